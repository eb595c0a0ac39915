"""The interface both backends implement: ``kubernetes`` (custom resources) and ``local`` (subprocess).

The SDK's module functions and :class:`finetuner.run.Run` only talk to this interface, so the
seed experience is the same with or without a cluster.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator

from pydantic import BaseModel, Field

from finetuner.api.layout import DATASETS
from finetuner.api.v1alpha1 import ExperimentSpec, ExperimentStatus, FinetuneRunSpec, FinetuneRunStatus
from finetuner.errors import ArgumentError, RunNotFoundError
from finetuner.storage import LocalStore, S3Store, StorageError, open_store

MAX_DATASET_NAME = 63


class RunRecord(BaseModel):
    """A run as a backend sees it: what was asked and what was observed."""

    name: str
    namespace: str
    spec: FinetuneRunSpec
    status: FinetuneRunStatus = Field(default_factory=FinetuneRunStatus)
    created_at: str | None = None
    queue_position: int | None = None  # local queue: 1 = the next to start in its line (GPU or CPU)


class Reservation(BaseModel):
    """A run name held for one submission, and the datasets uploaded for it alone.

    ``fit()`` reserves the name before it uploads anything, and uploads under names no other run
    writes (``<run>-<uid>-train``): two processes submitting one name never mix their data.
    """

    name: str
    uid: str = Field(default_factory=lambda: secrets.token_hex(4))
    datasets: list[str] = Field(default_factory=list)
    data_uri: str | None = None

    def dataset(self, role: str) -> str:
        """The dataset name of one upload (``role``: train, eval, 0-query, ...), at most 63 characters."""
        tail = f'-{self.uid}-{role}'
        return self.name[: MAX_DATASET_NAME - len(tail)].rstrip('-') + tail


def name_taken(name: str) -> ArgumentError:
    return ArgumentError(
        'run_name', f'a run named {name!r} already exists; choose another name or delete_run({name!r})'
    )


def delete_datasets(data_uri: str | None, datasets: list[str]) -> None:
    """Delete datasets uploaded for one submission alone (best effort: what they were for is gone)."""
    if not data_uri or not datasets:
        return
    try:
        store = open_store(data_uri)
        for dataset in datasets:
            store.delete(f'{DATASETS}/{dataset}')
    except StorageError:
        pass


class ExperimentRecord(BaseModel):
    name: str
    namespace: str
    spec: ExperimentSpec = Field(default_factory=ExperimentSpec)
    status: ExperimentStatus = Field(default_factory=ExperimentStatus)
    created_at: str | None = None


class Backend(ABC):
    """Where runs live. Every method raises finetuner.errors types, never raw API errors."""

    name: str

    # --- runs -----------------------------------------------------------------------------------
    def reserve_run(self, reservation: Reservation) -> None:
        """Hold ``reservation.name`` for a submission before its data is uploaded; a name in use raises
        ArgumentError. Here: the name must be free now, and :meth:`create_run` is the atomic step (an API
        server answers the second create of a name with 409)."""
        try:
            self.get_run(reservation.name)
        except RunNotFoundError:
            return
        raise name_taken(reservation.name)

    def release_run(self, reservation: Reservation) -> None:
        """A submission failed after :meth:`reserve_run`: free the name and delete what was uploaded for it."""
        delete_datasets(reservation.data_uri, reservation.datasets)

    @abstractmethod
    def create_run(self, name: str, spec: FinetuneRunSpec, reservation: Reservation | None = None) -> RunRecord:
        """Submit a run; it starts in phase CREATED. A name in use raises ArgumentError."""

    @abstractmethod
    def get_run(self, name: str) -> RunRecord:
        """The run with its current status (RunNotFoundError when there is none)."""

    @abstractmethod
    def list_runs(self, experiment: str | None = None) -> list[RunRecord]: ...

    @abstractmethod
    def delete_run(self, name: str) -> None:
        """Delete the run, its trainer and its stored outputs."""

    @abstractmethod
    def cancel_run(self, name: str) -> None:
        """Stop a run that is CREATED or STARTED; it ends FAILED, reason Cancelled (finetuner.api.reasons)."""

    @abstractmethod
    def suspend_run(self, name: str) -> None:
        """``spec.suspend = true``: the run stops training (keeping its checkpoints) and stays CREATED,
        reason Suspended, holding no GPU or slot, until :meth:`resume_run`. Nothing for an ended run."""

    @abstractmethod
    def resume_run(self, name: str) -> None:
        """``spec.suspend = false``: the run waits for a slot again and resumes from its last checkpoint."""

    @abstractmethod
    def logs(self, name: str) -> str:
        """The trainer's log so far."""

    @abstractmethod
    def stream_logs(self, name: str) -> Iterator[str]:
        """Log lines as they come, until the run ends."""

    @abstractmethod
    def output_store(self, name: str) -> LocalStore | S3Store:
        """The run's output location (artifact, metrics.json, progress.json, logs)."""

    # --- experiments ----------------------------------------------------------------------------
    @abstractmethod
    def create_experiment(
        self, name: str, spec: ExperimentSpec | None = None, uploads: Reservation | None = None
    ) -> ExperimentRecord:
        """Get or create (an existing experiment is returned as it is). ``uploads``: the datasets uploaded
        for its run template, deleted with it where the backend owns them."""

    @abstractmethod
    def get_experiment(self, name: str) -> ExperimentRecord: ...

    @abstractmethod
    def list_experiments(self) -> list[ExperimentRecord]: ...

    @abstractmethod
    def delete_experiment(self, name: str) -> None:
        """Delete the experiment and every run in it."""

    # --- data -----------------------------------------------------------------------------------
    @abstractmethod
    def data_store(self) -> LocalStore | S3Store:
        """Where datasets are pushed (``datasets/<name>/data.jsonl`` below it)."""
