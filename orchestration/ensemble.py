"""Driver side of a training job: MLflow runs, N ensemble members on Ray, registration at the end.

Called by ``orchestration/train.py`` (``run_training(cfg)``) after Ray is initialised. With
``ensemble.members: N`` > 1 the members train with seeds ``seed + i`` (and ``data.seed + i``), each in
its own Ray Train run ``<checkpoint.name>-member<i>`` and its own MLflow child run under one parent
run; they run concurrently (one ``TorchTrainer.fit`` per driver thread) when the cluster has CPUs/GPUs
for all of them, else one after the other (``ensemble.concurrent`` forces either). The paper (§10)
ensembled 4 models.

MLflow run ids are kept in ``<storage_path>/<name>.mlflow.json`` so that a new job pointed at the same
run (same storage path and name) continues the same MLflow runs, as Ray Train continues from the
run's latest checkpoint.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.config import TrainConfig, flatten
from orchestration.trainer import MemberResult, fit_member
from pipeline import storage


@dataclass(frozen=True)
class TrainingOutcome:
    members: tuple[MemberResult, ...]
    tracking_uri: str
    parent_run_id: str | None
    registered: Any = None  # ops.registry ModelVersion, when registered
    promotion: Any = None  # ops.registry PromotionDecision
    note: str = ""  # why registration was skipped, if it was


def _run_ids_file(cfg: TrainConfig) -> str:
    return storage.join(cfg.checkpoint.storage_path, f"{cfg.checkpoint.name}.mlflow.json")


def common_tags(cfg: TrainConfig, repo_root: str | Path) -> dict[str, str | None]:
    import ray

    from ops.tracking import git_commit
    from pipeline import manifest_sha256

    try:
        shards_hash = manifest_sha256(cfg.data.shards)
    except OSError:
        shards_hash = None
    return {
        "git_commit": git_commit(repo_root) or git_commit(Path(__file__).resolve().parents[1]),
        "shards_manifest_sha256": shards_hash,
        "shards": cfg.data.shards,
        "ray_job_id": ray.get_runtime_context().get_job_id(),
        "model": cfg.model.name,
        "ensemble.members": str(cfg.ensemble.members),
    }


def create_runs(cfg: TrainConfig, uri: str, tags: dict) -> tuple[str | None, list[str | None]]:
    """(parent run id or None, one run id per member); reuses the ids a previous job recorded."""
    from ops.tracking import check_reachable, create_run

    n = cfg.ensemble.members
    if not cfg.tracking.enabled:
        return None, [None] * n
    reason = check_reachable(uri)
    if reason:
        print(f"warning: MLflow tracking at {uri} is unreachable ({reason}); training continues untracked")
        return None, [None] * n
    ids_file = _run_ids_file(cfg)
    text = storage.read_text(ids_file)
    if text:
        saved = json.loads(text)
        if saved.get("tracking_uri") == uri and len(saved.get("members", [])) == n:
            print(f"continuing MLflow runs recorded in {ids_file}")
            return saved.get("parent"), saved["members"]
    storage_path = cfg.checkpoint.storage_path
    try:
        parent = None
        if n > 1:
            parent = create_run(
                uri,
                cfg.tracking.experiment,
                cfg.checkpoint.name,
                storage_path,
                {**tags, "role": "ensemble-parent"},
            )
            from ops.tracking import RunTracker

            RunTracker(uri, parent).log_params(flatten(cfg.to_dict()))
        members = []
        for i in range(n):
            member_cfg = cfg.for_member(i)
            members.append(
                create_run(
                    uri,
                    cfg.tracking.experiment,
                    member_cfg.checkpoint.name,
                    storage_path,
                    {
                        **tags,
                        "role": "ensemble-member" if n > 1 else "single",
                        "ensemble.member_index": str(i),
                        "seed": str(member_cfg.seed),
                    },
                    parent_run_id=parent,
                )
            )
    except Exception as exc:  # tracking must never stop training
        print(
            f"warning: could not create MLflow runs at {uri} ({type(exc).__name__}: {exc}); "
            "training continues untracked"
        )
        return None, [None] * n
    saved = {"tracking_uri": uri, "parent": parent, "members": members}
    storage.write_text(ids_file, json.dumps(saved, indent=2))
    return parent, members


def member_slots(cfg: TrainConfig) -> int:
    """How many members the cluster can train at once (``ensemble.concurrent`` decides when not auto)."""
    import ray

    from orchestration.trainer import resolve_use_gpu

    n = cfg.ensemble.members
    if cfg.ensemble.concurrent == "off":
        return 1
    if cfg.ensemble.concurrent == "on":
        return n
    res = ray.cluster_resources()
    workers = cfg.scaling.num_workers
    fits = int(res.get("CPU", 0) // (workers * cfg.scaling.cpus_per_worker))
    if resolve_use_gpu(cfg.scaling.use_gpu):
        fits = min(fits, int(res.get("GPU", 0) // (workers * cfg.scaling.gpus_per_worker)))
    return max(1, min(n, fits))


def register_members(
    cfg: TrainConfig, members: tuple[MemberResult, ...], uri: str, parent: str | None
) -> tuple[Any, Any, str]:
    """Register the final checkpoints with ``ops.registry`` (when present) and ask its promotion gate."""
    try:
        from ops import registry
    except ImportError as exc:
        return (
            None,
            None,
            (
                f"ops.registry is not available ({exc}); register later with "
                "`inception-registry register` on the checkpoint directories"
            ),
        )
    from mlflow import MlflowClient

    from ops.tracking import ensure_experiment

    sources = []
    for m in members:
        if m.run_id and cfg.tracking.enabled and cfg.tracking.log_checkpoint:
            sources.append(f"runs:/{m.run_id}")
        elif m.checkpoint_dir:
            sources.append(m.checkpoint_dir)
    if len(sources) != len(members):
        return None, None, "a member has no final checkpoint; nothing registered"
    # Give the registry's experiment an absolute artifact location (see ops.tracking).
    ensure_experiment(
        MlflowClient(tracking_uri=uri), registry.DEFAULT_EXPERIMENT, cfg.checkpoint.storage_path, uri
    )
    version = registry.register_ensemble(
        sources,
        cfg.ensemble.model_name,
        tracking_uri=uri,
        crops=cfg.ensemble.eval_crops,
        eval_shards=cfg.data.shards,
        eval_split=cfg.data.val_split,
        tags={"training_parent_run": parent or (members[0].run_id or "-")},
    )
    if parent:  # the ensemble's own run carries what the ensemble scored
        client = MlflowClient(tracking_uri=uri)
        for key in ("eval.top1_error", "eval.top5_error"):
            if key in version.tags:
                client.log_metric(parent, key, float(version.tags[key]))
    decision = (
        registry.promote(cfg.ensemble.model_name, version.version, tracking_uri=uri)
        if cfg.ensemble.promote
        else None
    )
    return version, decision, ""


def quiet_single_node() -> None:
    """On a one-node cluster there is no node to be preempted: Ray Train's preemption watcher has
    nothing to watch, and starting it makes Ray core log an error-level line about its constructor
    arguments for every model trained (ray-project/ray#53727). Off there (a default: an exported
    ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` wins); Ray Train passes the setting on to its controller."""
    import os

    import ray

    if sum(1 for node in ray.nodes() if node.get("Alive")) == 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def timings_file(cfg: TrainConfig) -> str:
    return storage.join(cfg.checkpoint.storage_path, f"{cfg.checkpoint.name}.timings.json")


def write_timings(cfg: TrainConfig, timings: dict[str, float]) -> None:
    """Wall seconds per stage of the job (``member <i>``, ``registration``), for the caller's time table."""
    storage.write_text(timings_file(cfg), json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=2))


def run_training(cfg: TrainConfig, repo_root: str | Path) -> TrainingOutcome:
    """Train every member to the end, then register them; Ray must already be initialised."""
    from ops.tracking import RunTracker, resolve_tracking_uri

    if not storage.is_remote(cfg.checkpoint.storage_path):
        Path(cfg.checkpoint.storage_path).mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.checkpoint.storage_path)
    parent, run_ids = create_runs(cfg, uri, common_tags(cfg, repo_root))
    n = cfg.ensemble.members
    slots = member_slots(cfg)
    quiet_single_node()
    print(
        f"training {n} member(s), {slots} at a time, {cfg.scaling.num_workers} worker(s) each; "
        f"tracking {uri}; checkpoints under {cfg.checkpoint.storage_path}",
        flush=True,
    )
    # members_after: the waves of members still to come after member i's, for its ETA line
    jobs = [(cfg.for_member(i), i, run_ids[i], uri, (n - 1 - i) // slots) for i in range(n)]
    timings: dict[str, float] = {}

    def fit(job) -> MemberResult:
        start = time.monotonic()
        result = fit_member(*job)
        timings[f"member {job[1]}"] = time.monotonic() - start
        return result

    if slots == 1:
        members = tuple(fit(job) for job in jobs)
    else:
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="member") as pool:
            members = tuple(pool.map(fit, jobs))
    for run_id in run_ids:
        RunTracker(uri, run_id).set_terminated("FINISHED")
    version = decision = None
    note = ""
    if cfg.ensemble.register:
        start = time.monotonic()
        version, decision, note = register_members(cfg, members, uri, parent)
        timings["registration"] = time.monotonic() - start
        if note:
            print(f"note: {note}")
        else:
            print(
                f"registered {cfg.ensemble.model_name} version {version.version}"
                + (f"; promotion: {decision.reason}" if decision is not None else "")
            )
    write_timings(cfg, timings)
    if parent:
        tracker = RunTracker(uri, parent)
        tracker.set_tags({"registered_version": getattr(version, "version", None)})
        tracker.log_dict({"members": [m.__dict__ for m in members]}, "members.json")
        tracker.set_terminated("FINISHED")
    return TrainingOutcome(
        members=members,
        tracking_uri=uri,
        parent_run_id=parent,
        registered=version,
        promotion=decision,
        note=note,
    )
