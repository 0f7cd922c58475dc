"""``make gpu-check`` in its CPU smoke mode: every step that can run without CUDA runs on tiny sizes
and reports real figures, so the script that spends scarce GPU minutes never rots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_smoke_runs_every_cpu_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=1200,  # the main job: Ray, MLflow, 2 members, a retry, registration
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == [
        "gpu-tests",
        "main-job",
        "loader",
        "train-step",
        "peers",
        "end-to-end",
        "multicrop",
    ]
    assert steps["gpu-tests"]["status"] == "skipped" and steps["gpu-tests"]["notes"] == ["needs a CUDA GPU"]
    assert steps["peers"]["status"] in ("ok", "skipped")  # skipped where torchvision/timm are missing
    for name in ("loader", "train-step", "end-to-end", "multicrop"):
        assert steps[name]["status"] == "ok", steps[name]
    rates = steps["loader"]["figures"]["images_per_s"]
    assert set(rates) == {"dali_cpu", "pillow_dataloader"} and min(rates.values()) > 0
    rows = steps["train-step"]["figures"]["rows"]
    assert [(r["setting"], r["batch"]) for r in rows] == [
        ("float32", 4),
        ("bf16+channels_last", 4),
        ("bf16+channels_last [global clip]", 4),
    ]
    ratio = steps["train-step"]["figures"]["per_tensor_over_global_clip"]["bf16+channels_last"]
    assert ratio == pytest.approx(rows[1]["images_per_s"] / rows[2]["images_per_s"])
    e2e = steps["end-to-end"]["figures"]
    assert e2e["steps"] == 6 and 0 <= e2e["steady_loader_wait_frac"] < 1
    assert e2e["resume"]["bit_exact"] and e2e["resume"]["steps"] == 3
    job = steps["main-job"]
    assert job["status"] == "ok", job
    f = job["figures"]
    assert re.fullmatch(r"inception-gpu-check-\d{8}-\d{6}", f["job_id"])
    # member 0's worker was killed at step 3 and resumed from the step-2 mid-epoch checkpoint
    assert f["killed_at_step"] == 3 and f["resumed"][0] == {"epoch": 0, "step": 2, "position": 8}
    assert [m["member"] for m in f["members"]] == [0, 1] and all(m["images_per_s"] > 0 for m in f["members"])
    assert f["job_over_harness"] > 0 and f["registered"]["version"] == "1"
    assert sorted(f["evaluation"]) == ["1x1", "1x10", "1x144", "2x1", "2x10", "2x144"]
    assert f["evaluation_images"] == 24
    crops = steps["multicrop"]["figures"]["crops"]
    assert sorted(crops, key=int) == ["1", "10", "144"] and all(c["images"] == 24 for c in crops.values())
    assert "=== make gpu-check ===" in proc.stdout and (out / "gpu_check.md").read_text().startswith(
        "# make gpu-check"
    )


def test_gpu_check_refuses_without_cuda_or_bad_steps(tmp_path):
    from benchmarks.gpu_check.cli import main

    assert main(["--smoke", "--only", "nonsense", "--out", str(tmp_path)]) == 2
    if not __import__("torch").cuda.is_available():
        assert main(["--out", str(tmp_path)]) == 2
