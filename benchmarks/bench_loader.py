"""Loader benchmark: train-pipeline images/s of the ``dali`` and ``torch`` backends of
``pipeline.make_loader`` side by side on the same cores, against the same DALI graph fed in the
same order without the loader, and against the reader-based DALI path the global order replaced
(``readers.webdataset`` + shuffle buffer + ``image_random_crop``), with and without its wrapper.

Run::

    python -m benchmarks.bench_loader --source ../shared/data/imagenet-sample-images.tar
    python -m benchmarks.bench_loader --shards DIR --device cuda --threads 8 --batch-size 128

``--source`` is turned into shards in a temporary folder with ``pipeline.shards.build_shards``
(or ``--shards`` points at existing ones). Pipelines run interleaved, one epoch each per round;
each gets its median wall-clock images/s and images per CPU-second (all its threads and worker
processes: stable on a shared machine). Prints the ratios the read side is held to:
dali/graph >= 0.95 (the loader's own cost), dali/previous >= 1.0 (no slower than the path it
replaced), dali/torch >= 2.5 (the Pillow DataLoader reading the same order), and the time to the
first batch of a fresh loader at an epoch's start and mid-epoch (a resume). ``--device cuda`` runs
the DALI pipelines with ``mixed`` decoding (nvJPEG + hardware decoder) on the GPU; the torch
baseline then still decodes on CPU workers and only normalises on the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from pipeline.config import DataConfig

TARGET_VS_GRAPH = 0.95  # the loader around the ordered graph costs < 5%
TARGET_VS_PREVIOUS = 1.0  # the ordered path is at least as fast as the reader-based one it replaced
TARGET_VS_TORCH = 2.5  # DALI >= 2.5x the Pillow DataLoader reading the same order


def build_bench_shards(source: str, out: Path, repeat: int) -> None:
    """Shards of ``source``; ``repeat`` > 1 lists the same tar ``repeat`` times (hard links) so
    epochs are long enough that per-epoch pipeline rebuilds weigh as little as on real datasets."""
    from pipeline.shards import build_shards
    from pipeline.shards.repeat import repeat_shards

    built = out.with_name(out.name + "-built")
    build_shards(source, built, "train", progress=True)
    repeat_shards(built, out, {"train": ("train", repeat)})


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers exit every epoch)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoaderTimer:
    """Epochs of a ``make_loader`` loader (per-epoch rebuild and conversion to torch included)."""

    def __init__(self, cfg: DataConfig, device: str, train: bool = True) -> None:
        from pipeline import make_loader

        if not train:  # the same shards read as an evaluation split (resize + centre crop)
            cfg = replace(cfg, train_split="none")
        self.loader = make_loader(cfg, "train", 0, 1, device)
        self.device = device
        for i, _ in enumerate(self.loader):  # warm-up: page cache, allocators, thread pools
            if i == 4:
                break

    def epoch(self, epoch: int) -> tuple[int, float, float]:
        import torch

        self.loader.set_epoch(epoch)
        cuda = self.device.startswith("cuda")
        images, start, cpu = 0, time.perf_counter(), cpu_seconds()
        first_images, first_at = 0, None
        for x, _ in self.loader:
            images += x.shape[0]
            if first_at is None:  # the epoch's start: pipeline build (nvJPEG buffers) + queue fill
                if cuda:
                    torch.cuda.synchronize()
                first_images, first_at = images, time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        # steady state: after the first batch, what an epoch of a real dataset's length runs at
        self.steady_rate = (images - first_images) / max(end - first_at, 1e-9) if first_at else 0.0
        self.start_s = (first_at or end) - start
        return images, end - start, cpu_seconds() - cpu


def previous_pipeline(cfg: DataConfig, device_id, spec, raw: bool):
    """The read path that ``pipeline.order`` replaced, kept here as the reference it must beat: DALI's
    ``readers.webdataset`` over the whole split with a 2048-sample shuffle buffer and the fused
    ``image_random_crop`` (``raw``: decode + crop + resize only, the bare ceiling)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipeline.dali_pipelines import decoder_args, normalize
    from pipeline.schema import split_files

    tars, idxs = split_files(cfg.shards, cfg.train_split)

    @pipeline_def
    def pipe():
        jpegs, labels = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg", "lbl"],
            dtypes=[types.UINT8, types.INT32],
            random_shuffle=True,
            initial_fill=2048,
            name="Reader",
        )
        images = fn.decoders.image_random_crop(
            jpegs,
            device=spec.decoder_device,
            output_type=types.RGB,
            random_area=list(cfg.crop_area),
            random_aspect_ratio=list(cfg.crop_aspect),
            num_attempts=10,
            **decoder_args(spec),
        )
        images = fn.resize(images, size=(cfg.image_size, cfg.image_size))
        if raw:
            return images, labels
        return normalize(images, spec, mirror=fn.random.coin_flip(probability=0.5)), labels

    return pipe(
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        seed=cfg.seed,
        prefetch_queue_depth=cfg.prefetch,
    )


