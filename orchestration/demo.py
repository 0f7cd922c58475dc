"""The main job end to end on the small real dataset shipped in ``data/cifar10-demo``.

Run (``make demo`` does exactly this after installing)::

    python -m orchestration.demo [--workdir runs/demo] [--keep-running] [--crops 1,10,144]
                                 [--subset 144=200] [section.key=value ...]

Steps, each announced with its progress:

1. calibration: a few training steps of the demo model on one core, timed, give this machine's
   speed against the machine the demo was sized on, and from it an estimate of every stage;
2. ``build-shards``: ``data/cifar10-demo/{train,test}.tar.gz`` -> WebDataset shards + DALI indexes
   (splits ``train`` and ``val``) in ``<workdir>/shards``; a rerun keeps shards whose checksums match;
3. ``ops.cluster up``: a local Ray head and an MLflow server (sqlite backend) on 127.0.0.1, reused
   when already running;
4. a Ray job (``python orchestration/train.py --config configs/demo.yaml``, submitted as
   ``ray job submit`` does, its log followed here): an ensemble of ``ensemble.members`` Inception-v3
   members, each on ``scaling.num_workers`` Ray Train workers with DALI loaders, one line per epoch;
   the job registers the ensemble in the MLflow registry (alias ``candidate``) and moves
   ``champion`` to it only if it beats the current champion on the same shards;
5. ``ops.evaluate``: the new registered version with 1, 10 and 144 crops for 1..N members, 144
   crops on the first 200 test images (``--subset``; 1,000 x 144 crops would take longer than the
   training on two cores); the table, with standard errors and the paired differences, is printed and
   logged to MLflow;
6. the time each stage took next to its estimate, and where to look (MLflow UI, Ray dashboard,
   shards, model URI); the servers are stopped unless ``--keep-running`` (then
   ``python -m ops.cluster down --state-dir <workdir>/cluster`` stops them).

Every invocation trains under a new run name (``checkpoint.name=demo-<date>-<time>``), so running
the demo again trains new members and registers a new version; ``champion`` moves only through the
promotion gate. Extra ``section.key=value`` arguments override ``configs/demo.yaml`` (e.g.
``schedule.epochs=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from orchestration.console import quiet_defaults  # noqa: E402
from pipeline.progress import format_duration  # noqa: E402

DATA = REPO_ROOT / "data" / "cifar10-demo"
SPLITS = (("train", DATA / "train.tar.gz"), ("val", DATA / "test.tar.gz"))
DEFAULT_CROPS = "1,10,144"
DEFAULT_SUBSETS = ("144=200",)
# What the job uploads to Ray as its working dir: the code, not the data, caches or environments.
JOB_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "runs",
    "data",
    "docs",
    "tests",
    ".gpucheck",
    ".devwheels",
]

# The machine the demo was sized on (2 cores, ~550 img/s training the demo): its calibration step and
# the seconds each stage took there with configs/demo.yaml and the default crops (run of 2026-11-27,
# 3 min 55 s in all). Estimates on another machine scale these by its calibration; stages of a
# changed recipe scale by their work.
REFERENCE = {
    "calibration_step_s": 0.079,
    "epochs": 6,
    "stages": {
        "calibration": 3.0,
        "build-shards": 2.0,
        "servers": 10.0,
        "job start": 9.0,
        "member (per member)": 78.0,
        "registration": 5.0,
        "evaluation 1 crop": 2.0,
        "evaluation 10 crops": 8.0,
        "evaluation 144 crops": 42.0,
    },
}
CALIBRATION_STEPS = 8


def step(n: int, total: int, text: str) -> None:
    print(f"\n==> [{n}/{total}] {text}", flush=True)


def calibrate(cfg) -> float:
    """Seconds per training step of the demo model (batch ``data.batch_size``, one thread: what one
    Ray Train worker does), the fastest of a few after one warm-up step."""
    import torch

    import models
    from orchestration.losses import training_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = models.build_model(
            cfg.model.name, 10, aux_logits=cfg.model.aux_logits, width_mult=cfg.model.width_mult
        )
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
        y = torch.randint(0, 10, (cfg.data.batch_size,))
        aux = tuple(getattr(model, "aux_loss_weights", ()))
        times = []
        for _ in range(CALIBRATION_STEPS + 1):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(x, with_aux=True)
            training_loss(out.logits, out.aux_logits, y, aux, 0.1).backward()
            opt.step()
            times.append(time.perf_counter() - start)
        return min(times[1:])  # the machine's speed; slower steps are interruptions
    finally:
        torch.set_num_threads(threads)


def estimate_stages(cfg, crops: list[int], subsets: dict[int, int], val_images: int, speed: float) -> dict:
    """Seconds per stage on this machine: the reference times, scaled by the recipe's work (epochs,
    members, images per crop setting) and by this machine's calibration (``speed`` = its step time
    over the reference's)."""
    ref = REFERENCE["stages"]
    out = {k: ref[k] for k in ("calibration", "build-shards", "servers", "job start")}
    startup = 14.0  # of a member's reference time: Ray Train worker group, loaders, model
    per_epoch = (ref["member (per member)"] - startup) / REFERENCE["epochs"]
    for i in range(cfg.ensemble.members):
        out[f"member {i}"] = startup + per_epoch * cfg.schedule.epochs
    out["registration"] = ref["registration"]
    ref_images = {1: 1000, 10: 1000, 144: 200}
    for c in crops:
        key = f"evaluation {c} crop{'s' if c > 1 else ''}"
        n = min(subsets.get(c, val_images), val_images)
        out[key] = ref[key] * n / ref_images[c] * cfg.ensemble.members / 2
    return {k: v * speed for k, v in out.items()}


