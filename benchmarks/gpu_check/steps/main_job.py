"""Step ``main-job``: the product as users run it. A local Ray head and an MLflow server (sqlite) on
127.0.0.1 (``ops.cluster``, as ``make demo``); ``orchestration/train.py`` submitted as a Ray job (DALI
mixed, bf16, channels_last and ``torch.compile`` on a GPU; 1 worker; mid-epoch checkpoints); 2
members; registered; the registered version evaluated through ``models:/`` with 1, 10 and 144 crops;
the servers stopped. Member 0's worker is killed once mid-epoch (``debug.fail_at_step``, SIGKILL) and
Ray's retry must resume it from the mid-epoch checkpoint.

Figures: the job's training img/s, loader wait and step time (MLflow, steady windows), divided by
the ``end-to-end`` step's harness rate once that step has run (it sets ``job_over_harness``); time
from submission to the first logged window;
the compile warm-up (the first window's extra time); the resume line; the registered version and
its evaluation table."""

from __future__ import annotations

import re
import time

from benchmarks.gpu_check.context import Context, StepResult, log

NAME = "main-job"
ORDER = 15
NEEDS_CUDA = False
MEMBERS = 2
MODEL_NAME = "inception-v3-gpu-check"
EXPERIMENT = "inception-v3-gpu-check"
RESUMED = re.compile(r"\[rank 0\] resumed from \S+: epoch (\d+), step (\d+), position (\d+)")


