"""The local backend: runs the trainer as a detached process on this machine, no cluster needed.

Everything lives under ``FINETUNER_HOME`` (default ``~/.cache/finetuner``)::

    runs/<name>/                 a run's folder (see finetuner.backends._rundir): run.json, config.json,
                                 state.json, supervisor.pid, trainer.log, output/ (artifact, metrics, ...)
    experiments/<name>.json      experiments ('default' exists implicitly), a sweep's spec among them
    datasets/<name>/data.jsonl   datasets pushed with finetuner.push_data or uploaded by fit
    queue/, claims/              the local queue and who holds which run name (finetuner.backends._scheduler)

Runs go through a queue: a run waits in CREATED ("Waiting for a free GPU", "Waiting: 2 runs ahead")
until its GPU or CPU slot is free (one training at a time per GPU, ``cpu_runs`` on the CPU, first in
first out), then a small supervisor started in its own session runs the trainer and records its end.
So a run survives the Python process that submitted it, and ``get_run`` in any later process sees it.
Every call checks the recorded phase against the world: a supervisor that vanished without writing a
final phase makes the run FAILED, never forever STARTED; a machine restart puts a training run back in
line to resume from its last checkpoint.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetuner.api import layout, reasons
from finetuner.api.v1alpha1 import (
    ExperimentSpec,
    ExperimentStatus,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
    Progress,
    RunCounts,
    RunMetrics,
    check_dns1123_name,
)
from finetuner.backends._rundir import (
    CANCEL_MARKER,
    COMMAND_FILE,
    CONFIG_FILE,
    NAMESPACE,
    OUTPUT_DIR,
    PID_FILE,
    RUN_FILE,
    STATE_FILE,
    SUSPEND_MARKER,
    TERMINATION_LOG,
    TRAINER_LOG,
    RunState,
    StoredExperiment,
    StoredRun,
    boot_id,
    cancelled_state,
    ending,
    explain_weights_unreachable,
    failure_reason,
    final_state,
    now,
    observed,
    process_alive,
    read_experiment,
    read_json,
    read_pid,
    read_state,
    read_stored,
    read_text,
    signal_group,
    trainer_command,
    write_json_atomic,
    write_run,
    write_state,
)
from finetuner.backends._scheduler import Claim, LocalQueue
from finetuner.backends.base import Backend, ExperimentRecord, Reservation, RunRecord, delete_datasets, name_taken
from finetuner.backends.scheduling import QueueSettings, Wait
from finetuner.errors import ArgumentError, BackendError, ExperimentNotFoundError, RunNotFoundError
from finetuner.storage import LocalStore, S3Store, open_store
from finetuner.sweeps import best_run, sweep_points, sweep_run_name

__all__ = [
    'CANCEL_MARKER',
    'COMMAND_FILE',
    'CONFIG_FILE',
    'DEFAULT_EXPERIMENT',
    'NAMESPACE',
    'OUTPUT_DIR',
    'PID_FILE',
    'RUN_FILE',
    'STATE_FILE',
    'SUSPEND_MARKER',
    'TERMINATION_LOG',
    'TRAINER_LOG',
    'LocalBackend',
    'RunState',
    'default_home',
    'ending',
    'explain_weights_unreachable',
    'failure_reason',
    'final_state',
    'now',
    'process_alive',
    'read_state',
    'trainer_command',
    'write_json_atomic',
    'write_state',
]

DEFAULT_EXPERIMENT = 'default'
RESERVED_WAIT_SECONDS = 10.0  # a deleted run's supervisor stops its trainer within this


def default_home() -> Path:
    if os.environ.get('FINETUNER_HOME'):
        return Path(os.environ['FINETUNER_HOME']).expanduser()
    cache = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(cache) / 'finetuner'


class LocalBackend(Backend):
    name = 'local'

    def __init__(
        self,
        home: str | Path | None = None,
        data: str | None = None,
        command: list[str] | None = None,
        cpu_runs: int | None = None,
        gpus: list[int] | None = None,
    ) -> None:
        """``home``: FINETUNER_HOME; ``data``: an s3:// prefix for datasets instead of the home folder;
        ``command``: the trainer's argv before ``--config FILE`` (tests give a scripted trainer);
        ``cpu_runs`` / ``gpus``: change the queue's settings, kept in the home for every process using it
        (trainings at once on the CPU; the GPU indices to give out, ``[]`` for none)."""
        self._home = Path(home).expanduser().resolve() if home else None
        self.data = data
        self.command = command or trainer_command()
        self._queues: dict[Path, LocalQueue] = {}
        if cpu_runs is not None or gpus is not None:
            self.configure_queue(cpu_runs=cpu_runs, gpus=gpus)

    @property
    def home(self) -> Path:
        """The given home, else FINETUNER_HOME as it is now (read on every call, never cached)."""
        return self._home or default_home().resolve()

    @property
    def queue(self) -> LocalQueue:
        home = self.home
        if home not in self._queues:
            self._queues[home] = LocalQueue(home)
        return self._queues[home]

    def queue_settings(self) -> QueueSettings:
        return self.queue.settings()

    def configure_queue(self, cpu_runs: int | None = None, gpus: list[int] | None = None) -> QueueSettings:
        """Set how many runs train at once on the CPU and which GPUs the queue gives out (see __init__)."""
        try:
            settings = self.queue.configure(cpu_runs=cpu_runs, gpus=gpus)
        except ValidationError as e:
            first = e.errors()[0]
            field = str(first['loc'][0]) if first['loc'] else 'cpu_runs'
            message = first['msg'].replace('Input should be', 'must be')
            raise ArgumentError(field, f'{message} (got {first.get("input")!r})') from e
        self.queue.tick()  # more room may start waiting runs now
        return settings

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

    # --- submitting ---------------------------------------------------------------------------
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

    def reserve_run(self, reservation: Reservation) -> None:
        """Hold the name atomically (its folder, and a claim naming this process) before any upload.

        What a run deleted by hand left behind (a folder without ``run.json``, a claim nobody holds) is
        cleaned up first, so the name is free again; a name another live process is submitting is not."""
        run_dir = self.run_dir(reservation.name)
        deadline = time.monotonic() + RESERVED_WAIT_SECONDS
        while True:
            with self.queue.locked():
                verdict = self._take_name(reservation, run_dir)
            if verdict != 'stopping':
                return
            if time.monotonic() > deadline:
                raise name_taken(reservation.name)
            time.sleep(0.1)  # a deleted run's supervisor is still stopping its trainer

    def _take_name(self, reservation: Reservation, run_dir: Path) -> str:
        """Under the lock: 'taken' (raised), 'stopping' (try again soon) or 'reserved'."""
        queue = self.queue
        claim = queue.claim(reservation.name)
        if read_stored(run_dir) is not None or (claim is not None and claim.reserving_alive()):
            raise name_taken(reservation.name)
        ticket = queue.ticket(reservation.name)
        if ticket is not None and queue.supervisor_alive(reservation.name, ticket.supervisor_pid):
            return 'stopping'
        if run_dir.exists() or claim is not None or ticket is not None:
            queue.forget(reservation.name, None)  # debris of a run deleted by hand
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError as e:
            raise name_taken(reservation.name) from e
        queue.write_claim(
            Claim(
                name=reservation.name,
                uid=reservation.uid,
                pid=os.getpid(),
                boot_id=boot_id(),
                datasets=reservation.datasets,
                data_uri=reservation.data_uri,
            )
        )
        return 'reserved'

    def release_run(self, reservation: Reservation) -> None:
        with self.queue.locked():
            self.queue.forget(reservation.name, reservation.uid)

    def create_run(self, name: str, spec: FinetuneRunSpec, reservation: Reservation | None = None) -> RunRecord:
        """Write the run and put it in the queue; it starts at once when its GPU or CPU slot is free."""
        self.check_ready()
        own = reservation is None
        reservation = reservation or Reservation(name=name)
        if own:
            self.reserve_run(reservation)
        try:
            self.create_experiment(spec.experiment)
            stored = StoredRun(
                name=name,
                spec=spec.to_k8s(),
                created_at=now(),
                uid=reservation.uid,
                uploads=reservation.datasets,
                data_uri=reservation.data_uri,
            )
            with self.queue.locked():
                claim = self.queue.claim(name)
                if claim is None or claim.uid != reservation.uid:
                    raise BackendError(f'the name {name!r} was not reserved for this submission; submit it again')
                write_run(self.run_dir(name), stored, spec, self.command, self.data_store().uri)
                self.queue.write_claim(claim.model_copy(update={'submitted': True}))
                self.queue.enqueue(name, reservation.uid)
        except BaseException:
            if own:
                self.release_run(reservation)
            raise
        waits = self.queue.tick()
        return self._record(name, self.run_dir(name), waits)

    # --- reading ------------------------------------------------------------------------------
    def _status(self, name: str, run_dir: Path, waits: dict[str, Wait]) -> FinetuneRunStatus:
        state = observed(run_dir, read_state(run_dir))  # STARTED as soon as the trainer shows life
        output = run_dir / OUTPUT_DIR
        stored = read_json(run_dir / RUN_FILE) or {}
        spec_output = (stored.get('spec') or {}).get('output')
        output_uri = f'{spec_output.rstrip("/")}/{name}' if spec_output else output.as_uri()
        progress = _parse(Progress, read_json(output / layout.PROGRESS))
        metrics = read_json(output / layout.METRICS)
        has_artifact = (output / layout.ARTIFACT_MANIFEST).is_file()
        reason, details = state.reason, state.details
        if state.phase == Phase.STARTED:
            details = reasons.running(progress)
        elif state.phase == Phase.CREATED and not state.admitted and name in waits:
            reason, details = waits[name].reason, waits[name].details
        return FinetuneRunStatus(
            phase=state.phase,
            details=details,
            reason=reason,
            start_time=state.start_time,
            completion_time=state.completion_time,
            attempts=max(state.attempts, 1) if state.start_time else 0,
            progress=progress,
            metrics=_parse(RunMetrics, {k: v for k, v in metrics.items() if k in ('before', 'after')})
            if isinstance(metrics, dict)
            else None,
            artifact_uri=f'{output_uri}/{layout.ARTIFACT}' if has_artifact or spec_output else None,
            output_uri=output_uri,
        )

    def _record(self, name: str, run_dir: Path, waits: dict[str, Wait]) -> RunRecord:
        stored = read_stored(run_dir)
        if stored is None:
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        wait = waits.get(name)
        return RunRecord(
            name=name,
            namespace=NAMESPACE,
            spec=FinetuneRunSpec.model_validate(stored.spec),
            status=self._status(name, run_dir, waits),
            created_at=stored.created_at,
            queue_position=wait.position if wait is not None else None,
        )

    def get_run(self, name: str) -> RunRecord:
        run_dir = self.run_dir(name)
        return self._record(name, run_dir, self.queue.tick())

    def list_runs(self, experiment: str | None = None) -> list[RunRecord]:
        if not self._runs_dir().is_dir():
            return []
        waits = self.queue.tick()
        runs = []
        for path in sorted(self._runs_dir().iterdir()):
            if not (path / RUN_FILE).is_file():
                continue
            try:
                run = self._record(path.name, path, waits)
            except (RunNotFoundError, ValueError):
                continue
            if experiment is None or run.spec.experiment == experiment:
                runs.append(run)
        return sorted(runs, key=lambda r: (r.created_at or '', r.name))

    # --- control ------------------------------------------------------------------------------
    def delete_run(self, name: str) -> None:
        """Delete the run (cancelled first when it is going), its folder and the datasets uploaded for it.
        Also what a run deleted by hand left behind: a re-created folder, its datasets, its claim."""
        run_dir = self.run_dir(name)
        stored = read_stored(run_dir)
        queue = self.queue
        claim = queue.claim(name)
        if stored is None and claim is not None and claim.reserving_alive():
            raise RunNotFoundError(name, f'the local backend ({self.home}); a run of that name is being submitted')
        if stored is None and claim is None and not run_dir.exists():
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        if stored is not None and not read_state(run_dir).phase_is_terminal():
            self.cancel_run(name)
        ticket = queue.ticket(name)
        if stored is None and ticket is not None and queue.supervisor_alive(name, ticket.supervisor_pid):
            signal_group(ticket.supervisor_pid or 0, signal.SIGKILL)
        with queue.locked():
            queue.forget(name, stored.uid if stored is not None else None)
        queue.children.pop(name, None)
        queue.tick()

    def _supervisor_alive(self, name: str, run_dir: Path) -> bool | None:
        """True/False, or None when no supervisor was recorded (yet)."""
        pid = read_pid(run_dir)
        return None if pid is None else self.queue.supervisor_alive(name, pid)

    def _stop(self, name: str, marker: str, timeout: float) -> bool:
        """Mark the run (cancel or suspend) and stop its supervisor; False when it held nothing (the
        marker alone decides, under the lock, for a run still waiting in line)."""
        run_dir = self.run_dir(name)
        with self.queue.locked():
            state = read_state(run_dir)
            if state.phase_is_terminal():
                return False
            pid = read_pid(run_dir) if state.admitted else None
            if pid is None and marker == CANCEL_MARKER:  # still in line: it never starts
                (run_dir / marker).write_text(now())
                write_state(run_dir, cancelled_state(state))
            if pid is None:
                return False
            (run_dir / marker).write_text(now())
        signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._supervisor_alive(name, run_dir) is not False:
            time.sleep(0.1)
        if self._supervisor_alive(name, run_dir):
            signal_group(pid, signal.SIGKILL)
        return True

    def cancel_run(self, name: str, timeout: float = 20.0) -> None:
        """Stop the run: a queued one never starts, a training one is stopped; FAILED, reason Cancelled."""
        run_dir = self.run_dir(name)
        self.get_run(name)
        self._stop(name, CANCEL_MARKER, timeout)
        with self.queue.locked():
            state = read_state(run_dir)
            if not state.phase_is_terminal():  # the supervisor died before writing its end
                write_state(run_dir, cancelled_state(state))
        self.queue.tick()

    def _set_suspend(self, name: str, suspend: bool) -> StoredRun:
        run_dir = self.run_dir(name)
        with self.queue.locked():
            stored = read_stored(run_dir)
            if stored is None:
                raise RunNotFoundError(name, f'the local backend ({self.home})')
            stored = stored.model_copy(update={'spec': {**stored.spec, 'suspend': suspend}})
            write_json_atomic(run_dir / RUN_FILE, stored.model_dump())
        return stored

    def suspend_run(self, name: str, timeout: float = 20.0) -> None:
        if read_state(self.run_dir(name)).phase_is_terminal():
            self.get_run(name)
            return
        self._set_suspend(name, True)
        self._stop(name, SUSPEND_MARKER, timeout)
        self.queue.tick()

    def resume_run(self, name: str) -> None:
        if read_state(self.run_dir(name)).phase_is_terminal():
            self.get_run(name)
            return
        self._set_suspend(name, False)
        self.queue.tick()

    # --- logs and outputs ---------------------------------------------------------------------
    def logs(self, name: str) -> str:
        run_dir = self.run_dir(name)
        if not (run_dir / RUN_FILE).is_file():
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        return read_text(run_dir / TRAINER_LOG)

    def stream_logs(self, name: str, poll: float = 0.5) -> Iterator[str]:
        run_dir = self.run_dir(name)
        if not (run_dir / RUN_FILE).is_file():
            raise RunNotFoundError(name, f'the local backend ({self.home})')
        position = 0
        pending = ''
        while True:
            ended = Phase(self.get_run(name).status.phase or Phase.CREATED).terminal
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
    def create_experiment(
        self, name: str, spec: ExperimentSpec | None = None, uploads: Reservation | None = None
    ) -> ExperimentRecord:
        """Get or create. A sweep's runs are created through the queue, ``parallelism`` at a time."""
        path = self._experiment_file(name)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            stored = StoredExperiment(
                name=name,
                spec=(spec or ExperimentSpec()).to_k8s(),
                created_at=now(),
                uploads=uploads.datasets if uploads else [],
                data_uri=self.data_store().uri,
                command=self.command,
            )
            if _create_exclusively(path, stored.model_dump()) and stored.parsed_spec().sweep is not None:
                with self.queue.locked():
                    marker = self.queue.sweep_marker(name)
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                self.queue.tick()
        return self.get_experiment(name)

    def get_experiment(self, name: str) -> ExperimentRecord:
        path = self._experiment_file(name)
        stored = read_experiment(path)
        if stored is None:
            if name != DEFAULT_EXPERIMENT:
                raise ExperimentNotFoundError(name, f'the local backend ({self.home})')
            stored = StoredExperiment(name=name, created_at=now())
        spec = stored.parsed_spec()
        runs = self.list_runs(experiment=name)
        swept = 0
        if spec.sweep is not None:
            names = {r.name for r in runs}
            swept = sum(1 for i in range(len(sweep_points(spec.sweep))) if sweep_run_name(name, i) in names)
        best = best_run(
            ((r.name, r.status.phase, r.status.metrics.after if r.status.metrics else None) for r in runs),
            spec.best_run,
        )
        return ExperimentRecord(
            name=name,
            namespace=NAMESPACE,
            spec=spec,
            status=ExperimentStatus(runs=_count(runs), best_run=best, sweep_created=swept),
            created_at=stored.created_at,
        )

    def list_experiments(self) -> list[ExperimentRecord]:
        folder = self.home / 'experiments'
        names = {p.stem for p in folder.glob('*.json')} if folder.is_dir() else set()
        names.add(DEFAULT_EXPERIMENT)
        return [self.get_experiment(name) for name in sorted(names)]

    def delete_experiment(self, name: str) -> None:
        """Delete the experiment, every run in it (a sweep creates no more) and its uploaded datasets."""
        self.get_experiment(name)
        stored = read_experiment(self._experiment_file(name))
        with self.queue.locked():
            self.queue.sweep_marker(name).unlink(missing_ok=True)
        for run in self.list_runs(experiment=name):
            self.delete_run(run.name)
        if stored is not None:
            delete_datasets(stored.data_uri, stored.uploads)
        self._experiment_file(name).unlink(missing_ok=True)

    # --- data -----------------------------------------------------------------------------------
    def data_store(self) -> LocalStore | S3Store:
        return open_store(self.data) if self.data else LocalStore(self.home)


def _create_exclusively(path: Path, value: Any) -> bool:
    """Write ``path`` only if it does not exist yet (atomically); False when another process was first."""
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.new')
    write_json_atomic(tmp, value)
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _count(runs: list[RunRecord]) -> RunCounts:
    counts = RunCounts(total=len(runs))
    for run in runs:
        field = (run.status.phase or Phase.CREATED).lower()
        setattr(counts, field, getattr(counts, field) + 1)
    return counts


def _parse(model: Any, value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    try:
        return model.model_validate(value)
    except ValueError:
        return None
