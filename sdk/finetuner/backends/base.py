"""The interface both backends implement: ``kubernetes`` (custom resources) and ``local`` (subprocess).

The SDK's module functions and :class:`finetuner.run.Run` only talk to this interface, so the
seed experience is the same with or without a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from pydantic import BaseModel, Field

from finetuner.api.v1alpha1 import ExperimentSpec, ExperimentStatus, FinetuneRunSpec, FinetuneRunStatus
from finetuner.storage import LocalStore, S3Store


class RunRecord(BaseModel):
    """A run as a backend sees it: what was asked and what was observed."""

    name: str
    namespace: str
    spec: FinetuneRunSpec
    status: FinetuneRunStatus = Field(default_factory=FinetuneRunStatus)
    created_at: str | None = None


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
    @abstractmethod
    def create_run(self, name: str, spec: FinetuneRunSpec) -> RunRecord:
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
    def create_experiment(self, name: str, spec: ExperimentSpec | None = None) -> ExperimentRecord:
        """Get or create."""

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
