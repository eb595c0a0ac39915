"""Experiments: adopt their runs, create the due points of a sweep, recount runs and the best run.

The pure parts (counting, the best run, sweep points) are :mod:`experiments`; this module applies
them through the seam, under a per-Experiment lock.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from finetuner.api.v1alpha1 import ExperimentSpec
from finetuner_operator import builders, experiments
from finetuner_operator.kube import Kube
from finetuner_operator.locks import KeyedLocks
from finetuner_operator.status import describe_validation_error, same_status, status_patch


class ExperimentSync:
    def __init__(self, kube: Kube, locks: KeyedLocks) -> None:
        self.kube = kube
        self.locks = locks

    def sync_experiment(self, namespace: str, name: str) -> None:
        """Adopt the experiment's runs, create due sweep points, recount runs and the best run."""
        with self.locks.hold('experiment', namespace, name):
            body = self.kube.get_experiment(namespace, name)
            if body is None or body['metadata'].get('deletionTimestamp'):
                return
            try:
                spec = ExperimentSpec.model_validate(body.get('spec') or {})
            except ValidationError as e:
                self.kube.post_event(body, 'Warning', 'InvalidSpec', describe_validation_error(e))
                return
            runs = self.kube.list_runs(namespace, f'{builders.EXPERIMENT_LABEL}={name}')
            self._adopt(body, runs)
            sweep_created = self._sweep(body, spec, runs)
            status = experiments.experiment_status(
                runs, spec.best_run, sweep_created, body['metadata'].get('generation')
            )
            if not same_status(body.get('status'), status):
                self.kube.patch_experiment_status(namespace, name, status_patch(status))

    def _adopt(self, body: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        """Make the Experiment an owner of each of its runs (deleting it deletes them)."""
        uid = body['metadata']['uid']
        for run in runs:
            refs = list(run['metadata'].get('ownerReferences') or [])
            if not any(r.get('uid') == uid for r in refs):
                refs.append({**builders.owner_reference(body), 'controller': False})
                self.kube.patch_run(
                    body['metadata']['namespace'], run['metadata']['name'], {'metadata': {'ownerReferences': refs}}
                )

    def _sweep(self, body: dict[str, Any], spec: ExperimentSpec, runs: list[dict[str, Any]]) -> int:
        """Create the sweep points due now (within ``parallelism``); how many points have runs."""
        if spec.sweep is None or spec.run_template is None:
            return 0
        name = body['metadata']['name']
        points = experiments.sweep_points(spec.sweep)
        by_name = {r['metadata']['name']: r for r in runs}
        existing: dict[int, str | None] = {}
        for index in range(len(points)):
            run = by_name.get(experiments.sweep_run_name(name, index))
            if run is not None:
                existing[index] = (run.get('status') or {}).get('phase')
        created = 0
        for index in experiments.next_sweep_runs(spec.sweep, existing):
            try:
                run_spec = experiments.sweep_run_spec(spec.run_template, points[index])
            except ValidationError as e:
                self.kube.post_event(
                    body, 'Warning', 'InvalidSweepPoint', f'point {points[index]}: {describe_validation_error(e)}'
                )
                break
            run_name = experiments.sweep_run_name(name, index)
            if self.kube.create_run(builders.build_sweep_run(body, run_name, run_spec, points[index])):
                self.kube.post_event(body, 'Normal', 'SweepRunCreated', f'Created run {run_name} for {points[index]}')
            created += 1
        return len(existing) + created
