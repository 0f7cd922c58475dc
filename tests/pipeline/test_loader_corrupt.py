"""A corrupt sample at read time: an error naming the shard and the key (both backends), or
skipped under ``skip_corrupt``; never a hang or a bare DALI stack trace."""

from __future__ import annotations

import pytest
import torch

from pipeline import DataConfig, make_loader
from pipeline.loader import CorruptSampleError
from tests.pipeline.shard_fixtures import write_coded_shards

BAD = 9  # sample index written truncated: key "val00009" in shard val-000001.tar (shard size 8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-shards")
    write_coded_shards(
        folder, {"val": 14, "train": 16}, num_classes=14, shard_size=8, corrupt={"val": {BAD}, "train": {1}}
    )
    return folder


def _cfg(shards, backend, **kw):
    return DataConfig(shards=str(shards), backend=backend, batch_size=4, image_size=80, val_resize=90, **kw)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_sample_error_names_shard_and_key(shards, backend):
    loader = make_loader(_cfg(shards, backend), "val", 0, 1, "cpu")
    with pytest.raises(CorruptSampleError, match=r"'val00009' in shard .*val-000001\.tar") as info:
        for _ in loader:
            pass
    assert "skip_corrupt" in str(info.value)
    if backend == "dali":
        assert "Traceback" not in str(info.value) and info.value.__suppress_context__


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_sample_in_shuffled_train_epoch(shards, backend):
    loader = make_loader(_cfg(shards, backend), "train", 0, 1, "cpu")
    assert loader.num_samples == 16  # the bad sample is in this epoch, wherever the shuffle puts it
    with pytest.raises(CorruptSampleError, match=r"'train00001' in shard .*train-000000\.tar"):
        list(loader)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_skip_corrupt_eval_yields_every_other_sample_once(shards, backend):
    loader = make_loader(_cfg(shards, backend, skip_corrupt=True), "val", 0, 1, "cpu")
    if backend == "dali":
        with pytest.warns(UserWarning, match="skipping corrupt sample 'val00009'"):
            labels = [y for _, y in loader]
    else:  # the warning is printed by the DataLoader worker process
        labels = [y for _, y in loader]
    assert sorted(torch.cat(labels).tolist()) == [i for i in range(14) if i != BAD]


def test_dali_skip_corrupt_later_epochs_use_filtered_index(shards):
    loader = make_loader(_cfg(shards, "dali", skip_corrupt=True), "val", 0, 1, "cpu")
    with pytest.warns(UserWarning):
        list(loader)
    loader.set_epoch(1)
    labels = torch.cat([y for _, y in loader]).tolist()  # no new warning, no failure
    assert labels == [i for i in range(14) if i != BAD]
