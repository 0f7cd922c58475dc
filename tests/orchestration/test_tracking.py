"""ops.tracking: runs created on a sqlite store, rank-0 logging read back through MlflowClient,
and an unreachable server that warns once and never raises."""

from __future__ import annotations

import time
import warnings

import pytest

from ops.tracking import RunTracker, check_reachable, create_run, resolve_tracking_uri


def test_resolve_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("", str(tmp_path)) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db", str(tmp_path)) == "sqlite:////x/y.db"


def test_unreachable_server_warns_once_and_keeps_going():
    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    assert check_reachable(uri, timeout=1.0) is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = RunTracker(uri, "0123456789abcdef")
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_params({"a": 1})
        tracker.log_training_curves()
    assert not tracker.enabled
    assert [str(w.message).split(" (")[0] for w in caught] == [f"MLflow tracking at {uri} is unreachable"]


def test_rank0_logging_round_trip(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(uri, "exp", "run-a", str(tmp_path), {"git_commit": "abc", "none": None})
    tracker = RunTracker(uri, run_id)
    tracker.log_params({"optim.lr": 0.045, "data.crop_area": [0.08, 1.0]})
    tracker.log_metrics({"train/loss": 2.5, "val_top1": 0.25}, step=1)
    tracker.log_metrics({"val_top1": 0.5, "train_loss": 2.0}, step=2)
    tracker.log_text("a\nb\n", "class_names.txt")
    tracker.log_training_curves()
    assert RunTracker(uri, run_id, enabled=False).enabled is False  # ranks != 0 log nothing
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params == {"optim.lr": "0.045", "data.crop_area": "[0.08, 1.0]"}
    assert run.data.tags["git_commit"] == "abc" and "none" not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_top1")] == [(1, 0.25), (2, 0.5)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"class_names.txt", "training_curves.png"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()  # absolute, not ./mlruns
    png = client.download_artifacts(run_id, "training_curves.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_curves_plot_loss_on_a_log_scale():
    from ops.tracking import training_curves_figure

    fig = training_curves_figure(
        {
            "epoch/train_loss": [(1, 2.5), (2, 2.0)],
            "val/loss": [(1, 38.0), (2, 1.9)],
            "val/top1_acc": [(1, 0.1), (2, 0.3)],
        },
        title="demo-member0 (run 1234abcd)",
    )
    loss, acc = fig.axes
    assert loss.get_yscale() == "log" and acc.get_yscale() == "linear"
    assert [line.get_label() for line in loss.lines] == ["epoch/train_loss", "val/loss"]
    assert list(loss.lines[1].get_ydata()) == [38.0, 1.9] and [line.get_label() for line in acc.lines] == [
        "val/top1_acc"
    ]
    # labelled axes, and the run in the title (before: no y labels, no name)
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("epoch", "loss (log scale)")
    assert (acc.get_xlabel(), acc.get_ylabel()) == ("epoch", "top-1 accuracy (fraction)")
    assert fig._suptitle.get_text() == "demo-member0 (run 1234abcd)"


def test_epoch_metrics_have_one_mlflow_name_each():
    from ops.tracking import EPOCH_METRIC_NAMES, epoch_metrics_for_mlflow

    got = epoch_metrics_for_mlflow(
        {"epoch": 2, "step": 62, "lr": 0.1, "train_loss": 2.0, "val_top1": 0.3, "x": 1}
    )
    assert got == {"epoch": 2, "epoch/train_loss": 2.0, "val/top1_acc": 0.3, "x": 1}
    names = [v for v in EPOCH_METRIC_NAMES.values() if v]
    assert len(names) == len(set(names)) and not any(n.startswith("train/") for n in names)


def test_child_runs_carry_parent(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = create_run(uri, "exp", "ens", str(tmp_path), {})
    child = create_run(uri, "exp", "ens-member0", str(tmp_path), {}, parent_run_id=parent)
    assert MlflowClient(uri).get_run(child).data.tags["mlflow.parentRunId"] == parent


@pytest.mark.parametrize("bad", ["not a uri at all"])
def test_non_http_uris_are_not_probed(bad):
    assert check_reachable(bad) is None


@pytest.mark.slow
def test_server_outage_mid_run_is_buffered_and_delivered(tmp_path, capsys):
    """A real MLflow server killed mid-run and restarted on the same port: nothing raises, the calls
    of the outage are delivered once it is back (before: the tracker switched itself off for good)."""
    import os
    import signal

    from mlflow import MlflowClient

    from ops import cluster

    state = tmp_path / "mlflow"
    state.mkdir()
    server = cluster.start_mlflow(state, 0, timeout=120)
    uri, port = server["url"], server["port"]
    try:
        run_id = create_run(uri, "exp", "outage", str(tmp_path), {})
        tracker = RunTracker(uri, run_id)
        tracker.RETRY_INTERVAL_S = 0.5
        tracker.log_metrics({"loss": 1.0}, step=1)
        os.killpg(server["pgid"], signal.SIGKILL)  # the server dies
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in (2, 3):
                tracker.log_metrics({"loss": float(step)}, step=step)
            tracker.set_tags({"phase": "outage"})
        assert tracker.pending == 3 and len(caught) == 1 and "kept and retried" in str(caught[0].message)
        server = cluster.start_mlflow(state, port, timeout=120)  # back, same port and store
        assert server["port"] == port
        time.sleep(0.6)
        tracker.log_metrics({"loss": 4.0}, step=4)  # the next call delivers the kept ones first
        assert tracker.pending == 0
        assert "answers again after" in capsys.readouterr().out
        client = MlflowClient(uri)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert client.get_run(run_id).data.tags["phase"] == "outage"
        # still down at the end of a run: the loss is reported, not silent
        os.killpg(server["pgid"], signal.SIGKILL)
        tracker.log_metrics({"loss": 5.0}, step=5)
        assert tracker.flush(final=True) is False
        assert (
            "1 tracking call(s) of this run (metrics, tags, params) were not delivered"
            in capsys.readouterr().out
        )
    finally:
        cluster.stop_group(server["pgid"])
