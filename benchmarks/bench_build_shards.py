"""How fast is ``build-shards`` compared with just decoding the same images with Pillow?

Run::

    python -m benchmarks.bench_build_shards --source /work/shared/data/imagenet-sample-images.tar

For each worker count (default 1 and 2) it measures, in one run, on the same files and cores:

- ``build``: ``pipeline.shards.build_shards`` end to end (list the archive, read, verify-decode /
  convert, shuffle, write tars + DALI indices + manifest) into a fresh temporary folder;
- ``pillow``: a full Pillow decode (``Image.open(...).load()``, converted to RGB) of every image,
  spread over the same number of processes reading the same bytes.

It prints images/s and MB/s (input bytes) for both and the ratio build/pillow: above 1 means the
build costs less than a plain decode (pass-through JPEGs are verified with a 1/8-scale IDCT, see
``pipeline.shards.images``). The machine may be shared: the 1-minute load average before and after
is printed so a reader can judge the figures.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.shards import SourceError, build_shards
from pipeline.shards.archives import Locator, open_collection

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _decode(loc: Locator) -> int:
    with Image.open(io.BytesIO(loc.read())) as img:
        img.load()
        return img.convert("RGB").width


def pillow_rate(locators: list[Locator], workers: int) -> float:
    """Seconds to fully decode every image with ``workers`` processes."""
    start = time.perf_counter()
    if workers == 1:
        for loc in locators:
            _decode(loc)
    else:
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for _ in pool.imap(_decode, locators, chunksize=8):
                pass
    return time.perf_counter() - start


def build_time(source: str, workers: int, scratch: Path, options: dict) -> tuple[float, int]:
    out = scratch / f"w{workers}"
    start = time.perf_counter()
    manifest = build_shards(source, out, "bench", workers=workers, progress=False, **options)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed, manifest.split("bench").num_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("REAL_DATA_DIR", "../shared/data")) / "imagenet-sample-images.tar"
    p.add_argument("--source", default=str(default), help="image folder or archive (build-shards SOURCE)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    p.add_argument("--scratch", help="folder for the temporary shards (default: system temp)")
    args = p.parse_args(argv)
    if not Path(args.source).exists():
        print(f"error: --source {args.source} does not exist", file=sys.stderr)
        return 2
    workers = [int(w) for w in args.workers.split(",")]
    with open_collection(args.source) as coll:
        locators = [loc for rel, loc in coll.files.items() if rel.lower().endswith(IMAGE_SUFFIXES)]
        total_mb = sum(loc.size for loc in locators) / 1e6
        for loc in locators:  # warm the page cache so neither side pays the first read
            loc.read()
        scratch = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.scratch))
        load_before = os.getloadavg()[0]
        rows = []
        try:
            for w in workers:
                t_build, n_built = build_time(args.source, w, scratch, {"shard_size": args.shard_size})
                t_pil = pillow_rate(locators, w)
                rows.append((w, n_built, t_build, t_pil))
        except SourceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    n = len(locators)
    print(
        f"source: {args.source}: {n} images, {total_mb:.1f} MB; cpu cores: {os.cpu_count()}; "
        f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'workers':>7} {'build img/s':>12} {'build MB/s':>11} {'pillow img/s':>13} {'pillow MB/s':>12} "
        f"{'build/pillow':>13} {'written':>8}"
    )
    for w, n_built, t_build, t_pil in rows:
        print(
            f"{w:>7} {n / t_build:>12.0f} {total_mb / t_build:>11.1f} {n / t_pil:>13.0f} "
            f"{total_mb / t_pil:>12.1f} {t_pil / t_build:>13.2f} {n_built:>8}"
        )
    print("(MB/s counts input bytes; times are wall clock, listing and writing included for build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
