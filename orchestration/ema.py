"""Exponential moving average of the weights: what gets evaluated and exported (paper §8).

Imported by ``orchestration.state``; tested against hand values in ``tests/orchestration/test_losses_ema.py``.

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
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    ``update`` is two fused multi-tensor kernels (``torch._foreach_lerp_`` over the floating-point
    entries, ``torch._foreach_copy_`` over the integer ones) on tensor lists built once per source
    model, as timm's ``ModelEmaV3`` does: Inception-v3 has ~580 state tensors, and a Python loop over
    them launched ~580 kernels per step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self._pairs: tuple[nn.Module, tuple[list[torch.Tensor], ...]] | None = None

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _tensor_lists(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """``(ema floats, model floats, ema others, model others)``, matched by state-dict key.

        The lists hold the tensors themselves (``keep_vars``), so they follow in-place changes of
        the model (optimizer steps, ``load_state_dict``); they are rebuilt for another model object."""
        if self._pairs is not None and self._pairs[0] is model:
            return self._pairs[1]
        source = model.state_dict(keep_vars=True)
        ema_floats, src_floats, ema_others, src_others = [], [], [], []
        for key, ema_value in self.module.state_dict(keep_vars=True).items():
            value = source[key]
            if ema_value.is_floating_point():
                if value.dtype != ema_value.dtype or value.device != ema_value.device:
                    raise ValueError(
                        f"EMA entry {key!r} is {ema_value.dtype} on {ema_value.device} but the model's is "
                        f"{value.dtype} on {value.device}: build the EMA after moving the model"
                    )
                ema_floats.append(ema_value)
                src_floats.append(value)
            else:
                ema_others.append(ema_value)
                src_others.append(value)
        lists = (ema_floats, src_floats, ema_others, src_others)
        self._pairs = (model, lists)
        return lists

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()  # TF: uses num_updates before incrementing
        ema_floats, src_floats, ema_others, src_others = self._tensor_lists(model)
        if ema_floats:
            torch._foreach_lerp_(ema_floats, src_floats, 1 - decay)
        if ema_others:
            torch._foreach_copy_(ema_others, src_others)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.num_updates = num_updates
