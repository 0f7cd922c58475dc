"""Running the steps and writing what they found: each step guarded so that one failure does not
hide the others, the report (``OUT/gpu_check.json``, ``OUT/gpu_check.md``) rewritten after each,
and a summary of one line per step made of the step's own headline."""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import asdict

import torch

from benchmarks.gpu_check.context import TARGETS, Context, StepResult, log
from benchmarks.gpu_check.steps import Step


def run_step(ctx: Context, step: Step, steps: list[Step]) -> None:
    """Run one step (or record why it was skipped), then rewrite the report."""
    if step.needs_cuda and not ctx.cuda:
        ctx.results.append(StepResult(step.name, "skipped", notes=["needs a CUDA GPU"]))
    elif ctx.left() <= 0:
        ctx.results.append(StepResult(step.name, "skipped", notes=["time budget spent (--budget-s)"]))
    else:
        log(f"step {step.name} ({ctx.left():.0f} s of the budget left)")
        start = time.perf_counter()
        try:
            res = step.run(ctx)
        except Exception as exc:  # one step's failure must not hide the others
            res = StepResult(step.name, "fail", error=f"{type(exc).__name__}: {exc}")
            with (ctx.out / "gpu_check_errors.log").open("a") as f:
                f.write(f"--- {step.name}\n{traceback.format_exc()}\n")
        res.seconds = time.perf_counter() - start
        ctx.results.append(res)
        log(
            f"step {step.name}: {res.status} in {res.seconds:.1f} s"
            + (f" ({res.error})" if res.error else "")
        )
        if ctx.cuda:  # what a step leaves behind shows here, not as the next step's out-of-memory
            gc.collect()
            torch.cuda.empty_cache()
            res.cuda_gib_after = torch.cuda.memory_allocated(ctx.device) / 2**30
            log(f"  CUDA memory still allocated after {step.name}: {res.cuda_gib_after:.2f} GiB")
    write_report(ctx, steps)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def summary_lines(ctx: Context, steps: list[Step]) -> list[str]:
    """One line per step with its headline figures."""
    headlines = {s.name: s.headline for s in steps}
    lines = [
        f"device: {ctx.env.get('device')}  torch {ctx.env.get('torch')}  DALI {ctx.env.get('nvidia.dali')}"
    ]
    for r in ctx.results:
        head = headlines[r.name](r.figures) if r.figures and r.name in headlines else ""
        extra = f" [{r.error}]" if r.error else (f" [{'; '.join(r.notes)}]" if r.notes else "")
        lines.append(f"{r.name:<11} {r.status:<12} {r.seconds:6.1f} s  {head}{extra}")
    return lines


def write_report(ctx: Context, steps: list[Step]) -> None:
    data = {
        "env": ctx.env,
        "smoke": ctx.smoke,
        "sizes": asdict(ctx.sizes),
        "targets": TARGETS,
        "steps": [asdict(r) for r in ctx.results],
    }
    (ctx.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = ["# make gpu-check", "", "```", *summary_lines(ctx, steps), "```", ""]
    for r in ctx.results:
        md += [f"## {r.name}: {r.status} ({r.seconds:.1f} s)", ""]
        if r.error:
            md += [f"error: `{r.error}`", ""]
        md += [f"- {n}" for n in r.notes]
        rows = r.figures.get("rows")
        if rows:
            keys = list(rows[0])
            md += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            md += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
        md += [
            "",
            "```json",
            json.dumps({k: v for k, v in r.figures.items() if k != "rows"}, indent=1, default=str),
            "```",
            "",
        ]
    (ctx.out / "gpu_check.md").write_text("\n".join(md))
