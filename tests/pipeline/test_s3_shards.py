"""Shards on object storage (``data.shards=s3://…``) against a real S3-compatible server
(``rclone serve s3`` on 127.0.0.1, the ``s3_server`` fixture): the same samples, order and pixels as
the local copy, one download per shard per node, and a named outcome for each failure."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from pipeline import make_loader, storage
from pipeline.schema import ShardFormatError, forget_remote, load_manifest
from pipeline.shards.upload import upload_shards
from tests.pipeline.shard_fixtures import write_coded_shards
from tests.pipeline.test_order import _cfg as order_cfg

TRAIN, VAL, CLASSES = 53, 23, 23


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3-local-shards")
    write_coded_shards(folder, {"train": TRAIN, "val": VAL}, num_classes=CLASSES, shard_size=10)
    return folder


@pytest.fixture(scope="module")
def s3_shards(s3_server, local_shards):
    s3_server.make_bucket("data")
    url = "s3://data/coded"
    upload_shards(local_shards, url, progress=False)
    return url


def _cfg(shards, cache_dir, backend="dali", **kw):
    """The order tests' settings, with a node cache of its own."""
    return order_cfg(shards, backend, cache_dir=str(cache_dir), num_threads=1, **kw)


def _run(loaders, epoch, start=0):
    for ld in loaders:
        ld.set_epoch(epoch, start)
    steps, images, labels = [], [], []
    for outs in zip(*loaders, strict=True):
        steps.append(np.concatenate([ld.last_batch.ids for ld in loaders]).tolist())
        images.append(torch.cat([x for x, _ in outs]))
        labels.append(torch.cat([y for _, y in outs]))
    return steps, images, labels


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_s3_gives_the_local_sequence_and_pixels_on_two_ranks(
    s3_server, local_shards, s3_shards, tmp_path, backend
):
    cache = tmp_path / "cache"
    for split in ("train", "val"):
        runs = []
        for shards in (local_shards, s3_shards):
            loaders = [make_loader(_cfg(shards, cache, backend), split, r, 2, "cpu") for r in range(2)]
            runs.append([_run(loaders, epoch) for epoch in (0, 1)])
            for ld in loaders:
                ld.close()
        for (steps_l, img_l, lab_l), (steps_s, img_s, lab_s) in zip(*runs, strict=True):
            assert steps_s == steps_l
            assert len(img_s) == len(img_l) > 0
            for a, b in zip(img_l, img_s, strict=True):
                assert torch.equal(a, b)
            for a, b in zip(lab_l, lab_s, strict=True):
                assert torch.equal(a, b)


def test_each_shard_is_downloaded_once_per_node_and_reread_from_the_cache(s3_server, s3_shards, tmp_path):
    cache = tmp_path / "cache"
    before = s3_server.gets("data", "coded/train-")
    loaders = [make_loader(_cfg(s3_shards, cache), "train", r, 2, "cpu") for r in range(2)]
    _run(loaders, 0)
    tars = sorted(p.name for p in (s3_server.root / "data" / "coded").glob("train-*.tar"))
    root = loaders[0].remote.cache.root
    _wait(lambda: sorted(p.name for p in root.glob("*.tar")) == tars, "every shard is cached")
    for ld in loaders:  # the fetchers finish what they started
        ld.remote.stop()
    after = s3_server.gets("data", "coded/train-")
    whole = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.endswith(".tar")}
    cached = sorted(p.name for p in root.glob("*.tar"))
    assert cached == tars  # every shard is in the node's cache, once
    fetched = sum(ld.remote.cache.fetches for ld in loaders)
    assert fetched == len(tars)  # one whole download per shard, by one of the two ranks
    # the GETs the server answered: one whole object per shard plus the range reads of the batches
    # read before their shard was cached
    ranges = sum(ld.remote.range_requests for ld in loaders)
    assert sum(whole.values()) == len(tars) + ranges
    # a second epoch reads every sample from the cache: no request at all
    before = s3_server.gets("data", "coded/")
    _run(loaders, 1)
    assert s3_server.gets("data", "coded/") == before
    for ld in loaders:
        ld.close()


