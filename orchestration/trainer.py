"""Ray Train: the per-worker training function and the ``TorchTrainer`` that runs it for one model.

``fit_member(cfg, ...)`` is called by ``orchestration.ensemble`` (driver side, from
``orchestration/train.py``); ``train_worker(loop_config)`` runs inside each Ray Train worker:

1. rebuild the typed config from the plain dict Ray hands it (first line);
2. build the model, its EMA, the optimizer and schedule, and this rank's loaders (global rank);
3. resume exactly from ``ray.train.get_checkpoint()`` when there is one (epoch, step, optimizer,
   schedule, EMA, every rank's RNG state, the position in the epoch's sample order and the
   quarantine list: ``loader.set_epoch(epoch, position)`` continues at the next sample);
4. per epoch: train, validate raw and EMA weights (top-1/top-5), ``ray.train.report(metrics,
   checkpoint)`` with the checkpoint written by rank 0 only (``ops.checkpoint.save_checkpoint``).

Checkpoints are taken at epoch ends and, with ``checkpoint.every_steps``, every N steps inside an
epoch. Positions count the samples the whole job has consumed, so a resume may use another number
of workers (``data.global_batch`` keeps the global batch, and with it the schedule, the same).
Corrupt samples quarantined by any rank are shared by all ranks at every checkpoint and epoch end,
kept in checkpoints, and logged to MLflow as ``data/quarantine.json``.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestration.config import TrainConfig, flatten, to_yaml
from orchestration.console import TRAIN_LOG_LEVEL, epoch_line, silence_report_lines, training_eta
from orchestration.ema import ModelEma
from orchestration.loop import LoopSettings, evaluate, train_one_epoch
from orchestration.optim import build_optimizer, loss_weight_decay
from orchestration.schedule import LrSchedule, scaled_lr, warmup_epochs


@dataclass(frozen=True)
class MemberResult:
    index: int
    run_id: str | None  # MLflow run of this member
    checkpoint_dir: str | None  # latest (final) checkpoint directory in the storage path
    metrics: dict[str, Any]  # last reported metrics
    epochs_reported: tuple[int, ...]  # epochs in Ray's reported-checkpoint history, in order


def _rng_state() -> dict[str, Any]:
    """Every random stream of this process as tensors and plain Python values, the only things a
    checkpoint may hold (it is read with ``weights_only=True``): numpy's key array as a tensor."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _byte_tensor(state: Any) -> torch.Tensor:
    """RNG states must be CPU uint8 tensors (``torch.set_rng_state`` raises "RNG state must be a
    torch.ByteTensor" for anything else, e.g. a state that a checkpoint load mapped to CUDA)."""
    return torch.as_tensor(state).detach().to("cpu", torch.uint8)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_byte_tensor(t) for t in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            print(
                f"warning: the checkpoint holds CUDA RNG states of {len(cuda)} device(s) and this worker "
                f"sees {torch.cuda.device_count()}: CUDA random streams (dropout) start afresh",
                flush=True,
            )


def _gather_rng_states() -> list[dict[str, Any]]:
    mine = _rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng_states(states: list[dict[str, Any]], rank: int, world_size: int) -> None:
    """This rank's saved RNG state; with another world size there is none to match, and it says so."""
    if len(states) == world_size:
        _set_rng_state(states[rank])
    elif rank == 0:
        print(
            f"warning: the checkpoint holds RNG states of {len(states)} worker(s) and this run has "
            f"{world_size}: random streams (dropout) start afresh from the seed; the data order does "
            "not depend on them",
            flush=True,
        )


