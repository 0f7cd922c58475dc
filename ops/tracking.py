"""MLflow tracking for training runs: run creation (driver), rank-0 logging that never stops training.

Used by ``orchestration.trainer`` / ``orchestration.ensemble``; not a CLI. The driver creates the runs
(one per ensemble member, nested under a parent run when there are several) and hands their ids to
the Ray workers; only rank 0 of each member logs into its run through a ``RunTracker``. A tracker
whose server cannot be reached warns once and turns itself off: training keeps going.

Tracking URI: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<storage_path>/mlflow.db`` (MLflow 3.17 refuses the plain ``./mlruns`` file store). With a
sqlite store, the experiment's artifacts go to ``<storage_path>/mlartifacts`` (an absolute path, so
they survive ``ray job submit``'s temporary working dir).
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

MAX_PARAM_LENGTH = 6000  # MLflow 3 param value limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
CURVE_KEYS = ("train_loss", "val_loss", "val_top1", "val_ema_top1")


# MLflow's console defaults are made for notebooks: a tqdm bar per artifact download, a "View run"
# URL on stdout per finished run, INFO lines from model logging. In our jobs' logs they bury the
# training lines, so our entry points lower them (as defaults: a user's own setting wins).
MLFLOW_QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def quiet_mlflow_console(environ: dict | None = None) -> None:
    """Set :data:`MLFLOW_QUIET_ENV` where the environment does not say otherwise (before MLflow is
    imported, or its loggers keep the level they were configured with)."""
    env = os.environ if environ is None else environ
    for key, value in MLFLOW_QUIET_ENV.items():
        env.setdefault(key, value)


def resolve_tracking_uri(configured: str, storage_path: str) -> str:
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{Path(storage_path).resolve() / 'mlflow.db'}"


def _limit_http_retries() -> None:
    # An unreachable server must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_reachable(uri: str, timeout: float = 3.0) -> str | None:
    """``None`` when ``uri`` looks usable, else why not (only http(s) servers are probed)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except Exception as exc:  # connection refused, timeout, HTTP error
        return f"{type(exc).__name__}: {exc}"
    return None


def ensure_experiment(client, name: str, storage_path: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(storage_path).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def create_run(
    uri: str,
    experiment: str,
    run_name: str,
    storage_path: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create an MLflow run (child of ``parent_run_id`` when given) and return its id."""
    from mlflow import MlflowClient

    _limit_http_retries()
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, experiment, storage_path, uri)
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def git_commit(root: str | Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def training_curves_figure(histories: dict[str, list[tuple[int, float]]]):
    """Loss (log scale: an early validation loss of ~40 would flatten every later point) and top-1
    per epoch, one line per metric key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, points in histories.items():
        if not points:
            continue
        ax = ax_loss if key.endswith("loss") else ax_acc
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    for ax, title in ((ax_loss, "loss (log scale)"), (ax_acc, "top-1 accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend()
    if ax_loss.lines:
        ax_loss.set_yscale("log")
    fig.tight_layout()
    return fig


class RunTracker:
    """Logs into one existing run; every call is a no-op once disabled (rank != 0, or unreachable)."""

    def __init__(self, uri: str, run_id: str | None, enabled: bool = True):
        self.uri = uri
        self.run_id = run_id
        self.enabled = bool(enabled and run_id)
        self._client = None
        if self.enabled:
            _limit_http_retries()
            reason = check_reachable(uri)
            if reason:
                self._disable(reason)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _disable(self, reason: str) -> None:
        if self.enabled:
            warnings.warn(
                f"MLflow tracking at {self.uri} is unreachable ({reason}); training continues "
                "without tracking for this run",
                RuntimeWarning,
                stacklevel=3,
            )
        self.enabled = False

    def _call(self, fn, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._disable(f"{type(exc).__name__}: {exc}")
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow log_batch: at most 100 params per call
            self._call(lambda chunk: self.client.log_batch(self.run_id, params=chunk), items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self._call(self.client.set_tag, self.run_id, key, str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._call(self.client.log_dict, self.run_id, data, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifacts, self.run_id, str(local_dir), artifact_path)

    def log_training_curves(self, artifact_file: str = "training_curves.png") -> None:
        """Plot this run's epoch metrics (loss, top-1 raw and EMA) into a PNG artifact."""
        self._call(self._log_training_curves, artifact_file)

    def _log_training_curves(self, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        histories = {}
        for key in CURVE_KEYS:
            history = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
            histories[key] = [(m.step, m.value) for m in history]
        fig = training_curves_figure(histories)
        self.client.log_figure(self.run_id, fig, artifact_file)
        plt.close(fig)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, self.run_id, status)
