"""Shards of public real image sets, built once from their archives: what the benchmarks and the
slower tests train on.

``build_real_shards("cifar10", data_dir, out)`` reads ``cifar10-jpg.tar.gz`` (``train/<class>/*.jpg``,
``test/<class>/*.jpg``); ``"tiny-imagenet"`` reads ``tiny-imagenet-100.tar.gz``
(``tiny-imagenet-100/{train,val}/<wnid>/*.JPEG``: 100 classes, 300 train and 50 validation images
each, 64 px). Each becomes the ``train`` and ``val`` splits of ``out`` through
``pipeline.shards.build_shards`` (ImageFolder layout, classes in sorted folder order), optionally a
per-class subset for smoke runs. A folder that already holds both splits at the requested sizes is
reused; one at other sizes is an error rather than a silent mix.
"""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.schema import load_manifest
from pipeline.shards.build import build_shards


@dataclass(frozen=True)
class RealDataset:
    archive: str
    prefix: str  # folder inside the archive above the split folders ("" for none)
    splits: dict[str, str]  # archive split folder -> shard split
    per_class: dict[str, int]  # shard split -> images per class in the whole set
    num_classes: int
    shard_size: int


DATASETS = {
    "cifar10": RealDataset(
        "cifar10-jpg.tar.gz", "", {"train": "train", "test": "val"}, {"train": 5000, "val": 1000}, 10, 5000
    ),
    "tiny-imagenet": RealDataset(
        "tiny-imagenet-100.tar.gz",
        "tiny-imagenet-100/",
        {"train": "train", "val": "val"},
        {"train": 300, "val": 50},
        100,
        5000,
    ),
}


def extract_subset(archive: Path, dest: Path, prefix: str, per_class: dict[str, int | None]) -> None:
    """Extract ``<prefix><folder>/<class>/<file>`` to ``dest/<folder>/<class>/<file>``, at most
    ``per_class[folder]`` files per class (None: all); other members are skipped."""
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not member.isfile() or not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            if len(parts) != 3 or parts[0] not in per_class or parts[2].startswith("."):
                continue
            key = (parts[0], parts[1])
            limit = per_class[parts[0]]
            if limit is not None and seen.get(key, 0) >= limit:
                continue
            seen[key] = seen.get(key, 0) + 1
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def build_real_shards(
    dataset: str,
    data_dir: str | Path,
    out: str | Path,
    per_class_train: int | None = None,
    per_class_test: int | None = None,
    progress: bool = True,
) -> Path:
    """Shards of ``dataset`` (``train`` and ``val`` splits) in ``out``; reused when the manifest has
    both at the requested sizes."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    d = DATASETS[dataset]
    out = Path(out)
    limits = {"train": per_class_train, "val": per_class_test}
    want = {split: d.num_classes * min(limits[split] or n, n) for split, n in d.per_class.items()}
    try:
        manifest = load_manifest(out)
    except Exception:  # no shard folder yet
        manifest = None
    if manifest is not None and set(want) <= set(manifest.splits):
        have = {split: manifest.splits[split].num_samples for split in want}
        if have != want:
            raise ValueError(f"{out} holds {have} samples, not the requested {want}: use another --out")
        return out
    archive = Path(data_dir) / d.archive
    if not archive.is_file():
        raise FileNotFoundError(
            f"{archive} not found: pass --data-dir (or REAL_DATA_DIR) holding {d.archive}"
        )
    with tempfile.TemporaryDirectory(prefix=f"{dataset}-") as tmp:
        extract_subset(archive, Path(tmp), d.prefix, {f: limits[s] for f, s in d.splits.items()})
        for folder, split in d.splits.items():
            build_shards(
                Path(tmp) / folder,
                out,
                split=split,
                format="imagefolder",
                shard_size=d.shard_size,
                seed=0,
                progress=progress,
            )
    return out
