"""The README's commands match the code: every program it shows exists, answers --help, and
accepts every --flag the README passes it; the commands that are cheap to run are run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.slow  # ~15 CLI start-ups with torch/ray/mlflow imports


def readme_commands() -> list[list[str]]:
    """Shell commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


INSTALLED = (
    "build-shards",
    "verify-shards",
    "mlflow",
    "ray",
    "inception-registry",
    "inception-serve",
    "inception-predict",
    "inception-export",
)  # console scripts in .venv/bin


def program_of(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(command prefix to run with --help, remaining args) for a README command; None if not ours."""
    head = argv[0].removeprefix(".venv/bin/")
    if head in ("make", "export", "curl"):  # curl: run against a real server in tests/ops/test_serving.py
        return None
    if head in INSTALLED:
        n = {"mlflow": 3, "ray": 3, "inception-registry": 2}.get(head, 1)
        return [str(BIN / head), *argv[1:n]], argv[n:]
    if head == "python":
        if argv[1] == "-m":
            return [sys.executable, "-m", argv[2]], argv[3:]
        return [sys.executable, argv[1]], argv[2:]
    raise AssertionError(f"README command {' '.join(argv)!r}: unknown program {argv[0]!r}")


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def test_readme_has_the_two_commands_and_ci_uses_the_test_one():
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_matches_its_program(argv):
    found = program_of(argv)
    if found is None:
        pytest.skip("make/export: covered by .ci/run and the demo")
    prefix, rest = found
    if prefix[-1] == "submit":  # ray job submit ... -- python orchestration/train.py ...
        cut = rest.index("--")
        rest, inner = rest[:cut], rest[cut + 1 :]
        check_flags(*program_of(inner))
    check_flags(prefix, rest)


def check_flags(prefix: list[str], rest: list[str]) -> None:
    out = subprocess.run([*prefix, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    missing = [f for f in flags(rest) if f not in out.stdout]
    assert not missing, f"{' '.join(prefix)} --help does not know {missing}"


@pytest.mark.parametrize(
    "argv",
    [a for a in readme_commands() if "--print-config" in a or "models.summary" in a],
    ids=lambda a: " ".join(a)[:60],
)
def test_cheap_readme_commands_run_as_written(argv):
    prefix, rest = program_of(argv)
    out = subprocess.run([*prefix, *rest], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if "models.summary" in argv[2]:
        assert "parameters" in out.stdout
    else:
        assert "optim:" in out.stdout and "lr: 0.045" in out.stdout
