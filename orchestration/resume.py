"""Resuming a run exactly: what a checkpoint holds beyond the weights, and choosing the checkpoint.

Library module, no CLI; used by ``orchestration.worker`` (inside each Ray Train worker), by
``orchestration.trainer`` (driver side, before any worker starts) and by ``make gpu-check``'s resume
check.

- Random streams: every rank's torch / Python / numpy / CUDA RNG state as plain tensors and values
  (checkpoints are read with ``weights_only=True``), restored when the world size is unchanged.
- ``restore_training_state``: weights, optimizer, schedule, EMA and RNG state into live objects.
- Data state (``data_state.json`` beside the checkpoint): position in the epoch's order, quarantine,
  manifest hash and global batch; ``check_resume_data`` refuses a resume that would silently read
  other data or another schedule.
- ``load_resume_payload``: Ray's ``get_checkpoint()``, or a newer one persisted on storage.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestration.config import TrainConfig
from orchestration.ema import ModelEma
from orchestration.schedule import LrSchedule


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
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


def gather_rng_states() -> list[dict[str, Any]]:
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng_states(states: list[dict[str, Any]], rank: int, world_size: int) -> None:
    """This rank's saved RNG state; with another world size there is none to match, and it says so."""
    if len(states) == world_size:
        set_rng_state(states[rank])
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


class DataCheckError(RuntimeError):
    """The data and the run disagree (class count, shards changed since the checkpoint, batch split)."""


REFUSED_FILE = "refused.txt"  # <storage_path>/<name>/: why the workers refused to run (not retried)


def refusal_file(cfg: TrainConfig) -> Path | None:
    """Where rank 0 leaves a DataCheckError for the driver: the run's folder on local (or mounted)
    storage; None for remote storage, where the error is raised and Ray retries it."""
    if "://" in cfg.checkpoint.storage_path:
        return None
    return Path(cfg.checkpoint.storage_path) / cfg.checkpoint.name / REFUSED_FILE


DATA_STATE_FILE = "data_state.json"  # beside checkpoint.pt: what the driver checks before a resume


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


# Settings whose change alters the number of steps in an epoch, and so the learning-rate schedule.
SCHEDULE_SETTINGS = (
    ("debug", "max_steps_per_epoch"),
    ("data", "global_batch"),
    ("data", "batch_size"),
    ("scaling", "num_workers"),
    ("data", "train_split"),
    ("data", "shards"),
)


def check_resume_schedule(cfg: TrainConfig, saved_config: dict, saved_steps: int, steps: int) -> None:
    """A resume whose epochs have another number of steps than the checkpoint's: one line naming
    each setting that changed, with its old and new value."""
    if int(saved_steps) == int(steps):
        return
    now = cfg.to_dict()
    changed = [
        f"{section}.{key} {saved_config.get(section, {}).get(key)!r} -> {now[section][key]!r}"
        for section, key in SCHEDULE_SETTINGS
        if saved_config.get(section, {}).get(key) != now[section][key]
    ]
    raise DataCheckError(
        f"the checkpoint's epochs have {saved_steps} steps and this run's {steps}, so its learning-rate "
        f"schedule cannot continue; changed since: {', '.join(changed) or 'the train split size'}. "
        "Resume with the checkpoint's values, or start a new run (checkpoint.name)"
    )


def check_before_start(cfg: TrainConfig) -> None:
    """Driver side, before any worker starts: the settings a worker would refuse (each a one-line
    ``DataCheckError``), so that Ray does not retry them ``checkpoint.max_failures`` times with a
    traceback each. The workers check the same again."""
    from pipeline import load_manifest

    manifest = load_manifest(cfg.data.shards)
    if cfg.model.num_classes and cfg.model.num_classes != manifest.num_classes:
        raise DataCheckError(
            f"model.num_classes={cfg.model.num_classes} but the shards in {cfg.data.shards} have "
            f"{manifest.num_classes} classes; set model.num_classes=0 to take the manifest's"
        )
    g = cfg.data.global_batch
    for workers in sorted({cfg.scaling.num_workers, cfg.scaling.min_workers or cfg.scaling.num_workers}):
        if g and g % workers:
            raise DataCheckError(
                f"data.global_batch={g} does not split over {workers} workers; choose a multiple"
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
        if not candidate.is_dir():  # Ray's checkpoint_manager_snapshot.json
            continue
        try:
            step = int(load_checkpoint(candidate)["step"])
        except CheckpointError as exc:  # partially copied when the worker died, or not ours at all
            print(f"warning: skipped {candidate} while looking for the newest checkpoint: {exc}", flush=True)
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
