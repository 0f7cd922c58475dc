"""The global sample order (``pipeline.order``) through real loaders: exactly once per epoch across
ranks, a pure function of (seed, epoch) whatever the world size, resumable mid-epoch with another
world size, and corrupt samples quarantined identically for every rank."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from pipeline import DataConfig, make_loader
from pipeline.order import epoch_permutation
from pipeline.samples import SampleTable
from tests.pipeline.shard_fixtures import write_coded_shards

TRAIN, VAL, CLASSES = 53, 23, 23  # 53 = 6 global batches of 8 + a tail of 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("order-shards")
    write_coded_shards(folder, {"train": TRAIN, "val": VAL}, num_classes=CLASSES, shard_size=10)
    return folder


def _cfg(shards, backend="dali", **kw):
    return DataConfig(
        **{
            "shards": str(shards),
            "backend": backend,
            "batch_size": 4,
            "image_size": 80,
            "val_resize": 90,
            **kw,
        }
    )


def _run(loaders, epoch, start=0, keep_images=False):
    """Global sequence of (ids per step) over ranks run side by side, and images per step."""
    for ld in loaders:
        ld.set_epoch(epoch, start)
    steps, images = [], []
    for outs in zip(*loaders, strict=True):
        steps.append(np.concatenate([ld.last_batch.ids for ld in loaders]).tolist())
        if keep_images:
            images.append(torch.cat([x for x, _ in outs]))
    return steps, images


def test_order_is_the_same_in_another_process():
    code = "from pipeline.order import epoch_permutation as p; print(p(7, 3, 1000)[:20].tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(epoch_permutation(7, 3, 1000)[:20].tolist())
    assert not np.array_equal(epoch_permutation(7, 3, 1000), epoch_permutation(7, 4, 1000))
    assert not np.array_equal(epoch_permutation(7, 3, 1000), epoch_permutation(8, 3, 1000))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_train_epoch_exactly_once_over_two_ranks(shards, backend):
    loaders = [make_loader(_cfg(shards, backend), "train", r, 2, "cpu") for r in range(2)]
    assert [len(ld) for ld in loaders] == [6, 6]  # 53 // 8 global steps on both ranks
    steps, _ = _run(loaders, epoch=2)
    seen = [i for step in steps for i in step]
    assert len(seen) == len(set(seen)) == 48  # every usable sample once, less the tail of 5 (< G = 8)
    order = epoch_permutation(0, 2, TRAIN).tolist()
    assert seen == order[:48]  # the epoch's permutation, step by step, rank 0's slice then rank 1's
    assert loaders[0].position == loaders[1].position == 48
    assert (
        make_loader(_cfg(shards, backend), "train", 0, 1, "cpu").table.keys[order[0]]
        == f"train{order[0]:05d}"
    )


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_eval_split_exactly_once_over_two_ranks(shards, backend):
    labels = []
    for r in range(2):
        labels += torch.cat([y for _, y in make_loader(_cfg(shards, backend), "val", r, 2, "cpu")]).tolist()
    assert labels == list(range(VAL))


def test_world_size_does_not_change_the_order_or_the_crops(shards):
    """G = 8 as 2 ranks x 4 or 1 rank x 8: the same global sequence and the same pixels."""
    two, img2 = _run([make_loader(_cfg(shards), "train", r, 2, "cpu") for r in range(2)], 1, keep_images=True)
    one, img1 = _run([make_loader(_cfg(shards, batch_size=8), "train", 0, 1, "cpu")], 1, keep_images=True)
    assert one == two
    assert all(torch.equal(a, b) for a, b in zip(img1, img2, strict=True))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_elastic_resume_mid_epoch_continues_the_same_sequence(shards, before, after):
    """Checkpoint after 3 steps with ``before`` ranks, resume from the recorded position with
    ``after`` ranks (same global batch): the global sequence equals the undisturbed run's."""

    def loaders(w):
        return [make_loader(_cfg(shards, batch_size=8 // w), "train", r, w, "cpu") for r in range(w)]

    undisturbed, _ = _run(loaders(before), epoch=4)
    first = loaders(before)
    for ld in first:
        ld.set_epoch(4)
    for _, _step in zip(range(3), zip(*first, strict=True), strict=False):
        pass
    position = first[0].position
    assert position == 24 and all(ld.position == position for ld in first)
    resumed, _ = _run(loaders(after), epoch=4, start=position)
    assert resumed == undisturbed[3:]


def test_shuffle_quality_against_a_buffer_shuffle():
    """Pairs of samples that share a batch in epoch e and again in e+1: the global permutation is at
    the level of independent random batches, a per-rank contiguous range with a shuffle buffer is not."""
    from benchmarks.shuffle_quality import buffer_shuffle_epoch, global_epoch, repeat_pair_fraction

    n, w, b, buf = 400000, 8, 32, 2048  # ImageNet (1.28M) gives 1.00x and 20x
    g = w * b
    ideal = (g - 1) / (n - 1)
    ours = repeat_pair_fraction(global_epoch(0, 0, n, g), global_epoch(0, 1, n, g), g)
    buffered = repeat_pair_fraction(
        buffer_shuffle_epoch(0, 0, n, w, b, buf), buffer_shuffle_epoch(0, 1, n, w, b, buf), g
    )
    assert ours < 1.2 * ideal
    assert buffered > 4 * ideal


def test_quarantine_two_ranks_equal_batches_named_once_excluded_later(tmp_path):
    """A JPEG whose header is fine but whose data DALI cannot decode: found by the rank that reads it,
    named once, replaced in its batch (both ranks still yield every batch), excluded from later epochs
    on every rank once the ranks share their records, and kept across a resume."""
    bad = 17
    write_coded_shards(
        tmp_path,
        {"train": TRAIN},
        num_classes=CLASSES,
        shard_size=10,
        corrupt={"train": {bad}},
        damage="data",
    )
    cfg = _cfg(tmp_path, skip_corrupt=True)
    loaders = [make_loader(cfg, "train", r, 2, "cpu") for r in range(2)]
    epoch = next(e for e in range(10) if bad in epoch_permutation(0, e, TRAIN)[:48])  # it is read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps, _ = _run(loaders, epoch)
    named = [str(w.message) for w in caught if "quarantined" in str(w.message)]
    assert named == [
        "quarantined corrupt sample 'train00017' of shard train-000001.tar (" + named[0].split("(", 1)[1]
    ]
    assert len(steps) == 6 and all(len(s) == 8 for s in steps)
    seen = [i for s in steps for i in s]
    assert bad not in seen and len(seen) == 48
    records = [r for ld in loaders for r in ld.quarantine.to_list()]
    assert [(r["shard"], r["key"], r["epoch"]) for r in records] == [
        ("train-000001.tar", "train00017", epoch)
    ]
    for ld in loaders:  # what the trainer does at the end of every epoch
        ld.quarantine.merge(records)
    later, _ = _run(loaders, epoch + 1)
    assert bad not in [i for s in later for i in s] and len(later) == (TRAIN - 1) // 8
    resumed = make_loader(cfg, "train", 0, 1, "cpu")  # a resume restores the records from its checkpoint
    resumed.quarantine.merge(records)
    resumed.set_epoch(epoch + 1)
    assert bad not in resumed.order.epoch_ids(epoch + 1)
    # the epoch of discovery is not reshuffled on resume: its positions stay those of the first run
    assert resumed.order.epoch_ids(epoch).tolist() == epoch_permutation(0, epoch, TRAIN).tolist()


def test_corrupt_data_without_skip_is_named(tmp_path):
    write_coded_shards(
        tmp_path, {"train": 16}, num_classes=4, shard_size=8, corrupt={"train": {5}}, damage="data"
    )
    from pipeline.loader import CorruptSampleError

    with pytest.raises(CorruptSampleError, match=r"'train00005' in shard .*train-000000\.tar"):
        list(make_loader(_cfg(tmp_path), "train", 0, 1, "cpu"))


def test_table_reads_the_index_offsets(shards):
    table = SampleTable.load(str(shards), "train")
    assert len(table) == TRAIN and table.keys[:2] == ["train00000", "train00001"]
    from pipeline.jpeg import jpeg_size
    from pipeline.samples import SampleReader

    reader = SampleReader(table)
    assert bytes(reader.jpeg(0)[:2]) == b"\xff\xd8" and reader.label(24) == 24 % CLASSES
    assert jpeg_size(reader.jpeg(0)) == (96, 128) and jpeg_size(reader.jpeg(1)) == (120, 90)