def restore_training_state(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    ema: ModelEma | None,
    *,
    rank: int,
    world_size: int,
) -> tuple[int, int]:
    """Load a checkpoint's weights, optimizer, schedule, EMA and this rank's RNG state into the live
    objects (on whatever device they are); returns ``(epoch, global step)`` to continue from.
    Tensors may come mapped to any device: weights and optimizer state are copied to the parameters'
    device, RNG states go back to the CPU."""
    model.load_state_dict(payload["model"], strict=True)
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["scheduler"])
    if ema is not None:
        ema.load_state_dict(payload["ema"], payload["extra"]["ema_updates"])
    restore_rng_states(payload["extra"]["rng"], rank, world_size)
    return int(payload["epoch"]), int(payload["step"])


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> int:
    """Every BatchNorm's running-average momentum (``model.bn_momentum``); returns how many."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = momentum
    return len(norms)


def loop_settings(
    cfg: TrainConfig, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
) -> LoopSettings:
    on_gpu = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if on_gpu else None, "bf16": torch.bfloat16, "off": None}[cfg.model.amp]
    channels_last = {"auto": on_gpu, "on": True, "off": False}[cfg.model.channels_last]
    return LoopSettings(
        device=device,
        amp_dtype=amp,
        channels_last=channels_last,
        aux_weights=tuple(getattr(model, "aux_loss_weights", ())),
        label_smoothing=cfg.optim.label_smoothing,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        clip_mode=cfg.optim.clip_mode,
        loss_weight_decay=loss_weight_decay(cfg.optim),
        log_every=cfg.tracking.log_every_steps,
        max_steps=cfg.debug.max_steps_per_epoch,
        max_eval_batches=cfg.debug.max_eval_batches,
        fail_at_step=cfg.debug.fail_at_step,
        fail_marker=cfg.debug.fail_marker,
        fail_mode=cfg.debug.fail_mode,
        rank=rank,
        world_size=world_size,
    )


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``loop_config`` = ``{"config": TrainConfig.to_dict(),
    "mlflow_run_id": ..., "tracking_uri": ..., "member": i, "members_after": k}`` (``members_after``:
    how many models of the job train after this one, for the console's ETA)."""
    cfg = TrainConfig.from_dict(loop_config["config"])  # typed config first (STYLE.md rule 2)
    import ray.train
    import ray.train.torch

    import models
    from ops.checkpoint import save_checkpoint
    from ops.tracking import RunTracker
    from pipeline import load_manifest, make_loader

    silence_report_lines()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    else:  # fixed input sizes: let cuDNN time its convolution algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = True
    tracker = RunTracker(
        loop_config.get("tracking_uri", ""),
        loop_config.get("mlflow_run_id"),
        enabled=cfg.tracking.enabled and rank == 0,
    )  # only rank 0 logs

    manifest = load_manifest(cfg.data.shards)
    if cfg.model.num_classes and cfg.model.num_classes != manifest.num_classes:
        raise DataCheckError(
            f"model.num_classes={cfg.model.num_classes} but the shards in {cfg.data.shards} have "
            f"{manifest.num_classes} classes; set model.num_classes=0 to take the manifest's"
        )
    num_classes = cfg.model.num_classes or manifest.num_classes
    model_spec = {"name": cfg.model.name, "num_classes": num_classes, "options": cfg.model.build_options()}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = models.build_model(model_spec["name"], num_classes, **model_spec["options"])
    set_bn_momentum(model, cfg.model.bn_momentum)
    s = loop_settings(cfg, model, device, rank, world_size)
    model = model.to(device, memory_format=torch.channels_last if s.channels_last else torch.preserve_format)
    ema = ModelEma(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None

    # data.layout auto: batches in the memory order the model computes in (channels-last batches for
    # a channels_last model, the default on CUDA), so that the loop never copies a batch to convert.
    data_cfg = per_rank_data(cfg, world_size)
    if data_cfg.layout == "auto":
        data_cfg = replace(data_cfg, layout="NHWC" if s.channels_last else "NCHW")
    global_batch = data_cfg.batch_size * world_size
    train_loader = make_loader(data_cfg, data_cfg.train_split, rank, world_size, device)
    val_loader = make_loader(data_cfg, data_cfg.val_split, rank, world_size, device)
    class_names = list(getattr(train_loader, "class_names", None) or manifest.class_names)
    steps_per_epoch = len(train_loader)
    if cfg.debug.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.debug.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise RuntimeError(
            f"data.shards {cfg.data.shards}: split {cfg.data.train_split!r} gives no full batch "
            f"of {cfg.data.batch_size} per rank for {world_size} workers; lower data.batch_size"
        )
    base_lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    schedule = LrSchedule(
        optimizer, base_lr, steps_per_epoch, cfg.schedule, warmup_epochs(cfg.schedule, global_batch)
    )

    from pipeline import manifest_sha256

    data_sha = manifest_sha256(cfg.data.shards)
    start_epoch, global_step, start_position = 0, 0, 0
    torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank stream for dropout etc. after identical init
    payload, source = load_resume_payload(cfg)
    if payload is not None:
        data_state = payload["extra"].get("data", {})
        check_resume_data(cfg, data_state, data_sha, global_batch)
        start_epoch, global_step = restore_training_state(
            payload, model, optimizer, schedule, ema, rank=rank, world_size=world_size
        )
        start_position = int(data_state.get("position", 0))
        train_loader.quarantine.merge(data_state.get("quarantine", []))
        print(
            f"[rank {rank}] resumed from {source}: epoch {start_epoch}, step {global_step}, "
            f"position {start_position} of the epoch's sample order",
            flush=True,
        )
    elif rank == 0:  # a fresh run: describe it once
        tracker.log_params(flatten(cfg.to_dict()))
        tracker.log_text(to_yaml(cfg), "config/resolved_config.yaml")
        tracker.log_text("\n".join(class_names) + "\n", "class_names.txt")
        tracker.set_tags(
            {
                "num_classes": num_classes,
                "global_batch": global_batch,
                "base_lr": base_lr,
                "steps_per_epoch": steps_per_epoch,
                "world_size": world_size,
                "device": device.type,
            }
        )

    train_model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world_size > 1
    if cfg.model.compile:
        train_model = torch.compile(train_model)
    eval_model = (
        torch.compile(model) if cfg.model.compile else model
    )  # unwrapped: ranks may differ in batches
    ema_eval = ema.module if ema is not None else None

    def on_log(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(metrics, step)

    member, members_after = int(loop_config.get("member", 0)), int(loop_config.get("members_after", 0))
    epoch_times: list[float] = []  # wall time of each epoch run by this process (train, val, report)
    mark = time.monotonic()
    logged_quarantine = [0]

    def share_quarantine() -> None:
        """Every rank's quarantined samples to every rank (identical orders from the next epoch on)."""
        records = train_loader.quarantine.to_list()
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        train_loader.quarantine.merge(records)
        if rank == 0 and len(train_loader.quarantine) != logged_quarantine[0]:
            logged_quarantine[0] = len(train_loader.quarantine)
            tracker.log_text(json.dumps(train_loader.quarantine.to_list(), indent=1), "data/quarantine.json")

    def save_and_report(metrics: dict, epochs_done: int, step: int, position: int, epoch_end: bool) -> None:
        """Rank 0 writes the checkpoint; every rank reports (Ray Train needs every rank's report)."""
        share_quarantine()
        rng_states = _gather_rng_states()
        data_state = {
            "position": position,
            "quarantine": train_loader.quarantine.to_list(),
            "manifest_sha256": data_sha,
            "global_batch": global_batch,
        }
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            ray_checkpoint = None
            if rank == 0:
                started = time.perf_counter()
                save_checkpoint(
                    tmp,
                    {
                        "model_spec": model_spec,
                        "model": model.state_dict(),
                        "ema": (ema.state_dict() if ema is not None else model.state_dict()),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": schedule.state_dict(),
                        "epoch": epochs_done,
                        "step": step,
                        "config": cfg.to_dict(),
                        "class_names": class_names,
                        "metrics": metrics,
                        "extra": {
                            "rng": rng_states,
                            "ema_updates": ema.num_updates if ema is not None else 0,
                            "world_size": world_size,
                            "data": data_state,
                        },
                    },
                )
                write_data_state(tmp, data_state, epochs_done, step)
                ray_checkpoint = ray.train.Checkpoint.from_directory(tmp)
                metrics = {**metrics, "checkpoint_write_s": time.perf_counter() - started}
                if not epoch_end:
                    tracker.log_metrics(
                        {"checkpoint_write_s": metrics["checkpoint_write_s"]}, step=step
                    )
            if epoch_end and rank == 0:
                nonlocal mark
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epochs_done)
                epoch_times.append(time.monotonic() - mark)
                mark = time.monotonic()
                eta = training_eta(
                    epoch_times, cfg.schedule.epochs - epochs_done, members_after, cfg.schedule.epochs
                )
                print(epoch_line(member, epochs_done, cfg.schedule.epochs, metrics, eta), flush=True)
                if epochs_done == cfg.schedule.epochs:
                    if cfg.tracking.log_checkpoint:
                        tracker.log_artifacts(tmp, "checkpoint")
                    tracker.log_training_curves()
            ray.train.report(metrics, checkpoint=ray_checkpoint)

    trace = StepTrace(cfg.debug.trace_file, rank)
    for epoch in range(start_epoch, cfg.schedule.epochs):
        train_loader.set_epoch(epoch, start_position if epoch == start_epoch else 0)

        def on_step(step: int, loss: torch.Tensor, epoch: int = epoch) -> None:
            trace.write(epoch, step, train_loader, loss)
            every = cfg.checkpoint.every_steps
            if every and step % every == 0 and train_loader.order.steps(epoch, train_loader.position) > 0:
                position = train_loader.position
                mid = {"epoch": epoch, "step": step, "position": position}
                save_and_report(mid, epoch, step, position, False)

        train_metrics, global_step = train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            schedule,
            ema,
            model,
            s,
            global_step,
            on_log=on_log if rank == 0 else None,
            on_step=on_step,
        )
        val = evaluate(eval_model, val_loader, s)
        metrics = {
            "epoch": epoch + 1,
            "step": global_step,
            **train_metrics,
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
            "val_count": val["count"],
            "quarantined": len(train_loader.quarantine),
        }
        if ema_eval is not None:
            val_ema = evaluate(ema_eval, val_loader, s)
            metrics.update(
                val_ema_top1=val_ema["top1"], val_ema_top5=val_ema["top5"], val_ema_loss=val_ema["loss"]
            )
        save_and_report(metrics, epoch + 1, global_step, 0, True)
    if rank == 0:  # metrics kept during an MLflow outage: delivered now, or reported as lost
        tracker.flush(final=True, attempts=3, wait_s=5.0)


