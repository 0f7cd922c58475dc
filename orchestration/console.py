"""What a training job prints: one line per epoch per model from rank 0, and little else.

``quiet_defaults()`` runs first in every entry point that starts Ray Train or MLflow work
(``orchestration/train.py``, ``orchestration.demo``), before Ray or MLflow is imported. It only sets
environment defaults, so a user who wants Ray's or MLflow's own chatter back exports the variable:

- ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train V2 routes every worker ``print`` through its logger
  *and*, when Ray has replaced ``sys.stdout`` (it has, in workers), through the original ``print``
  too, so each line reached the console twice. Without the patch a print is forwarded once.
  (Ray Train propagates this variable from the driver to its controller and workers.)
- ``RAY_DISABLE_WORKER_LOG_PREFIX=1``: no ``(RayTrainWorker pid=...)`` before forwarded lines; ours
  name their member and rank themselves, Ray's warnings name their component.
- Ray Train's own INFO reports (``Reporting training result ...`` with the whole metrics dict, per
  rank, per epoch; ``Checkpoint successfully created``; worker-group start-up) are switched off in
  ``orchestration.trainer.build_trainer`` with ``RunConfig(logging_config=LoggingConfig("WARNING"))``,
  the setting Ray Train V2 provides for it. They stay in Ray's log files.
- MLflow: :data:`ops.tracking.MLFLOW_QUIET_ENV` (no artifact-download bars, no "View run" URLs).
"""

from __future__ import annotations

import os

from ops.tracking import quiet_mlflow_console
from pipeline.progress import format_duration

RAY_QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
}
TRAIN_LOG_LEVEL = "WARNING"  # Ray Train's LoggingConfig in every TorchTrainer we build


def quiet_defaults(environ: dict | None = None) -> None:
    env = os.environ if environ is None else environ
    for key, value in RAY_QUIET_ENV.items():
        env.setdefault(key, value)
    quiet_mlflow_console(env)


def silence_report_lines() -> None:
    """In a Ray Train worker: drop Ray's ``Reporting training result N: TrainingReport(...)`` INFO line
    (the whole metrics dict, per rank, per epoch). Ray 2.60 names that module's logger by its file
    path (``logging.getLogger(__file__)``), so it escapes ``LoggingConfig`` (which filters loggers
    under ``ray.train``) and reaches the console through the root logger; its own level is the only
    switch. Warnings from it still show."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_line(member: int, epoch: int, epochs: int, metrics: dict, eta_s: float | None) -> str:
    """``member 0  epoch 3/12  loss 3.24  val top-1 27.9% (EMA 24.8%)  229 img/s  loader wait 0.8%
    ETA 0:04:10``: the one line a training job prints per epoch and model (rank 0)."""
    top1 = f"val top-1 {metrics['val_top1']:.1%}"
    if "val_ema_top1" in metrics:
        top1 += f" (EMA {metrics['val_ema_top1']:.1%})"
    return (
        f"member {member}  epoch {epoch}/{epochs}  loss {metrics['train_loss']:.2f}  {top1}  "
        f"{metrics['train_images_per_sec']:.0f} img/s  "
        f"loader wait {metrics['train_loader_wait_frac']:.1%}  ETA {format_duration(eta_s)}"
    )


def progress_line(
    member: int,
    epoch: int,
    epochs: int,
    step: int,
    steps: int,
    images_per_s: float,
    wait: float,
    eta_s: float | None,
) -> str:
    """``member 0  epoch 3/12  step 120/500  229 img/s  loader wait 0.8%  epoch ETA 0:04:10``: rank 0's
    line inside an epoch, every ``console.progress_every_s`` (figures over the last interval)."""
    return (
        f"member {member}  epoch {epoch}/{epochs}  step {step}/{steps}  {images_per_s:.0f} img/s  "
        f"loader wait {wait:.1%}  epoch ETA {format_duration(eta_s)}"
    )


def training_eta(epoch_times: list[float], epochs_left: int, members_after: int, epochs: int) -> float | None:
    """Seconds of training left for this job: the epochs left of this model plus those of the models
    that will train after it, at the mean epoch time seen so far (``None`` before the first epoch)."""
    if not epoch_times:
        return None
    return sum(epoch_times) / len(epoch_times) * (epochs_left + members_after * epochs)
