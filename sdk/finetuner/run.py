"""A fine-tuning run as the user holds it: ``run.name``, ``run.status()``, ``run.save_model(...)``.

A :class:`Run` keeps no state of its own beyond its name and spec: every call asks the backend,
so a run fetched in a new process (``finetuner.get_run(name)``) behaves like the one ``fit`` returned.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field

from finetuner.api import layout, reasons
from finetuner.api.mining import SYNTHESIS_DATA, Task
from finetuner.api.v1alpha1 import FinetuneRunSpec, FinetuneRunStatus, Phase, Progress, RunMetrics
from finetuner.backends.base import Backend, RunRecord
from finetuner.errors import ArgumentError, BackendError, RunFailedError, RunNotFinishedError
from finetuner.storage import StorageError
from finetuner.wording import for_sdk

if TYPE_CHECKING:
    from finetuner.console.events import EventRow


class Run:
    """A FinetuneRun: CREATED → STARTED → FINISHED or FAILED."""

    def __init__(self, record: RunRecord, backend: Backend) -> None:
        self._record = record
        self._backend = backend

    # --- identity -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._record.name

    @property
    def experiment_name(self) -> str:
        return self._record.spec.experiment

    @property
    def config(self) -> FinetuneRunSpec:
        """The spec the run was submitted with."""
        return self._record.spec

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def record(self) -> RunRecord:
        """The run as last read from the backend (no new read; see refresh())."""
        return self._record

    def __repr__(self) -> str:
        status = self._record.status
        return f'Run(name={self.name!r}, experiment={self.experiment_name!r}, status={status.phase!r})'

    # --- status -------------------------------------------------------------------------------
    def refresh(self) -> RunRecord:
        self._record = self._backend.get_run(self.name)
        return self._record

    def full_status(self) -> FinetuneRunStatus:
        """Everything observed: phase, details, reason, times, progress, metrics, artifact URI. The details
        name fields as fit() does (``batch_size``, ``train_data[3]``), where the custom resource's status
        says ``spec.batchSize``, ``spec.trainData[3]``."""
        status = self.refresh().status
        return status.model_copy(update={'details': for_sdk(status.details)}) if status.details else status

    def status(self) -> dict[str, str]:
        """``{'status': 'CREATED', 'details': 'Run submitted and awaits execution'}`` and so on."""
        status = self.full_status()
        phase = str(status.phase or Phase.CREATED.value)
        # A run nobody has acted on yet (no operator pass, empty status) reads like the seed's fresh run.
        details = status.details or (reasons.SUBMITTED if phase == Phase.CREATED.value else '')
        return {'status': phase, 'details': details}

    @property
    def phase(self) -> str:
        return self.status()['status']

    def progress(self) -> Progress | None:
        return self.full_status().progress

    @property
    def artifact_uri(self) -> str | None:
        return self.full_status().artifact_uri

    @property
    def train_data(self) -> str:
        """The training data a synthesis run wrote (the URI of ``artifact/data.jsonl``), for
        ``fit(train_data=run.train_data)``; RunNotFinishedError / RunFailedError until it is FINISHED.
        A fine-tuning run: the data it trained on."""
        if self.config.task != Task.SYNTHESIS.value:
            return self.config.train_data
        status = self._require_finished('training data')
        output = status.output_uri or self._backend.output_store(self.name).uri
        return f'{output.rstrip("/")}/{SYNTHESIS_DATA}'

    # --- logs ---------------------------------------------------------------------------------
    def logs(self) -> str:
        """The trainer's log so far."""
        return self._backend.logs(self.name)

    def stream_logs(self) -> Iterator[str]:
        """Log lines as they are written, until the run ends."""
        return self._backend.stream_logs(self.name)

    # --- waiting ------------------------------------------------------------------------------
    def wait(
        self,
        timeout: float | None = None,
        poll: float = 2.0,
        on_progress: Any = None,
    ) -> dict[str, str]:
        """Block until the run is FINISHED or FAILED; return its final status dict.

        ``on_progress(status: FinetuneRunStatus)`` is called after every poll (e.g. to draw a bar).
        A TimeoutError names the phase the run was still in.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.full_status()
            if on_progress is not None:
                on_progress(status)
            phase = Phase(status.phase or Phase.CREATED)
            if phase.terminal:
                return {'status': phase.value, 'details': status.details or ''}
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f'run {self.name!r} is still {phase.value} after {timeout} s: {status.details}')
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # --- results ------------------------------------------------------------------------------
    def _require_finished(self, what: str) -> FinetuneRunStatus:
        status = self.full_status()
        phase = Phase(status.phase or Phase.CREATED)
        if phase == Phase.FAILED:
            raise RunFailedError(f'run {self.name!r} failed, so it has no {what}: {status.details}')
        if phase != Phase.FINISHED:
            raise RunNotFinishedError(
                f'run {self.name!r} is {phase.value}, so it has no {what} yet; call run.wait() first '
                f'(details: {status.details})'
            )
        return status

    def metrics(self) -> RunMetrics:
        """Evaluation before and after fine-tuning (empty when the run had no evaluation data):
        ``metrics().after['mrr']``, or as Finetuner's dict, ``metrics()['after']['mrr']``."""
        status = self._require_finished('metrics')
        if status.metrics is not None:
            return status.metrics
        try:
            raw = self._backend.output_store(self.name).read_json_or_none(layout.METRICS)  # type: ignore[union-attr]
        except StorageError as e:
            raise BackendError(f'cannot read the metrics of run {self.name!r}: {e}') from e
        if not isinstance(raw, dict):
            return RunMetrics()
        return RunMetrics.from_report(raw)

    def example_results(self) -> ExampleResults:
        """For a few evaluation queries, the top matches before and after fine-tuning, each marked
        relevant or not (``ExampleResults.before`` / ``.after``, query by query in the same order).

        The trainer gathers them whenever the run evaluates (``eval_data`` or ``val_split``, or an
        ``EvaluationCallback`` with ``gather_examples=True``); a run without evaluation has none (empty
        lists). Images come as ``data:`` URIs of small thumbnails (``ExampleQuery.image``). Read as
        Finetuner's dict, ``example_results()['after']`` maps each query to its matches, closest first."""
        self._require_finished('example results')
        try:
            store = self._backend.output_store(self.name)
            examples = store.read_json_or_none(layout.EXAMPLES)  # type: ignore[union-attr]
            metrics = None if examples is not None else store.read_json_or_none(layout.METRICS)  # type: ignore[union-attr]
        except StorageError as e:
            raise BackendError(f'cannot read the example results of run {self.name!r}: {e}') from e
        return ExampleResults.from_reports(examples, metrics)

    def display_metrics(self, console: Any = None) -> None:
        """Print the metrics before and after fine-tuning as a table (on ``console``, a rich Console)."""
        from finetuner.tables import print_whole

        print_whole(metrics_table(self.name, self.metrics()), console)

    def display_examples(self, k: int = 5, console: Any = None) -> None:
        """Print, for a few evaluation queries, the top ``k`` matches before and after fine-tuning, each
        marked relevant (✓) or not (✗), as Finetuner's ``display_examples``. Texts are shown as text,
        images as their file paths; in a notebook, a table of the pictures instead (unless ``console``, a
        rich Console, is given). A run keeps the 5 closest matches per query (``num_example_queries``
        queries of its EvaluationCallback, 5 by default)."""
        from finetuner import examples_display

        k = examples_display.check_k(k)
        results = self.example_results()
        show_html = examples_display.notebook_display() if console is None else None
        if show_html is not None:
            show_html(examples_display.to_html(results, k))
            return
        from rich.console import Console

        console = console or Console()
        tables = examples_display.tables(results, k, self.name)
        if not tables:
            console.print(f'Run {self.name} has no example results: it did not evaluate (no eval_data or val_split).')
        for table in tables:
            console.print(table)

    def events(self) -> list[EventRow]:
        """What happened to the run, oldest first: on Kubernetes the Events of the run, its Job and its pods
        (``kubectl describe``'s list: scheduling, image pulls, phase changes); locally its phase changes.
        Each has ``time``, ``type`` (Normal or Warning), ``reason``, ``message``, ``source`` and ``object``."""
        from finetuner.console.events import run_events

        return run_events(self._backend, self.refresh())

    def save_model(self, path: str | Path, overwrite: bool = False) -> str:
        """Download the fine-tuned model into the folder ``path``; return that path.

        A folder that exists and is not empty is refused (it may hold your files), unless ``overwrite=True``:
        then it is replaced as a whole, never mixed with the new model. The model is downloaded next to it
        first and moved into place only once complete, so a failed download leaves the folder as it was.
        """
        self._require_finished('model')
        target = check_save_target(Path(path).expanduser(), overwrite)
        store = self._backend.output_store(self.name)
        try:
            if not store.exists(layout.ARTIFACT_MANIFEST):
                raise RunNotFinishedError(
                    f'run {self.name!r} is FINISHED but its artifact is incomplete '
                    f'({store.uri}/{layout.ARTIFACT_MANIFEST} is missing)'
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f'.{target.name}.download-', dir=target.parent))
            try:
                store.download_dir(layout.ARTIFACT, staging)  # type: ignore[union-attr]
                _move_into_place(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except StorageError as e:
            raise BackendError(f'cannot download the model of run {self.name!r}: {e}') from e
        return str(target)

    def save_artifact(self, directory: str | Path = 'artifacts', overwrite: bool = False) -> str:
        """Download the model into ``directory/<run name>``; return that path."""
        return self.save_model(Path(directory).expanduser() / self.name, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        commit_message: str | None = None,
    ) -> str:
        """Publish the fine-tuned model as the Hugging Face model repository ``repo_id`` ("user/name"),
        created when missing (``private`` then), with its model card; return the repository's URL.

        The folder uploaded is the artifact less this installation's own ``manifest.json`` (the run's
        spec names your buckets); ``finetuner.get_model(repo_id)`` and the model's own library load it back.
        ``token``: a hub token with write access (default: ``HF_TOKEN`` or ``huggingface-cli login``)."""
        from finetuner import hub

        repo_id = hub.check_repo_id(repo_id)
        self._require_finished('model')
        with tempfile.TemporaryDirectory(prefix=f'finetuner-hub-{self.name}-') as tmp:
            folder = Path(self.save_model(Path(tmp) / 'model'))
            prepared = hub.prepare_folder(folder, repo_id, self.name)
            message = commit_message or f'Fine-tuned with kube-finetuner (run {self.name})'
            return hub.upload(prepared, token, private, message).url or ''

    # --- control ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the run; it ends FAILED with details saying it was cancelled. A run still waiting in the
        local queue never starts."""
        self._backend.cancel_run(self.name)
        self.refresh()

    def suspend(self) -> None:
        """Stop training and give back the GPU or slot (``spec.suspend``): the run stays CREATED, reason
        Suspended, keeping its checkpoints, until :meth:`resume`. An ended run is left as it is."""
        self._backend.suspend_run(self.name)
        self.refresh()

    def resume(self) -> None:
        """Let a suspended run train again: it waits for a slot and resumes from its last checkpoint."""
        self._backend.resume_run(self.name)
        self.refresh()


def check_save_target(target: Path, overwrite: bool) -> Path:
    """Check the folder save_model writes to: refused when it is a file, or a non-empty folder unless overwrite."""
    if target.exists() and not target.is_dir():
        raise ArgumentError('path', f'{str(target)!r} is a file; give a folder (new or empty) to save the model in')
    if target.is_dir() and not overwrite:
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ', '.join(entries[:3]) + (', ...' if len(entries) > 3 else '')
            raise ArgumentError(
                'path',
                f'folder {str(target)!r} is not empty ({len(entries)} entries: {shown}); give a new or empty '
                'folder, or save_model(path, overwrite=True) to replace it and everything in it',
            )
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Put the complete download at ``target``: renames only, so the folder is never a mix of old and new."""
    if not target.exists():
        staging.rename(target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f'.{target.name}.replaced-', dir=target.parent))
    aside.rmdir()
    target.rename(aside)
    try:
        staging.rename(target)
    except OSError:
        aside.rename(target)  # the old folder back as it was
        raise
    shutil.rmtree(aside, ignore_errors=True)


