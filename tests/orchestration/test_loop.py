"""The per-worker loop without Ray: metrics, step counting, log cadence, failure injection, evaluation."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from models import ModelOutputs
from orchestration.config import ScheduleConfig
from orchestration.ema import ModelEma
from orchestration.loop import InjectedFailure, LoopSettings, evaluate, model_input, train_one_epoch
from orchestration.optim import RMSpropTF
from orchestration.schedule import LrSchedule


class _TwoHead(nn.Module):
    """A linear classifier with one auxiliary head, speaking the models/ forward contract."""

    aux_loss_weights = (0.4,)

    def __init__(self):
        super().__init__()
        self.fc, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, with_aux=False):
        x = x.flatten(1)
        return ModelOutputs(self.fc(x), (self.aux(x),)) if with_aux else self.fc(x)


class _SlowLoader:
    """Separable 3-class data; each batch takes ``delay`` seconds to arrive."""

    def __init__(self, batches=6, delay=0.0):
        g = torch.Generator().manual_seed(0)
        self.labels = [torch.randint(0, 3, (8,), generator=g) for _ in range(batches)]
        self.delay = delay

    def __len__(self):
        return len(self.labels)

    def __iter__(self):
        for y in self.labels:
            time.sleep(self.delay)
            x = torch.nn.functional.one_hot(y, 4).float() * 3.0  # class k lights feature k
            yield x, y


def _setup(**settings):
    torch.manual_seed(0)
    model = _TwoHead()
    opt = RMSpropTF(model.parameters(), lr=0.1)
    sched = LrSchedule(opt, 0.1, 6, ScheduleConfig(), 0.0)
    base = dict(
        device=torch.device("cpu"),
        amp_dtype=None,
        channels_last=False,
        aux_weights=(0.4,),
        label_smoothing=0.1,
        clip_grad_norm=2.0,
    )
    return model, opt, sched, LoopSettings(**{**base, **settings})


def test_epoch_metrics_and_log_cadence():
    model, opt, sched, s = _setup(log_every=2)
    ema = ModelEma(model, 0.9, warmup=False)
    logs = []
    metrics, step = train_one_epoch(
        model, _SlowLoader(delay=0.02), opt, sched, ema, model, s, 10, on_log=lambda m, k: logs.append((k, m))
    )
    assert step == 16 and ema.num_updates == 6 and sched.last_step == 6
    assert [k for k, _ in logs] == [12, 14, 16]
    assert set(logs[0][1]) == {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/images_per_sec",
        "train/loader_wait_frac",
        "train/step_time_s",
        "train/peak_memory_mib",
    }
    assert 0.3 < metrics["train_loader_wait_frac"] < 1.0  # 20 ms of waiting in a few-ms step
    assert metrics["train_images_per_sec"] == pytest.approx(48 / metrics["train_epoch_time_s"], rel=1e-6)
    assert metrics["peak_memory_mib"] > 0 and metrics["lr"] == pytest.approx(0.1)


def test_learns_and_evaluates():
    model, opt, sched, s = _setup()
    first, _ = train_one_epoch(model, _SlowLoader(), opt, sched, None, model, s, 0)
    for _ in range(4):
        last, _ = train_one_epoch(model, _SlowLoader(), opt, sched, None, model, s, 0)
    assert last["train_loss"] < first["train_loss"]
    val = evaluate(model, _SlowLoader(), s)
    assert val["count"] == 48 and val["top1"] == 1.0 and val["top5"] == 1.0  # k = min(5, classes) = 3


def test_max_steps_and_failure_injection(tmp_path):
    marker = tmp_path / "marker"
    model, opt, sched, s = _setup(max_steps=4, fail_at_step=3, fail_marker=str(marker))
    with pytest.raises(InjectedFailure, match="fail_at_step=3"):
        train_one_epoch(model, _SlowLoader(), opt, sched, None, model, s, 0)
    assert marker.read_text() == "failed at step 3\n"
    _, step = train_one_epoch(
        model, _SlowLoader(), opt, sched, None, model, s, 0
    )  # marker: no second failure
    assert step == 4


def test_grad_norm_is_logged_before_clipping():
    # clipping off: the gradients stay as computed, so they can be read back
    model, opt, sched, s = _setup(clip_grad_norm=0.0, log_every=1, max_steps=1)
    logs = []
    train_one_epoch(model, _SlowLoader(), opt, sched, None, model, s, 0, on_log=lambda m, k: logs.append(m))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert logs[0]["train/grad_norm"] == pytest.approx(float(norm), rel=1e-6) and float(norm) > 0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layouts_and_dtypes_train_end_to_end(tmp_path, layout, dtype):
    """DALI (CPU) batches in either memory order and dtype through the real network and loop: NHWC
    reaches a channels_last model without a copy; float16 batches train with AMP off."""
    import models
    from pipeline import DataConfig, make_loader
    from tests.pipeline.shard_fixtures import write_coded_shards

    write_coded_shards(tmp_path, {"train": 16}, num_classes=4, shard_size=8)
    cfg = DataConfig(
        shards=str(tmp_path), batch_size=4, image_size=80, val_resize=90, layout=layout, dtype=dtype
    )
    loader = make_loader(cfg, "train", 0, 1, "cpu")
    x, _ = next(iter(loader))
    assert x.shape == (4, 3, 80, 80) and x.dtype == getattr(torch, dtype)
    s = LoopSettings(
        device=torch.device("cpu"),
        amp_dtype=None,
        channels_last=layout == "NHWC",
        aux_weights=(0.4,),
        label_smoothing=0.1,
        clip_grad_norm=2.0,
    )
    assert (model_input(x, s).data_ptr() == x.data_ptr()) == (dtype == "float32")  # no layout copy
    torch.manual_seed(0)
    model = models.inception_v3(num_classes=4, width_mult=0.25)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = RMSpropTF(model.parameters(), lr=0.01)
    sched = LrSchedule(opt, 0.01, len(loader), ScheduleConfig(), 0.0)
    metrics, step = train_one_epoch(model, loader, opt, sched, ModelEma(model, 0.9), model, s, 0)
    assert step == 4 and math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    val = evaluate(model, loader, s)
    assert val["count"] == 16


def test_progress_lines_inside_an_epoch():
    """Before: nothing between epoch lines (hours on ImageNet). Every interval: steps done, images/s
    and the loader's share of it, and the window metrics still get their whole loader wait."""
    model, opt, sched, s = _setup(log_every=3, progress_every_s=0.05)
    beats, logs = [], []
    metrics, _ = train_one_epoch(
        model,
        _SlowLoader(batches=6, delay=0.06),  # every step takes > 0.05 s: a line after each
        opt,
        sched,
        None,
        model,
        s,
        0,
        on_log=lambda m, k: logs.append(m),
        on_progress=lambda *a: beats.append(a),
    )
    assert [b[0] for b in beats] == [1, 2, 3, 4, 5, 6]
    for _, rate, wait in beats:
        assert 8 / 0.2 < rate < 8 / 0.05 and 0.5 < wait <= 1.0  # 8 images per ~0.06 s, mostly waiting
    assert all(0.5 < m["train/loader_wait_frac"] <= 1.0 for m in logs)  # not taken by the progress lines
    assert 0.5 < metrics["train_loader_wait_frac"] <= 1.0
    off = []
    model, opt, sched, s = _setup(progress_every_s=0.0)
    train_one_epoch(model, _SlowLoader(delay=0.06), opt, sched, None, model, s, 0, on_progress=off.append)
    assert off == []
