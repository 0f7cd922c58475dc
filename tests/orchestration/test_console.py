"""orchestration.console: the epoch line, the training ETA and the quiet environment defaults."""

from __future__ import annotations

from ops.tracking import MLFLOW_QUIET_ENV
from orchestration.console import RAY_QUIET_ENV, epoch_line, quiet_defaults, training_eta

METRICS = {
    "train_loss": 3.2414,
    "val_top1": 0.279,
    "val_ema_top1": 0.248,
    "train_images_per_sec": 229.4,
    "train_loader_wait_frac": 0.008,
}


def test_epoch_line_format():
    line = epoch_line(0, 3, 12, METRICS, 250.0)
    assert line == (
        "member 0  epoch 3/12  loss 3.24  val top-1 27.9% (EMA 24.8%)  229 img/s  loader wait 0.8%  "
        "ETA 0:04:10"
    )
    no_ema = {k: v for k, v in METRICS.items() if k != "val_ema_top1"}
    assert "val top-1 27.9%  229 img/s" in epoch_line(1, 1, 2, no_ema, None)
    assert epoch_line(1, 1, 2, no_ema, None).endswith("ETA -")


def test_training_eta_counts_the_members_still_to_come():
    assert training_eta([], 5, 1, 6) is None
    # 10 s epochs: 2 epochs left of this member, then one more member of 6 epochs
    assert training_eta([9.0, 11.0], 2, 1, 6) == 10.0 * (2 + 6)
    assert training_eta([10.0], 0, 0, 6) == 0.0


def test_quiet_defaults_never_override_the_user():
    env = {"MLFLOW_LOGGING_LEVEL": "DEBUG"}
    quiet_defaults(env)
    assert env["MLFLOW_LOGGING_LEVEL"] == "DEBUG"  # the user's choice stays
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and env["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1"
    assert set(env) == set(RAY_QUIET_ENV) | set(MLFLOW_QUIET_ENV)


def test_progress_line_format():
    from orchestration.console import progress_line

    line = progress_line(1, 3, 12, 120, 500, 229.4, 0.008, 250.0)
    assert line == "member 1  epoch 3/12  step 120/500  229 img/s  loader wait 0.8%  epoch ETA 0:04:10"
    assert progress_line(0, 1, 1, 1, 2, 0.0, 0.0, None).endswith("epoch ETA -")
