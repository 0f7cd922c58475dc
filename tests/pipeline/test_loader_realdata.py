"""Both loaders on real ImageNet JPEGs (``imagenet-sample-images.tar``: one image per class,
full size, some grayscale): every class exactly once over 2 ranks, same format from both."""

from __future__ import annotations

import pytest
import torch

from pipeline import DataConfig, make_loader


@pytest.fixture(scope="module")
def imagenet_shards(real_data_dir, tmp_path_factory):
    from pipeline.shards import build_shards

    out = tmp_path_factory.mktemp("imagenet-sample")
    build_shards(real_data_dir / "imagenet-sample-images.tar", out, "val", shard_size=300, progress=False)
    return out


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_real_imagenet_eval_once_over_two_ranks(imagenet_shards, backend):
    cfg = DataConfig(shards=str(imagenet_shards), backend=backend, batch_size=64)
    labels, shapes = [], set()
    for rank in range(2):
        loader = make_loader(cfg, "val", rank, 2, "cpu")
        assert len(loader) == 8 and loader.num_samples == 500
        for x, y in loader:
            shapes.add((tuple(x.shape[1:]), x.dtype))
            assert torch.isfinite(x).all() and -2.2 < float(x.min()) and float(x.max()) < 2.7
            labels += y.tolist()
    assert sorted(labels) == list(range(1000))
    assert shapes == {((3, 299, 299), torch.float32)}
