"""GoogLeNet / Inception-v1 ("Going deeper with convolutions", Szegedy et al., 2014), v3's predecessor.

Build it with ``models.googlenet(...)`` or ``models.build_model("googlenet", ...)``; print its table
with ``python -m models.summary googlenet --image-size 224``.

The key layout is torchvision's ``GoogLeNet`` (``conv1``..``conv3``, ``inception3a``..``inception5b``
with ``branch1``..``branch4``, ``aux1``/``aux2`` with ``conv``, ``fc1``, ``fc2``, and ``fc``), with its
batch-normalized convolutions (BN postdates the paper; torchvision's TF-ported weights have it).
22 layers with parameters, 1x1 reductions before the 3x3 and 5x5 convolutions, max-pool projection
(paper Table 1), two auxiliary classifiers (after 4a and 4d) whose losses are weighted 0.3 and which
are dropped at inference (``model(x)`` never computes them).

torchvision uses a 3x3 kernel in the "5x5" branch (a known bug kept for its weights,
pytorch/vision#906). The default here is the paper's 5x5 (``branch3_kernel=5``);
``branch3_kernel=3`` reproduces torchvision's layout exactly so its weights load.

torchvision also pools differently from the paper in two places (no parameters are involved, so
weights load either way): the auxiliary heads pool adaptively to 4x4 where the paper uses 5x5
average pooling with stride 3 (4x4 from the 14x14 grid at 224 px), and ``maxpool4`` is 2x2/2 where
the paper's Table 1 has 3x3/2. ``pooling="paper"`` (the default) follows the paper (the auxiliary
pooling stays adaptive at input sizes whose grid is not 14x14, where 5x5/3 would not give 4x4);
``pooling="torchvision"`` reproduces torchvision's outputs.

Parameters with 1000 classes:
    branch3_kernel=5 (paper):       7,005,832 with aux heads 13,385,816
    branch3_kernel=3 (torchvision): 6,624,904 with aux heads 13,004,888
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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

# paper section 5: "the losses of the auxiliary classifiers were weighted by 0.3"
AUX_LOSS_WEIGHT = 0.3
# torchvision GoogLeNet._initialize_weights: truncnorm(-2, 2, scale=0.01)
INIT_STD = 0.01

# Paper Table 1 filter banks: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj)
INCEPTION_BANKS = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class Inception(nn.Module):
    """Inception module with dimension reductions (paper Figure 2b)."""

    def __init__(self, in_channels: int, banks: tuple[int, ...], branch3_kernel: int) -> None:
        super().__init__()
        ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = banks
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=branch3_kernel, padding=branch3_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (paper section 5): avgpool to 4x4, 1x1 conv 128, fc 1024, dropout 0.7, fc."""

    def __init__(self, in_channels: int, num_classes: int, scale, paper_pool: bool = True) -> None:
        super().__init__()
        self.paper_pool = paper_pool
        c128, c1024 = scale(128), scale(1024)
        self.conv = BasicConv2d(in_channels, c128, kernel_size=1)
        self.fc1 = nn.Linear(c128 * 4 * 4, c1024)
        self.fc2 = nn.Linear(c1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # N x 512 x 14 x 14 (aux1) / N x 528 x 14 x 14 (aux2); paper: 5x5/3 average pooling -> 4x4
        if self.paper_pool and x.shape[-2:] == (14, 14):
            x = F.avg_pool2d(x, kernel_size=5, stride=3)
        else:  # torchvision's layout, and the paper's at other input sizes
            x = F.adaptive_avg_pool2d(x, (4, 4))
        x = torch.flatten(self.conv(x), 1)
        # N x 2048
        x = F.relu(self.fc1(x), inplace=True)
        x = F.dropout(x, 0.7, training=self.training)  # paper: 70% dropped outputs
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """GoogLeNet; see the module docstring. Shapes in comments are for a 224x224 input at width 1."""

    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        *,
        branch3_kernel: int = 5,
        width_mult: float = 1.0,
        dropout: float = 0.4,
        transform_input: bool = False,
        pooling: str = "paper",
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        width_mult = check_width_mult(width_mult)
        if branch3_kernel not in (3, 5):
            raise ValueError(f"branch3_kernel must be 5 (paper) or 3 (torchvision), got {branch3_kernel!r}")
        if pooling not in ("paper", "torchvision"):
            raise ValueError(f"pooling must be 'paper' or 'torchvision', got {pooling!r}")
        self.pooling = pooling
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.transform_input = bool(transform_input)
        self.aux_loss_weights: tuple[float, ...] = (AUX_LOSS_WEIGHT, AUX_LOSS_WEIGHT) if aux_logits else ()

        def s(channels: int) -> int:
            return scale_channels(channels, width_mult)

        self.conv1 = BasicConv2d(3, s(64), kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(s(64), s(64), kernel_size=1)
        self.conv3 = BasicConv2d(s(64), s(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels = s(192)
        for name, banks in INCEPTION_BANKS.items():
            module = Inception(channels, tuple(s(c) for c in banks), branch3_kernel)
            setattr(self, name, module)
            channels = module.out_channels
            if name == "inception3b":
                self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            elif name == "inception4e":
                kernel = 3 if pooling == "paper" else 2  # paper Table 1: 3x3/2; torchvision: 2x2/2
                self.maxpool4 = nn.MaxPool2d(kernel, stride=2, ceil_mode=True)
        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        if aux_logits:
            paper_pool = pooling == "paper"
            self.aux1 = InceptionAux(self.inception4a.out_channels, num_classes, s, paper_pool)
            self.aux2 = InceptionAux(self.inception4d.out_channels, num_classes, s, paper_pool)
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(check_dropout(dropout))  # paper: 40%; torchvision: 20%
        self.fc = nn.Linear(channels, num_classes)
        init_truncated_normal(self, default_std=INIT_STD)

    def _forward_to_4a(self, x: Tensor) -> Tensor:
        check_input_size(x, "googlenet")
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        # N x 3 x 224 x 224
        x = self.maxpool1(self.conv1(x))
        # N x 64 x 56 x 56
        x = self.maxpool2(self.conv3(self.conv2(x)))
        # N x 192 x 28 x 28
        x = self.inception3b(self.inception3a(x))
        # N x 480 x 28 x 28
        x = self.inception4a(self.maxpool3(x))
        # N x 512 x 14 x 14 (aux1's input)
        return x

    def _forward_4b_to_4d(self, x: Tensor) -> Tensor:
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        # N x 528 x 14 x 14 (aux2's input)
        return x

    def _forward_4e_to_5b(self, x: Tensor) -> Tensor:
        x = self.maxpool4(self.inception4e(x))
        # N x 832 x 7 x 7
        x = self.inception5b(self.inception5a(x))
        # N x 1024 x 7 x 7
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [N, 3, H, W] -> last feature map [N, num_features, H', W'] (7 x 7 at 224 px)."""
        return self._forward_4e_to_5b(self._forward_4b_to_4d(self._forward_to_4a(x)))

    def forward_head(self, features: Tensor) -> Tensor:
        """Feature map -> logits [N, num_classes]: global average pool, dropout, fc."""
        x = torch.flatten(self.avgpool(features), 1)
        return self.fc(self.dropout(x))

    @overload
    def forward(self, x: Tensor, with_aux: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, with_aux: Literal[True]) -> ModelOutputs: ...

    def forward(self, x: Tensor, with_aux: bool = False) -> Tensor | ModelOutputs:
        """Logits [N, num_classes]; with ``with_aux=True`` ``ModelOutputs(logits, (aux1, aux2))``."""
        use_aux = with_aux and self.aux1 is not None and self.aux2 is not None
        x = self._forward_to_4a(x)
        aux1 = self.aux1(x) if use_aux else None
        x = self._forward_4b_to_4d(x)
        aux2 = self.aux2(x) if use_aux else None
        logits = self.forward_head(self._forward_4e_to_5b(x))
        if not with_aux:
            return logits
        return ModelOutputs(logits, (aux1, aux2) if use_aux else ())


def googlenet(num_classes: int = 1000, aux_logits: bool = True, **options) -> GoogLeNet:
    """GoogLeNet; options: branch3_kernel, pooling, width_mult, dropout, transform_input (``GoogLeNet``)."""
    return GoogLeNet(num_classes=num_classes, aux_logits=aux_logits, **options)
