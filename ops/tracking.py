"""MLflow tracking for training runs: run creation (driver), rank-0 logging that never stops training.

Used by ``orchestration.worker`` / ``orchestration.ensemble`` (and its URI helpers by ``ops.registry``
and ``ops.evaluate``); not a CLI. The driver creates the runs
(one per ensemble member, nested under a parent run when there are several) and hands their ids to
the Ray workers; only rank 0 of each member logs into its run through a ``RunTracker``. A tracker
whose server cannot be reached warns once and turns itself off: training keeps going.

Tracking URI: ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<storage_path>/mlflow.db`` (MLflow 3.17 refuses the plain ``./mlruns`` file store). With a
sqlite store, the experiment's artifacts go to ``<storage_path>/mlartifacts`` (an absolute path, so
they survive ``ray job submit``'s temporary working dir).
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

MAX_PARAM_LENGTH = 6000  # MLflow 3 param value limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
# MLflow metric names (one name per quantity; accuracies and errors are fractions in [0, 1], the
# name says which; every metric is on the global-step axis, and ``epoch`` is logged beside the
# epoch's figures so that the MLflow UI can plot them against it):
# - every ``tracking.log_every_steps`` steps: ``train/loss``, ``train/lr``, ``train/grad_norm``,
#   ``train/images_per_sec``, ``train/loader_wait_frac``, ``train/step_time_s``, ``train/peak_memory_mib``
#   (means over the window);
# - at each epoch's end: the names below (``epoch/*``: over the whole epoch; ``val/*``: validation).
EPOCH_METRIC_NAMES = {
    "epoch": "epoch",
    "train_loss": "epoch/train_loss",
    "train_images_per_sec": "epoch/images_per_sec",
    "train_loader_wait_frac": "epoch/loader_wait_frac",
    "train_step_time_s": "epoch/step_time_s",
    "train_epoch_time_s": "epoch/time_s",
    "peak_memory_mib": "epoch/peak_memory_mib",
    "val_top1": "val/top1_acc",
    "val_top5": "val/top5_acc",
    "val_loss": "val/loss",
    "val_count": "val/images",
    "val_ema_top1": "val/ema_top1_acc",
    "val_ema_top5": "val/ema_top5_acc",
    "val_ema_loss": "val/ema_loss",
    "quarantined": "data/train_quarantined",
    "val_quarantined": "data/val_quarantined",
    "lr": None,  # train/lr at the same step
    "step": None,  # the x axis
}
CURVE_KEYS = ("epoch/train_loss", "val/loss", "val/top1_acc", "val/ema_top1_acc")


def epoch_metrics_for_mlflow(metrics: dict[str, float]) -> dict[str, float]:
    """An epoch's figures under their MLflow names (:data:`EPOCH_METRIC_NAMES`; others as they are)."""
    out = {}
    for key, value in metrics.items():
        name = EPOCH_METRIC_NAMES.get(key, key)
        if name is not None:
            out[name] = value
    return out


MAX_DIGEST = 36  # MLflow's dataset digest column


