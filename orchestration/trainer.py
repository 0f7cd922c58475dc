"""Ray Train, driver side: the ``TorchTrainer`` that trains one model and what it leaves behind.

``fit_member(cfg, ...)`` is called by ``orchestration.ensemble`` (from ``orchestration/train.py``):
it checks the settings against the data and the newest checkpoint of the run before any worker
starts (``orchestration.resume.check_before_start`` / ``check_before_resume``), builds the
``TorchTrainer`` whose workers run ``orchestration.worker.train_worker``, trains to the end
(resuming a previous run of the same ``checkpoint.name``) and describes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.config import TrainConfig
from orchestration.console import TRAIN_LOG_LEVEL
from orchestration.resume import DataCheckError, check_before_resume, check_before_start, refusal_file
from orchestration.worker import train_worker


@dataclass(frozen=True)
class MemberResult:
    index: int
    run_id: str | None  # MLflow run of this member
    checkpoint_dir: str | None  # latest (final) checkpoint directory in the storage path
    metrics: dict[str, Any]  # last reported metrics
    epochs_reported: tuple[int, ...]  # epochs in Ray's reported-checkpoint history, in order


def resolve_use_gpu(setting: str) -> bool:
    import ray

    have = ray.cluster_resources().get("GPU", 0) > 0
    if setting == "on" and not have:
        raise RuntimeError(
            "scaling.use_gpu=on but the Ray cluster has no GPU; use scaling.use_gpu=auto or off"
        )
    return have if setting == "auto" else setting == "on"


def build_trainer(
    cfg: TrainConfig, run_id: str | None, tracking_uri: str, member: int = 0, members_after: int = 0
):
    """The ``TorchTrainer`` for one model (one ensemble member)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg.scaling.use_gpu)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    storage_path, storage_fs = cfg.checkpoint.storage_path, None
    if storage_path.startswith("s3://"):  # the same endpoint as the shards', no directory markers
        from orchestration.remote_storage import arrow_filesystem

        storage_fs, storage_path = arrow_filesystem(storage_path, cfg.data.storage_options)
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "member": member,
            "members_after": members_after,
        },
        scaling_config=ScalingConfig(
            num_workers=(
                (cfg.scaling.min_workers, cfg.scaling.num_workers)
                if cfg.scaling.min_workers
                else cfg.scaling.num_workers
            ),
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.checkpoint.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            # Ray Train's per-report INFO lines (the whole metrics dict, per rank, per epoch) off:
            # the epoch line above says it once (orchestration.console)
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
        ),
    )


def checkpoint_location(cfg: TrainConfig, path: str) -> str:
    """A checkpoint's folder, or its URI on object storage (Ray reports ``bucket/key`` there)."""
    scheme = cfg.checkpoint.storage_path.partition("://")
    if scheme[1] and not path.startswith(scheme[0] + "://"):
        return f"{scheme[0]}://{path.lstrip('/')}"
    return str(Path(path))


def fit_member(
    cfg: TrainConfig, index: int, run_id: str | None, tracking_uri: str, members_after: int = 0
) -> MemberResult:
    """Train one model to the end (resuming a previous run of the same name) and describe the result."""
    check_before_start(cfg)
    check_before_resume(cfg)
    refused = refusal_file(cfg)
    if refused is not None:
        refused.unlink(missing_ok=True)  # an earlier job's
    result = build_trainer(cfg, run_id, tracking_uri, index, members_after).fit()
    if refused is not None and refused.exists():  # a data or settings check the workers made: no retry
        message = refused.read_text()
        refused.unlink()
        raise DataCheckError(message)
    if result.error is not None:
        raise result.error
    epochs: list[int] = []
    for _, metrics in result.best_checkpoints or []:
        epochs.append(int(metrics.get("epoch", -1)))
    ckpt = result.checkpoint
    return MemberResult(
        index=index,
        run_id=run_id,
        checkpoint_dir=checkpoint_location(cfg, ckpt.path) if ckpt else None,
        metrics=dict(result.metrics or {}),
        epochs_reported=tuple(epochs),
    )
