"""The local backend: runs the trainer as a detached process on this machine, no cluster needed.

Everything lives under ``FINETUNER_HOME`` (default ``~/.cache/finetuner``)::

    runs/<name>/run.json         the run as submitted (name, spec, creation time)
    runs/<name>/config.json      the TrainerConfig handed to the trainer
    runs/<name>/state.json       phase, details, times, exit code (written by the supervisor)
    runs/<name>/supervisor.pid   the supervisor's pid (its process group holds the trainer)
    runs/<name>/trainer.log      the trainer's stdout and stderr
    runs/<name>/output/          the run's output location (file://): artifact, metrics, progress
    experiments/<name>.json      experiments ('default' exists implicitly)
    datasets/<name>/data.jsonl   datasets pushed with finetuner.push_data or uploaded by fit

A small supervisor (``python -m finetuner.backends._supervisor RUN_DIR``) is started in its own
session: it runs the trainer, watches it, and writes the final phase atomically, so a run
survives the Python process that submitted it, and ``get_run`` in any later process sees it.
The phase read back is always checked against the world: a supervisor that vanished without
writing a final phase makes the run FAILED, never forever STARTED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetuner.api import layout, reasons
from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import (
    ExperimentSpec,
    ExperimentStatus,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
    Progress,
    RunCounts,
    RunMetrics,
    TrainerConfig,
    check_dns1123_name,
)
from finetuner.backends.base import Backend, ExperimentRecord, RunRecord
from finetuner.errors import ArgumentError, BackendError, ExperimentNotFoundError, RunNotFoundError
from finetuner.storage import LocalStore, S3Store, StorageError, open_store

NAMESPACE = 'local'
DEFAULT_EXPERIMENT = 'default'

RUN_FILE = 'run.json'
CONFIG_FILE = 'config.json'
STATE_FILE = 'state.json'
COMMAND_FILE = 'command.json'
PID_FILE = 'supervisor.pid'
TRAINER_LOG = 'trainer.log'
TERMINATION_LOG = 'termination-log'
CANCEL_MARKER = 'cancel-requested'
OUTPUT_DIR = 'output'


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='milliseconds').replace('+00:00', 'Z')


def default_home() -> Path:
    if os.environ.get('FINETUNER_HOME'):
        return Path(os.environ['FINETUNER_HOME']).expanduser()
    cache = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(cache) / 'finetuner'


def trainer_command() -> list[str]:
    """The trainer as a module of this interpreter (the same venv that runs the SDK)."""
    return [sys.executable, '-m', 'finetuner_trainer']


class RunState(BaseModel):
    """What the supervisor observed (``state.json``)."""

    phase: Phase = Phase.CREATED
    details: str = reasons.SUBMITTED
    reason: str | None = Reason.SUBMITTED.value
    start_time: str | None = None
    completion_time: str | None = None
    exit_code: int | None = None
    trainer_pid: int | None = None

    def phase_is_terminal(self) -> bool:
        return Phase(self.phase).terminal


class _StoredRun(BaseModel):
    name: str
    spec: dict[str, Any]
    created_at: str


class _StoredExperiment(BaseModel):
    name: str
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: str


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_state(run_dir: Path) -> RunState:
    try:
        return RunState.model_validate_json((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return RunState()


def write_state(run_dir: Path, state: RunState) -> None:
    write_json_atomic(run_dir / STATE_FILE, state.model_dump(mode='json'))


# Failures of the Hugging Face hub client when weights are neither cached nor downloadable.
_WEIGHTS_UNREACHABLE = (
    'LocalEntryNotFoundError',
    'OfflineModeIsEnabled',
    'huggingface.co',
    'locate the file on the Hub',
)


def explain_weights_unreachable(run_dir: Path, message: str) -> str | None:
    """An actionable message when the trainer died fetching pretrained weights (offline machine)."""
    if not any(marker in message for marker in _WEIGHTS_UNREACHABLE):
        return None
    config = _read_json(run_dir / CONFIG_FILE) or {}
    model = (config.get('spec') or {}).get('model', 'the model')
    return (
        f'the pretrained weights of {model!r} are not on this machine and cannot be downloaded '
        '(no connection to the Hugging Face hub, or HF_HUB_OFFLINE is set). Give a local model folder as model=..., '
        "set HF_ENDPOINT to a reachable hub mirror, or train from scratch with model_options={'pretrained': False}. "
        f'(trainer: {message[:300]})'
    )


def run_output(run_dir: Path) -> LocalStore | S3Store:
    """The run's output location as its trainer was told (``spec.output`` may move it off this machine)."""
    config = _read_json(run_dir / CONFIG_FILE) or {}
    return open_store(config.get('outputUri') or (run_dir / OUTPUT_DIR).as_uri())


