"""The Inception-v3 modules (paper section 6, Figures 5-7 and 10; auxiliary head Figure 8).

Imported by ``models/inception_v3.py``. Class and attribute names are torchvision's
(``InceptionA``..``InceptionE``, ``InceptionAux``, ``branch7x7dbl_2``...) because they are the keys
of published weight files. Every block takes ``scale``, the ``width_mult`` channel map, and exposes
``out_channels`` so the network can chain blocks at any width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.layers import BasicConv2d

Scale = Callable[[int], int]


class InceptionA(nn.Module):
    """35x35 module (Figure 5): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1.

    The 5x5 branch is what the TF-ported weights contain (torchvision/TF-slim); the paper's Figure 5
    factorizes it into two 3x3s, which the third branch already is.
    """

    def __init__(self, in_channels: int, pool_features: int, scale: Scale) -> None:
        super().__init__()
        c64, c48, c96 = scale(64), scale(48), scale(96)
        self.branch1x1 = BasicConv2d(in_channels, c64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, c48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c48, c64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c64, c96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c96, c96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, scale(pool_features), kernel_size=1)
        self.out_channels = c64 + c64 + c96 + scale(pool_features)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Figure 10): stride-2 convs in parallel with a stride-2 max pool."""

    def __init__(self, in_channels: int, scale: Scale) -> None:
        super().__init__()
        c384, c64, c96 = scale(384), scale(64), scale(96)
        self.branch3x3 = BasicConv2d(in_channels, c384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c64, c96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c96, c96, kernel_size=3, stride=2)
        self.out_channels = c384 + c96 + in_channels

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """17x17 module with n x n convolutions factorized into 1x7 and 7x1 (Figure 6, n = 7)."""

    def __init__(self, in_channels: int, channels_7x7: int, scale: Scale) -> None:
        super().__init__()
        c7, c192 = scale(channels_7x7), scale(192)
        self.branch1x1 = BasicConv2d(in_channels, c192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, c192, kernel_size=1)
        self.out_channels = 4 * c192

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Figure 10 pattern with a factorized 7x7 branch)."""

    def __init__(self, in_channels: int, scale: Scale) -> None:
        super().__init__()
        c192, c320 = scale(192), scale(320)
        self.branch3x3_1 = BasicConv2d(in_channels, c192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c192, c320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, c192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c192, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c192, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c192, c192, kernel_size=3, stride=2)
        self.out_channels = c320 + c192 + in_channels

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """8x8 module with expanded filter banks (Figure 7): 1x3 and 3x1 outputs concatenated side by side."""

    def __init__(self, in_channels: int, scale: Scale) -> None:
        super().__init__()
        c320, c384, c448, c192 = scale(320), scale(384), scale(448), scale(192)
        self.branch1x1 = BasicConv2d(in_channels, c320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, c384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c448, c384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, c192, kernel_size=1)
        self.out_channels = c320 + 4 * c384 + c192

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the last 17x17 grid (Figure 8): avgpool 5/3 -> 1x1 conv -> 5x5 conv -> fc.

    The 5x5 conv covers the whole 5x5 pooled grid, so it is the head's fully connected layer; the
    paper's "BN-auxiliary" (Table 3) batch-normalizes it as well as the 1x1 conv. ``fc_batch_norm=False``
    is the ablation without it (``conv1`` becomes conv + bias + ReLU).
    """

    # TF-slim inception_v3: the aux 5x5 conv is initialized with stddev 0.01 and the aux logits with
    # 0.001. (torchvision sets ``stddev`` on the BasicConv2d wrapper, so its init loop never sees 0.01.)
    CONV1_INIT_STD = 0.01
    FC_INIT_STD = 0.001

    def __init__(self, in_channels: int, num_classes: int, scale: Scale, fc_batch_norm: bool = True) -> None:
        super().__init__()
        c128, c768 = scale(128), scale(768)
        self.conv0 = BasicConv2d(in_channels, c128, kernel_size=1)
        self.conv1 = BasicConv2d(
            c128, c768, kernel_size=5, batch_norm=fc_batch_norm, init_std=self.CONV1_INIT_STD
        )
        self.fc = nn.Linear(c768, num_classes)
        self.fc.init_std = self.FC_INIT_STD

    def forward(self, x: Tensor) -> Tensor:
        # N x 768 x 17 x 17 at 299 px; the grid is 3 x 3 at 75 px and 6 x 6 at 131 px
        if x.shape[-2] >= 17 and x.shape[-1] >= 17:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)  # paper Figure 8: 17x17 -> 5x5
        else:
            x = F.adaptive_avg_pool2d(x, (5, 5))  # small inputs: bring the grid to the 5x5 that conv1 spans
        # N x 768 x 5 x 5
        x = self.conv1(self.conv0(x))
        # N x 768 x 1 x 1 (more at inputs above 299)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.fc(x)
