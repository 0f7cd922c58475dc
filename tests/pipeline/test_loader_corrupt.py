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
    with pytest.warns(UserWarning, match="quarantined corrupt sample 'val00009' of shard val-000001.tar"):
        labels = [y for _, y in loader]
    assert torch.cat(labels).tolist() == [i for i in range(14) if i != BAD]
    assert loader.quarantine.to_list() == [
        {
            "shard": "val-000001.tar",
            "key": "val00009",
            "reason": loader.quarantine.records[BAD]["reason"],
            "epoch": -1,
        }
    ]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_skip_corrupt_later_passes_leave_the_sample_out(shards, backend):
    loader = make_loader(_cfg(shards, backend, skip_corrupt=True), "val", 0, 1, "cpu")
    with pytest.warns(UserWarning):
        list(loader)
    loader.set_epoch(1)
    labels = torch.cat([y for _, y in loader]).tolist()  # no new warning, no failure
    assert labels == [i for i in range(14) if i != BAD]


def _cut(folder, tar_name: str, keep_samples: int) -> list[str]:
    """Cut ``tar_name`` 100 bytes into its sample ``keep_samples`` (0: into the first one), as an
    interrupted copy would; returns the keys cut off, in order."""
    from pipeline.schema import read_index

    _, entries = read_index(folder / tar_name.replace(".tar", ".idx"))
    offset = entries[keep_samples][0][1]  # the first component's (jpg) data offset
    tar = folder / tar_name
    tar.write_bytes(tar.read_bytes()[: offset + 100])
    return [sample[0][3].partition(".")[0] for sample in entries[keep_samples:]]


@pytest.fixture
def cut_shards(tmp_path):
    """val: 14 intact samples in two tars (8 + 6); val-000001.tar cut after its 3rd sample."""
    write_coded_shards(tmp_path, {"val": 14}, num_classes=14, shard_size=8)
    return tmp_path, _cut(tmp_path, "val-000001.tar", 3)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_truncated_shard_names_the_first_cut_sample(cut_shards, backend):
    # before: the error named an intact sample (val00008), found by replaying the decoder
    folder, cut = cut_shards
    assert cut == ["val00011", "val00012", "val00013"]
    with pytest.raises(
        CorruptSampleError, match=r"'val00011' in shard .*val-000001\.tar: truncated: its data ends"
    ):
        list(make_loader(_cfg(folder, backend), "val", 0, 1, "cpu"))


def test_skip_corrupt_skips_only_the_cut_samples(cut_shards):
    # before: five intact samples dropped, then DALI's raw "Malformed index file" error
    folder, cut = cut_shards
    with pytest.warns(UserWarning) as caught:
        loader = make_loader(_cfg(folder, "dali", skip_corrupt=True), "val", 0, 1, "cpu")
    assert sorted(str(w.message).split("'")[1] for w in caught) == cut
    labels = torch.cat([y for _, y in loader]).tolist()
    assert labels == list(range(11))  # every intact sample, once, in order


def test_tar_cut_inside_its_first_sample_is_left_out(tmp_path):
    # every sample of val-000001.tar cut (an index left empty once made DALI fail)
    write_coded_shards(tmp_path, {"val": 14}, num_classes=14, shard_size=8)
    assert _cut(tmp_path, "val-000001.tar", 0) == [f"val{i:05d}" for i in range(8, 14)]
    with pytest.warns(UserWarning):
        loader = make_loader(_cfg(tmp_path, "dali", skip_corrupt=True), "val", 0, 1, "cpu")
    assert torch.cat([y for _, y in loader]).tolist() == list(range(8))


def test_verify_deep_lists_every_damaged_sample(cut_shards):
    from pipeline.shards import verify_shards

    folder, cut = cut_shards
    shallow = verify_shards(folder, progress=False)
    assert (
        shallow.errors[-1]
        == "val-000001.tar: sha256 differs from the manifest (corrupt or replaced); rebuild it"
    )
    deep = verify_shards(folder, deep=True, progress=False)
    size = (folder / "val-000001.tar").stat().st_size
    # before: --deep stopped at the checksum and named no sample
    assert (
        f"val-000001.tar: 3 sample(s) truncated (the file ends at byte {size}): {', '.join(cut)}"
        in deep.errors
    )
