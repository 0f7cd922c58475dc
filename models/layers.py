"""Building blocks shared by the networks in ``models/`` (imported, not run).

``BasicConv2d`` is torchvision's conv + BatchNorm(eps 0.001) + ReLU unit (its key names ``conv.*`` and
``bn.*`` are part of the weight-file contract); ``ModelOutputs`` is the typed result of
``model(x, with_aux=True)``; ``scale_channels`` implements the ``width_mult`` option.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Smallest spatial input every network here accepts (the paper's section 9 studies 79x79 inputs; 75 is
# the smallest size for which Inception-v3's last grid reduction, a 3x3 stride-2 valid conv, still fits).
MIN_INPUT_SIZE = 75

# width_mult rounds filter banks to multiples of 8 (every torchvision bank is one, so width 1.0 is
# exact) and never below 8 channels; the MobileNet-v2 ``_make_divisible`` rule.
CHANNEL_DIVISOR = 8

# Per-channel affine map that turns ImageNet mean/std-normalized input into the [-1, 1] scaling that
# Google's TF-ported weights expect (torchvision's ``transform_input``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelOutputs(NamedTuple):
    """What ``model(x, with_aux=True)`` returns: main logits [N, C] and one [N, C] per auxiliary head.

    ``aux_logits`` is an empty tuple for a model built without auxiliary heads; GoogLeNet has two
    (aux1 after inception4a, aux2 after inception4d), Inception-v3 one (after Mixed_6e).
    """

    logits: Tensor
    aux_logits: tuple[Tensor, ...]


class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d(eps=0.001) -> ReLU, torchvision's ``BasicConv2d``.

    ``batch_norm=False`` gives a conv with bias followed by ReLU (keys ``conv.weight``, ``conv.bias``),
    used by the paper's "auxiliary head without BN" ablation. ``init_std`` overrides the truncated-normal
    standard deviation used by ``init_truncated_normal`` for this conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        batch_norm: bool = True,
        init_std: float | None = None,
        **conv_kwargs,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=not batch_norm, **conv_kwargs)
        # eps 0.001: TF-slim's batch_norm default, kept by torchvision for the ported weights.
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001) if batch_norm else None
        if init_std is not None:
            self.conv.init_std = init_std

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


def scale_channels(channels: int, width_mult: float) -> int:
    """Filter-bank size for ``width_mult``: nearest multiple of 8, at least 8, never more than 10% below."""
    if width_mult == 1.0:
        return channels
    target = channels * width_mult
    scaled = max(CHANNEL_DIVISOR, int(target + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if scaled < 0.9 * target:
        scaled += CHANNEL_DIVISOR
    return scaled


def check_width_mult(width_mult: float) -> float:
    if not isinstance(width_mult, (int, float)) or not math.isfinite(width_mult) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number (1.0 = paper widths), got {width_mult!r}")
    return float(width_mult)


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def check_dropout(dropout: float) -> float:
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def check_input_size(x: Tensor, model_name: str) -> None:
    """Fail early with a readable message instead of a conv shape error deep inside the network."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{model_name} expects images [N, 3, H, W], got shape {tuple(x.shape)}")
    height, width = x.shape[-2], x.shape[-1]
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"{model_name} needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {height}x{width}: "
            "resize or crop to a larger size"
        )


def imagenet_to_unit_range(x: Tensor) -> Tensor:
    """Map ImageNet mean/std-normalized images to the [-1, 1] range of Google's ported weights.

    Equivalent to torchvision's ``_transform_input``: un-normalize with ImageNet statistics, then
    normalize with mean 0.5 / std 0.5 per channel.
    """
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


@torch.no_grad()
def init_truncated_normal(model: nn.Module, default_std: float) -> None:
    """Truncated-normal init of every Conv2d/Linear weight (cut at 2 std, TF's ``truncated_normal``).

    Per-layer ``init_std`` attributes override ``default_std``; biases start at 0 and BatchNorm at
    (weight 1, bias 0). Deterministic under ``torch.manual_seed``.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            truncated_normal_(module.weight, std=float(getattr(module, "init_std", default_std)))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def truncated_normal_(tensor: Tensor, std: float, cut: float = 2.0) -> Tensor:
    """Fill ``tensor`` in place from N(0, std^2) restricted to [-cut*std, cut*std].

    Inverse-CDF sampling (uniform in [Phi(-cut), Phi(cut)], then the normal quantile via erfinv): one
    pass over the tensor. ``torch.nn.init.trunc_normal_`` of torch 2.13 rejection-samples with
    repeated full-tensor passes and takes ~15 s for Inception-v3's 27 M weights on 2 cores.
    """
    low = 0.5 * (1.0 + math.erf(-cut / math.sqrt(2.0)))  # Phi(-cut)
    tensor.uniform_(2.0 * low - 1.0, 1.0 - 2.0 * low)  # erf-space image of [Phi(-cut), Phi(cut)]
    tensor.erfinv_().mul_(std * math.sqrt(2.0))
    return tensor.clamp_(-cut * std, cut * std)
