"""Read the golden torchvision layouts in ``tests/models/golden/`` (made by ``golden/make_golden.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def golden_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """``name`` is ``inception3`` or ``googlenet``; returns [(key, shape)] in torchvision's order."""
    entries = json.loads((GOLDEN_DIR / f"torchvision_{name}.json").read_text())
    return [(key, tuple(shape)) for key, shape in entries]


def layout_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def parameter_count(layout: list[tuple[str, tuple[int, ...]]]) -> int:
    """Trainable parameters of a layout: everything but BatchNorm buffers."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(shape) for key, shape in layout if not key.endswith(buffers))


def random_state_dict(layout, seed: int = 0, with_bn_counters: bool = True) -> dict[str, torch.Tensor]:
    """A state dict shaped like ``layout`` (what a published weight file holds), with random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            if with_bn_counters:
                state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state
