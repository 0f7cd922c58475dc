"""The read side on shards written by the real write side (``pipeline.shards.build_shards``):
an ImageFolder of coded JPEGs goes through build-shards (global shuffle, DALI indices, manifest)
and comes back through both backends with every label matching its image."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline import DataConfig, make_loader
from pipeline.config import NORMALIZATIONS
from tests.pipeline.shard_fixtures import coded_image, encode_jpeg, level_to_label

CLASSES, PER_CLASS = 5, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.shards import build_shards

    root = tmp_path_factory.mktemp("imagefolder")
    for c in range(CLASSES):
        (root / f"c{c:02d}").mkdir()
        for i in range(PER_CLASS):
            (root / f"c{c:02d}" / f"img{i}.jpg").write_bytes(encode_jpeg(coded_image(c, 90 + 7 * i, 110)))
    out = tmp_path_factory.mktemp("built")
    for split in ("train", "val"):
        build_shards(root, out, split, shard_size=4, progress=False)
    return out


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_build_shards_output_reads_back_aligned(shards, backend):
    cfg = DataConfig(shards=str(shards), backend=backend, batch_size=3, image_size=80, val_resize=90)
    mean, std = NORMALIZATIONS[cfg.normalization]
    seen = Counter()
    for rank in range(2):
        loader = make_loader(cfg, "val", rank, 2, "cpu")
        assert loader.class_names == [f"c{c:02d}" for c in range(CLASSES)]
        for x, y in loader:
            red = x[:, 0].float().mul(std[0]).add(mean[0]).mean(dim=(1, 2))
            assert [level_to_label(float(v)) for v in red] == y.tolist()
            seen.update(y.tolist())
    assert seen == Counter({c: PER_CLASS for c in range(CLASSES)})
    train = make_loader(cfg, "train", 0, 1, "cpu")
    xs, ys = zip(*list(train), strict=True)
    assert len(xs) == len(train) == (CLASSES * PER_CLASS) // 3
    red = torch.cat(xs)[:, 0].float().mul(std[0]).add(mean[0]).mean(dim=(1, 2))
    assert [level_to_label(float(v)) for v in red] == torch.cat(ys).tolist()