def test_a_truncated_cached_shard_is_fetched_again(s3_server, local_shards, s3_shards, tmp_path):
    cache = tmp_path / "cache"
    ld = make_loader(_cfg(s3_shards, cache, cache_ahead_steps=1000), "val", 0, 1, "cpu")
    ld.set_epoch(0)
    first = [y.tolist() for _, y in ld]
    victim = ld.remote.cache.root / "val-000001.tar"
    _wait(victim.exists, "the fetcher caches the shard")
    ld.remote.stop()
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    ld.close()
    ld = make_loader(_cfg(s3_shards, cache, cache_ahead_steps=1000), "val", 0, 1, "cpu")
    ld.set_epoch(0)
    assert [y.tolist() for _, y in ld] == first
    whole = (local_shards / "val-000001.tar").stat().st_size
    _wait(lambda: victim.exists() and victim.stat().st_size == whole, "the shard is fetched again")
    ld.remote.stop()
    assert victim.read_bytes() == (local_shards / "val-000001.tar").read_bytes()
    ld.close()


def test_named_errors_bucket_manifest_credentials_replaced(s3_server, local_shards, s3_shards, tmp_path):
    with pytest.raises(ShardFormatError, match="s3://nobucket/x/manifest.json: the bucket does not exist"):
        make_loader(_cfg("s3://nobucket/x", tmp_path), "val", 0, 1, "cpu")
    with pytest.raises(ShardFormatError, match="s3://data/nothing/manifest.json: no such object"):
        make_loader(_cfg("s3://data/nothing", tmp_path), "val", 0, 1, "cpu")
    # wrong credentials
    saved = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    storage.forget_clients()
    forget_remote()
    try:
        with pytest.raises(ShardFormatError, match="refused the credentials|access denied"):
            make_loader(_cfg(s3_shards, tmp_path), "val", 0, 1, "cpu")
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = saved
        storage.forget_clients()
    # a shard replaced on the server (through the S3 API) by one of another size: refused at start
    upload_shards(local_shards, "s3://data/replaced", progress=False)
    client = storage.client_for("s3://data/replaced")
    original = (local_shards / "val-000000.tar").read_bytes()
    client.put_bytes("val-000000.tar", original + b"\0" * 512)
    forget_remote()
    with pytest.raises(
        ShardFormatError, match="s3://data/replaced/val-000000.tar is .* the object was replaced"
    ):
        make_loader(_cfg("s3://data/replaced", tmp_path), "val", 0, 1, "cpu")
    # ... and by one of the same size: its download fails the pass with the object's name
    data = bytearray(original)
    data[200] ^= 1  # a tar header byte: the samples still read, the bytes are not the manifest's
    client.put_bytes("val-000000.tar", bytes(data))
    forget_remote()
    from pipeline.checksums import ShardChecksumError

    ld = make_loader(_cfg("s3://data/replaced", tmp_path / "c2", cache_ahead_steps=1000), "val", 0, 1, "cpu")
    with pytest.raises(
        ShardChecksumError, match="s3://data/replaced/val-000000.tar: .* the object was replaced"
    ):
        for _ in range(50):  # the pass, or the next one, fails once the shard's download is checked
            ld.set_epoch(0)
            for _ in ld:
                pass
            time.sleep(0.1)
    ld.close()


def test_a_cache_budget_below_the_largest_shard_is_one_line(s3_shards, tmp_path):
    with pytest.raises(ShardFormatError, match="data.cache_bytes=1000 cannot hold the largest shard"):
        make_loader(_cfg(s3_shards, tmp_path, cache_bytes=1000), "val", 0, 1, "cpu")


def _ids_of_pass(ld):
    out = []
    for _ in ld:
        out.append(ld.last_batch.ids.tolist())
    return out


