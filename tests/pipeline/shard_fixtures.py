"""Tiny shard folders for the read-side tests, written exactly as ``pipeline/schema.py`` specifies.

Each image encodes its own label and its orientation, so alignment can be checked after any
crop, resize and mirror:

- red channel: a constant level ``label_level(label)`` (levels 11 apart, far above JPEG error);
- green channel: a left-to-right ramp 0..255, so a mirrored crop has a decreasing green ramp;
- blue channel: a top-to-bottom ramp 0..255 (lets geometry tests locate a crop vertically).

JPEGs are written at quality 95 without chroma subsampling so the channels do not bleed.
Used by the read-side tests (imported as ``tests.pipeline.shard_fixtures``); it writes tars with
``tarfile``, indices with DALI's own ``wds2idx`` and the manifest with ``schema.write_manifest``,
independently of ``pipeline.shards`` (``test_loader_build_shards.py`` covers that writer).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.schema import (
    CLASS_EXT,
    IMAGE_EXT,
    LABEL_EXT,
    ClassInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    encode_label,
    index_name,
    shard_name,
    write_manifest,
)

LEVEL_STEP = 11  # red levels per class: JPEG q95 4:4:4 error on flat areas is < 3 levels


def label_level(label: int) -> int:
    return 10 + LEVEL_STEP * label


def level_to_label(red_mean: float) -> int:
    return int(round((red_mean - 10) / LEVEL_STEP))


def coded_image(label: int, height: int, width: int) -> np.ndarray:
    """HWC uint8 image whose red encodes ``label``, green the column and blue the row."""
    if label_level(label) > 255:
        raise ValueError(
            f"label {label} cannot be encoded in the red channel (max {(255 - 10) // LEVEL_STEP})"
        )
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = label_level(label)
    img[..., 1] = np.linspace(0, 255, width, dtype=np.float32).round().astype(np.uint8)[None, :]
    img[..., 2] = np.linspace(0, 255, height, dtype=np.float32).round().astype(np.uint8)[:, None]
    return img


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI index of ``tar_path`` made with DALI's own ``wds2idx`` tool."""
    tool = Path(sys.executable).with_name("wds2idx")
    cmd = [str(tool)] if tool.exists() else [sys.executable, "-m", "wds2idx"]
    subprocess.run([*cmd, str(tar_path), str(idx_path)], check=True, capture_output=True)


def write_split(
    folder: Path, split: str, samples: list[tuple[str, bytes, int]], shard_size: int
) -> SplitInfo:
    """Write ``(key, jpeg_bytes, label)`` samples into ``split-NNNNNN.tar`` + ``.idx`` files."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(samples), shard_size):
        i = start // shard_size
        tar_path, idx_path = folder / shard_name(split, i), folder / index_name(split, i)
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, label in samples[start : start + shard_size]:
                cls_bytes, lbl_bytes = encode_label(label)
                _add(tar, f"{key}.{IMAGE_EXT}", jpeg)
                _add(tar, f"{key}.{CLASS_EXT}", cls_bytes)
                _add(tar, f"{key}.{LABEL_EXT}", lbl_bytes)
        write_index(tar_path, idx_path)
        data = tar_path.read_bytes()
        shards.append(
            ShardInfo(
                tar=tar_path.name,
                index=idx_path.name,
                count=len(samples[start : start + shard_size]),
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
            )
        )
    return SplitInfo(shards=tuple(shards), params={"shard_size": shard_size, "writer": "tests"})


def write_coded_shards(
    folder: Path,
    splits: dict[str, int],
    num_classes: int,
    shard_size: int = 8,
    sizes: tuple[tuple[int, int], ...] = ((96, 128), (120, 90), (100, 100)),
    corrupt: dict[str, set[int]] | None = None,
    damage: str = "header",
) -> Manifest:
    """Coded images for each ``split -> num_samples``; sample ``i`` has label ``i % num_classes``
    and key ``f"{split}{i:05d}"``. ``corrupt[split]`` lists sample indices whose JPEG is truncated:
    to its first 40 bytes (``damage="header"``: no frame header) or to a third (``"data"``: a valid
    header, the decoder fails)."""
    corrupt = corrupt or {}
    infos = {}
    for split, count in splits.items():
        samples = []
        for i in range(count):
            label = i % num_classes
            h, w = sizes[i % len(sizes)]
            jpeg = encode_jpeg(coded_image(label, h, w))
            if i in corrupt.get(split, set()):
                jpeg = jpeg[:40] if damage == "header" else jpeg[: len(jpeg) // 3]
            samples.append((f"{split}{i:05d}", jpeg, label))
        infos[split] = write_split(folder, split, samples, shard_size)
    manifest = Manifest(
        classes=tuple(ClassInfo(index=c, name=f"class{c:02d}") for c in range(num_classes)),
        splits=infos,
    )
    write_manifest(folder, manifest)
    return manifest
