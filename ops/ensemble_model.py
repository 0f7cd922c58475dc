"""The registered ensemble as an MLflow pyfunc model (docs/architecture.md, "Registered ensemble").

Not run directly: ``ops.registry.register_ensemble`` logs an :class:`EnsembleModel` with one
artifact per member (``member_<i>`` = model spec + EMA weights) and ``ensemble_config`` (class
names, preprocessing, crops); ``mlflow.pyfunc.load_model("models:/NAME@champion")`` and
``inception-serve`` (``ops.serving``) load it back. ``load_context`` builds every member once;
``predict`` runs per request: decode + crop (``pipeline.multicrop.preprocess_images``), every
member on every crop, softmax, mean over crops and members per image.

Request format for ``inception-serve --model models:/NAME@champion`` (``ops.serving``; POST
``/invocations``, ``Content-Type: application/json``; MLflow's scoring protocol). The input is one
DataFrame column ``image`` holding JPEG (or PNG) file bytes; in JSON, binary columns are base64 strings::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"], ["<base64 JPEG>"]]},
     "params": {"top_k": 5}}

    {"dataframe_records": [{"image": "<base64 JPEG>"}], "params": {"top_k": 3}}

The answer is ``{"predictions": [{"classes": [...], "indices": [...], "probabilities": [...]}, ...]}``,
one record per image with the ``top_k`` (default 5) classes, best first; ``"params": {"top_k": 0}``
gives every class in class order (the model's ``artifacts/ensemble_config.json``). A body without an
``image`` column, or with bytes that are not an image, is answered with HTTP 400 and a JSON
``message`` naming the missing column or the row (``row 0 of column 'image' is not a decodable
image ...``), never with the request's content (:class:`EnsembleInputError`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.multicrop import SUPPORTED_CROPS

CONFIG_ARTIFACT = "ensemble_config"
IMAGE_COLUMN = "image"
DEFAULT_TOP_K = 5  # the paper reports top-1 and top-5; top-5 is what serving returns by default
# Crops pushed through each member at once: Inception-v3's largest activation at 299 px is
# 64 x 147 x 147 float32 = 5.5 MB per crop, so 144 crops (one image at 144 crops) peak near 1 GB.
MAX_CROPS_PER_FORWARD = 144
MAX_ERROR_CHARS = 500  # an error reply names the problem; it never carries the request
# Images above this many pixels are refused before they are decoded (HTTP 400): a 108-megapixel
# JPEG decoded to 1.4 GB. Pillow's own bomb limit is 179 MP. Override with INCEPTION_SERVE_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "INCEPTION_SERVE_MAX_PIXELS"


def member_artifact(index: int) -> str:
    return f"member_{index}"


class EnsembleInputError(MlflowException):
    """A request the ensemble cannot answer (missing column, not an image, too many pixels): HTTP 400
    when served, with our message only.

    MLflow's scoring server rewrites the message of every ``MlflowException`` from ``predict`` to
    ``Failed to predict data '<the request>'. Error: <message>``; for ``inputs`` / ``instances``
    requests ``<the request>`` is the whole payload (a 100 kB image came back as 134 kB of base64).
    The message is fixed at construction: later rewrites are ignored, so a reply never echoes
    the request."""

    def __init__(self, message: str) -> None:
        self._own_message = None
        super().__init__(message[:MAX_ERROR_CHARS], error_code=INVALID_PARAMETER_VALUE)
        self._own_message = self._message

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = self._own_message if self._own_message is not None else str(value)[:MAX_ERROR_CHARS]


def _from_base64(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return base64.b64decode(bytes(value), validate=True)
        except (binascii.Error, ValueError):
            return bytes(value)  # raw image bytes
    return value


def _as_image_bytes(value: Any, row: int) -> bytes | np.ndarray:
    """One cell of the ``image`` column: bytes, base64 text (JSON clients) or a uint8 HWC array."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        # "inputs" / "instances" JSON requests reach predict as the base64 text's bytes (MLflow decodes
        # base64 for DataFrame requests only); raw JPEG/PNG bytes are never valid base64
        return _from_base64(bytes(value))
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise EnsembleInputError(f"row {row}: column 'image' is text but not base64 ({exc})") from exc
    raise EnsembleInputError(
        f"row {row}: column 'image' must hold JPEG bytes (base64 in JSON), got {type(value).__name__}"
    )


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """N Inception members averaged over K crops; see the module docstring for the request format."""

    def __init__(self) -> None:
        self.members: list[torch.nn.Module] = []
        self.class_names: list[str] = []
        self.data_config = None
        self.crops = 1
        self.device = torch.device("cpu")
        self.max_pixels = DEFAULT_MAX_PIXELS

    # ---- loading -------------------------------------------------------------------------------
    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        paths = [context.artifacts[member_artifact(i)] for i in range(len(config["members"]))]
        self.setup(config, paths)

    def setup(self, config: dict, member_paths: list[str], device: str | None = None) -> None:
        """Build every member from its artifact file (model spec + EMA weights), in eval mode."""
        from ops.checkpoint import model_from_checkpoint
        from pipeline.config import DataConfig

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Subnormal activations make CPU convolutions ~15x slower (measured: 61 vs 911 crops/s for the
        # demo member); flushing them to zero changes no prediction.
        torch.set_flush_denormal(True)
        self.class_names = list(config["class_names"])
        self.crops = int(config["crops"])
        self.max_pixels = int(os.environ.get(MAX_PIXELS_ENV) or DEFAULT_MAX_PIXELS)
        data = config["data"]
        self.data_config = DataConfig(
            image_size=data["image_size"], val_resize=data["val_resize"], normalization=data["normalization"]
        )
        self.members = []
        for path in member_paths:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            self.members.append(model_from_checkpoint(payload, weights="ema").to(self.device))

    # ---- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def member_probabilities(
        self, images: list[bytes | np.ndarray], crops: int | None = None
    ) -> torch.Tensor:
        """Per-member class probabilities averaged over the crops: [M, N, C] float32 on the CPU."""
        crops = crops or self.crops
        per_chunk = max(1, MAX_CROPS_PER_FORWARD // crops)
        out = []
        for start in range(0, len(images), per_chunk):
            chunk = [
                self._preprocess(images[i], i, crops)
                for i in range(start, min(start + per_chunk, len(images)))
            ]
            x = torch.cat(chunk).to(self.device, dtype=torch.float32)  # [n*K, 3, S, S]
            probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members])  # [M, n*K, C]
            out.append(probs.view(len(self.members), len(chunk), crops, -1).mean(dim=2).cpu())
        if not out:
            return torch.zeros(len(self.members), 0, len(self.class_names))
        return torch.cat(out, dim=1)

    def _preprocess(self, image: bytes | np.ndarray, row: int, crops: int) -> torch.Tensor:
        from pipeline.multicrop import preprocess_images

        try:
            return preprocess_images(
                [image], crops, self.data_config, max_pixels=self.max_pixels
            )  # [K, 3, S, S]
        except ValueError as exc:
            reason = str(exc).replace("images[0] ", "", 1)
            raise EnsembleInputError(f"row {row} of column 'image' {reason}") from exc

    def predict_images(
        self, images: list[bytes | np.ndarray], top_k: int = DEFAULT_TOP_K, crops: int | None = None
    ) -> pd.DataFrame:
        """Ensemble prediction for in-memory images (JPEG bytes or uint8 HWC arrays)."""
        probs = self.member_probabilities(images, crops).mean(dim=0)  # [N, C]: members averaged
        return self.format_predictions(probs, top_k)

    def format_predictions(self, probs: torch.Tensor, top_k: int) -> pd.DataFrame:
        if top_k <= 0:  # every class, in class order, named like the top-k answer
            n, names = probs.shape[0], list(self.class_names)
            return pd.DataFrame(
                {
                    "classes": [names] * n,
                    "indices": [list(range(len(names)))] * n,
                    "probabilities": [row.tolist() for row in probs.numpy()],
                }
            )
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return pd.DataFrame(
            {
                "classes": [[self.class_names[i] for i in row] for row in indices.tolist()],
                "indices": indices.tolist(),
                "probabilities": values.tolist(),
            }
        )

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:  # "inputs" / "instances" JSON
            model_input = pd.DataFrame({IMAGE_COLUMN: list(model_input[IMAGE_COLUMN])})
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            got = (  # counted, not named: a column name is the request's text
                f"{len(model_input.columns)} other column(s)"
                if isinstance(model_input, pd.DataFrame)
                else type(model_input).__name__
            )
            raise EnsembleInputError(
                f"input must be a DataFrame with a column 'image' of JPEG bytes, got {got}"
            )
        top_k = (params or {}).get("top_k", DEFAULT_TOP_K)
        try:
            top_k = int(top_k)
        except (TypeError, ValueError):
            raise EnsembleInputError("params.top_k must be an integer") from None
        if top_k < 0:
            raise EnsembleInputError(f"params.top_k must be >= 0 (0: every class's probability), got {top_k}")
        crops = (params or {}).get("crops") or self.crops  # 0 / absent: the version's own setting
        try:
            crops = int(crops)
        except (TypeError, ValueError):
            raise EnsembleInputError("params.crops must be 1, 10 or 144") from None
        if crops not in SUPPORTED_CROPS:
            raise EnsembleInputError(
                f"params.crops must be 1, 10 or 144 (0: the version's {self.crops}), got {crops}"
            )
        if len(model_input) == 0:  # the same answer for every request format
            raise EnsembleInputError("the request holds no images")
        images = [_as_image_bytes(v, i) for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())]
        return self.predict_images(images, top_k=top_k, crops=crops)
