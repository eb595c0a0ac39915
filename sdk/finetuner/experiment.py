"""An experiment groups runs: ``finetuner.create_experiment('flickr')``; ``default`` always exists."""

from __future__ import annotations

from typing import Any

from finetuner.api.v1alpha1 import ExperimentStatus
from finetuner.backends.base import Backend, ExperimentRecord
from finetuner.errors import ArgumentError, RunNotFoundError
from finetuner.run import Run


class Experiment:
    def __init__(self, record: ExperimentRecord, backend: Backend) -> None:
        self._record = record
        self._backend = backend

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def description(self) -> str | None:
        return self._record.spec.description

    def __repr__(self) -> str:
        return f'Experiment(name={self.name!r}, runs={self._record.status.runs.total})'

    def status(self) -> ExperimentStatus:
        """Its runs counted by phase (and the best run, where the cluster computes one)."""
        self._record = self._backend.get_experiment(self.name)
        return self._record.status

    def list_runs(self) -> list[Run]:
        return [Run(record, self._backend) for record in self._backend.list_runs(experiment=self.name)]

    def get_run(self, name: str) -> Run:
        record = self._backend.get_run(name)
        if record.spec.experiment != self.name:
            raise RunNotFoundError(name, f'experiment {self.name!r}')
        return Run(record, self._backend)

    def delete_run(self, name: str) -> None:
        self.get_run(name)
        self._backend.delete_run(name)

    def delete_runs(self) -> None:
        for run in self.list_runs():
            self._backend.delete_run(run.name)

    def create_run(self, **fit_arguments: Any) -> Run:
        """``finetuner.fit(...)`` with this experiment."""
        if 'experiment_name' in fit_arguments and fit_arguments['experiment_name'] != self.name:
            raise ArgumentError('experiment_name', f'is set by the experiment ({self.name!r}); leave it out')
        from finetuner import fit

        return fit(**{**fit_arguments, 'experiment_name': self.name})
