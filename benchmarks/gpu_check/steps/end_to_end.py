"""Step ``end-to-end``: shards -> DALI mixed -> ``train_one_epoch`` for a few hundred steps, images/s
and loader-wait fraction (CUDA-event timed), against the step-only rate of ``train-step``; then a
checkpoint, and a resume from it (loaded mapped to the GPU) that must repeat the uninterrupted
run's losses bit for bit (deterministic kernels for that part)."""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.gpu_check.context import TARGETS, Context, StepResult, cuda_backends, log

NAME = "end-to-end"
ORDER = 50
NEEDS_CUDA = False


def train_state(ctx: Context, num_classes: int, seed: int, total_steps: int, channels_last: bool):
    """The product's model, optimizer, schedule and EMA (``orchestration.state``) at the paper recipe."""
    import models
    from orchestration.config import OptimConfig, ScheduleConfig
    from orchestration.state import build_train_state, place_model

    torch.manual_seed(seed)
    model = models.inception_v3(num_classes=num_classes, width_mult=ctx.sizes.width_mult)
    model = place_model(model, ctx.device, channels_last)
    optim = OptimConfig()
    return build_train_state(model, optim, ScheduleConfig(), base_lr=optim.lr, steps_per_epoch=total_steps)


def train_epoch(state, loader, s, global_step: int, on_log) -> tuple[dict, int]:
    """``orchestration.loop.train_one_epoch`` on a ``TrainState`` (no wrapper: one process)."""
    from orchestration.loop import train_one_epoch

    st = state
    return train_one_epoch(
        st.model, loader, st.optimizer, st.schedule, st.ema, st.model, s, global_step, on_log=on_log
    )


def losses(state, loader, s, epoch: int, steps: int, global_step: int) -> list[float]:
    """Per-step training losses of ``steps`` steps of ``epoch`` (logged every step)."""
    out: list[float] = []
    loader.set_epoch(epoch)
    settings = replace(s, max_steps=steps, log_every=1)
    train_epoch(state, loader, settings, global_step, lambda m, _step: out.append(m["train/loss"]))
    return out


def throughput(ctx: Context, state, loader, s, setting) -> tuple[dict, int]:
    """One epoch of ``e2e_steps`` steps: the epoch's and the steady (after the first log window)
    images/s and loader-wait fraction."""
    z = ctx.sizes
    windows = []
    log(f"end-to-end: {z.e2e_steps} steps of {z.e2e_batch} ({setting.name})")
    metrics, step = train_epoch(state, loader, s, 0, lambda m, _step: windows.append(m))
    steady = windows[1:] or windows
    figures = {
        "setting": setting.name,
        "batch": z.e2e_batch,
        "steps": step,
        "epoch_images_per_s": metrics["train_images_per_sec"],
        "epoch_loader_wait_frac": metrics["train_loader_wait_frac"],
        "steady_images_per_s": sum(w["train/images_per_sec"] for w in steady) / max(len(steady), 1),
        "steady_loader_wait_frac": sum(w["train/loader_wait_frac"] for w in steady) / max(len(steady), 1),
        "windows": [{k: w[k] for k in ("train/images_per_sec", "train/loader_wait_frac")} for w in windows],
    }
    return figures, step


def save_state(ctx: Context, state, step: int, num_classes: int):
    """A checkpoint of ``state`` at the epoch boundary, in the product's format (RNG state included)."""
    from ops.checkpoint import save_checkpoint
    from orchestration.resume import rng_state

    folder = ctx.work / "checkpoint"
    save_checkpoint(
        folder,
        {
            "model_spec": {"name": "inception_v3", "num_classes": num_classes, "options": {}},
            "model": state.model.state_dict(),
            "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.schedule.state_dict(),
            "epoch": 1,
            "step": step,
            "config": {},
            "class_names": [],
            "extra": {"rng": [rng_state()], "ema_updates": state.ema.num_updates, "world_size": 1},
        },
    )
    return folder