def metrics_table(run_name: str, metrics: RunMetrics) -> Any:
    from rich.table import Table

    table = Table(title=f'Retrieval metrics of {run_name}')
    table.add_column('metric')
    table.add_column('before', justify='right')
    table.add_column('after', justify='right')
    table.add_column('change', justify='right')
    for name in sorted(set(metrics.before) | set(metrics.after)):
        before, after = metrics.before.get(name), metrics.after.get(name)
        change = f'{after - before:+.4f}' if before is not None and after is not None else ''
        table.add_row(
            name,
            '' if before is None else f'{before:.4f}',
            '' if after is None else f'{after:.4f}',
            change,
        )
    return table


class ExampleMatch(BaseModel):
    """One retrieved item: what it is, its label, its distance to the query and whether it is relevant."""

    content: str = Field(description='The text, the image path, or "<image, N bytes>" for inline images.')
    label: str | int | float | bool | None = None
    distance: float
    relevant: bool
    image: str | None = Field(default=None, description='A thumbnail of an image item, as a data: URI.')


class ExampleQuery(BaseModel):
    query: str = Field(description='The query text or image, described as ExampleMatch.content.')
    label: str | int | float | bool | None = None
    image: str | None = Field(default=None, description='A thumbnail of an image query, as a data: URI.')
    matches: list[ExampleMatch] = Field(default_factory=list, description='Closest first.')


