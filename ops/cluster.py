"""Start, inspect and stop a local Ray head and an MLflow tracking server, both on 127.0.0.1.

Run::

    python -m ops.cluster up --state-dir runs/cluster      # or: inception-cluster up
    python -m ops.cluster status --state-dir runs/cluster
    python -m ops.cluster down --state-dir runs/cluster

``up`` starts (sized for a 2-core machine; docs/architecture.md, "Facts"):

- a Ray head: ``ray start --head --num-cpus=2 --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
  --temp-dir=STATE/ray`` with this virtual environment first on PATH (jobs use its Python) and
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; jobs go to ``ray job submit --address http://127.0.0.1:8265``;
- an MLflow server: ``mlflow server --backend-store-uri sqlite:///STATE/mlflow.db
  --artifacts-destination STATE/artifacts --host 127.0.0.1 --port 5000 --workers 1`` with
  ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (~0.5 GiB instead of ~2.5 GiB); point training at it
  with ``MLFLOW_TRACKING_URI=http://127.0.0.1:5000``.

It waits until the Ray dashboard (``/api/gcs_healthz``) and MLflow (``/health``) answer, then writes
``STATE/cluster.json`` (ports, process groups, pids, URLs, log files). Ray 2.60 turns on token
authentication by itself when ``~/.ray/auth_token`` exists (``ray get-auth-token --generate``);
``ray job submit`` on this machine then reads the token from there. A second ``up`` reuses
services that still answer. Each service runs in its own process group; ``down`` ends exactly
those groups (SIGTERM, then SIGKILL after a grace period) rather than ``ray stop``, which would also
stop other Ray instances of the same user on this machine. Ports default to Ray's and MLflow's
usual ones and move to a free port when taken (``0`` always picks a free one).

Multi-node cluster (the same pieces by hand):

1. Head node: ``ray start --head --port=6379 --num-cpus=<cores> --num-gpus=<gpus> --dashboard-host=0.0.0.0``
   and one MLflow server for the whole cluster, on a host every node reaches:
   ``mlflow server --backend-store-uri postgresql://... (or sqlite:///shared/mlflow.db)
   --artifacts-destination /shared/mlflow-artifacts --host 0.0.0.0 --port 5000``.
2. Every worker node: ``ray start --address=<head-ip>:6379`` (same Python environment and code).
3. A storage path every node mounts (NFS, or s3://... for Ray), given to the training config as
   ``RunConfig(storage_path=...)``: checkpoints are written there, so a restarted worker on another
   node resumes from them; shards live on it (or are copied to each node) at the same absolute path.
4. Submit with ``ray job submit --address http://<head-ip>:8265 --working-dir . -- python
   orchestration/train.py --config ...`` and ``MLFLOW_TRACKING_URI=http://<mlflow-host>:5000``.
   On a real cluster, stop nodes with ``ray stop`` on each node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STATE_FILE = "cluster.json"
DEFAULT_PORTS = {
    "ray": 6379,
    "dashboard": 8265,
    "client": 10001,
    "agent": 52365,
    "mlflow": 5000,
}  # upstream defaults
HOST = "127.0.0.1"
STOP_GRACE_S = 10.0


class ClusterError(RuntimeError):
    """A service did not start, answer or stop; the message carries its log tail."""


# ---- small process / network tools --------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind (uvicorn, gRPC): a port whose last server just died still has
        # connections in TIME_WAIT; it is free for a new server, which must come back on the same URL
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def pick_port(preferred: int) -> int:
    """``preferred`` when free, else a free port chosen by the OS (``0`` always asks the OS)."""
    if preferred and _port_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (read from /proc; zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_group(pgid: int, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_pids(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if group_pids(pgid):
        raise ClusterError(f"process group {pgid} survived SIGKILL: {group_pids(pgid)}")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_ok(url: str, what: str, log: Path, timeout: float, pgid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if pgid is not None and not group_pids(pgid):
            break
        time.sleep(0.5)
    raise ClusterError(
        f"{what} did not answer at {url} within {timeout:.0f}s; last lines of {log}:\n{_log_tail(log)}"
    )


# ---- services ---------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # jobs and workers use this Python
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps Ray on 127.0.0.1 (docs/architecture.md)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # ~0.5 GiB instead of 2.5 GiB
    # Ray 2.60 switches token auth on for `ray start` whenever ~/.ray/auth_token exists (any earlier
    # local ray.init() writes one), and clients then need the token. This head is bound to 127.0.0.1
    # only, so it is started without auth unless the caller chose a mode; clients use client_env().
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def client_env() -> dict:
    """Environment for `ray job submit` / ray.init against the head that `up` started."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def _ray_temp_dir(state_dir: Path) -> Path:
    """Ray's temp dir; kept short because Ray's Unix sockets live under it (107-byte path limit)."""
    path = state_dir / "ray"
    if len(str(path)) > 40:
        import hashlib

        path = Path("/tmp") / f"ray-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]}"
    return path


def start_ray(state_dir: Path, num_cpus: int, ports: dict, timeout: float) -> dict:
    temp = _ray_temp_dir(state_dir)
    temp.mkdir(parents=True, exist_ok=True)
    port, dash = pick_port(ports["ray"]), pick_port(ports["dashboard"])
    client, agent = pick_port(ports["client"]), pick_port(ports["agent"])
    log = state_dir / "ray-start.log"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        f"--node-ip-address={HOST}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        rc = proc.wait(timeout=timeout)
    if rc != 0:
        stop_group(proc.pid)
        raise ClusterError(f"`ray start` exited {rc}; last lines of {log}:\n{_log_tail(log)}")
    url = f"http://{HOST}:{dash}"
    wait_until_ok(f"{url}/api/gcs_healthz", "Ray dashboard", log, timeout, proc.pid)
    gcs = [p for p in group_pids(proc.pid) if "gcs_server" in _cmdline(p)]
    return {
        "pgid": proc.pid,
        "gcs_pid": gcs[0] if gcs else None,
        "address": f"{HOST}:{port}",
        "dashboard_url": url,
        "client_port": client,
        "temp_dir": str(temp),
        "num_cpus": num_cpus,
        "log": str(log),
        "health": f"{url}/api/gcs_healthz",
    }


