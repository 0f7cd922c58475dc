"""The one checkpoint format (docs/architecture.md, "Checkpoint"): a directory holding ``checkpoint.pt``.

Written by rank 0 of a training run, read by resume, the registry and evaluation. The directory
is what ``ray.train.Checkpoint.from_directory`` wraps. The file holds::

    format_version  int
    model_spec      {"name": "inception_v3", "num_classes": N, "options": {...}} -> models.build_model
    model           state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    ema             state_dict of the exponential moving average of the weights (what gets exported)
    optimizer       optimizer state_dict            scheduler  scheduler state_dict (or None)
    epoch           epochs completed                step       optimizer steps completed
    config          the resolved training config (plain dict)
    class_names     list of class names, index order
    metrics         last validation metrics (dict)
    extra           anything else the trainer needs to resume (RNG state, data position)

Only tensors and plain Python data (dict, list, tuple, str, int, float, bool, None) go in: the file
is read with ``torch.load(weights_only=True)``, which refuses anything else, so loading a checkpoint
from anywhere (``--model DIR``, a ``runs:/`` download, a resume) cannot run code from the file.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_spec", "model", "ema", "epoch", "step", "config", "class_names")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or of another format."""


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile wrapper prefixes and move tensors to CPU: the bare model's keys."""
    from models.weights import strip_wrapper_prefixes

    return {
        key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
        for key, value in strip_wrapper_prefixes(state).items()
    }


def save_checkpoint(directory: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``directory/checkpoint.pt`` atomically (temp file + rename)."""
    missing = [k for k in REQUIRED_KEYS if k != "format_version" and k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint payload lacks {missing}")
    payload = dict(payload, format_version=FORMAT_VERSION)
    payload["model"] = clean_state_dict(payload["model"])
    payload["ema"] = clean_state_dict(payload["ema"])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / CHECKPOINT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / CHECKPOINT_FILE


def refusal_reason(exc: BaseException) -> str:
    """What PyTorch's weights-only loader found, without its advice (load with ``weights_only=False``,
    or allowlist the global): the things a user handed a hostile file must not do."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"the file asks to call {found.group(1)}" if found else type(exc).__name__


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CHECKPOINT_FILE} in {directory}: not a checkpoint directory")
    try:
        # weights_only: tensors and plain data only; a file that holds anything else (a pickled object
        # whose loading would run code) is refused, so a checkpoint handed to us cannot execute code
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain data, and loading them "
            f"could run code ({refusal_reason(exc)}). Checkpoints written by this package never do; "
            "do not load it"
        ) from None
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({exc})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this format (a {type(payload).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this format (missing {missing})")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {payload['format_version']} != {FORMAT_VERSION}")
    return payload


def model_from_checkpoint(payload: dict[str, Any], weights: str = "ema") -> torch.nn.Module:
    """Rebuild the network of a checkpoint with its ``ema`` (default) or raw ``model`` weights (eval mode)."""
    import models

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    spec = payload["model_spec"]
    model = models.build_model(spec["name"], num_classes=spec["num_classes"], **spec.get("options", {}))
    model.load_state_dict(payload[weights], strict=True)
    return model.eval()