class PreviousLoaderTimer:
    """The replaced ``make_loader`` DALI path as it ran: a reader-based pipeline built per training
    epoch (its seed and its shard followed the epoch), iterated through ``DALIGenericIterator`` with
    the conversion to torch batches; the build is part of the epoch's time, as it was in training."""

    def __init__(self, cfg: DataConfig, device: str) -> None:
        from pipeline.loader import resolve_device

        self.cfg = cfg
        self.device, self.device_id = resolve_device(device)
        self.spec = _spec(cfg, self.device, self.device_id)
        self.nhwc = self.spec.layout == "NHWC"
        self.epoch(0)  # warm-up: libraries, page cache

    def epoch(self, epoch: int) -> tuple[int, float, float]:
        import torch
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        images, start, cpu = 0, time.perf_counter(), cpu_seconds()
        cfg = replace(self.cfg, seed=self.cfg.seed * 1000 + epoch)
        pipe = previous_pipeline(cfg, self.device_id, self.spec, raw=False)
        pipe.build()
        batches = DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP
        )
        for out in batches:
            x = out[0]["images"].to(self.device, non_blocking=True)
            y = out[0]["labels"].reshape(-1).to(self.device).long()
            if self.nhwc:
                x = x.permute(0, 3, 1, 2)
            images += y.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        del batches, pipe
        return images, time.perf_counter() - start, cpu_seconds() - cpu


def _spec(cfg: DataConfig, dev, device_id):
    from pipeline.dali_loader import DaliLoader

    return DaliLoader(cfg, cfg.train_split, 0, 1, dev, device_id, "train").spec()


class PipeTimer:
    """A bare DALI pipeline run for an epoch's worth of batches, outputs left in DALI buffers.
    ``graph``: our train graph fed in the global order by the loader's own feeder (offsets, frame
    headers, crop windows), without the loader around it (no iterator, no torch tensors, no labels);
    ``raw``: the replaced reader-based decode + crop + resize, the bare ceiling of that path."""

    def __init__(self, cfg: DataConfig, device: str, which: str) -> None:
        from pipeline.dali_loader import DaliLoader, Feeder
        from pipeline.dali_pipelines import train_pipeline
        from pipeline.loader import resolve_device
        from pipeline.samples import SampleTable

        dev, device_id = resolve_device(device)
        self.gpu, self.batch = device_id is not None, cfg.batch_size
        if which == "raw":
            self.pipe = previous_pipeline(cfg, device_id, _spec(cfg, dev, device_id), raw=True)
            self.per_epoch = len(SampleTable.load(cfg.shards, cfg.train_split)) // self.batch
            self.feed = None
        else:
            self.loader = DaliLoader(cfg, cfg.train_split, 0, 1, dev, device_id, "train")
            self.feed = Feeder(self.loader)
            self.pipe = train_pipeline(
                spec=self.loader.spec(),
                source=self.feed,
                batch_size=cfg.batch_size,
                num_threads=cfg.num_threads,
                device_id=device_id,
                seed=0,
                prefetch_queue_depth=cfg.prefetch,
            )
            self.per_epoch = len(self.loader)
        self.pipe.build()
        self._epoch = 0
        self._reset(0)
        for _ in range(5):
            self.pipe.run()

    def _reset(self, epoch: int) -> None:
        if self.feed is not None:  # an endless feed: every epoch's batches, one after the other
            self.loader.set_epoch(epoch)
            batches = self.loader.plan() * 1000
            self.feed.reset(batches)

    def epoch(self, epoch: int) -> tuple[int, float, float]:
        start, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(self.per_epoch):
            out = self.pipe.run()
        if self.gpu:
            out[0].as_cpu()  # wait for the last GPU batch
        return self.per_epoch * self.batch, time.perf_counter() - start, cpu_seconds() - cpu


