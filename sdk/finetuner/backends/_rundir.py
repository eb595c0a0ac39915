"""A local run's folder: its files, its recorded state, and how a trainer's exit becomes a phase.

Shared by the local backend (:mod:`finetuner.backends.local`), its queue
(:mod:`finetuner.backends._scheduler`) and the per-run supervisor (:mod:`finetuner.backends._supervisor`),
none of which imports another's module-level state. Layout of ``runs/<name>/``::

    run.json          the run as submitted (name, uid, spec, creation time, its uploaded datasets)
    config.json       the TrainerConfig handed to the trainer
    command.json      the trainer's argv before ``--config FILE``
    state.json        phase, reason, details, times, exit code, admission (written atomically)
    supervisor.pid    the pid of the supervisor of the current attempt (its process group holds the trainer)
    trainer.log       the trainer's stdout and stderr, every attempt appended
    output/           the run's output location (file://): artifact, metrics, progress, checkpoints
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetuner.api import layout, reasons
from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import ExperimentSpec, FinetuneRunSpec, Phase, TrainerConfig
from finetuner.storage import LocalStore, S3Store, StorageError, open_store

NAMESPACE = 'local'

RUN_FILE = 'run.json'
CONFIG_FILE = 'config.json'
STATE_FILE = 'state.json'
COMMAND_FILE = 'command.json'
PID_FILE = 'supervisor.pid'
TRAINER_LOG = 'trainer.log'
SUPERVISOR_LOG = 'supervisor.log'
TERMINATION_LOG = 'termination-log'
CANCEL_MARKER = 'cancel-requested'
SUSPEND_MARKER = 'suspend-requested'
OUTPUT_DIR = 'output'


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='milliseconds').replace('+00:00', 'Z')


@cache
def boot_id() -> str | None:
    """This boot of the machine (Linux); a run admitted under another boot id trained before a restart."""
    try:
        return Path('/proc/sys/kernel/random/boot_id').read_text().strip() or None
    except OSError:
        return None


class RunState(BaseModel):
    """What the queue and the supervisor observed (``state.json``)."""

    phase: Phase = Phase.CREATED
    details: str = reasons.SUBMITTED
    reason: str | None = Reason.SUBMITTED.value
    start_time: str | None = None
    completion_time: str | None = None
    exit_code: int | None = None
    trainer_pid: int | None = None
    admitted: bool = Field(
        default=False, description='the queue started a supervisor for this attempt, which has not recorded its end'
    )
    gpu_ids: list[int] = Field(default_factory=list, description='GPUs the queue gave this attempt')
    boot_id: str | None = Field(default=None, description='the boot of the machine the attempt was admitted in')
    attempts: int = Field(default=0, description='attempts the queue admitted')
    admitted_at: str | None = Field(default=None, description='when the queue admitted the current attempt')
    trainer_started_at: str | None = Field(
        default=None, description="when the supervisor started the current attempt's trainer process"
    )
    log_bytes_at_admission: int = Field(
        default=0, description="trainer.log's size when the current attempt was admitted: output beyond it is new"
    )
    progress_mtime_at_admission: int | None = Field(
        default=None, description="progress.json's mtime (ns) when the current attempt was admitted; None: none"
    )

    def phase_is_terminal(self) -> bool:
        return Phase(self.phase).terminal


class StoredRun(BaseModel):
    """``run.json``: the run as submitted."""

    name: str
    spec: dict[str, Any]
    created_at: str
    uid: str | None = None  # which run of this name (a run deleted and submitted again gets a new one)
    uploads: list[str] = Field(default_factory=list)  # datasets uploaded for this run alone
    data_uri: str | None = None  # the data store those datasets are in
    sweep_point: dict[str, Any] | None = None  # the point of its experiment's sweep


class StoredExperiment(BaseModel):
    """``experiments/<name>.json``: a local experiment as created."""

    name: str
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    uploads: list[str] = Field(default_factory=list)  # datasets uploaded for its run template
    data_uri: str | None = None  # the data store those datasets (and its runs' configs) use
    command: list[str] | None = None  # the trainer argv its sweep runs get

    def parsed_spec(self) -> ExperimentSpec:
        try:
            return ExperimentSpec.model_validate(self.spec)
        except ValueError:
            return ExperimentSpec()


def new_uid() -> str:
    """Tells apart runs of one name: a run deleted and submitted again is another run."""
    return secrets.token_hex(4)


def trainer_command() -> list[str]:
    """The trainer as a module of this interpreter (the same venv that runs the SDK)."""
    return [sys.executable, '-m', 'finetuner_trainer']


def output_uri(run_dir: Path, name: str, spec: FinetuneRunSpec) -> str:
    if spec.output:
        return f'{spec.output.rstrip("/")}/{name}'
    return (run_dir / OUTPUT_DIR).as_uri()


def write_run(
    run_dir: Path, stored: StoredRun, spec: FinetuneRunSpec, command: list[str], data_uri: str | None
) -> None:
    """Fill a new run's folder (which exists, reserved for it): ``run.json`` last, so a reader never
    sees a run without its configuration."""
    (run_dir / OUTPUT_DIR).mkdir(exist_ok=True)
    config = TrainerConfig(
        run_name=stored.name,
        namespace=NAMESPACE,
        spec=spec,
        output_uri=output_uri(run_dir, stored.name, spec),
        data_uri=data_uri,
        termination_log=str(run_dir / TERMINATION_LOG),
    )
    write_json_atomic(run_dir / CONFIG_FILE, config.to_k8s())
    write_json_atomic(run_dir / COMMAND_FILE, command)
    write_state(run_dir, RunState())
    write_json_atomic(run_dir / RUN_FILE, stored.model_dump())


def read_experiment(path: Path) -> StoredExperiment | None:
    raw = read_json(path)
    try:
        return StoredExperiment.model_validate(raw) if isinstance(raw, dict) else None
    except ValueError:
        return None


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError, IsADirectoryError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors='replace')
    except (FileNotFoundError, NotADirectoryError):
        return ''


def read_stored(run_dir: Path) -> StoredRun | None:
    raw = read_json(run_dir / RUN_FILE)
    if not isinstance(raw, dict):
        return None
    try:
        return StoredRun.model_validate(raw)
    except ValueError:
        return None


def read_state(run_dir: Path) -> RunState:
    try:
        return RunState.model_validate_json((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return RunState()


def write_state(run_dir: Path, state: RunState) -> None:
    write_json_atomic(run_dir / STATE_FILE, state.model_dump(mode='json'))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None


def admission_baseline(run_dir: Path) -> dict[str, Any]:
    """What the trainer files hold when an attempt is admitted (the RunState fields ``*_at_admission``):
    a resumed attempt's earlier log and progress are not signs of this attempt's life."""
    return {
        'log_bytes_at_admission': _size(run_dir / TRAINER_LOG),
        'progress_mtime_at_admission': _mtime_ns(run_dir / OUTPUT_DIR / layout.PROGRESS),
    }


def shows_life(run_dir: Path, state: RunState) -> bool:
    """The current attempt's trainer wrote to its log or its progress since the attempt was admitted."""
    if _size(run_dir / TRAINER_LOG) > state.log_bytes_at_admission:
        return True
    progress = _mtime_ns(run_dir / OUTPUT_DIR / layout.PROGRESS)
    return progress is not None and progress != state.progress_mtime_at_admission


