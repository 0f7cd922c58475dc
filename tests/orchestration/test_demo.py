"""`python -m orchestration.demo` end to end with a tiny budget (1 epoch, 1 and 10 crops): the console
contract a newcomer reads, on output that is not a terminal (as in CI or a log file). Slow (~2 min)."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_console_contract(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--crops",
            "1,10",
            "schedule.epochs=1",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:]
    lines = [line for line in out.splitlines() if line.strip()]
    # one line per epoch per member, from rank 0 only, in the documented format
    for member in (0, 1):
        start = f"member {member}  epoch 1/1  "  # progress lines inside the epoch start alike
        epoch_lines = [line for line in lines if line.startswith(start) and " val top-1 " in line]
        assert len(epoch_lines) == 1, out[-5000:]
        assert re.fullmatch(
            rf"member {member}  epoch 1/1  loss \d+\.\d\d  val top-1 \d+\.\d% \(EMA \d+\.\d%\)  \d+ img/s  "
            r"loader wait \d+\.\d%  ETA \d:\d\d:\d\d",
            epoch_lines[0],
        ), epoch_lines[0]
    # the Ray job has a readable id (the dashboard's job list shows it)
    job_line = r"^    job inception-demo-\d{8}-\d{6} \(its log: ray job logs"
    assert re.search(job_line, out, flags=re.M), out[-5000:]
    repeated = [
        line for line, n in collections.Counter(lines).items() if n > 1 and not line.startswith("|---")
    ]
    assert not repeated, repeated
    for noise in (
        "TrainingReport(",
        "Reporting training result",
        "Downloading artifacts",
        "View run",
        "CloudPickle",
        "Ignoring upload",
        "is now ignored by default",
        "\r",
    ):
        assert noise not in out, noise
    # the estimate at the start, the table with standard errors, the time table at the end
    assert "estimated total: " in out
    assert "| members | 1 crop top-1 / top-5 (%) | 10 crops top-1 / top-5 (%) |" in out
    assert re.search(r"^\| 2 \| \d+\.\d\d ± \d+\.\d\d / ", out, re.M)
    assert "Top-1 differences, paired on the same images" in out
    stages = re.findall(r"^\| ([a-z][a-z0-9 -]+) \| (\d:\d\d:\d\d) \| ", out, re.M)
    assert [name for name, _ in stages] == [
        "calibration",
        "build-shards",
        "servers",
        "job start",
        "member 0",
        "member 1",
        "registration",
        "evaluation 1 crop",
        "evaluation 10 crops",
    ]
    assert "stopped " in out
