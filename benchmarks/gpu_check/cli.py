"""``python -m benchmarks.gpu_check``: the arguments, the shards, the steps in order, the summary."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_check.context import (
    DEFAULT_SHARDS,
    REPO,
    SMOKE_IMAGES,
    SMOKE_SOURCE,
    Context,
    Sizes,
    environment,
    log,
)
from benchmarks.gpu_check.data import prepare_shards
from benchmarks.gpu_check.report import run_step, summary_lines
from benchmarks.gpu_check.steps import all_steps


def parse_args(argv: list[str] | None, step_names: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Measure and check the GPU path: tests, loader, training step, peers, end to end + "
        "resume, multi-crop evaluation. Writes gpu_check.json/.md into --out.",
    )
    p.add_argument("--out", default="gpu-check-out", help="report folder (default: gpu-check-out)")
    p.add_argument(
        "--shards",
        help=f"shard folder with a 'train' split of real JPEGs (default: {DEFAULT_SHARDS}; "
        f"--smoke: built from {SMOKE_SOURCE.relative_to(REPO)})",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU; CUDA-only steps are skipped")
    p.add_argument("--only", help=f"comma list of steps to run ({', '.join(step_names)})")
    p.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="time budget; optional parts (compile) and later steps are skipped past it (default 360)",
    )
    p.add_argument(
        "--slow-tests",
        action="store_true",
        help="gpu-tests: run the slow GPU tests too (compiled vs eager step: ~60 s more on an H200)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="DALI threads = DataLoader workers (default: CPU cores, at most 16)",
    )
    p.add_argument(
        "--prepare",
        metavar="SOURCE",
        help="build the default shard folder from SOURCE "
        "(e.g. ../shared/data/imagenet-sample-images.tar) and exit",
    )
    p.add_argument("--images", type=int, default=160, help="--prepare: images to keep (default 160, ~17 MB)")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> int:
    """``--prepare SOURCE``: build the shard folder and exit."""
    try:
        out = prepare_shards(Path(args.prepare), args.images, Path(args.shards or DEFAULT_SHARDS))
    except (OSError, ValueError) as exc:  # missing source, too few images, foreign files: one line
        print(f"error: --prepare {args.prepare}: {exc}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"prepared {out} ({args.images} images, {size:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    steps = all_steps()
    names = [s.name for s in steps]
    args = parse_args(argv, names)
    if args.prepare:
        return prepare(args)
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    bad = sorted((only or set()) - set(names))
    if bad:
        print(f"error: unknown step(s) {', '.join(bad)}; steps: {', '.join(names)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA GPU here; run with --smoke for the CPU check of this script", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp:
        work = Path(tmp)
        shards = Path(args.shards) if args.shards else None
        if shards is None and args.smoke:
            shards = prepare_shards(SMOKE_SOURCE, SMOKE_IMAGES, work / "smoke-source", progress=False)
        shards = shards or DEFAULT_SHARDS
        if not (shards / "manifest.json").exists():
            print(
                f"error: no shards at {shards}: run `make gpu-check-data` (or --prepare SOURCE) first, "
                "or pass --shards DIR",
                file=sys.stderr,
            )
            return 2
        ctx = Context(
            out=out,
            sizes=Sizes.smoke() if args.smoke else Sizes.full(args.threads),
            smoke=args.smoke,
            device=device,
            source_shards=shards.resolve(),
            work=work,
            deadline=time.monotonic() + args.budget_s,
            env=environment(device),
            slow_tests=args.slow_tests,
        )
        log(f"{ctx.env['device']}, budget {args.budget_s:.0f} s, report in {out}")
        for step in steps:
            if only is None or step.name in only:
                run_step(ctx, step, steps)
    print(
        "\n".join(["", "=== make gpu-check ===", *summary_lines(ctx, steps), f"report: {out}/gpu_check.md"]),
        flush=True,
    )
    return 1 if any(r.status == "fail" for r in ctx.results) else 0