class ExampleResults(BaseModel):
    """Top matches of the same evaluation queries before and after fine-tuning (``examples.json``)."""

    before: list[ExampleQuery] = Field(default_factory=list)
    after: list[ExampleQuery] = Field(default_factory=list)

    @classmethod
    def from_reports(cls, examples: Any, metrics: Any = None) -> ExampleResults:
        """From examples.json, or from metrics.json of a run by an older trainer, which kept only the
        latest evaluation's examples there (``after``). Anything malformed counts as no examples."""
        if isinstance(examples, dict):
            raw: dict[str, Any] = {k: examples.get(k) or [] for k in ('before', 'after')}
        elif isinstance(metrics, dict) and isinstance(metrics.get('examples'), list):
            raw = {'before': [], 'after': metrics['examples']}
        else:
            return cls()
        try:
            return cls.model_validate(raw)
        except ValueError:
            return cls()

    def __bool__(self) -> bool:
        return bool(self.before or self.after)

    # Finetuner's run.example_results() is the dict {'before': {query: [match, ...]}, 'after': {...}};
    # code written for it (``for stage in results: results[stage][query][:k]``) reads this model the same
    # way. The matches are ExampleMatch objects (content, label, distance, relevant), closest first.
    STAGES: ClassVar[tuple[str, str]] = ('before', 'after')

    def __getitem__(self, stage: str) -> dict[str, list[ExampleMatch]]:
        if stage not in self.STAGES:
            raise KeyError(stage)
        return {query.query: query.matches for query in getattr(self, stage)}

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # a mapping's keys, not pydantic's pairs
        return iter(self.STAGES)

    def keys(self) -> tuple[str, str]:
        return self.STAGES

    def items(self) -> list[tuple[str, dict[str, list[ExampleMatch]]]]:
        return [(stage, self[stage]) for stage in self.STAGES]

    def _repr_html_(self) -> str:
        """The examples as pictures and text in a notebook (the top 5 matches of every query)."""
        from finetuner.examples_display import to_html

        return to_html(self, 5)