def _read_report(output: LocalStore | S3Store, key: str) -> Any:
    try:
        return output.read_json_or_none(key)
    except (StorageError, ValueError):
        return None


def _trainer_message(output: LocalStore | S3Store, run_dir: Path) -> str | None:
    """The trainer's own one-line reason: its failure.json, else its termination log."""
    failure = _read_report(output, layout.FAILURE)
    if isinstance(failure, dict) and (failure.get('message') or failure.get('reason')):
        return str(failure.get('message') or failure.get('reason'))
    lines = [line for line in _read_text(run_dir / TERMINATION_LOG).splitlines() if line.strip()]
    return lines[-1] if lines else None


def failure_reason(run_dir: Path, exit_code: int | None) -> tuple[str, str]:
    """(reason, details) of a failed trainer, in the vocabulary the operator speaks too."""
    message = _trainer_message(run_output(run_dir), run_dir)
    explained = explain_weights_unreachable(run_dir, message) if message else None
    if explained:
        return Reason.WEIGHTS_UNAVAILABLE.value, explained
    if message is None:
        lines = [line for line in _read_text(run_dir / TRAINER_LOG).splitlines() if line.strip()]
        message = reasons.trainer_exited(exit_code, lines[-1].strip() if lines else 'no output')
    if reasons.is_configuration_error(exit_code):
        return Reason.CONFIGURATION_ERROR.value, reasons.configuration_error(message)
    return Reason.TRAINER_FAILED.value, message


def ending(run_dir: Path, exit_code: int) -> tuple[Phase, str, str]:
    """(phase, reason, details) of a trainer that exited with ``exit_code``."""
    if (run_dir / CANCEL_MARKER).exists():
        return Phase.FAILED, Reason.CANCELLED.value, reasons.CANCELLED
    if exit_code == 0:
        output = run_output(run_dir)
        try:
            published = output.exists(layout.ARTIFACT_MANIFEST)
        except StorageError:
            published = False
        if published:
            return Phase.FINISHED, Reason.SUCCEEDED.value, reasons.succeeded(output.uri)
        return Phase.FAILED, Reason.ARTIFACT_MISSING.value, reasons.artifact_missing(output.uri)
    reason, details = failure_reason(run_dir, exit_code)
    return Phase.FAILED, reason, details


def final_state(run_dir: Path, exit_code: int, state: RunState) -> RunState:
    """The terminal state of a trainer that exited with ``exit_code``."""
    phase, reason, details = ending(run_dir, exit_code)
    return state.model_copy(
        update={
            'exit_code': exit_code,
            'completion_time': now(),
            'trainer_pid': None,
            'phase': phase,
            'reason': reason,
            'details': details,
        }
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError, IsADirectoryError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors='replace')
    except FileNotFoundError:
        return ''


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, finished but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f'/proc/{pid}/stat')
    if stat.exists():
        try:
            return stat.read_text().rsplit(')', 1)[1].split()[0] != 'Z'
        except (OSError, IndexError):
            return False
    return True


