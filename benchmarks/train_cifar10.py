"""Acceptance run on real data: CIFAR-10 JPEGs -> shards -> 2 Ray workers -> top-1, images/s, loader wait.

    python -m benchmarks.train_cifar10 [--data-dir DIR] [--out runs/cifar10] [--budget-min 15]
                                           [--per-class-train N] [--per-class-test N] [key=value ...]

``--data-dir`` holds ``cifar10-jpg.tar.gz`` (default ``$REAL_DATA_DIR``); ``train/<class>/*.jpg`` becomes
the ``train`` split and ``test/<class>/*.jpg`` the ``val`` split of ``<out>/shards`` (built once with
``pipeline.shards.real_data``), then ``orchestration/train.py --config configs/cifar10.yaml`` trains in
this process (local Ray, 2 workers). Target: >= 50% top-1 on the test split within 15 minutes of
training on 2 cores. ``--per-class-*`` build a subset for smoke runs. Prints one JSON summary line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import REPO_ROOT, Run, parse_real_data_args, real_data_parser, train_runs

ARCHIVE = "cifar10-jpg.tar.gz"


def parse_args(argv: list[str] | None):
    parser = real_data_parser(
        "python -m benchmarks.train_cifar10",
        __doc__,
        archives=ARCHIVE,
        out=str(REPO_ROOT / "runs" / "cifar10"),
        rows=False,
    )
    parser.add_argument("--budget-min", type=float, default=15.0, help="training-time target in minutes")
    parser.add_argument("--target-top1", type=float, default=0.5)
    return parse_real_data_args(parser, argv, ARCHIVE)


def summarize(trained, args) -> dict:
    """The run's figures against its targets, one JSON-able dict."""
    outcome, m = trained.outcome, trained.metrics
    summary = {
        "val_top1": m.get("val_top1"),
        "val_ema_top1": m.get("val_ema_top1"),
        "val_top5": m.get("val_top5"),
        "val_count": m.get("val_count"),
        "epochs": m.get("epoch"),
        "train_images_per_sec": m.get("train_images_per_sec"),
        "train_loader_wait_frac": m.get("train_loader_wait_frac"),
        "wall_time_min": trained.wall_min,
        "budget_min": args.budget_min,
        "checkpoint": outcome.members[0].checkpoint_dir,
        "mlflow_run": outcome.members[0].run_id,
        "tracking_uri": outcome.tracking_uri,
    }
    if outcome.members[0].run_id:  # time spent in training epochs proper (no start-up, eval, checkpoints)
        from mlflow import MlflowClient

        history = MlflowClient(outcome.tracking_uri).get_metric_history(
            outcome.members[0].run_id, "epoch/time_s"
        )
        summary["train_time_min"] = sum(h.value for h in history) / 60
    best = max(v for v in (summary["val_top1"], summary["val_ema_top1"]) if v is not None)
    summary["passed"] = bool(best >= args.target_top1 and trained.wall_min <= args.budget_min)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    run = Run("CIFAR-10", REPO_ROOT / "configs" / "cifar10.yaml", (f"checkpoint.storage_path={out}",))
    trained = train_runs("cifar10", args, out, [run])
    if trained is None:
        return 2
    print(json.dumps(summarize(next(trained), args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
