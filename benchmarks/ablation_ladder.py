"""The paper's Table 3 ablation ladder on real CIFAR-10: every rung of ``configs/ablations/`` trained
with the same budget on the same shards, one Table-3-shaped table with the paper's ImageNet figures
beside.

    python -m benchmarks.ablation_ladder --data-dir ../shared/data [--epochs 6] [--rungs 1,2,3,4,5]
        [--out runs/ablation] [--json ladder.json] [--per-class-train N --per-class-test N] [key=value ...]

Each rung is its own recipe file (``configs/ablations/N-*.yaml``: the paper's optimiser, schedule,
clipping, label smoothing, stem and auxiliary head for that rung), trained with these changes for
CIFAR-10 on 2 CPU cores, the same for every rung:

- the data: CIFAR-10's 32-px images upscaled to 75 px (the smallest input Inception-v3 takes), area
  0.35-1 crops, the 50k train / 10k test splits; the network at width 0.25; 2 Ray workers x 32;
- ``model.bn_momentum=0.01`` and ``ema.decay=0.999``: the references' 0.0003 and 0.9999 average over
  ~3,300 and ~10,000 steps, longer than the ~4,700 steps of these runs, so the evaluated statistics and
  weights would still be mostly their initial values. Both are the same for every rung.

The optimiser settings stay the paper's (lr 0.045 per 32 images scaled to the global batch, RMSProp
eps 1.0 or SGD momentum 0.9, per-tensor clipping at 2.0, x0.94 every 2 epochs); each rung differs from
the one before by exactly what Table 3 adds. Errors are on the 10,000 test images (one standard error:
~0.5 points at 30 % error). Prints the table and one JSON line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, Run, parse_real_data_args, real_data_parser, report, train_runs

LADDER = REPO_ROOT / "configs" / "ablations"
# Szegedy et al. 2016, Table 3: single-crop top-1 / top-5 error on ImageNet (None: not reported)
PAPER = {
    1: ("Inception-v2", 23.4, None),
    2: ("+ RMSProp", 23.1, 6.3),
    3: ("+ Label Smoothing", 22.8, 6.1),
    4: ("+ Factorized 7x7", 21.6, 5.8),
    5: ("+ BN-auxiliary", 21.2, 5.6),
}
CIFAR_OVERRIDES = (
    "data.image_size=75",
    "data.val_resize=86",
    "data.crop_area=[0.35, 1.0]",
    "data.num_threads=1",
    "data.val_split=val",
    "model.width_mult=0.25",
    "model.bn_momentum=0.01",
    "ema.decay=0.999",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
    "ensemble.members=1",
    "ensemble.register=false",
    "checkpoint.num_to_keep=1",
    "checkpoint.max_failures=1",
    "tracking.log_every_steps=100",
)


def rung_files(rungs: list[int]) -> list[tuple[int, Path]]:
    files = {int(p.name.split("-", 1)[0]): p for p in sorted(LADDER.glob("*.yaml"))}
    missing = [r for r in rungs if r not in files]
    if missing:
        raise FileNotFoundError(f"no ladder recipe for rung(s) {missing} in {LADDER}")
    return [(r, files[r]) for r in rungs]


def table(rows: list[dict]) -> str:
    lines = [
        "| rung | top-1 error (%) | top-5 error (%) | EMA top-1 error (%) | wall "
        "| paper top-1 / top-5 (ImageNet) |",
        "|---|---|---|---|---:|---|",
    ]
    for r in rows:
        name, p1, p5 = PAPER.get(r["rung"], (r["name"], None, None))
        paper = f"{p1} / {p5 if p5 is not None else '–'}" if p1 is not None else "–"
        lines.append(
            f"| {r['rung']}. {name} | {r['top1_err']:.2f} ± {r['top1_se']:.2f} | {r['top5_err']:.2f} | "
            f"{r['ema_top1_err']:.2f} | {r['wall_min']:.1f} min | {paper} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = real_data_parser(
        "python -m benchmarks.ablation_ladder",
        __doc__,
        archives="cifar10-jpg.tar.gz",
        out=str(REPO_ROOT / "runs" / "ablation"),
        epochs=(6, "epochs per rung (default 6: ~10 min a rung on 2 cores)"),
    )
    parser.add_argument(
        "--rungs", default="1,2,3,4,5", help="comma list of rungs (default: the whole ladder)"
    )
    return parse_real_data_args(parser, argv, "cifar10-jpg.tar.gz")


def row(rung: int, path: Path, m: dict, args, wall_min: float) -> dict:
    from ops.evaluate import binomial_stderr

    n = int(m["val_count"])
    return {
        "rung": rung,
        "name": path.stem,
        "top1_err": 100 * (1 - m["val_top1"]),
        "top1_se": 100 * binomial_stderr(1 - m["val_top1"], n),
        "top5_err": 100 * (1 - m["val_top5"]),
        "ema_top1_err": 100 * (1 - m.get("val_ema_top1", float("nan"))),
        "images": n,
        "epochs": int(m["epoch"]),
        "seed": args.seed,
        "wall_min": wall_min,
        "images_per_s": m.get("train_images_per_sec"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    try:
        rungs = rung_files([int(r) for r in args.rungs.split(",") if r.strip()])
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = [
        Run(
            f"rung {rung} ({path.name})",
            path,
            (
                *CIFAR_OVERRIDES,
                f"schedule.epochs={args.epochs}",
                f"seed={args.seed}",
                f"checkpoint.storage_path={out / 'runs'}",
                f"checkpoint.name=rung{rung}-seed{args.seed}-e{args.epochs}",
                f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            ),
        )
        for rung, path in rungs
    ]
    started = time.perf_counter()
    trained = train_runs("cifar10", args, out, runs)
    if trained is None:
        return 2
    rows = [row(r, path, t.metrics, args, t.wall_min) for (r, path), t in zip(rungs, trained, strict=True)]
    total_min = (time.perf_counter() - started) / 60
    footer = (
        f"CIFAR-10 test split ({rows[0]['images']} images, ± one standard error), "
        f"{args.epochs} epochs per rung, seed {args.seed}; whole ladder {total_min:.1f} min"
    )
    report(rows, table(rows), footer, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