def start_mlflow(state_dir: Path, port: int, timeout: float, artifacts_destination: str = "") -> dict:
    """An MLflow server (sqlite under ``state_dir``) that stores artifacts in ``state_dir/artifacts``
    or at ``artifacts_destination`` (a folder or an ``s3://`` URL; clients upload through it)."""
    port = pick_port(port)
    db, artifacts, log = state_dir / "mlflow.db", state_dir / "artifacts", state_dir / "mlflow.log"
    if artifacts_destination:
        artifacts = artifacts_destination
    else:
        artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        wait_until_ok(f"{url}/health", "MLflow server", log, timeout, proc.pid)
    except ClusterError:
        stop_group(proc.pid)
        raise
    return {
        "pgid": proc.pid,
        "pid": proc.pid,
        "url": url,
        "port": port,
        "backend_store_uri": f"sqlite:///{db}",
        "artifacts": str(artifacts),
        "log": str(log),
        "health": f"{url}/health",
    }


# ---- state ------------------------------------------------------------------------------------
def read_state(state_dir: str | Path) -> dict:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_dir / STATE_FILE)


def service_running(info: dict | None) -> bool:
    return bool(info) and bool(group_pids(info["pgid"])) and http_ok(info["health"])


def up(
    state_dir: str | Path,
    *,
    num_cpus: int = 2,
    ray_port: int = DEFAULT_PORTS["ray"],
    dashboard_port: int = DEFAULT_PORTS["dashboard"],
    mlflow_port: int = DEFAULT_PORTS["mlflow"],
    timeout: float = 120.0,
    artifacts_destination: str = "",
) -> dict:
    """Start whatever is not running yet; returns the state (also written to STATE/cluster.json)."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(state_dir)
    ports = dict(DEFAULT_PORTS, ray=ray_port, dashboard=dashboard_port)
    for key, start in (
        ("ray", lambda: start_ray(state_dir, num_cpus, ports, timeout)),
        ("mlflow", lambda: start_mlflow(state_dir, mlflow_port, timeout, artifacts_destination)),
    ):
        if service_running(state.get(key)):
            state[key]["reused"] = True
            continue
        if state.get(key):  # stale entry: a leftover group that no longer answers
            stop_group(state[key]["pgid"])
        state[key] = dict(start(), reused=False)
        _write_state(state_dir, state)
    _write_state(state_dir, state)
    return state


def down(state_dir: str | Path) -> list[str]:
    """Stop the services recorded in STATE/cluster.json; returns what was stopped."""
    state_dir = Path(state_dir).resolve()
    state, stopped = read_state(state_dir), []
    for key in ("mlflow", "ray"):
        info = state.get(key)
        if info and group_pids(info["pgid"]):
            stop_group(info["pgid"])
            stopped.append(key)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status(state_dir: str | Path) -> dict:
    """Recorded services with a live ``running`` flag."""
    state = read_state(Path(state_dir).resolve())
    return {key: dict(info, running=service_running(info)) for key, info in state.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inception-cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument(
        "--state-dir", default="runs/cluster", help="holds cluster.json, logs, mlflow.db, artifacts"
    )
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may schedule (default 2: this machine)")
    p.add_argument("--ray-port", type=int, default=DEFAULT_PORTS["ray"])
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_PORTS["dashboard"])
    p.add_argument("--mlflow-port", type=int, default=DEFAULT_PORTS["mlflow"])
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service")
    p.add_argument(
        "--artifacts-destination",
        default="",
        help="where the MLflow server keeps artifacts: a folder or s3://bucket/prefix (credentials and "
        "endpoint from the AWS_* variables); default STATE/artifacts",
    )
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            state = up(
                args.state_dir,
                num_cpus=args.num_cpus,
                ray_port=args.ray_port,
                dashboard_port=args.dashboard_port,
                mlflow_port=args.mlflow_port,
                timeout=args.timeout,
                artifacts_destination=args.artifacts_destination,
            )
            r, m = state["ray"], state["mlflow"]
            print(
                f"ray    {'reused' if r['reused'] else 'started'}: address {r['address']}, "
                f"dashboard {r['dashboard_url']}"
            )
            print(
                f"mlflow {'reused' if m['reused'] else 'started'}: {m['url']} "
                f"(backend {m['backend_store_uri']})"
            )
            print(f"export RAY_ADDRESS={r['dashboard_url']} MLFLOW_TRACKING_URI={m['url']}")
            print(
                "then: ray job submit --working-dir . -- python orchestration/train.py ..., "
                f"or run orchestration/train.py --address {r['address']} directly"
            )
        elif args.command == "down":
            stopped = down(args.state_dir)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            st = status(args.state_dir)
            if not st:
                print(f"no cluster recorded in {Path(args.state_dir) / STATE_FILE}")
            for key, info in st.items():
                where = info.get("dashboard_url") or info.get("url")
                address = f" address {info['address']}" if info.get("address") else ""
                state = "running" if info["running"] else "DOWN"
                print(f"{key:6s} {state} {where}{address} pgid {info['pgid']}")
    except (ClusterError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"inception-cluster: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