def resume_time(cfg: DataConfig, device: str) -> dict[str, float]:
    """Seconds from nothing to the first batch of a fresh loader started mid-epoch (what a resumed
    worker waits for its data), and from the beginning of an epoch, for comparison."""
    from pipeline import make_loader

    out = {}
    for name, frac in (("start_of_epoch_s", 0.0), ("mid_epoch_s", 0.5)):
        t0 = time.perf_counter()
        loader = make_loader(cfg, cfg.train_split, 0, 1, device)
        position = int(len(loader) * frac) * loader.order.global_batch
        loader.set_epoch(1, start=position)
        next(iter(loader))
        out[name] = time.perf_counter() - t0
        del loader
    return out


PIPELINES = {
    "dali": "dali train (make_loader)",
    "torch": "torch train (make_loader)",
    "graph": "dali train graph, no wrapper",
    "previous": "replaced dali path (reader)",
    "raw": "replaced path, bare ceiling",
    "eval": "dali eval (make_loader)",
}


def make_timer(name: str, cfg: DataConfig, device: str):
    if name in ("raw", "graph"):
        return PipeTimer(cfg, device, name)
    if name == "previous":
        return PreviousLoaderTimer(cfg, device)
    if name == "eval":
        return LoaderTimer(replace(cfg, backend="dali"), device, train=False)
    return LoaderTimer(replace(cfg, backend=name), device)


def run_rounds(cfg: DataConfig, device: str, wanted: list[str], rounds: int) -> dict:
    """Interleave one epoch of each pipeline per round (the machine may be shared: interleaving
    exposes every pipeline to the same background load) and keep each pipeline's median rates:
    wall-clock images/s and images per CPU-second (all threads and worker processes)."""
    timers = {name: make_timer(name, cfg, device) for name in wanted}
    wall: dict[str, list[float]] = {name: [] for name in wanted}
    per_cpu: dict[str, list[float]] = {name: [] for name in wanted}
    steady: dict[str, list[float]] = {name: [] for name in wanted}
    starts: dict[str, list[float]] = {name: [] for name in wanted}
    for r in tqdm(range(rounds), desc="rounds", disable=not sys.stderr.isatty()):
        for name, timer in timers.items():
            n, seconds, cpu = timer.epoch(r + 1)
            wall[name].append(n / seconds)
            per_cpu[name].append(n / max(cpu, 1e-9))
            if hasattr(timer, "steady_rate"):  # make_loader epochs: also without the epoch start
                steady[name].append(timer.steady_rate)
                starts[name].append(timer.start_s)
    out = {}
    for name in wanted:
        out[name] = {
            "pipeline": PIPELINES[name],
            "wall_rates": wall[name],
            "images_per_s": statistics.median(wall[name]),
            "images_per_cpu_s": statistics.median(per_cpu[name]),
        }
        if steady[name]:
            out[name]["steady_images_per_s"] = statistics.median(steady[name])
            out[name]["epoch_start_s"] = statistics.median(starts[name])
    return out


