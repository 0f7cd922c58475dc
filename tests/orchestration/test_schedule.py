"""Learning-rate schedule: linear scaling to the global batch, staircase x0.94 every 2 epochs, warm-up."""

from __future__ import annotations

import pytest
import torch

from orchestration.config import OptimConfig, ScheduleConfig
from orchestration.schedule import LrSchedule, scaled_lr, warmup_epochs


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_scaled_lr():
    assert scaled_lr(OptimConfig(), 32) == pytest.approx(0.045)
    assert scaled_lr(OptimConfig(), 64) == pytest.approx(0.09)
    assert scaled_lr(OptimConfig(), 1600) == pytest.approx(2.25)  # the paper's 50 x 32
    assert scaled_lr(OptimConfig(lr_scaling="sqrt"), 128) == pytest.approx(0.09)
    assert scaled_lr(OptimConfig(lr_scaling="none"), 1600) == pytest.approx(0.045)


def test_auto_warmup():
    assert warmup_epochs(ScheduleConfig(), 256) == 0.0
    assert warmup_epochs(ScheduleConfig(), 512) == 5.0
    assert warmup_epochs(ScheduleConfig(warmup_epochs=1.5), 64) == 1.5


def test_staircase_decay_every_two_epochs():
    opt = _opt()
    sched = LrSchedule(opt, 0.09, steps_per_epoch=10, cfg=ScheduleConfig(), warmup=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)
    lrs = {}
    for step in range(1, 61):
        sched.step()
        lrs[step] = opt.param_groups[0]["lr"]
    assert lrs[19] == pytest.approx(0.09)
    assert lrs[20] == pytest.approx(0.0846)  # 0.09 * 0.94
    assert lrs[39] == pytest.approx(0.0846)
    assert lrs[40] == pytest.approx(0.079524)  # 0.09 * 0.94^2
    assert lrs[60] == pytest.approx(0.07475256)  # 0.09 * 0.94^3


def test_linear_warmup_then_decay():
    opt = _opt()
    sched = LrSchedule(opt, 0.09, steps_per_epoch=10, cfg=ScheduleConfig(warmup_start_factor=0.1), warmup=1.0)
    assert sched.lr_at(0) == pytest.approx(0.009)
    assert sched.lr_at(5) == pytest.approx(0.0495)  # 0.09 * (0.1 + 0.9 * 0.5)
    assert sched.lr_at(10) == pytest.approx(0.09)
    assert sched.lr_at(20) == pytest.approx(0.0846)


def test_state_round_trip_and_mismatch():
    opt = _opt()
    sched = LrSchedule(opt, 0.09, 10, ScheduleConfig(), 0.0)
    for _ in range(25):
        sched.step()
    other = LrSchedule(_opt(), 0.09, 10, ScheduleConfig(), 0.0)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 25 and other.optimizer.param_groups[0]["lr"] == pytest.approx(0.0846)
    with pytest.raises(ValueError, match="steps per epoch"):
        LrSchedule(_opt(), 0.09, 11, ScheduleConfig(), 0.0).load_state_dict(sched.state_dict())
