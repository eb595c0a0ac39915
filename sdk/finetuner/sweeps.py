"""An Experiment's sweep: its points, the names and specs of their runs, and the best run.

One definition for both backends: the operator (``finetuner_operator.experiments``) creates a
cluster sweep's runs with these functions and the local backend its local ones, so the same sweep
gives the same points, the same run names and the same best run wherever it runs.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping
from typing import Any

from finetuner.api.v1alpha1 import (
    MAX_RUN_NAME,
    BestRun,
    BestRunSelector,
    FinetuneRunSpec,
    Phase,
    Sweep,
    SweepKind,
)


def sweep_points(sweep: Sweep) -> list[dict[str, Any]]:
    """Every point of a grid (parameters in name order, the last varying fastest), or ``count`` points
    drawn with ``seed``: distinct while the grid has enough, with repeats beyond (deterministic)."""
    keys = sorted(sweep.parameters)
    grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(sweep.parameters[k] for k in keys))]
    if sweep.kind == SweepKind.GRID.value:
        return grid
    rng = random.Random(sweep.seed)
    count = sweep.count or len(grid)
    if count <= len(grid):
        return rng.sample(grid, count)
    return [rng.choice(grid) for _ in range(count)]


def sweep_run_name(experiment: str, index: int) -> str:
    """``<experiment>-000``, ``-001``, ...: the run of point ``index`` (the experiment's name cut to fit)."""
    suffix = f'-{index:03d}'
    return experiment[: MAX_RUN_NAME - len(suffix)].rstrip('-') + suffix


def sweep_run_spec(template: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The template with the point applied; validated, so that a bad point fails on the Experiment."""
    spec = {**template, **point}
    FinetuneRunSpec.model_validate(spec)
    return spec


def next_sweep_runs(sweep: Sweep, existing: Mapping[int, str | None]) -> list[int]:
    """Indexes of sweep points to create now: not yet created, within ``parallelism`` active runs.

    ``existing`` maps the index of each created point to its run's phase (None before any status).
    """
    total = len(sweep_points(sweep))
    active = sum(1 for phase in existing.values() if phase not in (Phase.FINISHED.value, Phase.FAILED.value))
    free = max(sweep.parallelism - active, 0)
    todo = [i for i in range(total) if i not in existing]
    return todo[:free]


def best_run(
    runs: Iterable[tuple[str, str | None, Mapping[str, Any] | None]], selector: BestRunSelector
) -> BestRun | None:
    """The FINISHED run with the best ``metrics.after[metric]`` among ``(name, phase, metrics after)``;
    ties go to the first name in order. None while no finished run has the metric."""
    candidates: list[tuple[float, str]] = []
    for name, phase, after in runs:
        if phase != Phase.FINISHED.value:
            continue
        value = (after or {}).get(selector.metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            candidates.append((float(value), name))
    if not candidates:
        return None
    sign = -1.0 if selector.mode == 'max' else 1.0
    value, name = min(candidates, key=lambda c: (sign * c[0], c[1]))
    return BestRun(name=name, metric=selector.metric, value=value)
