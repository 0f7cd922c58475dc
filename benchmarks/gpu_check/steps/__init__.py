"""The steps of ``make gpu-check``, one module each: adding a step is adding a module here.

Every step module defines ``NAME`` (its name in ``--only`` and in the report), ``ORDER`` (steps run
in ascending order), ``NEEDS_CUDA`` (skipped without a GPU, reported as such), ``run(ctx) ->
StepResult`` and ``headline(figures) -> str`` (its line in the summary). Steps import what they
measure inside ``run``, so one that cannot import (no DALI, no torchvision) fails alone.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.gpu_check.context import Context, StepResult


@dataclass(frozen=True)
class Step:
    name: str
    order: int
    needs_cuda: bool
    run: Callable[[Context], StepResult]
    headline: Callable[[dict], str]


def all_steps() -> list[Step]:
    """Every step module of this package, in ``ORDER``."""
    steps = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        steps.append(Step(module.NAME, module.ORDER, module.NEEDS_CUDA, module.run, module.headline))
    return sorted(steps, key=lambda s: s.order)
