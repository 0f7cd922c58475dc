"""Acceptance run on real data: CIFAR-10 JPEGs -> shards -> 2 Ray workers -> top-1, images/s, loader wait.

    python -m ops.benchmarks.train_cifar10 [--data-dir DIR] [--out runs/cifar10] [--budget-min 15]
                                           [--per-class-train N] [--per-class-test N] [key=value ...]

``--data-dir`` holds ``cifar10-jpg.tar.gz`` (default ``$REAL_DATA_DIR``); ``train/<class>/*.jpg`` becomes
the ``train`` split and ``test/<class>/*.jpg`` the ``val`` split of ``<out>/shards`` (built once with
``ops.benchmarks.real_data``), then ``orchestration/train.py --config configs/cifar10.yaml`` trains in
this process (local Ray, 2 workers). Target: >= 50% top-1 on the test split within 15 minutes of
training on 2 cores. ``--per-class-*`` build a subset for smoke runs. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ARCHIVE = "cifar10-jpg.tar.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.benchmarks.train_cifar10", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data-dir", default=os.environ.get("REAL_DATA_DIR"), help=f"folder with {ARCHIVE}")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "runs" / "cifar10"), help="shards + checkpoints + MLflow"
    )
    parser.add_argument(
        "--per-class-train", type=int, default=None, help="subset for smoke runs (default: all 5000)"
    )
    parser.add_argument(
        "--per-class-test", type=int, default=None, help="subset for smoke runs (default: all 1000)"
    )
    parser.add_argument("--budget-min", type=float, default=15.0, help="training-time target in minutes")
    parser.add_argument("--target-top1", type=float, default=0.5)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/cifar10.yaml")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error(f"--data-dir (or REAL_DATA_DIR) must name the folder holding {ARCHIVE}")

    from orchestration.console import quiet_defaults

    quiet_defaults()  # before Ray and MLflow are imported: one line per epoch (as orchestration/train.py)
    from ops.benchmarks.real_data import build_real_shards
    from orchestration.config import ConfigError, load_config
    from orchestration.ensemble import run_training
    from orchestration.train import init_ray

    out = Path(args.out).resolve()
    try:
        shards = build_real_shards(
            "cifar10", args.data_dir, out / "shards", args.per_class_train, args.per_class_test
        )
        cfg = load_config(
            REPO_ROOT / "configs" / "cifar10.yaml",
            [f"data.shards={shards}", f"checkpoint.storage_path={out}", *args.overrides],
            root=str(REPO_ROOT),
        )
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray(None, None)
    start = time.perf_counter()
    outcome = run_training(cfg, REPO_ROOT)
    wall = time.perf_counter() - start
    m = outcome.members[0].metrics
    summary = {
        "val_top1": m.get("val_top1"),
        "val_ema_top1": m.get("val_ema_top1"),
        "val_top5": m.get("val_top5"),
        "val_count": m.get("val_count"),
        "epochs": m.get("epoch"),
        "train_images_per_sec": m.get("train_images_per_sec"),
        "train_loader_wait_frac": m.get("train_loader_wait_frac"),
        "wall_time_min": wall / 60,
        "budget_min": args.budget_min,
        "checkpoint": outcome.members[0].checkpoint_dir,
        "mlflow_run": outcome.members[0].run_id,
        "tracking_uri": outcome.tracking_uri,
    }
    if outcome.members[0].run_id:  # time spent in training epochs proper (no start-up, eval, checkpoints)
        from mlflow import MlflowClient

        history = MlflowClient(outcome.tracking_uri).get_metric_history(
            outcome.members[0].run_id, "train_epoch_time_s"
        )
        summary["train_time_min"] = sum(h.value for h in history) / 60
    best = max(v for v in (summary["val_top1"], summary["val_ema_top1"]) if v is not None)
    summary["passed"] = bool(best >= args.target_top1 and wall / 60 <= args.budget_min)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