def build_demo_shards(shards: Path) -> None:
    from pipeline.shards import build_shards

    for split, source in SPLITS:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the demo dataset ships with the repository")
        manifest = build_shards(str(source), str(shards), split=split, shard_size=1000, seed=0, workers=2)
        info = manifest.split(split)
        print(
            f"    {split}: {info.num_samples} images in {len(info.shards)} shards, "
            f"{len(info.skipped)} skipped, {manifest.num_classes} classes"
        )


DEMO_EXPERIMENT = "inception-v3-demo"  # configs/demo.yaml's tracking.experiment


def job_metadata(mlflow_url: str, experiment: str, what: str) -> dict[str, str]:
    """Ray job metadata: what the job is and the MLflow experiment page its runs land on."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return {
        "job": what,
        "mlflow_experiment": experiment,
        "mlflow_url": f"{mlflow_url}/#/experiments/{experiment_id}",
    }


def run_training_job(
    dashboard_url: str,
    mlflow_url: str,
    overrides: list[str],
    *,
    config: str = "configs/demo.yaml",
    name: str = "demo",
    experiment: str = DEMO_EXPERIMENT,
    log_to=None,
) -> str:
    """Submit the training job to the Ray head (what ``ray job submit`` does) and print its log as it
    comes (to ``log_to`` too, a text file); returns the job id, raises when the job did not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ops.cluster import client_env

    for key, value in client_env().items():
        os.environ.setdefault(key, value)
    # The working dir is uploaded with JOB_EXCLUDES given here in full; Ray's own default list would
    # otherwise print a warning per excluded folder on every submission.
    os.environ["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"] = ""
    # Ray's packaging and job-client INFO lines (one per ignored file, "Uploading package ...",
    # "WebSocket closed ..."); the SDK modules set their own loggers to INFO, so they are lowered by name
    for logger in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    entrypoint = " ".join(
        [
            f"python orchestration/train.py --config {config}",
            f"--root {REPO_ROOT}",
            f"tracking.uri={mlflow_url}",
            *overrides,
        ]
    )
    print(
        f"    $ ray job submit --address {dashboard_url} --working-dir {REPO_ROOT} -- {entrypoint}",
        flush=True,
    )
    client = JobSubmissionClient(dashboard_url)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": JOB_EXCLUDES},
        # what the Ray dashboard's job list shows: a readable id, and where the runs are tracked
        submission_id=f"inception-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        metadata=job_metadata(mlflow_url, experiment, f"inception-v3 {name} training ({config})"),
    )
    print(f"    job {job_id} (its log: ray job logs {job_id}; the Ray dashboard has it too)\n", flush=True)

    async def follow() -> None:
        async for text in client.tail_job_logs(job_id):
            sys.stdout.write(text)
            sys.stdout.flush()
            if log_to is not None:
                log_to.write(text)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    deadline = time.monotonic() + 30
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(
            f"the training job {job_id} ended {status}; its log is above and in the Ray dashboard"
        )
    return job_id


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


