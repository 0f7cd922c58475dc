"""Multi-crop loaders: counts, row grouping, mirrors, and DALI cutting the same boxes as the
shared geometry (compared with the Pillow path on coded images: the green/blue ramps locate
every crop to a pixel or two)."""

from __future__ import annotations

import pytest
import torch

from pipeline import DataConfig, make_multicrop_loader
from pipeline.config import NORMALIZATIONS
from tests.pipeline.shard_fixtures import label_level, level_to_label, write_coded_shards

NUM = 7  # val samples, one class each


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mc-shards")
    write_coded_shards(folder, {"val": NUM}, num_classes=NUM, shard_size=4)
    return folder


def _cfg(shards, backend):
    return DataConfig(shards=str(shards), backend=backend, batch_size=3, image_size=80, val_resize=90)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    mean, std = NORMALIZATIONS["imagenet"]
    return x.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def _collect(shards, backend, crops, rank=0, world=1):
    images, labels = [], []
    loader = make_multicrop_loader(_cfg(shards, backend), "val", crops, rank, world, "cpu")
    for x, y in loader:
        assert x.shape[0] == crops * y.shape[0]
        images.append(x)
        labels.append(y)
    return loader, torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("crops", [1, 10])
def test_counts_grouping_and_mirrors(shards, backend, crops):
    loader, x, y = _collect(shards, backend, crops)
    assert len(loader) == 3 and loader.num_samples == NUM
    assert x.shape == (NUM * crops, 3, 80, 80) and x.dtype == torch.float32
    assert y.tolist() == list(range(NUM))
    px = _pixels(x)
    # rows i*K:(i+1)*K belong to image i: their red level encodes label i
    red = px[:, 0].mean(dim=(1, 2)).view(NUM, crops)
    assert [[level_to_label(float(v)) for v in row] for row in red] == [[i] * crops for i in range(NUM)]
    if crops == 10:
        torch.testing.assert_close(x[1::2], x[0::2].flip(-1))  # each window followed by its mirror


def test_144_crops_dali_counts(shards):
    loader, x, y = _collect(shards, "dali", 144, rank=1, world=2)
    assert loader.num_samples == 4 and y.tolist() == [3, 4, 5, 6]
    assert x.shape == (4 * 144, 3, 80, 80)
    red = _pixels(x)[:, 0].mean(dim=(1, 2)).view(4, 144)
    assert torch.allclose(red, torch.tensor([label_level(i) for i in y.tolist()]).float()[:, None], atol=3)


@pytest.mark.parametrize("crops", [10, 144])
def test_dali_cuts_the_same_boxes_as_pillow(shards, crops):
    _, xd, yd = _collect(shards, "dali", crops)
    _, xt, yt = _collect(shards, "torch", crops)
    assert yd.tolist() == yt.tolist()
    diff = (_pixels(xd) - _pixels(xt)).abs()
    # same boxes, two resamplers: measured mean 0.10-0.13 levels, max 2; moving the Pillow boxes
    # by 2 px gives a mean of 2.1 (the green/blue ramps shift everywhere)
    assert float(diff.mean()) < 0.5, float(diff.mean())
    assert float(diff.mean(dim=(1, 2, 3)).max()) < 0.6 and float(diff.max()) <= 3.0
