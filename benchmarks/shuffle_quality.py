"""How well an epoch's order mixes: of the sample pairs that share a global batch in epoch e, the
fraction that share one again in epoch e+1. For independent random batches that is (G-1)/(N-1).

Compares the global order of ``pipeline.order`` with the per-rank scheme it replaced (each rank reads
a contiguous range of the shards' stored order, rotated per epoch, through a shuffle buffer, as
DALI's ``readers.webdataset(random_shuffle=True, initial_fill=...)`` and WebDataset do).

    python -m benchmarks.shuffle_quality [--samples 1281167] [--workers 8] [--batch 32] [--buffer 2048]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from pipeline.order import epoch_permutation


def global_epoch(seed: int, epoch: int, n: int, g: int) -> np.ndarray:
    """The samples of an epoch in consumption order (full global batches of ``g``)."""
    return epoch_permutation(seed, epoch, n)[: n // g * g]


def _buffer_shuffle(items, size: int, rng: random.Random):
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def buffer_shuffle_epoch(seed: int, epoch: int, n: int, w: int, b: int, buffer: int) -> np.ndarray:
    """The replaced scheme: rank r reads shard range ``(r + epoch) % w`` through a shuffle buffer;
    global step t is every rank's t-th batch."""
    per_rank = []
    for r in range(w):
        s = (r + epoch) % w
        rng = random.Random(hash((seed, epoch, r)))
        items = list(_buffer_shuffle(range(n * s // w, n * (s + 1) // w), buffer, rng))
        per_rank.append(items[: (n // w) // b * b])
    steps = len(per_rank[0]) // b
    return np.array([i for t in range(steps) for r in range(w) for i in per_rank[r][t * b : (t + 1) * b]])


def repeat_pair_fraction(first: np.ndarray, second: np.ndarray, g: int) -> float:
    """Of the pairs sharing a batch of ``g`` in ``first``, the fraction sharing one in ``second``."""
    n = int(max(first.max(), second.max())) + 1
    ba, bb = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    ba[first] = np.arange(len(first)) // g
    bb[second] = np.arange(len(second)) // g
    both = (ba >= 0) & (bb >= 0)
    pair_key = ba[both] * (len(second) // g + 1) + bb[both]
    _, counts = np.unique(pair_key, return_counts=True)
    repeated = float((counts * (counts - 1) // 2).sum())
    total = (len(first) // g) * g * (g - 1) / 2
    return repeated / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.shuffle_quality",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--samples", type=int, default=1281167, help="samples per epoch (default: ImageNet's train split)"
    )
    p.add_argument("--workers", type=int, default=8, help="ranks (default 8)")
    p.add_argument("--batch", type=int, default=32, help="batch per rank (default 32, the paper's)")
    p.add_argument(
        "--buffer", type=int, default=2048, help="shuffle buffer of the replaced scheme (default 2048)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if min(a.workers, a.batch, a.buffer) < 1 or a.samples < 2 * a.workers * a.batch:
        p.error("--workers, --batch and --buffer must be >= 1, and --samples at least two global batches")
    n, g = a.samples, a.workers * a.batch
    t0 = time.perf_counter()
    ours = repeat_pair_fraction(global_epoch(a.seed, 0, n, g), global_epoch(a.seed, 1, n, g), g)
    buffered = repeat_pair_fraction(
        buffer_shuffle_epoch(a.seed, 0, n, a.workers, a.batch, a.buffer),
        buffer_shuffle_epoch(a.seed, 1, n, a.workers, a.batch, a.buffer),
        g,
    )
    ideal = (g - 1) / (n - 1)
    print(f"{n} samples, {a.workers} ranks x batch {a.batch} (G = {g}), buffer {a.buffer}")
    print("pairs sharing a batch in epoch 0 that share one again in epoch 1:")
    print(f"  independent random batches (ideal)  {ideal:.3e}")
    print(f"  global order (pipeline.order)       {ours:.3e}  ({ours / ideal:.2f}x ideal)")
    print(f"  per-rank range + shuffle buffer     {buffered:.3e}  ({buffered / ideal:.0f}x ideal)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
