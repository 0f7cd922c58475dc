"""Real tiny checkpoints and shards for the ops tests (no mocks: the real model, checkpoint
format and build-shards); see ``tiny_model`` for how the random members are made well-behaved."""

from __future__ import annotations

import dataclasses
import functools
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from ops.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.config import DataConfig

CLASSES = tuple(f"pattern{i}" for i in range(8))  # > 5 classes, so top-5 error is not trivially 0
IMAGE_SIZE, VAL_RESIZE = 75, 86  # the models' minimum input; 75 / 0.875 ~ 86 as for 299 / 342


@functools.lru_cache(maxsize=1)
def _calibration_batch() -> torch.Tensor:
    from pipeline.multicrop import preprocess_images

    cfg = DataConfig(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE)
    images = [jpeg_bytes(synthetic_image(label, v)) for label in range(len(CLASSES)) for v in range(2, 4)]
    return preprocess_images(images, 1, cfg)


def tiny_model(
    seed: int, num_classes: int = len(CLASSES), calibration: torch.Tensor | None = None
) -> torch.nn.Module:
    """A width-1/8 Inception-v3 whose predictions vary smoothly with the image.

    At initialisation a random Inception is chaotic: a one-level JPEG/resize difference flips its
    answer. So: BatchNorm statistics are measured on real-looking crops, every BN scale is set to
    0.5 (layers contract instead of amplify), and the classifier reads standardised features.
    """
    x = _calibration_batch() if calibration is None else calibration
    torch.manual_seed(seed)
    net = models.build_model("inception_v3", num_classes=num_classes, width_mult=0.125)
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average over the calibration batch
            mod.reset_running_stats()
    net.train()
    features = []
    with torch.no_grad():
        net(x)
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(0.5)
        net.eval()
        hook = net.fc.register_forward_hook(lambda m, inputs, out: features.append(inputs[0]))
        net(x)
        hook.remove()
        mu, sd = features[0].mean(0), features[0].std(0) + 1e-12
        w = torch.randn(num_classes, mu.shape[0]) * (1.5 / mu.shape[0] ** 0.5) / sd
        net.fc.weight.copy_(w)
        net.fc.bias.copy_(-w @ mu)
    return net


def make_checkpoint(
    directory: Path, seed: int, shards: str = "", class_names=CLASSES, calibration=None
) -> Path:
    """A checkpoint whose ``ema`` weights (what the registry exports) differ from its raw ``model``."""
    ema = tiny_model(seed, len(class_names), calibration).state_dict()
    raw = {
        k: -v if k.startswith("fc.") else v for k, v in ema.items()
    }  # the raw weights must not be exported
    data = DataConfig(shards=shards, image_size=IMAGE_SIZE, val_resize=VAL_RESIZE, normalization="imagenet")
    save_checkpoint(
        directory,
        {
            "model_spec": {
                "name": "inception_v3",
                "num_classes": len(class_names),
                "options": {"width_mult": 0.125},
            },
            "model": raw,
            "ema": ema,
            "optimizer": {},
            "scheduler": None,
            "epoch": 3,
            "step": 30,
            "config": {"data": dataclasses.asdict(data)},
            "class_names": list(class_names),
            "metrics": {},
            "extra": {},
        },
    )
    return directory


# One smooth sinusoidal pattern per class: (cycles along x, cycles along y). Low frequencies, so
# DALI's and Pillow's resizes agree to about one grey level.
PATTERNS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (0.5, 0.5), (2, 1))


def synthetic_image(label: int, variant: int, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    fx, fy = PATTERNS[label]
    base = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + 0.7 * variant)
    rgb = np.stack([base, 1 - base, 0.5 + 0.4 * np.sin(2 * np.pi * xx * yy + label)], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_split(shards: Path, split: str = "val") -> tuple[list[bytes], list[int]]:
    """Every sample's JPEG bytes and label, straight from the tars (independent of the loaders)."""
    images, labels = [], []
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:  # tar order = the loaders' order
                if name.endswith(".jpg"):
                    images.append(tar.extractfile(members[name]).read())
                    labels.append(int(tar.extractfile(members[name[:-4] + ".cls"]).read()))
    return images, labels


def members_of(checkpoints: list[Path]) -> list[torch.nn.Module]:
    return [model_from_checkpoint(load_checkpoint(c), weights="ema") for c in checkpoints]


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """16 images (2 per class) as a ``val`` split (4 tars) made by the real build-shards."""
    from pipeline.shards import build_shards

    root = tmp_path_factory.mktemp("synthetic")
    for label, name in enumerate(CLASSES):
        (root / "src" / name).mkdir(parents=True)
        for v in range(2):
            (root / "src" / name / f"{v}.jpg").write_bytes(jpeg_bytes(synthetic_image(label, v)))
    build_shards(
        root / "src", root / "shards", split="val", format="imagefolder", shard_size=5, progress=False
    )
    return root / "shards"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, synthetic_shards) -> list[Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return [make_checkpoint(root / f"member{i}", seed=i, shards=str(synthetic_shards)) for i in range(3)]


def doctored_copy(src, dst, *, manifest_too: bool):
    """A copy of ``src`` whose first val tar has every label rewritten to 0 (``.lbl`` and the one-digit
    ``.cls``, same sizes: what an attacker who wants a better figure writes); ``manifest_too``: the
    manifest's sha256 of that tar edited to match, as a careful attacker would."""
    import dataclasses
    import hashlib
    import shutil

    from pipeline.schema import SplitInfo, load_manifest, read_index, write_manifest

    shutil.copytree(src, dst)
    manifest = load_manifest(dst)
    first = manifest.split("val").shards[0]
    tar = dst / first.tar
    data = bytearray(tar.read_bytes())
    for sample in read_index(dst / first.index)[1]:
        for ext, offset, size, _ in sample:
            if ext == "lbl":
                data[offset : offset + 4] = (0).to_bytes(4, "little")
            if ext == "cls" and size == 1:
                data[offset] = ord("0")
    tar.write_bytes(bytes(data))
    if manifest_too:
        info = manifest.split("val")
        edited = dataclasses.replace(first, sha256=hashlib.sha256(data).hexdigest())
        splits = {**manifest.splits, "val": SplitInfo((edited, *info.shards[1:]), info.skipped, info.params)}
        write_manifest(dst, dataclasses.replace(manifest, splits=splits))
    return dst
