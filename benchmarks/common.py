"""What the training benchmarks share: one argument parser, and one "build the real shards -> load
each run's config -> start Ray -> train the runs in turn" helper, as torchvision's reference scripts
share ``train.py``'s functions. ``ablation_ladder``, ``recipe_compare`` and ``train_cifar10`` are
each a table of runs and a way to print their figures on top of these.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` as well as `python -m benchmarks.x`
    sys.path.insert(0, str(REPO_ROOT))


@dataclass(frozen=True)
class Run:
    """One training run of a benchmark: its label, its recipe file and the overrides that make it
    this run (the shard folder and the user's own overrides are added by ``train_runs``)."""

    label: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trained:
    """A finished run: its resolved config, the training outcome and the wall time it took."""

    run: Run
    cfg: object  # orchestration.config.TrainConfig
    outcome: object  # orchestration.ensemble.TrainingOutcome
    wall_min: float

    @property
    def metrics(self) -> dict:
        """The (single) member's last reported metrics."""
        return self.outcome.members[0].metrics


def real_data_parser(
    prog: str,
    doc: str,
    *,
    archives: str,
    out: str | None,
    out_help: str = "",
    rows: bool = True,
    epochs: tuple[int | None, str] | None = None,
) -> argparse.ArgumentParser:
    """The arguments every training benchmark takes: where the archives are, where the shards,
    checkpoints and MLflow store go, per-class subsets for smoke runs, ``section.key=value``
    overrides applied to every run and, for benchmarks that print a table of runs (``rows``), the
    seed and ``--json`` for the rows; ``epochs=(default, help)`` adds ``--epochs`` per run."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("REAL_DATA_DIR"),
        help=f"folder with {archives} (default $REAL_DATA_DIR)",
    )
    parser.add_argument("--out", default=out, help=f"shards, checkpoints, MLflow (default {out_help or out})")
    if rows:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class-train", type=int, default=None, help="subset for smoke runs")
    parser.add_argument("--per-class-test", type=int, default=None, help="subset for smoke runs")
    if rows:
        parser.add_argument("--json", help="also write the rows to this JSON file")
    if epochs is not None:
        parser.add_argument("--epochs", type=int, default=epochs[0], help=epochs[1])
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    return parser


def parse_real_data_args(parser: argparse.ArgumentParser, argv: list[str] | None, archives: str):
    """Parsed arguments; a usage error when no data folder is named or ``--epochs`` is below 1."""
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error(f"--data-dir (or REAL_DATA_DIR) must name the folder holding {archives}")
    if getattr(args, "epochs", None) is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def train_runs(
    dataset: str, args: argparse.Namespace, out: Path, runs: list[Run]
) -> Iterator[Trained] | None:
    """Build ``dataset``'s shards under ``out/shards`` (reused when already there), load every run's
    config with them, start a local Ray instance and train the runs one after the other in this
    process. None, with one error line, when the data or a config is wrong (before anything trains)."""
    from orchestration.console import quiet_defaults

    quiet_defaults()  # before Ray and MLflow are imported: one line per epoch, as orchestration/train.py
    from orchestration.config import ConfigError, load_config
    from orchestration.train import init_ray
    from pipeline.shards.real_data import build_real_shards

    try:
        shards = build_real_shards(
            dataset, args.data_dir, out / "shards", args.per_class_train, args.per_class_test
        )
        overrides = (f"data.shards={shards}", *args.overrides)  # the user's last: they win
        configs = [
            (run, load_config(run.config, [*run.overrides, *overrides], root=str(REPO_ROOT))) for run in runs
        ]
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    init_ray(None, None)
    return _train_in_turn(configs)


def _train_in_turn(configs: list) -> Iterator[Trained]:
    """Train each ``(Run, TrainConfig)`` in turn, announcing each with an ETA from the ones before."""
    from orchestration.ensemble import run_training

    started = time.perf_counter()
    for i, (run, cfg) in enumerate(configs):
        left = (time.perf_counter() - started) / i * (len(configs) - i) / 60 if i else None
        eta = f", about {left:.0f} min left" if left is not None else ""
        print(f"==> {run.label}, {i + 1} of {len(configs)}{eta}", flush=True)
        start = time.perf_counter()
        outcome = run_training(cfg, REPO_ROOT)
        yield Trained(run, cfg, outcome, (time.perf_counter() - start) / 60)


def report(rows: list[dict], table: str, footer: str, json_path: str | None) -> None:
    """The Markdown table, a footer line, then the rows as one JSON line (and in ``json_path``)."""
    print()
    print(table)
    print(f"\n{footer}")
    print(json.dumps(rows))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