def ratios(results: dict) -> list[tuple[str, str, str, float]]:
    """(what, numerator, denominator, target) for the ratios that the measured pipelines allow."""
    checks = [
        ("dali / graph (wrapper cost)", "dali", "graph", TARGET_VS_GRAPH),
        ("dali / replaced dali path", "dali", "previous", TARGET_VS_PREVIOUS),
        ("dali / torch", "dali", "torch", TARGET_VS_TORCH),
        ("dali / replaced bare ceiling", "dali", "raw", 0.0),
    ]
    return [c for c in checks if c[1] in results and c[2] in results]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_loader", description=__doc__.split("\n\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="image collection for build-shards (e.g. imagenet-sample-images.tar)")
    src.add_argument("--shards", help="existing shard folder with a 'train' split")
    p.add_argument("--device", default="cpu", help="cpu (DALI CPU operators) or cuda[:N] (mixed decoding)")
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per pipeline, interleaved (default 3)")
    p.add_argument(
        "--repeat", type=int, default=3, help="list --source's shards N times: longer epochs (default 3)"
    )
    p.add_argument(
        "--pipelines",
        default="dali,graph,previous,torch,raw",
        help="comma list of dali, graph (our DALI graph without the loader), previous (the replaced "
        "reader-based DALI path), torch, raw (the replaced path's bare ceiling), eval",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = [b.strip() for b in args.pipelines.split(",") if b.strip()]
    bad = [b for b in wanted if b not in PIPELINES]
    if bad or args.threads < 1 or args.rounds < 1 or args.repeat < 1 or args.batch_size < 1:
        print(
            f"error: bad arguments ({', '.join(bad) or 'threads/rounds/repeat/batch-size must be >= 1'})",
            file=sys.stderr,
        )
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
            shards = Path(args.shards) if args.shards else Path(tmp) / "shards"
            if args.source:
                if not Path(args.source).exists():
                    raise FileNotFoundError(f"--source {args.source} does not exist")
                build_bench_shards(args.source, shards, args.repeat)
            cfg = DataConfig(
                shards=str(shards),
                batch_size=args.batch_size,
                image_size=args.image_size,
                val_resize=max(args.image_size, round(args.image_size / 0.875)),
                num_threads=args.threads,
            )
            results = run_rounds(cfg, args.device, wanted, args.rounds)
            resume = resume_time(cfg, args.device)
    except Exception as exc:  # one clear line instead of a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"device {args.device}, {args.threads} DALI threads = DataLoader workers, batch {args.batch_size}")
    print(f"{'pipeline':<32} {'img/s (wall, median)':>21} {'img per CPU-s':>14}  wall rounds")
    for r in results.values():
        rounds = ", ".join(f"{x:.0f}" for x in r["wall_rates"])
        print(f"{r['pipeline']:<32} {r['images_per_s']:21.1f} {r['images_per_cpu_s']:14.1f}  {rounds}")
    summary = {
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "results": results,
        "time_to_first_batch": resume,
    }
    for what, num, den, target in ratios(results):
        by_wall = results[num]["images_per_s"] / results[den]["images_per_s"]
        by_cpu = results[num]["images_per_cpu_s"] / results[den]["images_per_cpu_s"]
        summary[what] = {"wall": by_wall, "cpu": by_cpu, "target": target}
        verdict = "ok" if min(by_wall, by_cpu) >= target else "BELOW TARGET"
        print(
            f"{what:<28} wall {by_wall:5.2f}x   per CPU-s {by_cpu:5.2f}x   (target >= {target}x: {verdict})"
        )
    print(
        f"time to first batch of a fresh loader: {resume['start_of_epoch_s']:.2f} s at an epoch's start, "
        f"{resume['mid_epoch_s']:.2f} s resuming mid-epoch"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
