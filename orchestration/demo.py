"""The main job end to end on the small real dataset shipped in ``data/cifar10-demo``.

Run (``make demo`` does exactly this after installing)::

    python -m orchestration.demo [--workdir runs/demo] [--keep-running] [section.key=value ...]

Steps, each announced with its progress:

1. ``build-shards``: ``data/cifar10-demo/{train,test}.tar.gz`` -> WebDataset shards + DALI indexes
   (splits ``train`` and ``val``) in ``<workdir>/shards``; a rerun keeps shards whose checksums match.
2. ``ops.cluster up``: a local Ray head and an MLflow server (sqlite backend) on 127.0.0.1, reused
   when already running.
3. ``ray job submit ... -- python orchestration/train.py --config configs/demo.yaml``: an ensemble of
   ``ensemble.members`` Inception-v3 members, each on ``scaling.num_workers`` Ray Train workers with
   DALI loaders; the job registers the ensemble in the MLflow registry (alias ``candidate``) and
   moves ``champion`` to it only if it beats the current champion on the same shards.
4. ``ops.evaluate``: the new registered version with 1, 10 and 144 crops for 1..N members; the
   table is printed and logged to MLflow.
5. Where to look (MLflow UI, Ray dashboard, shards, model URI); the servers are stopped unless
   ``--keep-running`` (then ``python -m ops.cluster down --state-dir <workdir>/cluster`` stops them).

Every invocation trains under a new run name (``checkpoint.name=demo-<date>-<time>``), so running
the demo again trains new members and registers a new version; ``champion`` moves only through the
promotion gate. Extra ``section.key=value`` arguments override ``configs/demo.yaml`` (e.g.
``schedule.epochs=1``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "data" / "cifar10-demo"
SPLITS = (("train", DATA / "train.tar.gz"), ("val", DATA / "test.tar.gz"))


def step(n: int, total: int, text: str) -> None:
    print(f"\n==> [{n}/{total}] {text}", flush=True)


def build_demo_shards(shards: Path) -> None:
    from pipeline.shards import build_shards

    for split, source in SPLITS:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the demo dataset ships with the repository")
        manifest = build_shards(str(source), str(shards), split=split, shard_size=1000, seed=0, workers=2)
        info = manifest.split(split)
        print(f"    {split}: {info.num_samples} images in {len(info.shards)} shards, "
              f"{len(info.skipped)} skipped, {manifest.num_classes} classes")


def submit_training(dashboard_url: str, mlflow_url: str, overrides: list[str]) -> None:
    ray = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray if ray.exists() else "ray"), "job", "submit", "--address", dashboard_url,
        "--working-dir", str(REPO_ROOT), "--",
        "python", "orchestration/train.py", "--config", "configs/demo.yaml", "--root", str(REPO_ROOT),
        f"tracking.uri={mlflow_url}", *overrides,
    ]
    print("    $ " + " ".join(cmd), flush=True)
    from ops.cluster import client_env

    env = dict(client_env(), RAY_ADDRESS=dashboard_url)
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the training job failed (ray job submit exited {result.returncode}); "
                           "its log is above and in the Ray dashboard")


def newest_version(mlflow_url: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise RuntimeError(f"the job registered no version of {name!r}")
    newest = max(versions, key=lambda v: int(v.version))
    try:
        champion = client.get_model_version_by_alias(name, "champion").version
    except Exception:
        champion = None
    return newest.version, champion


def evaluate(model_uri: str, shards: Path, mlflow_url: str, crops: str) -> None:
    from ops.evaluate import main as evaluate_main

    rc = evaluate_main(["--model", model_uri, "--shards", str(shards), "--split", "val", "--crops", crops,
                        "--tracking-uri", mlflow_url, "--experiment", "inception-v3-demo-evaluation"])
    if rc != 0:
        raise RuntimeError(f"evaluation of {model_uri} failed (exit {rc})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.demo",
        description="Shards -> DALI -> Ray Train -> MLflow registry -> multi-crop evaluation, on the "
        "CIFAR-10 subset shipped in data/cifar10-demo.",
        epilog="Overrides: section.key=value of configs/demo.yaml, e.g. schedule.epochs=1",
    )
    p.add_argument("--workdir", default="runs/demo",
                   help="shards, cluster state and checkpoints (default runs/demo)")
    p.add_argument("--keep-running", action="store_true", help="leave the Ray head and MLflow server running")
    p.add_argument("--crops", default="1,10,144", help="crop settings to evaluate (default 1,10,144)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from ops import cluster
    from orchestration.config import ConfigError, load_config

    workdir = (REPO_ROOT / args.workdir).resolve()  # an absolute --workdir stays as it is
    # A fresh run name per invocation: a rerun trains new members and registers a new version (the
    # promotion gate decides about champion) instead of resuming the finished run of the last demo.
    run_name = f"checkpoint.name=demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"data.shards={workdir / 'shards'}", f"checkpoint.storage_path={workdir}", run_name,
                 *args.overrides]
    try:
        cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides, root=str(REPO_ROOT))
    except ConfigError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    shards, state_dir = Path(cfg.data.shards), workdir / "cluster"
    start, total = time.monotonic(), 5
    state = None
    try:
        step(1, total, f"build-shards: {DATA.relative_to(REPO_ROOT)} -> {shards}")
        build_demo_shards(shards)
        step(2, total, "local Ray head + MLflow server on 127.0.0.1")
        state = cluster.up(state_dir)
        dashboard, mlflow_url = state["ray"]["dashboard_url"], state["mlflow"]["url"]
        print(f"    Ray dashboard {dashboard}   MLflow UI {mlflow_url}  (follow the run there)")
        members, workers = cfg.ensemble.members, cfg.scaling.num_workers
        step(3, total, f"ray job submit: {members} member(s) x {workers} worker(s)")
        submit_training(dashboard, mlflow_url, overrides)
        version, champion = newest_version(mlflow_url, cfg.ensemble.model_name)
        model_uri = f"models:/{cfg.ensemble.model_name}/{version}"
        step(4, total, f"multi-crop evaluation of {model_uri} (crops {args.crops})")
        evaluate(model_uri, shards, mlflow_url, args.crops)
        step(5, total, "where to look")
        print(f"    registered model  {model_uri}  (champion: version {champion or '-'}: "
              f"models:/{cfg.ensemble.model_name}@champion)")
        print(f"    MLflow UI         {mlflow_url}")
        print(f"    Ray dashboard     {dashboard}")
        print(f"    shards            {shards}")
        print(f"    checkpoints       {workdir}")
        print(f"    wall time         {time.monotonic() - start:.0f} s")
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError, cluster.ClusterError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if state is not None and not args.keep_running:
            stopped = cluster.down(state_dir)
            print(f"    stopped {', '.join(stopped) or 'nothing'} (use --keep-running to leave them up)")
        elif state is not None:
            print(f"    still running; stop with: python -m ops.cluster down --state-dir {state_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
