"""Training reads shards whose bytes match their manifest: each tar is hashed the first time a node
reads it (pipeline.checksums). The doctored tar here has the manifest's size and decodes to the same
samples (only a tar header's mtime field changed, which no reader looks at), so before this check a
training pass read it without a word."""

from __future__ import annotations

import dataclasses
import os

import pytest

from pipeline import DataConfig, make_loader
from pipeline.checksums import MARKER_DIR_ENV, ShardChecksumError, ShardHashCheck
from pipeline.samples import SampleTable
from tests.pipeline.shard_fixtures import write_coded_shards

TRAIN, CLASSES = 24, 4


def doctor(tar: str) -> None:
    """Change one byte of the first member's tar header (its mtime field): same size, same samples."""
    with open(tar, "r+b") as fh:
        fh.seek(136)  # ustar header: mtime, 12 octal digits at offset 136
        first = fh.read(1)
        fh.seek(136)
        fh.write(b"1" if first != b"1" else b"2")


@pytest.fixture()
def shards(tmp_path, monkeypatch):
    monkeypatch.setenv(MARKER_DIR_ENV, str(tmp_path / "verified"))
    folder = tmp_path / "shards"
    write_coded_shards(folder, {"train": TRAIN, "val": 8}, num_classes=CLASSES, shard_size=8)
    return folder


def test_a_node_hashes_each_tar_once_and_a_changed_one_again(shards, tmp_path):
    table = SampleTable.load(str(shards), "train")
    marker_dir = str(tmp_path / "verified")
    first = ShardHashCheck(table.tars, table.sha256, marker_dir)
    first.start(range(len(table.tars)))
    first.wait()
    first.raise_if_failed()
    assert first.hashed == 3 and len(list((tmp_path / "verified").glob("*[!k]"))) == 3

    again = ShardHashCheck(table.tars, table.sha256, marker_dir)  # another rank or a later run
    again.start(range(len(table.tars)))
    again.wait()
    assert again.hashed == 0

    doctor(table.tars[1])
    assert os.path.getsize(table.tars[1]) == table_bytes(shards, 1)
    after = ShardHashCheck(table.tars, table.sha256, marker_dir)
    after.start([2, 1, 0])
    after.wait()
    assert after.hashed == 1  # only the changed file (its mtime changed) is hashed again
    with pytest.raises(ShardChecksumError, match=r"^train-000001\.tar: its sha256 is [0-9a-f]{16}\.\.\. but"):
        after.raise_if_failed()


def table_bytes(shards, t: int) -> int:
    from pipeline import load_manifest

    return load_manifest(str(shards)).split("train").shards[t].bytes


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_training_pass_over_a_changed_shard_fails_with_its_name(shards, backend):
    cfg = DataConfig(shards=str(shards), backend=backend, batch_size=4, image_size=80, val_resize=90)
    loader = make_loader(cfg, "train", 0, 1, "cpu")
    assert sum(1 for _ in loader) == TRAIN // 4  # the genuine shards pass

    doctor(str(shards / "train-000002.tar"))
    fresh = make_loader(cfg, "train", 0, 1, "cpu")
    with pytest.raises(
        ShardChecksumError, match=r"train-000002\.tar: its sha256 .* data\.verify_sha256=false"
    ):
        for _ in fresh:
            pass

    off = make_loader(dataclasses.replace(cfg, verify_sha256=False), "train", 0, 1, "cpu")
    assert sum(1 for _ in off) == TRAIN // 4  # what every pass did before the check