def settings(ctx: Context, shards: str, storage: str, marker: str) -> tuple[list[str], int, int]:
    """``(overrides, steps per epoch, the step member 0 is killed at)``."""
    z = ctx.sizes
    batch = z.e2e_batch
    steps = z.e2e_steps
    every = max(2, steps // 3)
    fail_at = every + max(1, every // 2)  # between the first and the second mid-epoch checkpoint
    gpu = [
        "scaling.use_gpu=on",
        "scaling.gpus_per_worker=1",
        "model.compile=true",
        "model.amp=bf16",
        "model.channels_last=on",
    ]
    cpu = ["scaling.use_gpu=off", "model.compile=false", "model.amp=off"]
    overrides = [
        f"data.shards={shards}",
        "data.backend=dali",
        f"data.batch_size={batch}",
        f"data.image_size={z.image_size}",
        f"data.val_resize={z.val_resize}",
        "data.crop_area=[0.08,1.0]",
        f"data.num_threads={z.threads}",
        f"model.width_mult={z.width_mult}",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={z.threads}",
        "schedule.epochs=1",
        f"debug.max_steps_per_epoch={steps}",
        "debug.max_eval_batches=2",
        f"ensemble.members={MEMBERS}",
        "ensemble.concurrent=off",
        "ensemble.register=true",
        f"ensemble.model_name={MODEL_NAME}",
        "ensemble.eval_crops=1",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.log_every_steps={max(1, steps // 10)}",
        "console.progress_every_s=30",
        f"checkpoint.storage_path={storage}",
        "checkpoint.name=main-job",
        f"checkpoint.every_steps={every}",
        "checkpoint.max_failures=1",
        f"debug.fail_at_step={fail_at}",
        "debug.fail_mode=kill",
        f"debug.fail_marker={marker}",
        *(gpu if ctx.cuda else cpu),
    ]
    return overrides, steps, fail_at


def member_figures(mlflow_url: str, submitted_ms: int) -> list[dict]:
    """Per member run: steady img/s, loader wait, step time, time to the first window, warm-up."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.role = 'ensemble-member'")
    out = []
    for run in sorted(runs, key=lambda r: int(r.data.tags.get("ensemble.member_index", 0))):
        rid = run.info.run_id

        def history(key: str, rid=rid) -> list:
            return sorted(client.get_metric_history(rid, key), key=lambda m: (m.step, m.timestamp))

        rate, wait, step_time = (
            history("train/images_per_sec"),
            history("train/loader_wait_frac"),
            history("train/step_time_s"),
        )
        steady = slice(1, None) if len(rate) > 1 else slice(None)
        median = lambda ms: sorted(m.value for m in ms)[len(ms) // 2] if ms else None  # noqa: E731
        warmup = None
        if len(step_time) > 1:  # the first window's extra seconds over the steady step time
            first, rest = step_time[0], median(step_time[1:])
            warmup = (first.value - rest) * (first.step or 1)
        out.append(
            {
                "member": int(run.data.tags.get("ensemble.member_index", 0)),
                "run_id": rid,
                "images_per_s": median(rate[steady]),
                "loader_wait_frac": median(wait[steady]),
                "step_time_s": median(step_time[steady]),
                "first_window_s_after_submit": (rate[0].timestamp - submitted_ms) / 1000 if rate else None,
                "compile_warmup_s": warmup,
                "epoch_images_per_s": run.data.metrics.get("epoch/images_per_sec"),
                "epoch_loader_wait_frac": run.data.metrics.get("epoch/loader_wait_frac"),
            }
        )
    return out


def run(ctx: Context) -> StepResult:
    try:
        import mlflow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        return StepResult(
            NAME,
            "skipped",
            notes=[
                f"needs Ray and MLflow ({exc.name} missing): device-wheels prepare --with-ray --with-mlflow"
            ],
        )
    from ops import cluster
    from orchestration.demo import evaluate, newest_version, run_training_job
    from pipeline.multicrop import SUPPORTED_CROPS

    z = ctx.sizes
    repeat = max(1, -(-z.e2e_batch * (z.e2e_steps + 1) // ctx.source_count()))
    shards = ctx.shards("main-job", {"train": ("train", repeat), "val": ("train", 1)})
    work = ctx.work / "main-job"
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "killed.marker"
    marker.unlink(missing_ok=True)
    overrides, steps, fail_at = settings(ctx, str(shards), str(work / "runs"), str(marker))
    state_dir = work / "cluster"
    started = time.monotonic()
    state = cluster.up(state_dir, num_cpus=max(2, z.threads + 1), ray_port=0, dashboard_port=0, mlflow_port=0)
    figures: dict = {"steps_per_epoch": steps, "batch": z.e2e_batch, "killed_at_step": fail_at}
    notes: list[str] = []
    try:
        dashboard, mlflow_url = state["ray"]["dashboard_url"], state["mlflow"]["url"]
        figures["servers_up_s"] = round(time.monotonic() - started, 1)
        submitted_ms = int(time.time() * 1000)
        log(f"main-job: ray job submit, {MEMBERS} members x {steps} steps of {z.e2e_batch}")
        job_log = ctx.out / "main_job.log"
        with open(job_log, "w") as fh:
            t0 = time.monotonic()
            figures["job_id"] = run_training_job(
                dashboard, mlflow_url, overrides, name="gpu-check", experiment=EXPERIMENT, log_to=fh
            )
            figures["job_s"] = round(time.monotonic() - t0, 1)
        text = job_log.read_text()
        resumed = [tuple(int(g) for g in m.groups()) for m in RESUMED.finditer(text)]
        figures["resumed"] = [{"epoch": e, "step": s, "position": p} for e, s, p in resumed]
        if not marker.exists() or not resumed or resumed[0][1] >= fail_at or resumed[0][2] == 0:
            notes.append("the killed worker did not resume from a mid-epoch checkpoint (see main_job.log)")
        figures["members"] = member_figures(mlflow_url, submitted_ms)
        version, champion = newest_version(mlflow_url, MODEL_NAME)
        figures["registered"] = {"model": MODEL_NAME, "version": version, "champion": champion}
        model_uri = f"models:/{MODEL_NAME}/{version}"
        log(f"main-job: evaluating {model_uri} with 1, 10 and 144 crops")
        table = evaluate(model_uri, shards, mlflow_url, list(SUPPORTED_CROPS), {})
        figures["evaluation"] = {
            f"{m}x{c}": {"top1_error": table.top1[(m, c)], "top5_error": table.top5[(m, c)]}
            for m in table.member_counts
            for c in table.crops
        }
        figures["evaluation_images"] = table.num_samples
    finally:
        cluster.down(state_dir)
    status = "ok" if not notes else "fail"
    return StepResult(NAME, status, figures=figures, notes=notes)


def headline(figures: dict) -> str:
    members = figures.get("members") or [{}]
    rate = members[0].get("images_per_s")
    ratio = figures.get("job_over_harness")
    resumed = figures.get("resumed") or [{}]
    return (
        f"job {figures.get('job_id')}: {rate or 0:,.0f} img/s (member 0, steady)"
        + (f", {ratio:.2f}x the harness" if ratio else "")
        + f"; resumed at step {resumed[0].get('step')} after the kill at {figures.get('killed_at_step')}; "
        f"version {figures.get('registered', {}).get('version')}"
    )