def shard_dataset_input(shards: str, split: str, context: str):
    """An MLflow dataset input for a split of a shard folder: named ``<folder>/<split>``, digest the
    manifest's sha256 (its first 36 characters, MLflow's limit; the whole of it in the profile), so
    that runs on the same shards show the same dataset in MLflow's "Datasets". None when the folder
    has no readable manifest (the run says so elsewhere)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from pipeline import ShardFormatError, load_manifest, manifest_sha256

    try:
        manifest = load_manifest(shards)
        info = manifest.split(split)
        digest = manifest_sha256(shards)
    except (ShardFormatError, OSError, KeyError, ValueError):
        return None
    profile = {
        "samples": info.num_samples,
        "shards": len(info.shards),
        "classes": manifest.num_classes,
        "manifest_sha256": digest,
    }
    schema = {"format": "WebDataset tars + DALI indexes", "members": {"jpg": "JPEG", "cls": "class index"}}
    dataset = Dataset(
        name=f"{Path(shards).name}/{split}",
        digest=digest[:MAX_DIGEST],
        source_type="local" if "://" not in str(shards) else str(shards).split("://", 1)[0],
        source=json.dumps({"uri": str(shards), "split": split}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])


def run_url(tracking_uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, when the tracking URI is a server (None for a local store)."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


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
    if "://" in storage_path:  # checkpoints on object storage: the store on this machine
        return f"sqlite:///{Path.home() / '.cache' / 'inception' / 'mlflow.db'}"
    return f"sqlite:///{Path(storage_path).resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def using_tracking_uri(uri: str | None):
    """Point MLflow's fluent API at ``uri`` for a block, then restore the caller's setting."""
    if not uri:
        yield
        return
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


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
    if uri.startswith("sqlite:") and "://" in storage_path:  # object storage: artifacts beside the runs
        location = f"{storage_path.rstrip('/')}/mlartifacts"
    elif uri.startswith("sqlite:"):
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


def training_curves_figure(histories: dict[str, list[tuple[float, float]]], title: str = ""):
    """Loss (log scale: an early validation loss of ~40 would flatten every later point) and top-1
    accuracy against the epoch, one line per metric; ``title`` names the run (member)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, points in histories.items():
        if not points:
            continue
        ax = ax_loss if key.endswith("loss") else ax_acc
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    for ax, ylabel in ((ax_loss, "loss (log scale)"), (ax_acc, "top-1 accuracy (fraction)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend()
    ax_loss.set_title("training and validation loss")
    ax_acc.set_title("validation top-1 accuracy (raw and EMA weights)")
    if ax_loss.lines:
        ax_loss.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class RunTracker:
    """Logs into one existing run; every call is a no-op once disabled (rank != 0, or unreachable at
    the start).

    A server that fails during the run (restarted, network blip) stops nothing: the calls are
    kept, in order (at most ``MAX_PENDING_CALLS``), retried every ``RETRY_INTERVAL_S`` seconds
    and delivered once it answers again, which is said in one line. :meth:`flush` at the end of a
    run makes a last attempt and reports what could not be delivered; nothing is dropped silently.
    Artifact uploads are the exception: their files are temporary, so a failed upload is reported
    at once (the checkpoint itself stays in the storage path)."""

    RETRY_INTERVAL_S = 10.0
    MAX_PENDING_CALLS = 10_000

    def __init__(self, uri: str, run_id: str | None, enabled: bool = True):
        self.uri = uri
        self.run_id = run_id
        self.enabled = bool(enabled and run_id)
        self._client = None
        self._pending: collections.deque = collections.deque()
        self._dropped = 0
        self._down_since: float | None = None
        self._retry_at = 0.0
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

    def _call(self, fn, *args, queue: bool = True, **kwargs) -> Any:
        if not self.enabled:
            return None
        if self._down_since is not None:
            if not queue:
                return self._lost(
                    fn,
                    f"MLflow at {self.uri} has been unreachable for "
                    f"{time.monotonic() - self._down_since:.0f}s",
                )
            self._enqueue(fn, args, kwargs)
            if time.monotonic() >= self._retry_at:
                self.flush()
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._down_since = time.monotonic()
            self._retry_at = self._down_since + self.RETRY_INTERVAL_S
            warnings.warn(
                f"MLflow tracking at {self.uri} failed ({type(exc).__name__}: {str(exc)[:200]}); training "
                f"goes on, tracking calls are kept and retried every {self.RETRY_INTERVAL_S:.0f}s",
                RuntimeWarning,
                stacklevel=3,
            )
            if not queue:
                return self._lost(fn, "the upload failed")
            self._enqueue(fn, args, kwargs)
            return None

    def _lost(self, fn, why: str) -> None:
        print(f"warning: MLflow: {getattr(fn, '__name__', 'a call')} not delivered ({why})", flush=True)
        return None

    def _enqueue(self, fn, args, kwargs) -> None:
        if len(self._pending) >= self.MAX_PENDING_CALLS:
            self._pending.popleft()
            self._dropped += 1
        self._pending.append((fn, args, kwargs))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, final: bool = False, attempts: int = 1, wait_s: float = 0.0) -> bool:
        """Deliver the kept calls in order; True when none is left. ``final``: report any that
        still are not delivered (after ``attempts`` tries ``wait_s`` apart)."""
        if self._down_since is None:
            return True
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait_s)
            delivered = 0
            try:
                while self._pending:
                    fn, args, kwargs = self._pending[0]
                    fn(*args, **kwargs)
                    self._pending.popleft()
                    delivered += 1
            except Exception:
                self._retry_at = time.monotonic() + self.RETRY_INTERVAL_S
                continue
            outage = time.monotonic() - self._down_since
            lost = (
                f"; {self._dropped} older call(s) were dropped (over {self.MAX_PENDING_CALLS})"
                if self._dropped
                else ""
            )
            print(
                f"MLflow tracking at {self.uri} answers again after {outage:.0f}s: "
                f"{delivered} kept call(s) delivered{lost}",
                flush=True,
            )
            self._down_since, self._dropped = None, 0
            return True
        if final:
            print(
                f"warning: MLflow tracking at {self.uri} is still unreachable: {len(self._pending)} tracking "
                f"call(s) of this run (metrics, tags, params) were not delivered",
                flush=True,
            )
        return False

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

    def log_inputs(self, datasets: list) -> None:
        datasets = [d for d in datasets if d is not None]
        if datasets:
            self._call(self.client.log_inputs, self.run_id, datasets)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._call(self.client.log_dict, self.run_id, data, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        # not kept for later: local_dir is usually temporary (the checkpoint stays in the storage path)
        self._call(self.client.log_artifacts, self.run_id, str(local_dir), artifact_path, queue=False)

    def log_training_curves(self, artifact_file: str = "training_curves.png") -> None:
        """Plot this run's epoch metrics (loss, top-1 raw and EMA) into a PNG artifact."""
        self._call(self._log_training_curves, artifact_file)

    def _log_training_curves(self, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        epoch_at = {m.step: m.value for m in self.client.get_metric_history(self.run_id, "epoch")}
        histories = {}
        for key in CURVE_KEYS:
            history = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
            histories[key] = [(epoch_at.get(m.step, m.step), m.value) for m in history]
        run = self.client.get_run(self.run_id)
        fig = training_curves_figure(histories, title=f"{run.info.run_name} (run {self.run_id[:8]})")
        self.client.log_figure(self.run_id, fig, artifact_file)
        plt.close(fig)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, self.run_id, status)
        self.flush(final=True)  # the run's last call: whatever is still kept is reported
