"""Regenerate the golden state_dict layouts of torchvision's Inception3 and GoogLeNet.

Run from the repository root:  ``.venv/bin/python tests/models/golden/make_golden.py``

torchvision cannot be installed next to the CPU torch of this project, so this script transcribes
the constructor calls of torchvision's ``models/inception.py`` (``Inception3``, ``InceptionA``..``E``,
``InceptionAux``, ``BasicConv2d``) and ``models/googlenet.py`` (``GoogLeNet``, ``Inception``,
``InceptionAux``) line by line, independently of ``models/``, and writes the keys and shapes that
``state_dict()`` of those classes has (1000 classes, auxiliary heads on). The tests compare our
models against these files, so a layout drift in ``models/`` cannot hide behind its own output.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def basic_conv(prefix: str, cin: int, cout: int, k) -> list:
    """torchvision BasicConv2d: Conv2d(bias=False) + BatchNorm2d(eps=0.001)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return [
        [f"{prefix}.conv.weight", [cout, cin, kh, kw]],
        [f"{prefix}.bn.weight", [cout]],
        [f"{prefix}.bn.bias", [cout]],
        [f"{prefix}.bn.running_mean", [cout]],
        [f"{prefix}.bn.running_var", [cout]],
        [f"{prefix}.bn.num_batches_tracked", []],
    ]


def linear(prefix: str, cin: int, cout: int) -> list:
    return [[f"{prefix}.weight", [cout, cin]], [f"{prefix}.bias", [cout]]]


def inception_a(p: str, cin: int, pool_features: int) -> list:
    return (
        basic_conv(f"{p}.branch1x1", cin, 64, 1)
        + basic_conv(f"{p}.branch5x5_1", cin, 48, 1)
        + basic_conv(f"{p}.branch5x5_2", 48, 64, 5)
        + basic_conv(f"{p}.branch3x3dbl_1", cin, 64, 1)
        + basic_conv(f"{p}.branch3x3dbl_2", 64, 96, 3)
        + basic_conv(f"{p}.branch3x3dbl_3", 96, 96, 3)
        + basic_conv(f"{p}.branch_pool", cin, pool_features, 1)
    )


def inception_b(p: str, cin: int) -> list:
    return (
        basic_conv(f"{p}.branch3x3", cin, 384, 3)
        + basic_conv(f"{p}.branch3x3dbl_1", cin, 64, 1)
        + basic_conv(f"{p}.branch3x3dbl_2", 64, 96, 3)
        + basic_conv(f"{p}.branch3x3dbl_3", 96, 96, 3)
    )


def inception_c(p: str, cin: int, c7: int) -> list:
    return (
        basic_conv(f"{p}.branch1x1", cin, 192, 1)
        + basic_conv(f"{p}.branch7x7_1", cin, c7, 1)
        + basic_conv(f"{p}.branch7x7_2", c7, c7, (1, 7))
        + basic_conv(f"{p}.branch7x7_3", c7, 192, (7, 1))
        + basic_conv(f"{p}.branch7x7dbl_1", cin, c7, 1)
        + basic_conv(f"{p}.branch7x7dbl_2", c7, c7, (7, 1))
        + basic_conv(f"{p}.branch7x7dbl_3", c7, c7, (1, 7))
        + basic_conv(f"{p}.branch7x7dbl_4", c7, c7, (7, 1))
        + basic_conv(f"{p}.branch7x7dbl_5", c7, 192, (1, 7))
        + basic_conv(f"{p}.branch_pool", cin, 192, 1)
    )


def inception_d(p: str, cin: int) -> list:
    return (
        basic_conv(f"{p}.branch3x3_1", cin, 192, 1)
        + basic_conv(f"{p}.branch3x3_2", 192, 320, 3)
        + basic_conv(f"{p}.branch7x7x3_1", cin, 192, 1)
        + basic_conv(f"{p}.branch7x7x3_2", 192, 192, (1, 7))
        + basic_conv(f"{p}.branch7x7x3_3", 192, 192, (7, 1))
        + basic_conv(f"{p}.branch7x7x3_4", 192, 192, 3)
    )