def resumed_losses(
    ctx: Context, ckpt, cfg, s, step: int, num_classes: int, channels_last: bool
) -> list[float]:
    """The continuation from the checkpoint, loaded mapped to the device (the hard case for RNG
    states), into a fresh state built from another seed and a fresh loader."""
    from ops.checkpoint import load_checkpoint
    from orchestration.resume import restore_training_state
    from pipeline import make_loader

    z = ctx.sizes
    resumed = train_state(ctx, num_classes, 1, z.e2e_steps + 2 * z.resume_steps, channels_last)
    payload = load_checkpoint(ckpt, map_location=ctx.device)
    restore_training_state(payload, *resumed.parts(), rank=0, world_size=1)
    return losses(resumed, make_loader(cfg, "train", 0, 1, ctx.device), s, 1, z.resume_steps, step)


def run(ctx: Context) -> StepResult:
    from benchmarks.step_bench import STEP_SETTINGS, loop_settings_for
    from pipeline import make_loader

    z = ctx.sizes
    num_classes = ctx.num_classes()
    setting = next(s for s in STEP_SETTINGS if s.name == ("bf16+channels_last" if ctx.cuda else "float32"))
    layout = "NHWC" if setting.channels_last else "NCHW"
    cfg, _ = ctx.train_data("end-to-end", z.e2e_steps * z.e2e_batch, z.e2e_batch, layout=layout)
    if ctx.cuda:
        cuda_backends(deterministic=False)
    state = train_state(ctx, num_classes, 0, z.e2e_steps + 2 * z.resume_steps, setting.channels_last)
    s = loop_settings_for(setting, ctx.device, tuple(state.model.aux_loss_weights))
    s = replace(s, max_steps=z.e2e_steps, log_every=max(1, z.e2e_steps // 6))
    loader = make_loader(cfg, "train", 0, 1, ctx.device)
    figures, step = throughput(ctx, state, loader, s, setting)
    res = StepResult(NAME, "ok", figures=figures)
    step_rate = ctx.step_rates.get((setting.name, z.e2e_batch))
    if step_rate:
        rate, wait = figures["steady_images_per_s"], figures["steady_loader_wait_frac"]
        figures["step_only_images_per_s"] = step_rate
        figures["over_step_only"] = rate / step_rate
        if ctx.cuda and (
            rate / step_rate < TARGETS["end_to_end_over_step"] or wait > TARGETS["loader_wait_frac"]
        ):
            res.status = "below target"
    else:
        res.notes.append("no step-only rate at this setting and batch (train-step step skipped?)")
    job = next((r for r in ctx.results if r.name == "main-job" and r.figures.get("members")), None)
    if job is not None and job.figures["members"][0].get("images_per_s"):  # the product's job, ran first
        job_rate = job.figures["members"][0]["images_per_s"]
        job.figures["job_over_harness"] = job_rate / figures["steady_images_per_s"]
        job.figures["harness"] = f"end-to-end {setting.name}, batch {z.e2e_batch}, eager" + (
            " (the job: compiled)" if ctx.cuda else ""
        )

    # checkpoint at the epoch boundary, then the same continuation twice: uninterrupted and resumed
    if ctx.cuda:
        cuda_backends(deterministic=True)
    ckpt = save_state(ctx, state, step, num_classes)
    log(f"resume: {z.resume_steps} steps uninterrupted, then the same from the checkpoint")
    expected = losses(state, loader, s, 1, z.resume_steps, step)
    del state, loader  # freed before the resumed copy is built
    got = resumed_losses(ctx, ckpt, cfg, s, step, num_classes, setting.channels_last)
    diff = max((abs(a - b) for a, b in zip(expected, got, strict=True)), default=float("nan"))
    figures["resume"] = {
        "steps": len(got),
        "bit_exact": expected == got,
        "max_abs_loss_diff": diff,
        "losses": got,
        "expected": expected,
    }
    if expected != got:
        res.status = "fail"
        res.error = f"resumed losses differ from the uninterrupted run (max |diff| {diff:.3g})"
    if ctx.cuda:
        cuda_backends(deterministic=False)
    return res


def headline(f: dict) -> str:
    return (
        f"{f['steady_images_per_s']:,.0f} img/s, "
        f"loader wait {100 * f['steady_loader_wait_frac']:.1f}%"
        + (f", {100 * f['over_step_only']:.0f}% of step-only" if "over_step_only" in f else "")
        + (f"; resume bit-exact: {f['resume']['bit_exact']}" if "resume" in f else "")
    )
