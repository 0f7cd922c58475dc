"""Real tiny checkpoints and shards for the ops tests (no mocks: the real model, checkpoint format and build-shards).

A freshly initialised network answers nearly the same for every input (its BatchNorm running
statistics are the identity), so each tiny member calibrates its BN statistics on random images and
gets a wider classifier: its predictions then differ from image to image and from member to member.
"""

from __future__ import annotations

import dataclasses
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

CLASSES = ("circle", "square", "stripe")
IMAGE_SIZE, VAL_RESIZE = 75, 86  # the models' minimum input; 75 / 0.875 ~ 86 as for 299 / 342


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = models.build_model("inception_v3", num_classes=len(CLASSES), width_mult=0.125)
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average over the calibration batch
            mod.reset_running_stats()
    net.train()
    x = torch.rand(16, 3, IMAGE_SIZE, IMAGE_SIZE) * 4 - 2
    with torch.no_grad():
        net(x)
    torch.nn.init.normal_(net.fc.weight, std=0.15)
    return net.eval()


def make_checkpoint(directory: Path, seed: int, shards: str = "", class_names=CLASSES) -> Path:
    """A checkpoint whose ``ema`` weights (what the registry exports) differ from its raw ``model``."""
    raw, ema = tiny_model(seed + 1000), tiny_model(seed)
    data = DataConfig(shards=shards, image_size=IMAGE_SIZE, val_resize=VAL_RESIZE, normalization="imagenet")
    save_checkpoint(directory, {
        "model_spec": {"name": "inception_v3", "num_classes": len(class_names), "options": {"width_mult": 0.125}},
        "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "scheduler": None,
        "epoch": 3, "step": 30, "config": {"data": dataclasses.asdict(data)}, "class_names": list(class_names),
        "metrics": {}, "extra": {},
    })
    return directory


def synthetic_image(label: int, variant: int, size: int = 96) -> np.ndarray:
    """Smooth class-specific patterns (low frequency, so every resize implementation agrees)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = variant * 0.37
    if label == 0:
        base = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 2
    elif label == 1:
        base = np.maximum(abs(xx - 0.5), abs(yy - 0.5)) * 2
    else:
        base = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + phase))
    rgb = np.stack([base, (base + phase) % 1.0, 1 - base * (0.3 + 0.1 * variant)], -1)
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
    """12 images (4 per class) as a ``val`` split made by the real build-shards."""
    from pipeline.shards import build_shards

    root = tmp_path_factory.mktemp("synthetic")
    for label, name in enumerate(CLASSES):
        (root / "src" / name).mkdir(parents=True)
        for v in range(4):
            (root / "src" / name / f"{v}.jpg").write_bytes(jpeg_bytes(synthetic_image(label, v)))
    build_shards(root / "src", root / "shards", split="val", format="imagefolder", shard_size=5, progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, synthetic_shards) -> list[Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return [make_checkpoint(root / f"member{i}", seed=i, shards=str(synthetic_shards)) for i in range(3)]
