"""The Ray Train worker: ``train_worker(loop_config)`` runs inside each worker of one model's
``TorchTrainer`` (``orchestration.trainer``).

1. rebuild the typed config from the plain dict Ray hands it (first line);
2. build the model, this rank's loaders (global rank), then the optimizer, schedule and EMA
   (``orchestration.state.build_train_state``);
3. resume exactly from ``ray.train.get_checkpoint()`` when there is one (``orchestration.resume``:
   epoch, step, optimizer, schedule, EMA, every rank's RNG state, the position in the epoch's sample
   order and the quarantine list: ``loader.set_epoch(epoch, position)`` continues at the next sample);
4. per epoch: train, validate raw and EMA weights (top-1/top-5), ``ray.train.report(metrics,
   checkpoint)`` with the checkpoint written by rank 0 only (``ops.checkpoint.save_checkpoint``).

Checkpoints are taken at epoch ends and, with ``checkpoint.every_steps``, every N steps inside an
epoch. Positions count the samples the whole job has consumed, so a resume may use another number
of workers (``data.global_batch`` keeps the global batch, and with it the schedule, the same).
Corrupt samples quarantined by any rank, in the training or the validation split, are shared by all
ranks at every checkpoint and epoch end, kept in checkpoints, and logged to MLflow as
``data/quarantine.json`` (a record's shard names its split).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestration.config import TrainConfig, flatten, to_yaml
from orchestration.console import epoch_line, progress_line, silence_report_lines, training_eta
from orchestration.loop import LoopSettings, evaluate, train_one_epoch
from orchestration.optim import loss_weight_decay
from orchestration.resume import (
    DataCheckError,
    check_resume_data,
    check_resume_schedule,
    gather_rng_states,
    load_resume_payload,
    refusal_file,
    restore_training_state,
    write_data_state,
)
from orchestration.schedule import scaled_lr, warmup_epochs
from orchestration.state import build_train_state, place_model, set_bn_momentum


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
        progress_every_s=cfg.console.progress_every_s if rank == 0 else 0.0,
    )


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


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``loop_config`` = ``{"config": TrainConfig.to_dict(),
    "mlflow_run_id": ..., "tracking_uri": ..., "member": i, "members_after": k}`` (``members_after``:
    how many models of the job train after this one, for the console's ETA)."""
    cfg = TrainConfig.from_dict(loop_config["config"])  # typed config first (docs/architecture.md)
    try:
        WorkerRun(cfg, loop_config).run()
    except DataCheckError as exc:
        # Data and settings that a retry would meet again (every rank meets the same check): left
        # for the driver instead of raised, so that Ray does not retry checkpoint.max_failures
        # times with a traceback each; the driver raises it as one line (trainer.fit_member).
        # Ray Train keeps no metrics-only report, so the message goes through the run's folder.
        import ray.train

        where = refusal_file(cfg)
        if where is None:
            raise
        if ray.train.get_context().get_world_rank() == 0:
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text(str(exc))


