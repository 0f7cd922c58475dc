"""Object-storage benchmark: training epochs read from ``s3://`` (a real S3-compatible server,
``rclone serve s3`` on 127.0.0.1) against the same shards read from a folder, DALI on CPU.

Run::

    python -m benchmarks.bench_s3 --source ../shared/data/imagenet-sample-images.tar

``--source`` is built into shards (``--shard-size`` samples each) in a temporary folder and uploaded
to the local server. For each image size (the demo's and 299), side by side in one run:

- epoch 1 from ``s3://`` with an empty node cache (cold), then three warm epochs alternated with
  three local ones: img/s (medians), the ratios warm/local (target >= 0.95) and cold/local, and
  what the epochs fetched (bytes, requests: whole shards and coalesced range requests, and the
  GETs the server answered). In steady state the requests per epoch stay <= shards + steps.
- With a cache budget of half the split, three epochs read (no decoding) under furthest-next-use
  eviction and under LRU: bytes and requests per epoch, side by side.

Ends with what a node needs for ImageNet at 16k img/s, from the measured bytes per image.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import DataConfig

TARGET_WARM = 0.95
ROUNDS = 3  # warm s3 and local epochs, alternated; medians compared
IMAGENET_TRAIN_BYTES = 140e9  # ImageNet-1k train as shards, about
IMAGENET_TRAIN_IMAGES = 1_281_167


def epoch_rate(loader, epoch: int) -> tuple[int, float]:
    loader.set_epoch(epoch)
    images, start = 0, time.perf_counter()
    for x, _ in loader:
        images += x.shape[0]
    return images, images / (time.perf_counter() - start)


def fetched(loader) -> dict[str, int]:
    r = loader.remote
    return {
        "bytes": r.cache.fetched_bytes + r.range_bytes,
        "whole": r.cache.fetches,
        "ranges": r.range_requests,
    }


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def read_epoch(loader, epoch: int) -> None:
    """An epoch's reads through the loader's reader, without decoding (the cache's work only)."""
    loader.set_epoch(epoch)
    for batch in loader.plan():
        loader.reader.prefetch(batch.ids)
        for i in batch.ids:
            loader.reader.sample(int(i))
        loader.advanced(batch, batch.ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_s3",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source", help="image collection to build shards from")
    p.add_argument("--shards", help="existing shard folder (instead of --source)")
    p.add_argument("--shard-size", type=int, default=50, help="samples per shard when building")
    p.add_argument("--sizes", default="128,299", help="image sizes (the demo's, then the paper's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    args = p.parse_args(argv)
    if not (args.source or args.shards):
        p.error("give --source or --shards")

    from ops.s3server import LocalS3
    from pipeline import make_loader, storage
    from pipeline.schema import load_manifest
    from pipeline.shards import build_shards
    from pipeline.shards.upload import upload_shards

    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    shards = Path(args.shards) if args.shards else tmp / "shards"
    if args.source:
        build_shards(args.source, shards, "train", shard_size=args.shard_size, progress=True)
    info = load_manifest(shards).split("train")
    split_bytes = sum(sh.bytes for sh in info.shards)
    print(f"{info.num_samples} images in {len(info.shards)} shards, {split_bytes / 1e6:.1f} MB")

    import os

    with LocalS3(tmp / "buckets", log_file=tmp / "rclone.log") as server:
        os.environ.update(server.env())
        storage.forget_clients()
        server.make_bucket("bench")
        url = "s3://bench/shards"
        upload_shards(shards, url, progress=False)
        base = DataConfig(
            shards=str(shards), backend="dali", batch_size=args.batch_size, num_threads=args.threads
        )
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            cfg = replace(base, image_size=size, val_resize=max(size, int(size / 0.875)))
            local = make_loader(cfg, "train", 0, 1, "cpu")
            epoch_rate(local, 0)  # warm-up: page cache, thread pools
            remote_cfg = replace(cfg, shards=url, cache_dir=str(tmp / f"cache-{size}"))
            remote = make_loader(remote_cfg, "train", 0, 1, "cpu")
            gets0, f0 = sum(server.gets("bench").values()), fetched(remote)
            images, cold = epoch_rate(remote, 0)
            remote.remote.stop()  # the fetcher's last downloads count for the cold epoch
            gets1, f1 = sum(server.gets("bench").values()), fetched(remote)
            locals_, warms = [], []
            for r in range(ROUNDS):  # interleaved: the machine's noise hits both alike
                locals_.append(epoch_rate(local, 1 + r)[1])
                warms.append(epoch_rate(remote, 1 + r)[1])
            gets2, f2 = sum(server.gets("bench").values()), fetched(remote)
            local_rate, warm = statistics.median(locals_), statistics.median(warms)
            steps = images // args.batch_size
            for name, rate, f, g in (
                ("cold", cold, delta(f1, f0), gets1 - gets0),
                (f"warm{ROUNDS}", warm, delta(f2, f1), gets2 - gets1),
            ):
                rows.append((size, name, rate, rate / local_rate, f, g, len(info.shards) + steps))
            print(
                f"size {size}: local {' / '.join(f'{x:.0f}' for x in locals_)} img/s, warm s3 "
                f"{' / '.join(f'{x:.0f}' for x in warms)} img/s"
            )
            local.close()
            remote.close()

        print()
        print("size  epoch   img/s  x local  fetched MB  whole  ranges  server GETs  (<= shards+steps)")
        for size, name, rate, ratio, f, g, bound in rows:
            print(
                f"{size:>4}  {name:<5} {rate:7.0f}  {ratio:7.2f}  {f['bytes'] / 1e6:10.1f}  {f['whole']:5d}  "
                f"{f['ranges']:6d}  {g:11d}  ({bound})"
            )
        warm_ok = all(ratio >= TARGET_WARM for _, name, _, ratio, *_ in rows if name.startswith("warm"))
        print(f"warm >= {TARGET_WARM} x local: {'yes' if warm_ok else 'NO'}")

        print("\ncache budget half the split, 3 epochs, reads only:")
        print("policy  epoch  fetched MB  x split  whole shards  range requests")
        per_image = split_bytes / info.num_samples
        for policy in ("fnu", "lru"):
            cfg = replace(
                base,
                shards=url,
                cache_dir=str(tmp / f"half-{policy}"),
                cache_bytes=split_bytes // 2,
                cache_policy=policy,
                image_size=128,
                val_resize=146,
            )
            ld = make_loader(cfg, "train", 0, 1, "cpu")
            total = 0
            for epoch in range(3):
                before = fetched(ld)
                read_epoch(ld, epoch)
                ld.remote.stop()
                f = delta(fetched(ld), before)
                total += f["bytes"]
                print(
                    f"{policy:<6}  {epoch:5d}  {f['bytes'] / 1e6:10.1f}  {f['bytes'] / split_bytes:7.2f}  "
                    f"{f['whole']:12d}  {f['ranges']:14d}"
                )
            print(f"{policy:<6}  total  {total / 1e6:10.1f}  {total / split_bytes:7.2f}")
            ld.close()

        need = 16_000 * IMAGENET_TRAIN_BYTES / IMAGENET_TRAIN_IMAGES
        print(
            f"\nImageNet at 16k img/s: {need / 1e9:.2f} GB/s per node from the store in the cold epoch "
            f"(~{IMAGENET_TRAIN_BYTES / IMAGENET_TRAIN_IMAGES / 1e3:.0f} kB per image); this set: "
            f"{per_image / 1e3:.0f} kB per image"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
