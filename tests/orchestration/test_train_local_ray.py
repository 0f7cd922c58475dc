"""`orchestration/train.py` without a cluster starts a local Ray bound to 127.0.0.1 only (as
``ops.cluster`` does); before, its GCS and raylet took and listened on the machine's external address.
Slow (~20 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# As train.py does it: init_ray before anything imports ray.
PROBE = """
from orchestration.train import init_ray
init_ray(None, 1)
import ray
import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported
from ray.util.state import list_actors

node = ray._private.worker.global_worker.node
print("node", node.node_ip_address)
print("gcs", node.gcs_address)
print("raylet", ray.nodes()[0]["NodeManagerAddress"])
print("state-api", len(list_actors()) >= 0)  # what Ray Train's PlacementGroupCleaner polls
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
listening = {
    c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
}
print("listen", ",".join(sorted(listening)))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_binds_loopback_only():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = dict(
        line.split(" ", 1)
        for line in proc.stdout.splitlines()
        if line.startswith(("node ", "gcs ", "raylet ", "state-api ", "listen "))
    )
    assert seen["node"] == "127.0.0.1" and seen["raylet"] == "127.0.0.1", seen
    assert seen["gcs"].startswith("127.0.0.1:") and seen["state-api"] == "True", seen
    listening = set(seen["listen"].split(","))
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    assert "connected to a new local Ray instance on 127.0.0.1" in proc.stdout


def _live_actors(dashboard_url: str, classes: tuple[str, ...]) -> list[str]:
    import requests

    found = requests.get(f"{dashboard_url}/api/v0/actors?limit=1000", timeout=10).json()["data"]["result"]
    return [a["class_name"] for a in found["result"] if a["class_name"] in classes and a["state"] != "DEAD"]


@pytest.mark.slow
def test_a_loopback_head_is_reached_and_ctrl_c_stops_a_waiting_job(tmp_path, monkeypatch):
    """`--address 127.0.0.1:PORT` (what `inception-cluster up` prints) connects (before: Ray turned it
    into the machine's external address and retried forever); the dashboard URL as RAY_ADDRESS is one
    line naming both ways; a job waiting for CPUs the cluster lacks stops on Ctrl-C (before: nothing
    happened, and nothing was printed)."""
    import signal
    import time

    from ops import cluster
    from orchestration.demo import build_demo_shards

    # a head without token auth, whatever an earlier test left in the environment (the dashboard's
    # state API is read below without a token)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    shards = tmp_path / "shards"
    build_demo_shards(shards)
    state_dir = tmp_path / "cluster"
    state_dir.mkdir()
    ports = {"ray": 0, "dashboard": 0, "client": 0, "agent": 0}
    head = cluster.start_ray(state_dir.resolve(), 1, ports, timeout=120)
    env = {k: v for k, v in cluster.client_env().items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable, "orchestration/train.py", "--config", "configs/demo.yaml",
        f"data.shards={shards}", f"checkpoint.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={tmp_path / 'mlflow.db'}", "scaling.cpus_per_worker=4",
    ]  # fmt: skip
    try:
        wrong = subprocess.run(
            cmd, cwd=REPO, env={**env, "RAY_ADDRESS": head["dashboard_url"]},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert wrong.returncode == 2, wrong.stderr[-2000:]
        (line,) = wrong.stderr.strip().splitlines()
        assert "is a Ray dashboard (job submission) address: submit with `ray job submit" in line
        assert "--address HOST:PORT" in line

        proc = subprocess.Popen(
            [*cmd, "--address", head["address"]], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        seen, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "training 2 member(s)" in line or not line:
                break
        assert f"connected to Ray at {head['address']}" in "".join(seen), "".join(seen)[-3000:]
        assert "the job waits until the cluster has them" in "".join(seen)
        deadline = time.monotonic() + 60  # the train controller is up and waits for its workers
        while not _live_actors(head["dashboard_url"], ("TrainController",)) and time.monotonic() < deadline:
            time.sleep(1)
        assert _live_actors(head["dashboard_url"], ("TrainController",))
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, rest[-3000:]
        assert "interrupted (Ctrl-C): stopping" in rest
        deadline = time.monotonic() + 30  # Ray ends the driver's actors once it is gone
        while _live_actors(head["dashboard_url"], ("TrainController", "RayTrainWorker")):
            assert time.monotonic() < deadline, "the job's actors outlived the interrupted driver"
            time.sleep(1)
    finally:
        if "proc" in locals() and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.stop_group(head["pgid"])