def test_a_server_outage_is_waited_out_or_named_and_a_resume_continues_exactly(
    s3_server, s3_shards, tmp_path
):
    """Range reads only (no shard fetched ahead): the server goes away mid-epoch. Back within the
    retry budget: the pass goes on, nothing skipped or repeated. Away for longer: a named error, and
    a loader on a node with an empty cache resumes from the last position exactly."""
    import threading

    from pipeline.storage import ObjectStoreError

    def cfg(cache, retry_s):
        return _cfg(s3_shards, cache, cache_ahead_steps=0, storage_options={"retry_s": retry_s}, batch_size=2)

    ref = make_loader(cfg(tmp_path / "ref", 60), "train", 0, 1, "cpu")
    ref.set_epoch(0)
    expected = _ids_of_pass(ref)
    ref.close()

    ld = make_loader(cfg(tmp_path / "a", 60), "train", 0, 1, "cpu")
    ld.set_epoch(0)
    got, it = [], iter(ld)
    for _ in range(5):
        next(it)
        got.append(ld.last_batch.ids.tolist())
    s3_server.stop()
    restart = threading.Timer(3.0, s3_server.start)
    restart.start()
    for _ in it:  # waits (retries) until the server is back
        got.append(ld.last_batch.ids.tolist())
    restart.join()
    assert got == expected
    ld.close()

    ld = make_loader(cfg(tmp_path / "b", 1), "train", 0, 1, "cpu")
    ld.set_epoch(0)
    it = iter(ld)
    for _ in range(7):
        next(it)
    position = ld.position  # what a mid-epoch checkpoint records
    s3_server.stop()
    try:
        with pytest.raises(
            ObjectStoreError, match=r"s3://data/coded/train-0000\d\d.tar: cannot connect to .*gave up"
        ):
            for _ in it:  # the batches prepared before the outage, then the error
                pass
    finally:
        s3_server.start()
    ld.close()
    fresh = make_loader(cfg(tmp_path / "empty-cache", 60), "train", 0, 1, "cpu")
    fresh.set_epoch(0, position)
    assert _ids_of_pass(fresh) == expected[7:]
    fresh.close()


def test_build_shards_uploads_to_s3_resumes_and_verify_shards_checks_it(s3_server, tmp_path, capsys):
    from PIL import Image

    from pipeline.shards.cli import build_main, verify_main

    s3_server.make_bucket("built")
    for split, n in (("train", 12), ("val", 6)):
        for i in range(n):
            folder = tmp_path / "src" / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + i, 30), (10 * i, 80, 160)).save(folder / f"{i}.jpg", quality=90)
    url = "s3://built/set"
    stage = tmp_path / "stage"
    for split in ("train", "val"):
        args = [str(tmp_path / "src" / split), url, "--split", split, "--shard-size", "4", "--no-progress"]
        assert build_main([*args, "--staging", str(stage)]) == 0
    out = capsys.readouterr().out
    assert "uploaded 4 files" in out  # val: 2 shards and their indexes; the manifest after them
    forget_remote()
    manifest = load_manifest(url)
    assert sorted(manifest.splits) == ["train", "val"]
    assert [sh.count for sh in manifest.split("train").shards] == [4, 4, 4]
    # again: everything is there already, nothing goes up but the manifest
    assert build_main([*args, "--staging", str(stage)]) == 0
    assert "uploaded 0 files (0.0 MB), kept 4 already there" in capsys.readouterr().out
    assert verify_main([url, "--deep", "--no-progress"]) == 0
    assert "train: 12 samples in 3 shards" in capsys.readouterr().out
    # an object damaged on the server is named
    data = bytearray(storage.client_for(url).get("train-000001.tar"))
    data[600] ^= 0xFF
    storage.client_for(url).put_bytes("train-000001.tar", bytes(data))
    forget_remote()
    assert verify_main([url, "--no-progress"]) == 1
    assert "train-000001.tar: sha256 differs from the manifest" in capsys.readouterr().out


