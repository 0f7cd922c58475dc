"""Load weight files in torchvision / timm layout into the networks of ``models/``.

Used from Python (training's fine-tune start, the registry); not run on its own::

    model = models.inception_v3(transform_input=True).eval()
    models.load_weights(model, "inception_v3_google-0cc3c7bd.pth")   # torchvision's file, strict

Accepts a path (``.pth`` / ``.pt`` / ``.bin`` pickled state dicts, read with ``weights_only=True``;
``.safetensors`` when the ``safetensors`` package is installed) or an in-memory state dict. Strips
``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes and unwraps ``{"state_dict": ...}``-style
containers. Any missing, unexpected or mis-shaped key is an error that lists the first few of each
and their counts; ``strict=False`` loads the matching keys and reports the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "ema")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SHOWN_KEYS = 5  # how many keys of each kind an error message lists


class WeightLoadError(RuntimeError):
    """A weight file cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What ``load_weights`` did: keys loaded and, with ``strict=False``, what was left out."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        if self.missing:
            title = f"{len(self.missing)} missing key(s) (in the model, not in the weights)"
            parts.append(_listing(title, self.missing))
        if self.unexpected:
            title = f"{len(self.unexpected)} unexpected key(s) (in the weights, not in the model)"
            parts.append(_listing(title, self.unexpected))
        if self.mismatched:
            shown = [f"{k}: weights {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            parts.append(_listing(f"{len(self.mismatched)} key(s) with mismatched shapes", shown))
        return "; ".join(parts) if parts else f"all {len(self.loaded)} keys loaded"


def _listing(title: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else ""
    return f"{title}: {', '.join(items[:SHOWN_KEYS])}{more}"


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes (in any nesting)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A flat ``{key: tensor}`` from a file path or a (possibly wrapped) state dict."""
    if isinstance(source, (str, Path)):
        state = _read_file(Path(source))
    elif isinstance(source, Mapping):
        state = source
    else:
        raise WeightLoadError(f"weights source must be a path or a state dict, got {type(source).__name__}")
    state = _unwrap_container(state, str(source) if isinstance(source, (str, Path)) else "state dict")
    return strip_wrapper_prefixes(state)


def _read_file(path: Path) -> Mapping:
    if not path.is_file():
        raise WeightLoadError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise WeightLoadError(f"{path}: reading .safetensors needs `pip install safetensors`") from exc
        return load_file(str(path))
    if path.suffix not in PICKLE_SUFFIXES:
        raise WeightLoadError(f"{path}: unsupported weight file type {path.suffix!r} (use {PICKLE_SUFFIXES})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightLoadError(
            f"{path}: cannot be read as a PyTorch state dict with weights_only=True ({exc})"
        ) from exc


def _unwrap_container(state: Mapping, origin: str) -> Mapping:
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"{origin}: holds a {type(state).__name__}, not a state dict")
    while state and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise WeightLoadError(
                f"{origin}: no tensors at the top level and none of the container keys {CONTAINER_KEYS} "
                f"(top-level keys: {list(state)[:SHOWN_KEYS]})"
            )
        state = inner
    if not state:
        raise WeightLoadError(f"{origin}: the state dict is empty")
    return state


def compare_state_dicts(model: nn.Module, state: Mapping[str, Tensor]) -> LoadReport:
    """Which keys of ``state`` fit ``model`` and which are missing, unexpected or mis-shaped."""
    expected = model.state_dict()
    report = LoadReport()
    for key, value in state.items():
        if key not in expected:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(expected[key].shape)))
        else:
            report.loaded.append(key)
    # BatchNorm fills in num_batches_tracked for files saved before it existed (torchvision's Inception).
    report.missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    return report


def _hint(report: LoadReport) -> str:
    heads = ("fc.", "AuxLogits.fc.", "aux1.fc2.", "aux2.fc2.")
    if report.mismatched and all(k.startswith(heads) for k, _, _ in report.mismatched):
        return " Only the classifier differs: build with the file's num_classes, or pass strict=False."
    aux = ("AuxLogits.", "aux1.", "aux2.")
    if report.unexpected and all(k.startswith(aux) for k in report.unexpected):
        return " The file has auxiliary heads: build the model with aux_logits=True, or pass strict=False."
    if report.missing and all(k.startswith(aux) for k in report.missing):
        return " The file has no auxiliary heads: build with aux_logits=False, or pass strict=False."
    return " Check the model name and options (stem, width_mult, branch3_kernel) against the file."


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, Tensor], strict: bool = True
) -> LoadReport:
    """Copy the weights of ``source`` into ``model``.

    ``strict=True``: every model key must be present with the same shape and no extra keys may be
    left over, or ``WeightLoadError`` lists them. ``strict=False``: loads the keys that fit and returns
    the report of the others (mis-shaped keys are skipped, e.g. a 1000-class head into a 10-class model).
    """
    state = read_state_dict(source)
    report = compare_state_dicts(model, state)
    if strict and not report.ok:
        origin = str(source) if isinstance(source, (str, Path)) else "state dict"
        raise WeightLoadError(
            f"weights from {origin} do not fit {type(model).__name__}: {report.describe()}.{_hint(report)}"
        )
    fitting = {k: state[k] for k in report.loaded}
    model.load_state_dict(fitting, strict=False)
    return report
