"""What one training run updates: the model, its optimizer, its learning-rate schedule and the
moving average of its weights, built in one place.

Library module, no CLI. ``orchestration.worker`` (the Ray Train worker), the step benchmark
(``benchmarks.step_bench``) and ``make gpu-check`` all build their state with ``build_train_state``,
so a benchmark's step is the product's step. No gradient scaler: training runs in bfloat16 autocast
on GPUs (the paper recipe's setting), which keeps float32's exponent range and needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orchestration.config import EmaConfig, OptimConfig, ScheduleConfig
from orchestration.ema import ModelEma
from orchestration.optim import build_optimizer
from orchestration.schedule import LrSchedule


@dataclass
class TrainState:
    """The live objects of a run; ``ema`` is None when the moving average is off."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    ema: ModelEma | None

    def parts(self) -> tuple[nn.Module, torch.optim.Optimizer, LrSchedule, ModelEma | None]:
        """``(model, optimizer, schedule, ema)``: the order ``restore_training_state`` takes them in."""
        return self.model, self.optimizer, self.schedule, self.ema


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Every BatchNorm's running-average momentum (``model.bn_momentum``); returns how many."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = momentum
    return len(norms)


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on ``device``, in channels-last memory when the step computes in it (the default on
    CUDA: cuDNN's fastest convolutions for bf16)."""
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def build_train_state(
    model: nn.Module,
    optim: OptimConfig,
    schedule: ScheduleConfig,
    *,
    base_lr: float,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    ema: EmaConfig | None = None,
) -> TrainState:
    """Optimizer, schedule and EMA around ``model`` (already on its device: the EMA copies it there).

    ``base_lr`` is the learning rate already scaled to the global batch
    (``orchestration.schedule.scaled_lr``); ``steps_per_epoch`` sets the schedule's epoch length;
    ``ema=None`` takes ``EmaConfig()`` (on, decay 0.9999 with warm-up: the paper recipe's)."""
    ema = ema if ema is not None else EmaConfig()
    average = ModelEma(model, ema.decay, ema.warmup) if ema.enabled else None
    optimizer = build_optimizer(model, optim, base_lr)
    lr_schedule = LrSchedule(optimizer, base_lr, steps_per_epoch, schedule, warmup_epochs)
    return TrainState(model, optimizer, lr_schedule, average)
