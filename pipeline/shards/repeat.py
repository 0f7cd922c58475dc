"""Longer splits from a few real shards: a shard folder whose split lists another folder's shards
several times, as hard links. What the loader benchmark and ``make gpu-check`` read, so that
per-epoch costs weigh as little as on real datasets. Pure Python; no DALI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.schema import ShardInfo, SplitInfo, index_name, load_manifest, shard_name, write_manifest


def repeat_shards(src: str | Path, dst: str | Path, splits: dict[str, tuple[str, int]]) -> Path:
    """A shard folder ``dst`` whose split ``name`` lists split ``source`` of ``src`` ``repeat`` times,
    for every ``name: (source, repeat)`` of ``splits``: longer epochs from a few real images, so that
    per-epoch costs weigh as little as on real datasets. Files are hard links (copies across file
    systems); ``src`` is not changed."""
    src, dst = Path(src), Path(dst)
    manifest = load_manifest(src)
    dst.mkdir(parents=True, exist_ok=True)

    def link(a: Path, b: Path) -> None:
        b.unlink(missing_ok=True)
        try:
            b.hardlink_to(a)
        except OSError:
            shutil.copyfile(a, b)

    out_splits = {}
    for name, (source, repeat) in splits.items():
        shards = []
        for _ in range(repeat):
            for sh in manifest.split(source).shards:
                i = len(shards)
                link(src / sh.tar, dst / shard_name(name, i))
                link(src / sh.index, dst / index_name(name, i))
                shards.append(
                    ShardInfo(shard_name(name, i), index_name(name, i), sh.count, sh.sha256, sh.bytes)
                )
        out_splits[name] = SplitInfo(tuple(shards), params={"repeat_of": source, "repeat": repeat})
    write_manifest(dst, type(manifest)(classes=manifest.classes, splits=out_splits))
    return dst
