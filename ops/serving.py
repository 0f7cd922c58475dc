"""Serve a registered ensemble with ``mlflow models serve`` on 127.0.0.1, for as long as a ``with``
block runs: what the serving tests and ``benchmarks.bench_serving`` use.

    with served("models:/inception@champion", tracking_uri, log_path="serve.log") as url:
        requests.post(f"{url}/invocations", json={...})

The server binds 127.0.0.1 only (``--env-manager local``: this environment's packages); it is
stopped (its whole process group) when the block ends, also on errors. For a server other hosts
reach, put it behind an authenticating proxy (README, "Registry, evaluation and serving").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"


class ServeError(RuntimeError):
    """The server did not come up; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def served(
    model_uri: str,
    tracking_uri: str,
    *,
    log_path: str | Path,
    port: int = 0,
    start_timeout_s: float = 240.0,
    env: dict | None = None,
) -> Iterator[str]:
    """Start the server, wait for ``/ping``, yield its URL, stop it."""
    import requests

    port = port or free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        *("models", "serve", "-m", model_uri, "--env-manager", "local", "-h", HOST, "-p", str(port)),
    ]
    bin_dir = str(Path(sys.executable).parent)  # mlflow serve runs uvicorn from PATH
    environ = dict(
        os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=bin_dir + os.pathsep + os.environ.get("PATH", "")
    )
    environ.update(env or {})
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environ)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                raise ServeError(f"mlflow models serve did not come up at {url}:\n{tail}")
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