def started(state: RunState) -> RunState:
    """STARTED: the trainer runs. Its start time is its process's start (a container's ``startedAt``)."""
    return state.model_copy(
        update={
            'phase': Phase.STARTED,
            'reason': Reason.RUNNING.value,
            'details': reasons.RUNNING,
            'start_time': state.start_time or state.trainer_started_at or state.admitted_at or now(),
        }
    )


def observed(run_dir: Path, state: RunState) -> RunState:
    """The state as the run's files show it now, which may be ahead of ``state.json``.

    The supervisor records STARTED when it next polls after its trainer shows life; a reader must not
    see CREATED in between (a trainer already reporting progress reads STARTED on a cluster too). An
    attempt counts once the supervisor has recorded its trainer process and that trainer has written
    to its log or progress since the attempt was admitted. The supervisor records the same state."""
    if state.phase == Phase.CREATED and state.admitted and state.trainer_pid is not None and shows_life(run_dir, state):
        return started(state)
    return state


def read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


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
    config = read_json(run_dir / CONFIG_FILE) or {}
    spec = config.get('spec') or {}
    model = spec.get('model', 'the model')
    offline = '(no connection to the Hugging Face hub, or HF_HUB_OFFLINE is set)'
    if (spec.get('modelOptions') or {}).get('pretrained') is False:
        # Advice that fits what was asked: the weights were not wanted, the configuration and tokenizer are.
        return (
            f"model_options={{'pretrained': False}} skips only the weights: the configuration and tokenizer of "
            f'{model!r} still come from the hub, and they are not on this machine and cannot be downloaded {offline}. '
            'Give a local model folder (config.json and tokenizer files) as model=..., or set HF_ENDPOINT to a '
            f'reachable hub mirror. (trainer: {message[:300]})'
        )
    return (
        f'the pretrained weights of {model!r} are not on this machine and cannot be downloaded {offline}. '
        'Give a local model folder as model=..., '
        "set HF_ENDPOINT to a reachable hub mirror, or train from scratch with model_options={'pretrained': False}. "
        f'(trainer: {message[:300]})'
    )


def run_output(run_dir: Path) -> LocalStore | S3Store:
    """The run's output location as its trainer was told (``spec.output`` may move it off this machine)."""
    config = read_json(run_dir / CONFIG_FILE) or {}
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
    lines = [line for line in read_text(run_dir / TERMINATION_LOG).splitlines() if line.strip()]
    return lines[-1] if lines else None


def failure_reason(run_dir: Path, exit_code: int | None) -> tuple[str, str]:
    """(reason, details) of a failed trainer, in the vocabulary the operator speaks too."""
    message = _trainer_message(run_output(run_dir), run_dir)
    explained = explain_weights_unreachable(run_dir, message) if message else None
    if explained:
        return Reason.WEIGHTS_UNAVAILABLE.value, explained
    if message is None:
        lines = [line for line in read_text(run_dir / TRAINER_LOG).splitlines() if line.strip()]
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
            'admitted': False,
            'phase': phase,
            'reason': reason,
            'details': details,
        }
    )


def cancelled_state(state: RunState) -> RunState:
    return state.model_copy(
        update={
            'phase': Phase.FAILED,
            'details': reasons.CANCELLED,
            'reason': Reason.CANCELLED.value,
            'completion_time': state.completion_time or now(),
            'admitted': False,
            'trainer_pid': None,
        }
    )


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


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (a supervisor and its trainer); gone already is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
