"""Training entry point: ``python orchestration/train.py --config configs/<recipe>.yaml [key=value ...]``.

Against a running cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python orchestration/train.py --config configs/demo.yaml --root $PWD

(``--root $PWD`` is expanded by your shell, so relative paths in the recipe resolve against your
checkout instead of Ray's temporary copy of it.) Without a cluster the same command without
``ray job submit`` starts a local Ray instance. ``--print-config`` shows the resolved config and exits.
Exit status: 0 done, 1 training failed, 2 bad config or arguments, 130 stopped by Ctrl-C (the
job's Ray workers end with this driver; checkpoints already written stay, and a rerun resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script path: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

from orchestration.config import ConfigError, load_config, to_yaml  # noqa: E402
from orchestration.console import quiet_defaults  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orchestration/train.py",
        description="Train Inception-v3 (or an ensemble of N members) on Ray Train with MLflow tracking.",
        epilog="Overrides: section.key=value, e.g. schedule.epochs=3 data.batch_size=64 ensemble.members=2",
    )
    parser.add_argument(
        "--config", required=True, help="YAML recipe (configs/imagenet.yaml, configs/demo.yaml)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    parser.add_argument(
        "--root",
        default=None,
        help="folder that relative paths resolve against (default: $INCEPTION_ROOT or cwd)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, a running local cluster, or a new one)",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of a newly started local Ray instance"
    )
    parser.add_argument(
        "--force-data-change",
        action="store_true",
        help="resume even if the shards' manifest differs from the checkpoint's "
        "(checkpoint.force_data_change)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_intermixed_args(argv)  # overrides may follow options (--print-config a.b=1)


def _inside_ray_working_dir_copy(path: str) -> bool:
    return "runtime_resources" in Path(path).parts or "/runtime_resources/" in path


LOOPBACK = "127.0.0.1"


def address_problem(address: str | None) -> str | None:
    """Why ``address`` cannot be connected to by a driver (None: it can, or there is none)."""
    if address and address.startswith(("http://", "https://")):
        return (
            f"{address} is a Ray dashboard (job submission) address: submit with `ray job submit "
            f"--address {address} --working-dir . -- python orchestration/train.py ...`, or run train.py "
            "directly with --address HOST:PORT, the Ray head's own address (`inception-cluster status` "
            "prints it)"
        )
    return None


def is_loopback_address(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, else start a local Ray instance bound to 127.0.0.1
    only (as ``ops.cluster`` does): without it Ray's GCS and raylet advertise and listen on the
    machine's external address, reachable by anyone on the network."""
    given = address or os.environ.get("RAY_ADDRESS")
    local = not given
    if local or is_loopback_address(given):
        # read when ray is imported: node addresses come from the loopback (docs/architecture.md,
        # "Facts"); without it Ray turns 127.0.0.1:PORT into the machine's external address and waits
        # forever for a GCS that listens on the loopback only (`inception-cluster up`'s)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {}
    if address:
        kwargs["address"] = address
    elif local:
        # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's PlacementGroupCleaner
        # polls every few seconds: without it, each poll logged "Failed to query Ray Train Controller
        # actor state" (~190 lines in four minutes) and the cleaner could not do its job.
        kwargs.update(include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK)
        # Local instance: workers import our packages from this checkout.
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    # Ray's own INFO lines on connecting ("Using address ... set in the environment variable",
    # "Connecting to ...", "Connected to ...") become the one line below.
    info = ray.init(logging_level=logging.WARNING, **kwargs)
    where = "a new local Ray instance on 127.0.0.1" if local else f"Ray at {info.address_info.get('address')}"
    print(f"connected to {where}" + (f" (dashboard {info.dashboard_url})" if info.dashboard_url else ""))