def inception_e(p: str, cin: int) -> list:
    return (
        basic_conv(f"{p}.branch1x1", cin, 320, 1)
        + basic_conv(f"{p}.branch3x3_1", cin, 384, 1)
        + basic_conv(f"{p}.branch3x3_2a", 384, 384, (1, 3))
        + basic_conv(f"{p}.branch3x3_2b", 384, 384, (3, 1))
        + basic_conv(f"{p}.branch3x3dbl_1", cin, 448, 1)
        + basic_conv(f"{p}.branch3x3dbl_2", 448, 384, 3)
        + basic_conv(f"{p}.branch3x3dbl_3a", 384, 384, (1, 3))
        + basic_conv(f"{p}.branch3x3dbl_3b", 384, 384, (3, 1))
        + basic_conv(f"{p}.branch_pool", cin, 192, 1)
    )


def inception3(num_classes: int = 1000) -> list:
    """torchvision Inception3.__init__ in registration order (aux_logits=True)."""
    return (
        basic_conv("Conv2d_1a_3x3", 3, 32, 3)
        + basic_conv("Conv2d_2a_3x3", 32, 32, 3)
        + basic_conv("Conv2d_2b_3x3", 32, 64, 3)
        + basic_conv("Conv2d_3b_1x1", 64, 80, 1)
        + basic_conv("Conv2d_4a_3x3", 80, 192, 3)
        + inception_a("Mixed_5b", 192, 32)
        + inception_a("Mixed_5c", 256, 64)
        + inception_a("Mixed_5d", 288, 64)
        + inception_b("Mixed_6a", 288)
        + inception_c("Mixed_6b", 768, 128)
        + inception_c("Mixed_6c", 768, 160)
        + inception_c("Mixed_6d", 768, 160)
        + inception_c("Mixed_6e", 768, 192)
        + basic_conv("AuxLogits.conv0", 768, 128, 1)
        + basic_conv("AuxLogits.conv1", 128, 768, 5)
        + linear("AuxLogits.fc", 768, num_classes)
        + inception_d("Mixed_7a", 768)
        + inception_e("Mixed_7b", 1280)
        + inception_e("Mixed_7c", 2048)
        + linear("fc", 2048, num_classes)
    )


def googlenet_inception(p: str, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) -> list:
    # torchvision keeps kernel_size=3 in branch3 ("a known bug", pytorch/vision#906).
    return (
        basic_conv(f"{p}.branch1", cin, ch1x1, 1)
        + basic_conv(f"{p}.branch2.0", cin, ch3x3red, 1)
        + basic_conv(f"{p}.branch2.1", ch3x3red, ch3x3, 3)
        + basic_conv(f"{p}.branch3.0", cin, ch5x5red, 1)
        + basic_conv(f"{p}.branch3.1", ch5x5red, ch5x5, 3)
        + basic_conv(f"{p}.branch4.1", cin, pool_proj, 1)
    )


def googlenet(num_classes: int = 1000) -> list:
    """torchvision GoogLeNet.__init__ in registration order (aux_logits=True)."""
    g = googlenet_inception
    return (
        basic_conv("conv1", 3, 64, 7)
        + basic_conv("conv2", 64, 64, 1)
        + basic_conv("conv3", 64, 192, 3)
        + g("inception3a", 192, 64, 96, 128, 16, 32, 32)
        + g("inception3b", 256, 128, 128, 192, 32, 96, 64)
        + g("inception4a", 480, 192, 96, 208, 16, 48, 64)
        + g("inception4b", 512, 160, 112, 224, 24, 64, 64)
        + g("inception4c", 512, 128, 128, 256, 24, 64, 64)
        + g("inception4d", 512, 112, 144, 288, 32, 64, 64)
        + g("inception4e", 528, 256, 160, 320, 32, 128, 128)
        + g("inception5a", 832, 256, 160, 320, 32, 128, 128)
        + g("inception5b", 832, 384, 192, 384, 48, 128, 128)
        + basic_conv("aux1.conv", 512, 128, 1)
        + linear("aux1.fc1", 2048, 1024)
        + linear("aux1.fc2", 1024, num_classes)
        + basic_conv("aux2.conv", 528, 128, 1)
        + linear("aux2.fc1", 2048, 1024)
        + linear("aux2.fc2", 1024, num_classes)
        + linear("fc", 1024, num_classes)
    )


def main() -> None:
    layouts = {"torchvision_inception3.json": inception3(), "torchvision_googlenet.json": googlenet()}
    for name, layout in layouts.items():
        path = HERE / name
        path.write_text(json.dumps(layout, separators=(",", ":")).replace('],["', '],\n["') + "\n")
        print(f"wrote {path} ({len(layout)} entries)")


if __name__ == "__main__":
    main()
