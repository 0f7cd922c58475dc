"""Inception-v3 ("Rethinking the Inception Architecture for Computer Vision", Szegedy et al., 2016).

Build it with ``models.inception_v3(...)`` or ``models.build_model("inception_v3", ...)``; print its
parameter and multiply-add table with ``python -m models.summary inception_v3 --image-size 299``.

With the defaults the ``state_dict`` has exactly the keys and shapes of torchvision's ``Inception3``
(27,161,264 parameters with 1000 classes and the auxiliary head, 23,834,568 without), so published
weights load with ``strict=True`` through ``models.load_weights`` and give the same outputs:
torchvision's ``inception_v3_google`` file (= timm's ``inception_v3.tv_in1k``) into the default model,
timm's ``gluon_in1k`` / ``tf_in1k`` files (saved without the auxiliary head) into ``aux_logits=False``.
Differences from torchvision:

- ``forward`` returns logits in every mode; ``forward(x, with_aux=True)`` returns
  ``ModelOutputs(logits, aux_logits)`` (and computes the auxiliary head whenever asked, in any mode).
- ``transform_input`` is off unless asked for. Google's ported weights expect inputs in [-1, 1]: turn it
  on (``transform_input=True``) when feeding ImageNet mean/std-normalized images to those weights.
- The auxiliary head also works below 299 px (its 5x5/3 pooling becomes adaptive when the 17x17 grid is
  smaller than 17), so every input from 75x75 up runs, with or without the head.
- Truncated normal init is cut at 2 std (TF's ``truncated_normal``; torchvision cuts at +-2 absolute),
  the aux 5x5 conv gets the intended std 0.01, and linear biases start at 0.

Ablation options (paper Table 3): ``stem="7x7"`` (the Inception-v2 baseline's single 7x7/2 conv instead
of the factorized 3x3 stack), ``aux_bn=False`` (the auxiliary head's fully connected layer without batch
norm), ``aux_logits=False``; plus ``width_mult`` for small experiments.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn

from models.inception_blocks import InceptionA, InceptionAux, InceptionB, InceptionC, InceptionD, InceptionE
from models.layers import (
    BasicConv2d,
    ModelOutputs,
    check_dropout,
    check_input_size,
    check_num_classes,
    check_width_mult,
    imagenet_to_unit_range,
    init_truncated_normal,
    scale_channels,
)

STEMS = ("factorized", "7x7")
# TF-slim train_image_classifier.py weighs the auxiliary cross-entropy by 0.4 (``weights=0.4``).
AUX_LOSS_WEIGHT = 0.4
# torchvision / TF-slim default std of the truncated normal init of every conv and linear layer.
INIT_STD = 0.1


class InceptionV3(nn.Module):
    """Inception-v3; see the module docstring. Shapes in comments are for a 299x299 input at width 1."""

    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        *,
        stem: str = "factorized",
        aux_bn: bool = True,
        width_mult: float = 1.0,
        dropout: float = 0.5,
        transform_input: bool = False,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        width_mult = check_width_mult(width_mult)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.num_classes = num_classes
        self.stem = stem
        self.width_mult = width_mult
        self.transform_input = bool(transform_input)
        self.aux_loss_weights: tuple[float, ...] = (AUX_LOSS_WEIGHT,) if aux_logits else ()

        def s(channels: int) -> int:
            return scale_channels(channels, width_mult)

        if stem == "factorized":  # paper section 6 / Table 1: the 7x7 conv factorized into three 3x3
            self.Conv2d_1a_3x3 = BasicConv2d(3, s(32), kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(s(32), s(32), kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(s(32), s(64), kernel_size=3, padding=1)
        else:  # Inception-v2 baseline (Table 3, row 1): one 7x7/2 conv, same 64 x 147 x 147 output
            self.Conv2d_1a_7x7 = BasicConv2d(3, s(64), kernel_size=7, stride=2)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(s(64), s(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(s(80), s(192), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(s(192), pool_features=32, scale=s)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, pool_features=64, scale=s)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, pool_features=64, scale=s)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, scale=s)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, channels_7x7=128, scale=s)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, channels_7x7=160, scale=s)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, channels_7x7=160, scale=s)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, channels_7x7=192, scale=s)
        grid17_channels = self.Mixed_6e.out_channels
        self.AuxLogits: InceptionAux | None = None
        if aux_logits:
            self.AuxLogits = InceptionAux(grid17_channels, num_classes, scale=s, fc_batch_norm=aux_bn)
        self.Mixed_7a = InceptionD(grid17_channels, scale=s)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, scale=s)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, scale=s)
        self.num_features = self.Mixed_7c.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.fc = nn.Linear(self.num_features, num_classes)
        init_truncated_normal(self, default_std=INIT_STD)

    def _forward_to_grid17(self, x: Tensor) -> Tensor:
        check_input_size(x, "inception_v3")
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        # N x 3 x 299 x 299
        if self.stem == "factorized":
            x = self.Conv2d_1a_3x3(x)
            # N x 32 x 149 x 149
            x = self.Conv2d_2a_3x3(x)
            # N x 32 x 147 x 147
            x = self.Conv2d_2b_3x3(x)
        else:
            x = self.Conv2d_1a_7x7(x)
        # N x 64 x 147 x 147
        x = self.maxpool1(x)
        # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)
        # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)
        # N x 192 x 71 x 71
        x = self.maxpool2(x)
        # N x 192 x 35 x 35
        x = self.Mixed_5b(x)
        # N x 256 x 35 x 35
        x = self.Mixed_5c(x)
        # N x 288 x 35 x 35
        x = self.Mixed_5d(x)
        # N x 288 x 35 x 35
        x = self.Mixed_6a(x)
        # N x 768 x 17 x 17
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)
        # N x 768 x 17 x 17 (the auxiliary head's input)
        return x

    def _forward_grid8(self, x: Tensor) -> Tensor:
        x = self.Mixed_7a(x)
        # N x 1280 x 8 x 8
        x = self.Mixed_7b(x)
        # N x 2048 x 8 x 8
        x = self.Mixed_7c(x)
        # N x 2048 x 8 x 8
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [N, 3, H, W] -> last feature map [N, num_features, H', W'] (8 x 8 at 299 px)."""
        return self._forward_grid8(self._forward_to_grid17(x))

    def forward_head(self, features: Tensor) -> Tensor:
        """Feature map -> logits [N, num_classes]: global average pool, dropout, fc."""
        x = torch.flatten(self.avgpool(features), 1)
        # N x 2048
        return self.fc(self.dropout(x))

    @overload
    def forward(self, x: Tensor, with_aux: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, with_aux: Literal[True]) -> ModelOutputs: ...

    def forward(self, x: Tensor, with_aux: bool = False) -> Tensor | ModelOutputs:
        """Logits [N, num_classes]; with ``with_aux=True`` ``ModelOutputs(logits, aux_logits)``."""
        x = self._forward_to_grid17(x)
        aux: tuple[Tensor, ...] = ()
        if with_aux and self.AuxLogits is not None:
            aux = (self.AuxLogits(x),)
        logits = self.forward_head(self._forward_grid8(x))
        return ModelOutputs(logits, aux) if with_aux else logits


def inception_v3(num_classes: int = 1000, aux_logits: bool = True, **options) -> InceptionV3:
    """Inception-v3; options: stem, aux_bn, width_mult, dropout, transform_input (see ``InceptionV3``)."""
    return InceptionV3(num_classes=num_classes, aux_logits=aux_logits, **options)
