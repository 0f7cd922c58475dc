"""One training epoch and one evaluation pass, with the metrics a data-pipeline-first system owes:
global images/s, fraction of step time spent waiting for the loader, step time, lr, loss, peak memory.

Called by ``orchestration.worker`` inside each Ray Train worker; plain PyTorch (works without Ray,
e.g. in tests: with no process group, world size is 1). Reductions across ranks use
``torch.distributed`` when it is initialised.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from orchestration.ema import ModelEma
from orchestration.losses import label_smoothing_cross_entropy, training_loss
from orchestration.optim import add_weight_decay, clip_gradients, parameter_groups
from orchestration.schedule import LrSchedule


@dataclass(frozen=True)
class LoopSettings:
    device: torch.device
    amp_dtype: torch.dtype | None  # torch.bfloat16 on GPU (paper recipe), None = float32
    channels_last: bool
    aux_weights: tuple[float, ...]
    label_smoothing: float
    clip_grad_norm: float
    clip_mode: str = "global"  # "global" | "per_tensor" (orchestration.optim.clip_gradients)
    loss_weight_decay: float = 0.0  # L2 added to weight gradients before clipping (optim.loss_weight_decay)
    log_every: int = 50
    max_steps: int = 0  # >0: stop the epoch early (smoke runs)
    max_eval_batches: int = 0
    fail_at_step: int = 0  # >0: fail once at this global step on rank 0 (fault-tolerance tests)
    fail_marker: str = ""
    fail_mode: str = "raise"
    rank: int = 0
    world_size: int = 1
    progress_every_s: float = 0.0  # >0: on_progress every this many seconds (rank 0's console line)


class InjectedFailure(RuntimeError):
    """Raised by ``debug.fail_at_step`` to test recovery from a failed worker."""


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _maybe_fail(s: LoopSettings, global_step: int) -> None:
    if not s.fail_at_step or global_step != s.fail_at_step or s.rank != 0:
        return
    marker = Path(s.fail_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at step {global_step}\n")
    if s.fail_mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFailure(f"debug.fail_at_step={global_step}: injected failure (marker {marker})")


def _autocast(s: LoopSettings):
    if s.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=s.device.type, dtype=s.amp_dtype)


def model_input(images: torch.Tensor, s: LoopSettings) -> torch.Tensor:
    """A loader batch as the model wants it. The loaders already hand over channels-last memory when
    ``data.layout`` is NHWC (the default on CUDA), and then this is no copy; float16 batches are cast
    up when no autocast would take them (AMP off: the weights are float32)."""
    if s.channels_last and not images.is_contiguous(memory_format=torch.channels_last):
        images = images.contiguous(memory_format=torch.channels_last)
    if s.amp_dtype is None and images.dtype != torch.float32:
        images = images.float()
    return images


class DataWaitClock:
    """Time the training step waits for the loader, without a host sync per step.

    CPU: wall-clock time blocked in ``next(loader)``. CUDA: the host is normally ahead of the GPU, so
    time blocked in ``next`` says nothing about whether the GPU waited. Instead an event is recorded
    when a step's work has been queued and another when the next batch is handed over; on the GPU's
    timeline the second follows the first at once while the host keeps ahead, and later by exactly
    the GPU's idle time when the loader made it drain its queue. Events are read at ``collect``
    (one sync, at log time).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host_total = 0.0
        self._t0 = 0.0
        self._mark = None  # CUDA: event after the previous step's work
        self._gaps: list = []  # CUDA: (step-done event, batch-ready event)

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def fetch_started(self) -> None:
        if self.cuda:
            if self._mark is None:
                self._mark = self._event()
        else:
            self._t0 = time.perf_counter()

    def fetch_done(self) -> None:
        if self.cuda:
            self._gaps.append((self._mark, self._event()))
            self._mark = None
        else:
            self._host_total += time.perf_counter() - self._t0

    def step_queued(self) -> None:
        if self.cuda:
            self._mark = self._event()

    def collect(self) -> float:
        """Seconds waited since the last ``collect`` (synchronises the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self._gaps) / 1000.0
            self._gaps.clear()
            return total
        total, self._host_total = self._host_total, 0.0
        return total


class ThroughputWindow:
    """Running sums between two log points; device tensors stay on the device until ``report``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.samples = self.steps = 0
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, batch: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.samples += batch
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm.detach().to(self.device, torch.float64)

    def report(self, wait: float, lr: float, world_size: int) -> dict[str, float]:
        """Window metrics (the caller has synchronised, e.g. through ``DataWaitClock.collect``)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.steps, 1)
        return {
            "train/loss": float(self.loss) / steps,
            "train/lr": lr,
            "train/grad_norm": float(self.grad_norm) / steps,
            "train/images_per_sec": self.samples * world_size / elapsed,
            "train/loader_wait_frac": wait / elapsed,
            "train/step_time_s": elapsed / steps,
            "train/peak_memory_mib": peak_memory_mib(self.device),
        }


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    ema: ModelEma | None,
    ema_target: nn.Module,
    s: LoopSettings,
    global_step: int,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    on_progress: Callable[[int, float, float], None] | None = None,
) -> tuple[dict, int]:
    """Train over ``loader`` once; returns (epoch metrics reduced over ranks, new global step).

    ``ema_target`` is the unwrapped model (no DDP / compile wrapper) whose weights the EMA follows;
    ``on_log(metrics, step)`` receives window metrics every ``s.log_every`` steps (rank-local values,
    images/s scaled to the global batch); ``on_step(global step, loss)`` runs after every step, on
    every rank (mid-epoch checkpoints, step traces); ``on_progress(steps done, images/s, loader wait
    fraction)`` every ``s.progress_every_s`` seconds, on the rank that passes it (figures over the
    interval, images/s scaled to the global batch). No step waits for the GPU: losses and gradient
    norms are summed on the device and read at log points, progress lines and the end of the epoch.
    """
    model.train()
    # the weights TF-slim's regulariser covers (conv / linear weights), for an L2 term in the loss
    decayed = parameter_groups(ema_target, 0.0)[0]["params"] if s.loss_weight_decay else []
    clock = DataWaitClock(s.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
    samples = steps = 0
    wait_total = 0.0
    epoch_start = time.perf_counter()
    window = ThroughputWindow(s.device)
    window_wait = 0.0  # loader wait collected for a progress line, owed to the window's next report
    beat_at, beat_samples, beat_wait = epoch_start, 0, 0.0
    iterator = iter(loader)
    while not (s.max_steps and steps >= s.max_steps):
        clock.fetch_started()
        try:
            images, labels = next(iterator)
        except StopIteration:
            break
        clock.fetch_done()
        with _autocast(s):
            out = model(model_input(images, s), with_aux=True)
            loss = training_loss(out.logits, out.aux_logits, labels, s.aux_weights, s.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.loss_weight_decay:
            add_weight_decay(decayed, s.loss_weight_decay)
        grad_norm = clip_gradients(model, s.clip_grad_norm, s.clip_mode)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(ema_target)
        clock.step_queued()
        global_step += 1
        steps += 1
        batch = labels.shape[0]
        samples += batch
        detached = loss.detach().to(torch.float64)
        loss_sum += detached * batch
        window.add(batch, detached, grad_norm)
        if on_step is not None:
            on_step(global_step, detached)
        _maybe_fail(s, global_step)
        if on_log is not None and global_step % s.log_every == 0:
            wait = clock.collect() + window_wait
            wait_total += wait - window_wait
            beat_wait += wait - window_wait
            window_wait = 0.0
            on_log(window.report(wait, schedule.get_last_lr(), s.world_size), global_step)
            window = ThroughputWindow(s.device)
        if on_progress is not None and s.progress_every_s > 0:
            now = time.perf_counter()
            if now - beat_at >= s.progress_every_s:
                wait = clock.collect()
                wait_total += wait
                window_wait += wait
                interval = now - beat_at
                rate = (samples - beat_samples) * s.world_size / interval
                on_progress(steps, rate, (beat_wait + wait) / interval)
                beat_at, beat_samples, beat_wait = time.perf_counter(), samples, 0.0
    wait_total += clock.collect()
    elapsed = time.perf_counter() - epoch_start
    total_loss, total_samples, total_wait, total_time, total_steps = all_reduce_sum(
        [float(loss_sum), float(samples), wait_total, elapsed, float(steps)], s.device
    )
    ranks = s.world_size
    metrics = {
        "train_loss": total_loss / max(total_samples, 1),
        "train_images_per_sec": total_samples / max(total_time / ranks, 1e-9),
        "train_loader_wait_frac": total_wait / max(total_time, 1e-9),
        "train_step_time_s": total_time / max(total_steps, 1),
        "train_epoch_time_s": total_time / ranks,
        "lr": schedule.get_last_lr(),
        "peak_memory_mib": peak_memory_mib(s.device),
    }
    return metrics, global_step


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, s: LoopSettings) -> dict[str, float]:
    """Top-1 / top-5 accuracy and (smoothing-free) cross-entropy over the loader, summed across ranks.

    The eval loader yields every usable sample exactly once across ranks (docs/architecture.md,
    "Data order"), so the reduced counts are the whole split less its quarantined samples (or
    ``max_eval_batches`` per rank in smoke runs).
    """
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for i, (images, labels) in enumerate(loader):
        if s.max_eval_batches and i >= s.max_eval_batches:
            break
        with _autocast(s):
            logits = model(model_input(images, s))
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # [B, k]
        hits = top.eq(labels[:, None])
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        loss_sum += float(label_smoothing_cross_entropy(logits, labels, 0.0)) * labels.shape[0]
        count += labels.shape[0]
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], s.device)
    return {
        "top1": correct1 / max(count, 1),
        "top5": correct5 / max(count, 1),
        "loss": loss_sum / max(count, 1),
        "count": count,
    }
