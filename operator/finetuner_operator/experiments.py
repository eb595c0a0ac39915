"""Pure logic of Experiments: counting runs by phase, picking the best run, sweep points."""

from __future__ import annotations

import itertools
import random
from typing import Any

from finetuner.api.v1alpha1 import (
    MAX_RUN_NAME,
    BestRun,
    BestRunSelector,
    ExperimentStatus,
    FinetuneRunSpec,
    Phase,
    RunCounts,
    Sweep,
    SweepKind,
)


def count_runs(runs: list[dict[str, Any]]) -> RunCounts:
    counts = {phase.value: 0 for phase in Phase}
    for run in runs:
        phase = (run.get('status') or {}).get('phase') or Phase.CREATED.value
        counts[phase] = counts.get(phase, 0) + 1
    return RunCounts(
        total=len(runs),
        created=counts[Phase.CREATED.value],
        started=counts[Phase.STARTED.value],
        finished=counts[Phase.FINISHED.value],
        failed=counts[Phase.FAILED.value],
    )


def best_run(runs: list[dict[str, Any]], selector: BestRunSelector) -> BestRun | None:
    """The finished run with the best ``status.metrics.after[metric]`` (ties: the first name in order)."""
    candidates: list[tuple[float, str]] = []
    for run in runs:
        status = run.get('status') or {}
        if status.get('phase') != Phase.FINISHED.value:
            continue
        value = ((status.get('metrics') or {}).get('after') or {}).get(selector.metric)
        if isinstance(value, (int, float)):
            candidates.append((float(value), run['metadata']['name']))
    if not candidates:
        return None
    sign = -1.0 if selector.mode == 'max' else 1.0
    value, name = min(candidates, key=lambda c: (sign * c[0], c[1]))
    return BestRun(name=name, metric=selector.metric, value=value)


def sweep_points(sweep: Sweep) -> list[dict[str, Any]]:
    """Every point of a grid, or ``count`` distinct points drawn with ``seed`` (deterministic)."""
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
    suffix = f'-{index:03d}'
    return experiment[: MAX_RUN_NAME - len(suffix)].rstrip('-') + suffix


def sweep_run_spec(template: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The template with the point applied; validated so a bad sweep fails on the Experiment."""
    spec = {**template, **point}
    FinetuneRunSpec.model_validate(spec)
    return spec


def next_sweep_runs(sweep: Sweep, existing: dict[int, str | None]) -> list[int]:
    """Indexes of sweep points to create now: not yet created, within ``parallelism`` active runs.

    ``existing`` maps the index of each created point to its run's phase (None before any status).
    """
    total = len(sweep_points(sweep))
    active = sum(1 for phase in existing.values() if phase not in (Phase.FINISHED.value, Phase.FAILED.value))
    free = max(sweep.parallelism - active, 0)
    todo = [i for i in range(total) if i not in existing]
    return todo[:free]


def experiment_status(
    runs: list[dict[str, Any]], selector: BestRunSelector, sweep_created: int, generation: int | None
) -> ExperimentStatus:
    return ExperimentStatus(
        runs=count_runs(runs),
        best_run=best_run(runs, selector),
        sweep_created=sweep_created,
        observed_generation=generation,
    )
