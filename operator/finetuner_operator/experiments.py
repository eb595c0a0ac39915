"""Pure logic of Experiments: counting runs by phase, picking the best run, sweep points.

Sweep points, their run names and specs and the best run are the SDK's (:mod:`finetuner.sweeps`): one
definition for the operator and the local backend.
"""

from __future__ import annotations

from typing import Any

from finetuner import sweeps
from finetuner.api.v1alpha1 import BestRun, BestRunSelector, ExperimentStatus, Phase, RunCounts
from finetuner.sweeps import next_sweep_runs, sweep_points, sweep_run_name, sweep_run_spec

__all__ = [
    'best_run',
    'count_runs',
    'experiment_status',
    'next_sweep_runs',
    'sweep_points',
    'sweep_run_name',
    'sweep_run_spec',
]


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
    return sweeps.best_run(
        (
            (
                run['metadata']['name'],
                (run.get('status') or {}).get('phase'),
                ((run.get('status') or {}).get('metrics') or {}).get('after'),
            )
            for run in runs
        ),
        selector,
    )


def experiment_status(
    runs: list[dict[str, Any]], selector: BestRunSelector, sweep_created: int, generation: int | None
) -> ExperimentStatus:
    return ExperimentStatus(
        runs=count_runs(runs),
        best_run=best_run(runs, selector),
        sweep_created=sweep_created,
        observed_generation=generation,
    )
