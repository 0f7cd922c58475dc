"""Exponential moving average of the weights: what gets evaluated and exported (paper §8).

Imported by ``orchestration.trainer``; tested against hand values in ``tests/orchestration/test_ema.py``.

Like TF's ``tf.train.ExponentialMovingAverage(decay, num_updates)`` as TF-slim used it, the average
covers every floating-point entry of the state dict (parameters and batch-norm moving statistics;
integer buffers such as ``num_batches_tracked`` are copied), and with ``warmup`` the effective decay
is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates so that early averages are not dominated
by the random initialisation. Same rule as timm's ``ModelEmaV2``/``ModelEmaV3`` with warm-up off/on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()  # TF: uses num_updates before incrementing
        source = model.state_dict()
        for key, ema_value in self.module.state_dict().items():
            value = source[key].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1 - decay)
            else:
                ema_value.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.num_updates = num_updates