class WorkerRun:
    """One worker's part of training one model: built (and resumed) in ``__init__``, trained by ``run``.
    Rank 0 writes checkpoints and logs to MLflow; every rank reports to Ray Train."""

    def __init__(self, cfg: TrainConfig, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        from ops.tracking import RunTracker

        silence_report_lines()
        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        else:  # fixed input sizes: let cuDNN time its convolution algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        self.tracker = RunTracker(
            loop_config.get("tracking_uri", ""),
            loop_config.get("mlflow_run_id"),
            enabled=cfg.tracking.enabled and self.rank == 0,
        )  # only rank 0 logs
        self.member = int(loop_config.get("member", 0))
        self.members_after = int(loop_config.get("members_after", 0))
        self._build()
        self._start()
        self.train_model = ray.train.torch.prepare_model(self.state.model, move_to_device=False)  # DDP
        if cfg.model.compile:
            self.train_model = torch.compile(self.train_model)
        model = self.state.model  # unwrapped for evaluation: ranks may differ in batches
        self.eval_model = torch.compile(model) if cfg.model.compile else model
        self.epoch_times: list[float] = []  # wall time of each epoch run by this process
        self.mark = time.monotonic()
        self.logged_quarantine = 0
        self.trace = StepTrace(cfg.debug.trace_file, self.rank)

    # --- set-up ---------------------------------------------------------------------------------
    def _build(self) -> None:
        """Model (identical initial weights on every rank), loaders, optimizer, schedule, EMA."""
        import models
        from pipeline import load_manifest, make_loader, manifest_sha256, storage

        cfg, rank, world_size = self.cfg, self.rank, self.world_size
        storage.configure(cfg.data.storage_options)
        manifest = load_manifest(cfg.data.shards)
        if cfg.model.num_classes and cfg.model.num_classes != manifest.num_classes:
            raise DataCheckError(
                f"model.num_classes={cfg.model.num_classes} but the shards in {cfg.data.shards} have "
                f"{manifest.num_classes} classes; set model.num_classes=0 to take the manifest's"
            )
        self.num_classes = cfg.model.num_classes or manifest.num_classes
        self.model_spec = {
            "name": cfg.model.name,
            "num_classes": self.num_classes,
            "options": cfg.model.build_options(),
        }
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        model = models.build_model(self.model_spec["name"], self.num_classes, **self.model_spec["options"])
        set_bn_momentum(model, cfg.model.bn_momentum)
        self.s = loop_settings(cfg, model, self.device, rank, world_size)
        model = place_model(model, self.device, self.s.channels_last)

        # data.layout auto: batches in the memory order the model computes in (channels-last batches
        # for a channels_last model, the default on CUDA), so that the loop never copies a batch.
        data_cfg = per_rank_data(cfg, world_size)
        if data_cfg.layout == "auto":
            data_cfg = replace(data_cfg, layout="NHWC" if self.s.channels_last else "NCHW")
        self.global_batch = data_cfg.batch_size * world_size
        self.train_loader = make_loader(data_cfg, data_cfg.train_split, rank, world_size, self.device)
        self.val_loader = make_loader(data_cfg, data_cfg.val_split, rank, world_size, self.device)
        self.class_names = list(getattr(self.train_loader, "class_names", None) or manifest.class_names)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.debug.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.debug.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise DataCheckError(
                f"data.shards {cfg.data.shards}: split {cfg.data.train_split!r} gives no full batch "
                f"of {cfg.data.batch_size} per rank for {world_size} workers; lower data.batch_size"
            )
        self.base_lr = scaled_lr(cfg.optim, self.global_batch)
        self.state = build_train_state(
            model,
            cfg.optim,
            cfg.schedule,
            base_lr=self.base_lr,
            steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=warmup_epochs(cfg.schedule, self.global_batch),
            ema=cfg.ema,
        )
        self.data_sha = manifest_sha256(cfg.data.shards)

    def _start(self) -> None:
        """Resume from the newest checkpoint of this run, or describe the fresh run to MLflow once."""
        cfg, rank = self.cfg, self.rank
        self.start_epoch, self.global_step, self.start_position = 0, 0, 0
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank stream for dropout etc. after identical init
        payload, source = load_resume_payload(cfg)
        if payload is not None:
            data_state = payload["extra"].get("data", {})
            check_resume_data(cfg, data_state, self.data_sha, self.global_batch)
            check_resume_schedule(
                cfg, payload.get("config", {}), payload["scheduler"]["steps_per_epoch"], self.steps_per_epoch
            )
            self.start_epoch, self.global_step = restore_training_state(
                payload, *self.state.parts(), rank=rank, world_size=self.world_size
            )
            self.start_position = int(data_state.get("position", 0))
            for loader in (self.train_loader, self.val_loader):  # each takes its own split's records
                loader.quarantine.merge(data_state.get("quarantine", []))
            print(
                f"[rank {rank}] resumed from {source}: epoch {self.start_epoch}, step {self.global_step}, "
                f"position {self.start_position} of the epoch's sample order",
                flush=True,
            )
        elif rank == 0:
            from ops.tracking import shard_dataset_input

            self.tracker.log_params(flatten(cfg.to_dict()))
            self.tracker.log_inputs(  # MLflow's "Datasets": the shards, digest = manifest hash
                [
                    shard_dataset_input(cfg.data.shards, cfg.data.train_split, "training"),
                    shard_dataset_input(cfg.data.shards, cfg.data.val_split, "validation"),
                ]
            )
            self.tracker.log_text(to_yaml(cfg), "config/resolved_config.yaml")
            self.tracker.log_text("\n".join(self.class_names) + "\n", "class_names.txt")
            self.tracker.set_tags(
                {
                    "num_classes": self.num_classes,
                    "global_batch": self.global_batch,
                    "base_lr": self.base_lr,
                    "steps_per_epoch": self.steps_per_epoch,
                    "world_size": self.world_size,
                    "device": self.device.type,
                }
            )

    # --- training -------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, st = self.cfg, self.state
        for epoch in range(self.start_epoch, cfg.schedule.epochs):
            self.train_loader.set_epoch(epoch, self.start_position if epoch == self.start_epoch else 0)
            progress = partial(self._progress, epoch, self._steps_done_before()) if self.rank == 0 else None
            train_metrics, self.global_step = train_one_epoch(
                self.train_model,
                self.train_loader,
                st.optimizer,
                st.schedule,
                st.ema,
                st.model,
                self.s,
                self.global_step,
                on_log=self.tracker.log_metrics if self.rank == 0 else None,
                on_step=partial(self._on_step, epoch),
                on_progress=progress,
            )
            metrics = {"epoch": epoch + 1, "step": self.global_step, **train_metrics, **self._validate()}
            self._save_and_report(metrics, epoch + 1, self.global_step, 0, epoch_end=True)
        self.train_loader.close()
        self.val_loader.close()
        if self.rank == 0:  # metrics kept during an MLflow outage: delivered now, or reported as lost
            self.tracker.flush(final=True, attempts=3, wait_s=5.0)

    def _steps_done_before(self) -> int:
        """Steps of the current epoch already run before this pass (a mid-epoch resume)."""
        return max(0, self.steps_per_epoch - min(self.train_loader.remaining(), self.steps_per_epoch))

    def _progress(self, epoch: int, done_before: int, steps: int, images_per_s: float, wait: float) -> None:
        """Rank 0, inside an epoch: where it is, how fast, and when the epoch ends."""
        step = done_before + steps
        left = self.steps_per_epoch - step
        eta = left * self.global_batch / images_per_s if images_per_s > 0 else None
        epochs, steps_per_epoch = self.cfg.schedule.epochs, self.steps_per_epoch
        line = progress_line(self.member, epoch + 1, epochs, step, steps_per_epoch, images_per_s, wait, eta)
        print(line, flush=True)

    def _validate(self) -> dict[str, float]:
        val = evaluate(self.eval_model, self.val_loader, self.s)
        metrics = {
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
            "val_count": val["count"],
        }
        if self.state.ema is not None:
            val_ema = evaluate(self.state.ema.module, self.val_loader, self.s)
            metrics.update(
                val_ema_top1=val_ema["top1"], val_ema_top5=val_ema["top5"], val_ema_loss=val_ema["loss"]
            )
        return metrics

    def _on_step(self, epoch: int, step: int, loss: torch.Tensor) -> None:
        """After every step, on every rank: the step trace, and a mid-epoch checkpoint when due."""
        loader = self.train_loader
        self.trace.write(epoch, step, loader, loss)
        every = self.cfg.checkpoint.every_steps
        if every and step % every == 0 and loader.order.steps(epoch, loader.position) > 0:
            mid = {"epoch": epoch, "step": step, "position": loader.position}
            self._save_and_report(mid, epoch, step, loader.position, epoch_end=False)

    def quarantined(self) -> list[dict]:
        """The training split's quarantine records, then the validation split's."""
        return self.train_loader.quarantine.to_list() + self.val_loader.quarantine.to_list()

    def _share_quarantine(self) -> None:
        """Every rank's quarantined samples, of both splits, to every rank: identical training orders
        from the next epoch on, and one record of everything left out, checkpointed and logged."""
        records = self.quarantined()
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        for loader in (self.train_loader, self.val_loader):  # each takes its own split's records
            loader.quarantine.merge(records)
        records = self.quarantined()
        if self.rank == 0 and len(records) != self.logged_quarantine:
            self.logged_quarantine = len(records)
            self.tracker.log_text(json.dumps(records, indent=1), "data/quarantine.json")

    def _save_and_report(self, metrics: dict, epochs_done: int, step: int, position: int, epoch_end: bool):
        """Rank 0 writes the checkpoint; every rank reports (Ray Train needs every rank's report)."""
        import ray.train

        self._share_quarantine()
        if epoch_end:  # after sharing: what every rank left out so far
            metrics = {
                **metrics,
                "quarantined": len(self.train_loader.quarantine),
                "val_quarantined": len(self.val_loader.quarantine),
            }
        rng_states = gather_rng_states()
        data_state = {
            "position": position,
            "quarantine": self.quarantined(),
            "manifest_sha256": self.data_sha,
            "global_batch": self.global_batch,
        }
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            ray_checkpoint = None
            if self.rank == 0:
                started = time.perf_counter()
                self._write_checkpoint(tmp, metrics, epochs_done, step, rng_states, data_state)
                ray_checkpoint = ray.train.Checkpoint.from_directory(tmp)
                metrics = {**metrics, "checkpoint_write_s": time.perf_counter() - started}
                if not epoch_end:
                    self.tracker.log_metrics({"checkpoint_write_s": metrics["checkpoint_write_s"]}, step=step)
            if epoch_end and self.rank == 0:
                self._end_of_epoch(tmp, metrics, epochs_done)
            ray.train.report(metrics, checkpoint=ray_checkpoint)

    def _write_checkpoint(self, folder: str, metrics, epochs_done, step, rng_states, data_state) -> None:
        from ops.checkpoint import save_checkpoint

        st = self.state
        save_checkpoint(
            folder,
            {
                "model_spec": self.model_spec,
                "model": st.model.state_dict(),
                "ema": (st.ema.state_dict() if st.ema is not None else st.model.state_dict()),
                "optimizer": st.optimizer.state_dict(),
                "scheduler": st.schedule.state_dict(),
                "epoch": epochs_done,
                "step": step,
                "config": self.cfg.to_dict(),
                "class_names": self.class_names,
                "metrics": metrics,
                "extra": {
                    "rng": rng_states,
                    "ema_updates": st.ema.num_updates if st.ema is not None else 0,
                    "world_size": self.world_size,
                    "data": data_state,
                },
            },
        )
        write_data_state(folder, data_state, epochs_done, step)

    def _end_of_epoch(self, checkpoint_dir: str, metrics: dict, epochs_done: int) -> None:
        """Rank 0 at an epoch's end: the epoch's metrics to MLflow, the console line with the ETA and,
        after the last epoch, the checkpoint and the training curves as artifacts."""
        from ops.tracking import epoch_metrics_for_mlflow

        epochs = self.cfg.schedule.epochs
        self.tracker.log_metrics(epoch_metrics_for_mlflow(metrics), step=self.global_step)
        self.epoch_times.append(time.monotonic() - self.mark)
        self.mark = time.monotonic()
        eta = training_eta(self.epoch_times, epochs - epochs_done, self.members_after, epochs)
        print(epoch_line(self.member, epochs_done, epochs, metrics, eta), flush=True)
        if epochs_done == epochs:
            if self.cfg.tracking.log_checkpoint:
                self.tracker.log_artifacts(checkpoint_dir, "checkpoint")
            self.tracker.log_training_curves()