class DataCheckError(RuntimeError):
    """The data and the run disagree (class count, shards changed since the checkpoint, batch split)."""


DATA_STATE_FILE = "data_state.json"  # beside checkpoint.pt: what the driver checks before a resume


def per_rank_data(cfg: TrainConfig, world_size: int):
    """The data config of one rank: ``data.global_batch`` split over the workers when it is set."""
    g = cfg.data.global_batch
    if not g:
        return cfg.data
    if g % world_size:
        raise DataCheckError(
            f"data.global_batch={g} does not split over {world_size} workers; choose a multiple"
        )
    return replace(cfg.data, batch_size=g // world_size)


def write_data_state(directory: str | Path, state: dict, epoch: int, step: int) -> None:
    summary = {"epoch": epoch, "step": step, **{k: v for k, v in state.items() if k != "quarantine"}}
    summary["quarantined"] = len(state["quarantine"])
    (Path(directory) / DATA_STATE_FILE).write_text(json.dumps(summary, indent=1) + "\n")


def check_resume_data(cfg: TrainConfig, state: dict, data_sha: str, global_batch: int) -> None:
    """One-line errors for a resume that would silently read other data or another schedule."""
    saved = state.get("manifest_sha256")
    if saved and saved != data_sha and not cfg.checkpoint.force_data_change:
        raise DataCheckError(
            f"the shards in {cfg.data.shards} (manifest {data_sha[:12]}) are not those the checkpoint was "
            f"trained on (manifest {saved[:12]}); point data.shards at them, start a new run "
            "(checkpoint.name), or pass --force-data-change"
        )
    before = state.get("global_batch")
    if before and before != global_batch:
        raise DataCheckError(
            f"the checkpoint was trained with a global batch of {before} and this run has {global_batch}; "
            f"set data.global_batch={before} to resume with any number of workers"
        )


def check_before_resume(cfg: TrainConfig) -> None:
    """Driver side, before any worker starts: the newest checkpoint of this run name against the
    shards and the global batch of this run (the same checks the workers make, as one line)."""
    if "://" in cfg.checkpoint.storage_path:
        return
    from pipeline import manifest_sha256

    run_dir = Path(cfg.checkpoint.storage_path) / cfg.checkpoint.name
    states = sorted(run_dir.glob(f"checkpoint_*/{DATA_STATE_FILE}"), reverse=True)
    if not states:
        return
    state = json.loads(states[0].read_text())
    global_batch = cfg.data.global_batch or cfg.data.batch_size * cfg.scaling.num_workers
    if cfg.scaling.min_workers and not cfg.data.global_batch:
        global_batch = state.get("global_batch")  # elastic without a fixed batch: whatever it finds
    check_resume_data(cfg, state, manifest_sha256(cfg.data.shards), global_batch)


class StepTrace:
    """``debug.trace_file``: one JSON line per step and rank (epoch, step, position, samples, loss)."""

    def __init__(self, path: str, rank: int) -> None:
        self.path = Path(f"{path}.rank{rank}") if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, epoch: int, step: int, loader, loss: torch.Tensor) -> None:
        if self.path is None:
            return
        line = {
            "epoch": epoch,
            "step": step,
            "position": loader.position,
            "ids": loader.last_batch.ids.tolist(),
            "loss": float(loss),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def newest_local_checkpoint(cfg: TrainConfig, newer_than_step: int) -> Path | None:
    """The newest readable checkpoint under ``<storage_path>/<name>`` with a later step, if any.

    Ray Train V2 registers a reported checkpoint only when its controller polls the worker (every 2 s);
    a worker that dies right after ``report`` leaves a persisted checkpoint that ``get_checkpoint()``
    does not return. Checkpoint folders are named by time, so the newest readable one wins. Local (or
    NFS-mounted) storage paths only; with ``s3://`` storage Ray's own record is used.
    """
    from ops.checkpoint import CheckpointError, load_checkpoint

    if "://" in cfg.checkpoint.storage_path:
        return None
    run_dir = Path(cfg.checkpoint.storage_path) / cfg.checkpoint.name
    for candidate in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        try:
            step = int(load_checkpoint(candidate)["step"])
        except CheckpointError:  # partially copied when the worker died
            continue
        return candidate if step > newer_than_step else None
    return None


def load_resume_payload(cfg: TrainConfig) -> tuple[dict | None, str | None]:
    """The checkpoint to resume from: Ray's ``get_checkpoint()``, or a newer one persisted on storage
    (chosen by rank 0 and broadcast, so every rank resumes from the same one).

    Loaded on the CPU whatever the worker's device: ``load_state_dict`` copies weights and optimizer
    state to the parameters' device, and RNG states must stay CPU byte tensors (mapped to CUDA,
    ``torch.set_rng_state`` rejects them and every resume on a GPU would fail)."""
    import ray.train

    from ops.checkpoint import load_checkpoint

    payload, source = None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            payload = load_checkpoint(ckpt_dir, map_location="cpu")
        source = checkpoint.path
    newer = [None]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        found = newest_local_checkpoint(cfg, int(payload["step"]) if payload else 0)
        newer = [str(found) if found else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(newer, src=0)
    if newer[0]:
        payload, source = load_checkpoint(newer[0], map_location="cpu"), newer[0]
    return payload, source


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
            storage_path=cfg.checkpoint.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            # Ray Train's per-report INFO lines (the whole metrics dict, per rank, per epoch) off:
            # the epoch line above says it once (orchestration.console)
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
        ),
    )


def fit_member(
    cfg: TrainConfig, index: int, run_id: str | None, tracking_uri: str, members_after: int = 0
) -> MemberResult:
    """Train one model to the end (resuming a previous run of the same name) and describe the result."""
    check_before_resume(cfg)
    result = build_trainer(cfg, run_id, tracking_uri, index, members_after).fit()
    if result.error is not None:
        raise result.error
    epochs: list[int] = []
    for _, metrics in result.best_checkpoints or []:
        epochs.append(int(metrics.get("epoch", -1)))
    ckpt = result.checkpoint
    return MemberResult(
        index=index,
        run_id=run_id,
        checkpoint_dir=str(Path(ckpt.path)) if ckpt else None,
        metrics=dict(result.metrics or {}),
        epochs_reported=tuple(epochs),
    )
