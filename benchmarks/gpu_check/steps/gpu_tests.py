"""Step ``gpu-tests``: the ``gpu``-marked tests (``pytest -m gpu``, slow ones with ``--slow-tests``),
pass/fail each, read from pytest's JUnit XML."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from benchmarks.gpu_check.context import REPO, Context, StepResult

NAME = "gpu-tests"
ORDER = 10
NEEDS_CUDA = True


def run(ctx: Context) -> StepResult:
    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    xml = ctx.out / "pytest_gpu.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        *files,
    ]
    env = dict(os.environ, RUN_SLOW="1" if ctx.slow_tests else "0")
    limit = min(180.0, max(60.0, ctx.left()))  # a hung test must not eat the whole budget
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    (ctx.out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    tests = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            tests[f"{case.get('classname')}::{case.get('name')}"] = outcome
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    res = StepResult(NAME, "ok", figures={**counts, "tests": tests, "files": files})
    if proc.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        res.status = "fail"
        res.error = f"pytest exit {proc.returncode}: " + (proc.stdout + proc.stderr).strip().splitlines()[-1]
    return res


def headline(f: dict) -> str:
    return f"{f['passed']} passed, {f['failed']} failed, {f['error']} errors, {f['skipped']} skipped"
