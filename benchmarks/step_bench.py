"""Training-step throughput of a network under the product's own loop, on synthetic batches already
on the device: the "step alone" figures of ``make gpu-check`` (``benchmarks.gpu_check``).

No CLI; ``make gpu-check``'s ``train-step`` and ``peers`` steps call it. A step here is exactly
``orchestration.loop.train_one_epoch``'s step: forward with the auxiliary head, label-smoothed loss,
backward, gradient clipping, RMSpropTF (the paper recipe's optimizer), the moving average of the
weights, on a model, optimizer, schedule and EMA built by ``orchestration.state.build_train_state``
as in training. Peers (torchvision's and timm's
Inception-v3) run through the same loop behind ``PeerAdapter``, so only the network differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models import ModelOutputs
from orchestration.config import OptimConfig, ScheduleConfig
from orchestration.loop import LoopSettings, train_one_epoch
from orchestration.optim import loss_weight_decay
from orchestration.state import build_train_state, place_model

AUX_WEIGHT = 0.4  # TF-slim's weight of the auxiliary loss, as models.inception_v3.AUX_LOSS_WEIGHT


class RepeatLoader:
    """The same device batch ``steps`` times: a loader that costs nothing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
        self.images, self.labels, self.steps = images, labels, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels


class PeerAdapter(nn.Module):
    """A torchvision/timm Inception-v3 behind the models/ forward contract (``with_aux``).
    ``has_aux``: the peer returns ``(logits, aux_logits)`` in training mode (its loss then weighs the
    auxiliary head as ours does)."""

    def __init__(self, net: nn.Module, has_aux: bool) -> None:
        super().__init__()
        self.net = net
        self.aux_loss_weights = (AUX_WEIGHT,) if has_aux else ()

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        out = self.net(x)
        if isinstance(out, tuple):  # torchvision InceptionOutputs(logits, aux_logits) / timm (x, aux)
            logits, aux = out[0], out[1]
        else:
            logits, aux = out, None
        if not with_aux:
            return logits
        return ModelOutputs(logits, (aux,) if aux is not None else ())


@dataclass(frozen=True)
class StepSetting:
    name: str  # "float32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"
    amp: bool
    channels_last: bool
    compile: bool
    clip_mode: str | None = None  # None: the config's (per_tensor); "global" for the side-by-side

    def with_clip(self, mode: str) -> StepSetting:
        return StepSetting(f"{self.name} [{mode} clip]", self.amp, self.channels_last, self.compile, mode)


STEP_SETTINGS = (
    StepSetting("float32", amp=False, channels_last=False, compile=False),
    StepSetting("bf16", amp=True, channels_last=False, compile=False),
    StepSetting("bf16+channels_last", amp=True, channels_last=True, compile=False),
    StepSetting("bf16+channels_last+compile", amp=True, channels_last=True, compile=True),
)


def loop_settings_for(
    setting: StepSetting, device: torch.device, aux_weights: tuple[float, ...]
) -> LoopSettings:
    optim = OptimConfig()
    return LoopSettings(
        device=device,
        amp_dtype=torch.bfloat16 if setting.amp else None,
        channels_last=setting.channels_last,
        aux_weights=aux_weights,
        label_smoothing=optim.label_smoothing,
        clip_grad_norm=optim.clip_grad_norm,
        clip_mode=setting.clip_mode or optim.clip_mode,
        loss_weight_decay=loss_weight_decay(optim),
        log_every=10**9,
    )


def time_training_steps(
    build: Callable[[], nn.Module],
    setting: StepSetting,
    *,
    device: torch.device,
    batch: int,
    image_size: int,
    num_classes: int,
    steps: int,
    warmup: int,
) -> dict[str, float]:
    """Images/s of ``steps`` loop steps after ``warmup`` steps (compilation happens there)."""
    torch.manual_seed(0)
    model = place_model(build(), device, setting.channels_last)
    aux = tuple(getattr(model, "aux_loss_weights", ()))
    s = loop_settings_for(setting, device, aux)
    optim = OptimConfig()
    optimizer, schedule, ema = build_train_state(
        model, optim, ScheduleConfig(), base_lr=optim.lr, steps_per_epoch=steps + warmup
    ).parts()[1:]
    train_model = torch.compile(model) if setting.compile else model
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    if setting.channels_last:  # what the loader hands over with layout NHWC
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    start = time.perf_counter()
    train_one_epoch(train_model, RepeatLoader(images, labels, warmup), optimizer, schedule, ema, model, s, 0)
    warm_s = time.perf_counter() - start
    metrics, _ = train_one_epoch(
        train_model, RepeatLoader(images, labels, steps), optimizer, schedule, ema, model, s, warmup
    )
    out = {
        "images_per_s": metrics["train_images_per_sec"],
        "step_ms": 1000 * metrics["train_step_time_s"],
        "warmup_s": warm_s,
        "peak_memory_gib": metrics["peak_memory_mib"] / 1024,
        "loss": metrics["train_loss"],
    }
    del train_model, model, optimizer, schedule, ema
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if setting.compile:
        torch._dynamo.reset()
    return out