def evaluate(model_uri: str, shards: Path, mlflow_url: str, crops: list[int], subsets: dict[int, int]):
    """The multi-crop table of the registered version (printed and logged to MLflow)."""
    from ops.evaluate import evaluate_multicrop, log_table
    from ops.evaluate_cli import load_members

    members, _, data = load_members([model_uri], mlflow_url)
    table = evaluate_multicrop(members, str(shards), data=data, split="val", crops=crops, max_images=subsets)
    print("\n" + table.to_markdown(), flush=True)
    run_id = log_table(
        table,
        tracking_uri=mlflow_url,
        model=model_uri,
        shards=str(shards),
        split="val",
        experiment="inception-v3-demo-evaluation",
    )
    print(f"    logged to {mlflow_url} (experiment inception-v3-demo-evaluation, run {run_id})")
    return table


def time_table(stages: dict[str, float], estimates: dict[str, float]) -> str:
    lines = ["| stage | time | estimate |", "|---|---:|---:|"]
    for name, seconds in stages.items():
        est = estimates.get(name)
        lines.append(f"| {name} | {format_duration(seconds)} | {format_duration(est) if est else '-'} |")
    total = sum(stages.values())
    lines.append(f"| **total** | **{format_duration(total)}** | {format_duration(sum(estimates.values()))} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ops.evaluate_cli import parse_crops, parse_subset

    p = argparse.ArgumentParser(
        prog="python -m orchestration.demo",
        description="Shards -> DALI -> Ray Train -> MLflow registry -> multi-crop evaluation, on the "
        "CIFAR-10 subset shipped in data/cifar10-demo, with an estimate at the start and the time of "
        "every stage at the end.",
        epilog="Overrides: section.key=value of configs/demo.yaml, e.g. schedule.epochs=1",
    )
    p.add_argument(
        "--workdir", default="runs/demo", help="shards, cluster state and checkpoints (default runs/demo)"
    )
    p.add_argument("--keep-running", action="store_true", help="leave the Ray head and MLflow server running")
    p.add_argument(
        "--crops",
        type=parse_crops,
        default=parse_crops(DEFAULT_CROPS),
        help=f"crop settings (default {DEFAULT_CROPS})",
    )
    p.add_argument(
        "--subset",
        type=parse_subset,
        action="append",
        default=None,
        metavar="CROPS=IMAGES",
        help="evaluate that crop setting on the first IMAGES test images only "
        f"(default {' '.join(DEFAULT_SUBSETS)}; 144=1000 for the whole test split)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")
    args = p.parse_args(argv)
    if args.subset is None:
        args.subset = [parse_subset(s) for s in DEFAULT_SUBSETS]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_defaults()  # before Ray and MLflow are imported here
    from ops import cluster
    from orchestration.config import ConfigError, load_config

    workdir = (REPO_ROOT / args.workdir).resolve()  # an absolute --workdir stays as it is
    # A fresh run name per invocation: a rerun trains new members and registers a new version (the
    # promotion gate decides about champion) instead of resuming the finished run of the last demo.
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [
        f"data.shards={workdir / 'shards'}",
        f"checkpoint.storage_path={workdir}",
        f"checkpoint.name={run_name}",
        *args.overrides,
    ]
    try:
        cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides, root=str(REPO_ROOT))
    except ConfigError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    state_dir = workdir / "cluster"
    servers: dict = {}  # the cluster's state once it is up: stopped below whatever happens
    try:
        run_stages(cfg, args, overrides, workdir, state_dir, servers)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError, cluster.ClusterError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if servers and not args.keep_running:
            stopped = cluster.down(state_dir)
            print(f"    stopped {', '.join(stopped) or 'nothing'} (use --keep-running to leave them up)")
        elif servers:
            print(f"    still running; stop with: python -m ops.cluster down --state-dir {state_dir}")
    return 0


