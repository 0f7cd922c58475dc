"""Learning-rate schedule of the paper, scaled to the global batch, with linear warm-up.

Used by ``orchestration.state`` (one ``LrSchedule`` per run, stepped after every optimizer step,
saved in every checkpoint). Tested against hand values in ``tests/orchestration/test_schedule.py``.

- Paper §8: lr 0.045, decayed every two epochs with an exponential rate of 0.94. TF-slim applies it as
  ``exponential_decay(..., staircase=True)``: the factor changes only at whole multiples of 2 epochs.
- Scaling: the paper ran 50 replicas of batch 32, each applying its own asynchronous updates at lr 0.045,
  i.e. 0.045 per batch-32 update. Synchronous data parallelism averages the replicas' gradients into
  one update of the global batch, so we follow the linear scaling rule (Goyal et al. 2017, "Accurate,
  Large Minibatch SGD"; timm applies it to ``rmsproptf`` too):
  ``lr = 0.045 * global_batch / 32`` (``optim.lr_scaling: sqrt`` uses the square root, ``none`` keeps 0.045).
- Warm-up: large scaled rates diverge early; Goyal et al. ramp linearly over 5 epochs. Default: no warm-up
  up to a global batch of 256, 5 epochs above it (``schedule.warmup_epochs`` overrides), starting at
  ``warmup_start_factor`` of the scaled rate.
"""

from __future__ import annotations

import math

import torch

from orchestration.config import OptimConfig, ScheduleConfig

WARMUP_FREE_GLOBAL_BATCH = 256  # Goyal et al. 2017: batch 256 trains without warm-up
DEFAULT_WARMUP_EPOCHS = 5.0  # Goyal et al. 2017 §2.2: gradual warm-up over 5 epochs


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    ratio = global_batch / cfg.lr_reference_batch
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def warmup_epochs(cfg: ScheduleConfig, global_batch: int) -> float:
    if cfg.warmup_epochs is not None:
        return cfg.warmup_epochs
    return 0.0 if global_batch <= WARMUP_FREE_GLOBAL_BATCH else DEFAULT_WARMUP_EPOCHS


class LrSchedule:
    """Step-indexed schedule; ``step()`` after each optimizer step sets the lr of the next one."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        steps_per_epoch: int,
        cfg: ScheduleConfig,
        warmup: float,
    ):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.steps_per_epoch = steps_per_epoch
        self.decay_rate = cfg.decay_rate
        self.decay_epochs = cfg.decay_epochs
        self.warmup_steps = int(round(warmup * steps_per_epoch))
        self.warmup_start_factor = cfg.warmup_start_factor
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        lr = self.base_lr * self.decay_rate ** math.floor(epoch / self.decay_epochs + 1e-9)  # staircase
        if step < self.warmup_steps:
            start = self.warmup_start_factor
            lr *= start + (1 - start) * step / self.warmup_steps
        return lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"checkpoint schedule has {state['steps_per_epoch']} steps per epoch, this run "
                f"{self.steps_per_epoch}: resume with the same data, batch size and number of workers"
            )
        self.last_step = int(state["last_step"])
        self._apply()
