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