def run_stages(cfg, args, overrides: list[str], workdir: Path, state_dir: Path, servers: dict) -> None:
    """The six stages, each announced and timed against its estimate; ``servers`` receives the
    cluster's state as soon as it is up, so that the caller stops it whatever happens next."""
    from ops import cluster
    from orchestration.ensemble import timings_file
    from pipeline import storage

    subsets = dict(args.subset)
    shards, total = Path(cfg.data.shards), 6
    start = time.monotonic()
    stages: dict[str, float] = {}
    t = time.monotonic()
    step(1, total, "calibration: this machine's speed and the time the demo will take")
    step_s = calibrate(cfg)
    stages["calibration"] = time.monotonic() - t
    speed = step_s / REFERENCE["calibration_step_s"]
    estimates = estimate_stages(cfg, args.crops, subsets, 1000, speed)
    print(
        f"    one training step: {1000 * step_s:.0f} ms ({1 / speed:.2f}x the speed of the machine the "
        f"demo was sized on)\n    estimated total: {format_duration(sum(estimates.values()))}; "
        f"{cfg.ensemble.members} member(s) x {cfg.schedule.epochs} epochs, crops "
        f"{','.join(map(str, args.crops))}",
        flush=True,
    )

    t = time.monotonic()
    step(2, total, f"build-shards: {DATA.relative_to(REPO_ROOT)} -> {shards}")
    build_demo_shards(shards)
    stages["build-shards"] = time.monotonic() - t

    t = time.monotonic()
    step(3, total, "local Ray head + MLflow server on 127.0.0.1")
    servers.update(cluster.up(state_dir))
    dashboard, mlflow_url = servers["ray"]["dashboard_url"], servers["mlflow"]["url"]
    print(f"    Ray dashboard {dashboard}   MLflow UI {mlflow_url}  (follow the run there)")
    stages["servers"] = time.monotonic() - t

    members, workers = cfg.ensemble.members, cfg.scaling.num_workers
    t = time.monotonic()
    step(4, total, f"Ray job: {members} member(s) x {workers} Ray Train worker(s), then registration")
    run_training_job(dashboard, mlflow_url, overrides)
    job_s = time.monotonic() - t
    job_stages = json.loads(storage.read_text(timings_file(cfg)) or "{}")
    stages["job start"] = max(0.0, job_s - sum(job_stages.values()))
    stages.update(job_stages)

    version, champion = newest_version(mlflow_url, cfg.ensemble.model_name)
    model_uri = f"models:/{cfg.ensemble.model_name}/{version}"
    crops_text = ", ".join(
        f"{c}" + (f" (first {subsets[c]} images)" if c in subsets else "") for c in args.crops
    )
    step(5, total, f"multi-crop evaluation of {model_uri}: crops {crops_text}")
    table = evaluate(model_uri, shards, mlflow_url, args.crops, subsets)
    for c, seconds in table.seconds.items():
        stages[f"evaluation {c} crop{'s' if c > 1 else ''}"] = seconds

    step(6, total, "time per stage, and where to look")
    print(time_table(stages, estimates))
    wall = format_duration(time.monotonic() - start)
    print(f"    (calibration step {1000 * step_s:.0f} ms; wall time {wall})")
    print(
        f"\n    registered model  {model_uri}  (champion: version {champion or '-'}: "
        f"models:/{cfg.ensemble.model_name}@champion)"
    )
    print(f"    MLflow UI         {mlflow_url}")
    print(f"    Ray dashboard     {dashboard}")
    print(f"    shards            {shards}")
    print(f"    checkpoints       {workdir}")


if __name__ == "__main__":
    sys.exit(main())