class LocalBackend(Backend):
    name = 'local'

    def __init__(
        self,
        home: str | Path | None = None,
        data: str | None = None,
        command: list[str] | None = None,
    ) -> None:
        """``home``: FINETUNER_HOME; ``data``: an s3:// prefix for datasets instead of the home folder;
        ``command``: the trainer's argv before ``--config FILE`` (tests give a scripted trainer)."""
        self._home = Path(home).expanduser().resolve() if home else None
        self.data = data
        self.command = command or trainer_command()
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def home(self) -> Path:
        """The given home, else FINETUNER_HOME as it is now (read on every call, never cached)."""
        return self._home or default_home().resolve()

    # --- paths --------------------------------------------------------------------------------
    def _runs_dir(self) -> Path:
        return self.home / 'runs'

    def run_dir(self, name: str) -> Path:
        """The run's folder; the name must be a DNS-1123 label, so it can never leave the home."""
        check_dns1123_name(name, 'run name')
        path = (self._runs_dir() / name).resolve()
        if path.parent != self._runs_dir().resolve():
            raise ArgumentError('run_name', f'{name!r} points outside {self._runs_dir()}')
        return path

    def _experiment_file(self, name: str) -> Path:
        check_dns1123_name(name, 'experiment name')
        return self.home / 'experiments' / f'{name}.json'

    def __repr__(self) -> str:
        return f'LocalBackend(home={str(self.home)!r})'

    # --- runs ---------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Refuse a run this machine cannot train (called by fit() before anything is uploaded)."""
        if self.command != trainer_command():
            return
        import importlib.util

        missing = [m for m in ('finetuner_trainer', 'torch') if importlib.util.find_spec(m) is None]
        if missing:
            from finetuner.models import MissingDependencyError

            raise MissingDependencyError(
                f'the local backend trains on this machine, but {missing[0]} is not installed here: '
                "pip install 'kube-finetuner[trainer]', or send runs to a cluster with "
                "finetuner.login(backend='kubernetes', ...)"
            )

    def output_uri(self, name: str, spec: FinetuneRunSpec) -> str:
        if spec.output:
            return f'{spec.output.rstrip("/")}/{name}'
        return (self.run_dir(name) / OUTPUT_DIR).as_uri()

    def create_run(self, name: str, spec: FinetuneRunSpec) -> RunRecord:
        self.check_ready()
        run_dir = self.run_dir(name)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError as e:
            raise ArgumentError(
                'run_name', f'a run named {name!r} already exists; choose another name or delete_run({name!r})'
            ) from e
        self.create_experiment(spec.experiment)
        created_at = now()
        (run_dir / OUTPUT_DIR).mkdir()
        write_json_atomic(
            run_dir / RUN_FILE, _StoredRun(name=name, spec=spec.to_k8s(), created_at=created_at).model_dump()
        )
        config = TrainerConfig(
            run_name=name,
            namespace=NAMESPACE,
            spec=spec,
            output_uri=self.output_uri(name, spec),
            data_uri=self.data_store().uri,
            termination_log=str(run_dir / TERMINATION_LOG),
        )
        write_json_atomic(run_dir / CONFIG_FILE, config.to_k8s())
        write_json_atomic(run_dir / COMMAND_FILE, self.command)
        write_state(run_dir, RunState())
        try:
            with (run_dir / 'supervisor.log').open('wb') as supervisor_log:
                child = subprocess.Popen(
                    [sys.executable, '-m', 'finetuner.backends._supervisor', str(run_dir)],
                    start_new_session=True,  # its own process group: outlives us, and cancel() kills the group
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=supervisor_log,
                    cwd=run_dir,
                    close_fds=True,
                )
        except OSError as e:
            failed = RunState(
                phase=Phase.FAILED, details=f'could not start the trainer: {e}', reason=Reason.START_FAILED.value
            )
            write_state(run_dir, failed)
            raise BackendError(f'could not start the local trainer for {name!r}: {e}') from e
        (run_dir / PID_FILE).write_text(str(child.pid))
        self._children[name] = child
        return RunRecord(
            name=name, namespace=NAMESPACE, spec=spec, status=self._status(name, run_dir), created_at=created_at
        )

    def _supervisor_alive(self, name: str, run_dir: Path) -> bool | None:
        """True/False, or None when no supervisor was recorded (yet)."""
        child = self._children.get(name)
        if child is not None:
            return child.poll() is None  # also reaps our own child once it ended
        try:
            pid = int((run_dir / PID_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return process_alive(pid)

    def _state(self, name: str, run_dir: Path) -> RunState:
        """The supervisor's record, checked against the world: a supervisor that vanished without
        writing a final phase leaves the run FAILED, never forever STARTED."""
        state = read_state(run_dir)
        if state.phase_is_terminal() or self._supervisor_alive(name, run_dir) is not False:
            return state
        state = read_state(run_dir)  # it may have written its final phase just before exiting
        if not state.phase_is_terminal():
            state = state.model_copy(
                update={
                    'phase': Phase.FAILED,
                    'reason': Reason.SUPERVISOR_LOST.value,
                    'details': 'the local process running this run ended without a result '
                    '(machine restarted or process killed); see logs() and start a new run',
                    'completion_time': state.completion_time or now(),
                }
            )
            write_state(run_dir, state)
        return state

    def _status(self, name: str, run_dir: Path) -> FinetuneRunStatus:
        state = self._state(name, run_dir)
        output = run_dir / OUTPUT_DIR
        stored = _read_json(run_dir / RUN_FILE) or {}
        spec_output = (stored.get('spec') or {}).get('output')
        output_uri = f'{spec_output.rstrip("/")}/{name}' if spec_output else output.as_uri()
        progress = _parse(Progress, _read_json(output / layout.PROGRESS))
        metrics = _read_json(output / layout.METRICS)
        has_artifact = (output / layout.ARTIFACT_MANIFEST).is_file()
        return FinetuneRunStatus(
            phase=state.phase,
            details=reasons.running(progress) if state.phase == Phase.STARTED else state.details,
            reason=state.reason,
            start_time=state.start_time,
            completion_time=state.completion_time,
            attempts=1 if state.start_time else 0,
            progress=progress,
            metrics=_parse(RunMetrics, {k: v for k, v in metrics.items() if k in ('before', 'after')})
            if isinstance(metrics, dict)
            else None,
            artifact_uri=f'{output_uri}/{layout.ARTIFACT}' if has_artifact or spec_output else None,
            output_uri=output_uri,
        )

    def get_run(self, name: str) -> RunRecord:
        run_dir = self.run_dir(name)
        stored = _read_json(run_dir / RUN_FILE)
        if stored is None:
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        record = _StoredRun.model_validate(stored)
        return RunRecord(
            name=name,
            namespace=NAMESPACE,
            spec=FinetuneRunSpec.model_validate(record.spec),
            status=self._status(name, run_dir),
            created_at=record.created_at,
        )

    def list_runs(self, experiment: str | None = None) -> list[RunRecord]:
        if not self._runs_dir().is_dir():
            return []
        runs = []
        for path in sorted(self._runs_dir().iterdir()):
            if not (path / RUN_FILE).is_file():
                continue
            try:
                run = self.get_run(path.name)
            except (RunNotFoundError, ValueError):
                continue
            if experiment is None or run.spec.experiment == experiment:
                runs.append(run)
        return sorted(runs, key=lambda r: (r.created_at or '', r.name))

    def delete_run(self, name: str) -> None:
        run = self.get_run(name)
        if not Phase(run.status.phase or Phase.CREATED).terminal:
            self.cancel_run(name)
        import shutil

        shutil.rmtree(self.run_dir(name), ignore_errors=True)
        self._children.pop(name, None)

    def cancel_run(self, name: str, timeout: float = 20.0) -> None:
        run_dir = self.run_dir(name)
        run = self.get_run(name)
        if Phase(run.status.phase or Phase.CREATED).terminal:
            return
        (run_dir / CANCEL_MARKER).write_text(now())
        try:
            pid = int((run_dir / PID_FILE).read_text())
        except (FileNotFoundError, ValueError):
            pid = None
        if pid is not None:
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._supervisor_alive(name, run_dir) is not False:
                time.sleep(0.1)
            if self._supervisor_alive(name, run_dir):
                _signal_group(pid, signal.SIGKILL)
        state = read_state(run_dir)
        if not state.phase_is_terminal():
            write_state(
                run_dir,
                state.model_copy(
                    update={
                        'phase': Phase.FAILED,
                        'details': reasons.CANCELLED,
                        'reason': Reason.CANCELLED.value,
                        'completion_time': now(),
                    }
                ),
            )

    def logs(self, name: str) -> str:
        run_dir = self.run_dir(name)
        if not (run_dir / RUN_FILE).is_file():
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        return _read_text(run_dir / TRAINER_LOG)

    def stream_logs(self, name: str, poll: float = 0.5) -> Iterator[str]:
        run_dir = self.run_dir(name)
        if not (run_dir / RUN_FILE).is_file():
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        position = 0
        pending = ''
        while True:
            ended = Phase(self._status(name, run_dir).phase or Phase.CREATED).terminal
            try:
                with (run_dir / TRAINER_LOG).open('rb') as f:
                    f.seek(position)
                    chunk = f.read()
                    position += len(chunk)
            except FileNotFoundError:
                chunk = b''
            pending += chunk.decode('utf-8', errors='replace')
            *lines, pending = pending.split('\n')
            yield from lines
            if ended and not chunk:
                if pending:
                    yield pending
                return
            if not chunk:
                time.sleep(poll)

    def output_store(self, name: str) -> LocalStore | S3Store:
        run = self.get_run(name)
        return open_store(run.status.output_uri or self.output_uri(name, run.spec))

    # --- experiments ----------------------------------------------------------------------------
    def create_experiment(self, name: str, spec: ExperimentSpec | None = None) -> ExperimentRecord:
        path = self._experiment_file(name)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            stored = _StoredExperiment(name=name, spec=(spec or ExperimentSpec()).to_k8s(), created_at=now())
            write_json_atomic(path, stored.model_dump())
        return self.get_experiment(name)

    def get_experiment(self, name: str) -> ExperimentRecord:
        path = self._experiment_file(name)
        stored = _read_json(path)
        if stored is None:
            if name != DEFAULT_EXPERIMENT:
                raise ExperimentNotFoundError(name, f'the local backend ({self.home})')
            stored = _StoredExperiment(name=name, created_at=now()).model_dump()
        record = _StoredExperiment.model_validate(stored)
        return ExperimentRecord(
            name=name,
            namespace=NAMESPACE,
            spec=ExperimentSpec.model_validate(record.spec),
            status=ExperimentStatus(runs=_count(self.list_runs(experiment=name))),
            created_at=record.created_at,
        )

    def list_experiments(self) -> list[ExperimentRecord]:
        folder = self.home / 'experiments'
        names = {p.stem for p in folder.glob('*.json')} if folder.is_dir() else set()
        names.add(DEFAULT_EXPERIMENT)
        return [self.get_experiment(name) for name in sorted(names)]

    def delete_experiment(self, name: str) -> None:
        self.get_experiment(name)
        for run in self.list_runs(experiment=name):
            self.delete_run(run.name)
        self._experiment_file(name).unlink(missing_ok=True)

    # --- data -----------------------------------------------------------------------------------
    def data_store(self) -> LocalStore | S3Store:
        return open_store(self.data) if self.data else LocalStore(self.home)


def _count(runs: list[RunRecord]) -> RunCounts:
    counts = RunCounts(total=len(runs))
    for run in runs:
        field = (run.status.phase or Phase.CREATED).lower()
        setattr(counts, field, getattr(counts, field) + 1)
    return counts


def _parse(model: type[BaseModel], value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    try:
        return model.model_validate(value)
    except ValueError:
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
