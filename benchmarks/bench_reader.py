"""What reading a sample costs: ``pipeline.samples.SampleReader`` (one ``pread`` per sample, JPEG and
label together, a bounded set of open tars) against the memory-mapped views it replaced (one map per
tar for the loader's life, the JPEG handed out as a view, the label read from the map), side by side
on the same shards, in the epoch's random order and in manifest order.

    python -m benchmarks.bench_reader --source ../shared/data/imagenet-sample-images.tar
    python -m benchmarks.bench_reader --shards DIR [--split train] [--rounds 5]

Both read every sample of the split once per round and touch each page of its JPEG as a decoder
would (page cache warm: the first round of each is not timed), rounds interleaved; prints the median
microseconds per sample of each, their ratio, and the files each kept open. The decoders cost 1-10
ms per sample on a CPU core, so this is the read path's own share of it.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE


class MappedReader:
    """The replaced read path: every tar mapped on first use and kept mapped; JPEG bytes as a view."""

    def __init__(self, table) -> None:
        self.table, self.maps = table, {}

    def _map(self, t: int) -> mmap.mmap:
        if t not in self.maps:
            with open(self.table.tars[t], "rb") as f:
                self.maps[t] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[t]

    def sample(self, i: int):
        t = int(self.table.tar_of[i])
        (jo, js), (lo, ls) = self.table.jpg[i], self.table.lbl[i]
        m = self._map(t)
        return memoryview(m)[jo : jo + js], int.from_bytes(m[lo : lo + ls], "little", signed=True)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def time_pass(reader, order: np.ndarray) -> float:
    """Seconds to read every sample of ``order``, wrap its JPEG as DALI's input array and touch one
    byte of each of its pages, as the decoder will: a mapped page is only brought in (a page fault)
    when it is first read, a ``pread`` copy has already paid for it."""
    start = time.perf_counter()
    touched = 0
    for i in order:
        jpeg, _ = reader.sample(int(i))
        touched += int(np.frombuffer(jpeg, dtype=np.uint8)[::PAGE].sum())
    return time.perf_counter() - start


def measure(shards: str, split: str, rounds: int) -> dict:
    from pipeline.order import epoch_permutation
    from pipeline.samples import SampleReader, SampleTable

    table = SampleTable.load(shards, split)
    orders = {"epoch order": epoch_permutation(0, 0, len(table)), "manifest order": np.arange(len(table))}
    out = {}
    for what, order in orders.items():
        readers = {"pread": SampleReader(table), "mmap": MappedReader(table)}
        times = {name: [] for name in readers}
        for r in range(rounds + 1):
            for name, reader in readers.items():
                seconds = time_pass(reader, order)
                if r:  # the first round warms the page cache and the maps
                    times[name].append(seconds)
        us = {name: 1e6 * statistics.median(t) / len(table) for name, t in times.items()}
        out[what] = {
            "us_per_sample": us,
            "pread_over_mmap": us["pread"] / us["mmap"],
            "open_files": {"pread": readers["pread"].open_files(), "mmap": len(readers["mmap"].maps)},
        }
        for reader in readers.values():
            reader.close()
    return {"samples": len(table), "tars": len(table.tars), "orders": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_reader", description=__doc__.split("\n\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="image collection for build-shards (e.g. imagenet-sample-images.tar)")
    src.add_argument("--shards", help="existing shard folder")
    p.add_argument("--split", default="train")
    p.add_argument("--shard-size", type=int, default=100, help="--source: samples per shard (default 100)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes of each reader (default 5)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        shards = args.shards
        if args.source:
            from pipeline.shards import build_shards

            if not Path(args.source).exists():
                print(f"error: --source {args.source} does not exist", file=sys.stderr)
                return 2
            shards = str(Path(tmp) / "shards")
            build_shards(args.source, shards, args.split, shard_size=args.shard_size, progress=True)
        result = measure(shards, args.split, args.rounds)
    print(f"{result['samples']} samples in {result['tars']} tars, {args.rounds} rounds each, page cache warm")
    for what, r in result["orders"].items():
        us, files = r["us_per_sample"], r["open_files"]
        print(
            f"{what:<15} pread {us['pread']:6.1f} us/sample ({files['pread']} files open)   "
            f"mmap {us['mmap']:6.1f} us/sample ({files['mmap']} maps)   "
            f"pread/mmap {r['pread_over_mmap']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
