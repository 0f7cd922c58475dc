"""The real-JPEG shards ``make gpu-check`` reads: one train shard of a few hundred images drawn from
an image collection (``make gpu-check-data``), small enough to travel to a GPU machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def prepare_shards(source: Path, images: int, out: Path, progress: bool = True) -> Path:
    """``out``: one train shard of ``images`` real JPEGs drawn (write-time shuffle) from ``source``
    (~105 KB per ImageNet JPEG)."""
    from pipeline.schema import ShardFormatError, SplitInfo, load_manifest, write_manifest
    from pipeline.shards import build_shards

    with tempfile.TemporaryDirectory(prefix="gpucheck-build-") as tmp:
        build_shards(source, Path(tmp), "train", shard_size=images, workers=2, progress=progress)
        manifest = load_manifest(tmp)
        first = manifest.split("train").shards[0]
        if first.count < images:
            raise ShardFormatError(
                f"{source} gave {first.count} images in its first shard, fewer than {images}"
            )
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copyfile(Path(tmp) / first.tar, out / first.tar)
        shutil.copyfile(Path(tmp) / first.index, out / first.index)
        params = dict(manifest.split("train").params, subset_of=str(source))
        write_manifest(
            out, type(manifest)(classes=manifest.classes, splits={"train": SplitInfo((first,), (), params)})
        )
    return out