def cluster_shortfall(cfg) -> str | None:
    """What one model's workers ask for that the Ray cluster does not have now (None: it fits)."""
    import ray

    have = ray.cluster_resources()
    workers = cfg.scaling.min_workers or cfg.scaling.num_workers
    need = {"CPU": (workers * cfg.scaling.cpus_per_worker, "scaling.cpus_per_worker")}
    if cfg.scaling.use_gpu == "on":
        need["GPU"] = (workers * cfg.scaling.gpus_per_worker, "scaling.gpus_per_worker")
    for kind, (amount, key) in need.items():
        if have.get(kind, 0) < amount:
            return (
                f"the job needs {amount:g} {kind}s ({workers} worker(s) x {key}={amount / workers:g}) "
                f"but the Ray cluster has {have.get(kind, 0):g}; lower {key} or scaling.num_workers"
            )
    return None


class Interrupted(Exception):
    """Ctrl-C in the driver."""


def run_interruptibly(fn, *args):
    """``fn(*args)`` in a thread, so that Ctrl-C reaches this (main) thread.

    Ray Train's ``fit()`` in the main thread installs its own SIGINT handler, which asks the train
    controller to abort and waits for it: while the controller waits for workers the cluster cannot
    place, nothing happened on Ctrl-C, and nothing was printed (only SIGTERM stopped it)."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            out["error"] = exc

    thread = threading.Thread(target=target, name="training", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        raise Interrupted from None
    if "error" in out:
        raise out["error"]
    return out["value"]


def stop_now(local: bool) -> None:
    """After Ctrl-C: leave at once. The job's actors (train controller, workers) belong to this
    driver and Ray ends them when it exits; a local instance is shut down first (bounded wait)."""
    print(
        "interrupted (Ctrl-C): stopping; the job's Ray workers end with this process, checkpoints "
        "already written stay and a rerun resumes from the newest",
        file=sys.stderr,
        flush=True,
    )
    if local:
        import ray

        closer = threading.Thread(target=ray.shutdown, daemon=True)
        closer.start()
        closer.join(15)
    sys.stdout.flush()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_defaults()  # before Ray and MLflow are imported: one line per epoch, no library chatter
    try:
        overrides = list(args.overrides)
        if args.force_data_change:
            overrides.append("checkpoint.force_data_change=true")
        cfg = load_config(args.config, overrides, root=args.root)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if _inside_ray_working_dir_copy(cfg.checkpoint.storage_path) and not args.root:
        print(
            f"error: checkpoint.storage_path resolved to {cfg.checkpoint.storage_path}, inside Ray's "
            "temporary copy of the working dir, which is deleted after the job: pass --root $PWD or "
            "absolute paths",
            file=sys.stderr,
        )
        return 2
    from ops.checkpoint import CheckpointError
    from orchestration.ensemble import run_training
    from orchestration.resume import DataCheckError
    from pipeline import ShardFormatError

    try:
        from pipeline import load_manifest, storage

        storage.configure(cfg.data.storage_options)
        load_manifest(cfg.data.shards)  # fail fast, before Ray starts, on a missing shard folder or object
        problem = address_problem(args.address or os.environ.get("RAY_ADDRESS"))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        init_ray(args.address, args.num_cpus)
        short = cluster_shortfall(cfg)
        if short and not (args.address or os.environ.get("RAY_ADDRESS")):  # our own instance: no autoscaler
            print(f"error: {short} (or start it with more: --num-cpus)", file=sys.stderr)
            return 2
        if short:  # a cluster may have an autoscaler: say so, then wait as Ray does
            print(f"warning: {short}; the job waits until the cluster has them", file=sys.stderr)
        # --root is the user's checkout under `ray job submit` (the job runs in a copy without .git)
        outcome = run_interruptibly(run_training, cfg, args.root or REPO_ROOT)
    except (Interrupted, KeyboardInterrupt):
        stop_now(local=not (args.address or os.environ.get("RAY_ADDRESS")))
    except (ShardFormatError, CheckpointError, DataCheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # Ray's TrainingFailedError and friends: one line, details are in the log above
        print(f"error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for m in outcome.members:
        top1 = m.metrics.get("val_ema_top1", m.metrics.get("val_top1", float("nan")))
        print(
            f"member {m.index}: epochs {m.metrics.get('epoch')} val top-1 (EMA) {top1:.4f} "
            f"checkpoint {m.checkpoint_dir} mlflow run {m.run_id}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