def test_furthest_next_use_evicts_the_shard_needed_last_and_refuses_one_needed_later(
    s3_server, local_shards, s3_shards, tmp_path
):
    from pipeline.samples import SampleTable
    from pipeline.shard_cache import NEVER, NodeCache, Schedule, coalesce

    assert coalesce([(100, 10), (0, 50), (120, 5), (1 << 20, 8)], gap=64) == [
        (0, 125, [1, 0, 2]),
        (1 << 20, (1 << 20) + 8, [3]),
    ]
    table = SampleTable.load(s3_shards, "val", str(tmp_path / "idx"))
    names = [p.rsplit("/", 1)[1] for p in table.tars]
    sizes, shas = table.sizes, table.sha256
    client = storage.client_for(s3_shards)

    def fill(cache, t, sched):
        return cache.fill(client, names[t], sizes[t], shas[t], "", lambda n: sched.next_use(names.index(n)))

    sched = Schedule(3)
    sched.set([0, 1, 2, 0, 1])
    cache = NodeCache(tmp_path / "fnu", s3_shards, sizes[0] + sizes[1], "fnu")
    assert fill(cache, 0, sched) and fill(cache, 1, sched)
    assert fill(cache, 2, sched) is None  # needed after both cached shards: not admitted
    assert cache.entries() == names[:2]
    sched.set([2, 2, 0, 1])  # now shard 2 is needed first and shard 1 last
    assert [sched.next_use(t) for t in range(3)] == [2, 3, 0]
    assert fill(cache, 2, sched)
    assert cache.entries() == [names[0], names[2]] and cache.evictions == 1
    sched.cursor = 3
    assert sched.next_use(2) == NEVER
    # the same requests under LRU: the least recently used goes, whatever comes next
    lru = NodeCache(tmp_path / "lru", s3_shards, sizes[0] + sizes[1], "lru")
    assert fill(lru, 0, sched) and fill(lru, 1, sched) and fill(lru, 2, sched)
    assert lru.entries() == [names[1], names[2]]
    # every cached file is the shard, byte for byte
    for name in cache.entries():
        assert (cache.root / name).read_bytes() == (local_shards / name).read_bytes()


def test_shards_go_up_as_they_are_written_and_the_manifest_last(s3_server, tmp_path):
    from PIL import Image

    from pipeline.shards import build_shards
    from pipeline.shards.upload import UploadAsWritten, upload_shards

    s3_server.make_bucket("built")
    for i in range(10):
        folder = tmp_path / "src" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24 + i), (20 * i, 90, 30)).save(folder / f"{i}.jpg", quality=90)
    url, stage = "s3://built/as-written", tmp_path / "stage"
    uploader = UploadAsWritten(stage, url)
    build_shards(tmp_path / "src", stage, "train", shard_size=4, on_shard_written=uploader, progress=False)
    uploader.finish()
    assert (uploader.uploaded, uploader.bytes > 0) == (6, True)  # 3 shards and their indexes
    forget_remote()
    with pytest.raises(ShardFormatError, match="manifest.json: no such object"):
        load_manifest(url)  # not before every shard is there
    assert upload_shards(stage, url, progress=False) == {"uploaded": 0, "kept": 6, "bytes": 0}
    assert load_manifest(url).split("train").num_samples == 10


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_uncached_batches_take_one_range_request_per_shard(s3_server, s3_shards, tmp_path, backend):
    """Nothing fetched ahead: a batch's samples of one shard come in one coalesced request (the torch
    backend's DataLoader workers as well), not one request per sample."""
    ld = make_loader(_cfg(s3_shards, tmp_path, backend, cache_ahead_steps=0), "val", 0, 1, "cpu")
    pairs = sum(len(set(ld.table.tar_of[b.ids].tolist())) for b in ld.order.batches(0))
    before = sum(s3_server.gets("data", "coded/val-").values())
    ld.set_epoch(0)
    assert sum(len(y) for _, y in ld) == VAL
    requests = sum(s3_server.gets("data", "coded/val-").values()) - before
    assert requests == pairs < VAL
    ld.close()
