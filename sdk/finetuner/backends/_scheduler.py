"""The local queue: runs wait in CREATED until the GPU or CPU slot they need is free, first in, first out.

There is no daemon. Every use of the local backend (a submit, a read, a cancel) and every supervisor
whose trainer ends makes one *pass* under the queue's lock (``flock`` on ``queue/lock``): it checks
each queued run against the world (a supervisor that vanished, a machine that restarted, a folder
deleted by hand), creates the due points of local sweeps, and starts the runs the rules of
:mod:`finetuner.backends.scheduling` admit, each under a supervisor of its own. So the queue outlives
the process that submitted, and after a supervisor is killed or the machine restarts, the next use of
the backend starts what waits. On disk, below the backend's home::

    queue/lock                 the lock every pass, submit, cancel and suspend holds
    queue/settings.json        QueueSettings: cpu_runs, gpus (shared by every process using this home)
    queue/tickets/<run>.json   one per run not yet FINISHED or FAILED: its place in line (Ticket)
    queue/sweeps/<exp>         a local experiment whose sweep still has points to create
    claims/<run>.json          who holds a run name and which datasets were uploaded for it (Claim)

A run that was training when the machine went down is put back in its place in line and resumes
from its last checkpoint (one is taken every epoch; without one it starts over), like a retried pod
on a cluster; after ``spec.backoffLimit`` such restarts it ends FAILED. A supervisor killed on a
running machine ends its run FAILED (``SupervisorLost``) and its orphaned trainer is killed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from finetuner.api import reasons
from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import FinetuneRunSpec, Phase
from finetuner.backends import _rundir as rd
from finetuner.backends.base import delete_datasets
from finetuner.backends.scheduling import (
    Admission,
    Holding,
    Plan,
    QueueSettings,
    Wait,
    Waiting,
    capacity,
    plan,
    pool_of,
    trainer_environment,
)
from finetuner.sweeps import next_sweep_runs, sweep_points, sweep_run_name, sweep_run_spec


class Ticket(BaseModel):
    """A run's place in the queue, from submission until it is FINISHED or FAILED."""

    name: str
    uid: str | None = None
    seq: int
    supervisor_pid: int | None = None


class Claim(BaseModel):
    """Who holds a run name (from before its data is uploaded until delete_run), and what it uploaded."""

    name: str
    uid: str
    pid: int = Field(description='the process that reserved the name')
    boot_id: str | None = None
    submitted: bool = False  # its run.json is written
    datasets: list[str] = Field(default_factory=list)
    data_uri: str | None = None

    def reserving_alive(self) -> bool:
        """The process that reserved the name may still upload and submit."""
        return not self.submitted and self.boot_id == rd.boot_id() and rd.process_alive(self.pid)


class LocalQueue:
    """The queue of one local backend home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.children: dict[str, subprocess.Popen[bytes]] = {}  # supervisors this process started

    # --- places -------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.home / 'queue'

    def run_dir(self, name: str) -> Path:
        return self.home / 'runs' / name

    def ticket_path(self, name: str) -> Path:
        return self.folder / 'tickets' / f'{name}.json'

    def claim_path(self, name: str) -> Path:
        return self.home / 'claims' / f'{name}.json'

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the queue's lock (blocking; released when the block ends or the process dies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / 'lock').open('a') as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- settings -----------------------------------------------------------------------------
    def settings(self) -> QueueSettings:
        raw = rd.read_json(self.folder / 'settings.json')
        try:
            return QueueSettings.model_validate(raw or {})
        except ValidationError:
            return QueueSettings()

    def configure(self, cpu_runs: int | None = None, gpus: list[int] | None = None) -> QueueSettings:
        """Change the settings every process using this home follows (None keeps a setting)."""
        with self.locked():
            current = self.settings().model_dump()
            current.update({k: v for k, v in (('cpu_runs', cpu_runs), ('gpus', gpus)) if v is not None})
            settings = QueueSettings.model_validate(current)
            rd.write_json_atomic(self.folder / 'settings.json', settings.model_dump())
        return settings

    # --- tickets and claims -------------------------------------------------------------------
    def tickets(self) -> list[Ticket]:
        folder = self.folder / 'tickets'
        found = []
        for path in sorted(folder.glob('*.json')) if folder.is_dir() else []:
            raw = rd.read_json(path)
            try:
                found.append(Ticket.model_validate(raw))
            except ValidationError:
                path.unlink(missing_ok=True)  # a torn or foreign file holds no place in line
        return sorted(found, key=lambda t: (t.seq, t.name))

    def ticket(self, name: str) -> Ticket | None:
        raw = rd.read_json(self.ticket_path(name))
        try:
            return Ticket.model_validate(raw) if raw is not None else None
        except ValidationError:
            return None

    def enqueue(self, name: str, uid: str | None) -> Ticket:
        """Put a run at the end of the line (call under the lock)."""
        last = max((t.seq for t in self.tickets()), default=0)
        ticket = Ticket(name=name, uid=uid, seq=max(time.time_ns(), last + 1))
        self.ticket_path(name).parent.mkdir(parents=True, exist_ok=True)
        rd.write_json_atomic(self.ticket_path(name), ticket.model_dump())
        return ticket

    def drop_ticket(self, name: str, uid: str | None = None) -> None:
        ticket = self.ticket(name)
        if ticket is not None and (uid is None or ticket.uid == uid):
            self.ticket_path(name).unlink(missing_ok=True)

    def claim(self, name: str) -> Claim | None:
        raw = rd.read_json(self.claim_path(name))
        try:
            return Claim.model_validate(raw) if raw is not None else None
        except ValidationError:
            return None

    def write_claim(self, claim: Claim) -> None:
        self.claim_path(claim.name).parent.mkdir(parents=True, exist_ok=True)
        rd.write_json_atomic(self.claim_path(claim.name), claim.model_dump())

    def forget(self, name: str, uid: str | None) -> None:
        """Delete what is left of the run ``uid`` of this name (None: whichever): its datasets, claim,
        ticket and folder, sparing another run of the name that holds it now. Call under the lock."""
        claim = self.claim(name)
        stored = rd.read_stored(self.run_dir(name))
        mine = claim is not None and (uid is None or claim.uid == uid)
        if mine and claim is not None:
            delete_datasets(claim.data_uri, claim.datasets)
            self.claim_path(name).unlink(missing_ok=True)
        elif stored is not None and (uid is None or stored.uid == uid):
            delete_datasets(stored.data_uri, stored.uploads)
        self.drop_ticket(name, uid)
        held_by_another = (stored is not None and uid is not None and stored.uid != uid) or (
            claim is not None and not mine
        )
        if not held_by_another:
            shutil.rmtree(self.run_dir(name), ignore_errors=True)

    # --- supervisors --------------------------------------------------------------------------
    def supervisor_alive(self, name: str, pid: int | None) -> bool:
        child = self.children.get(name)
        if child is not None and child.pid == pid:
            if child.poll() is None:
                return True
            del self.children[name]  # reaped
            return False
        return pid is not None and rd.process_alive(pid)

    def reap(self) -> None:
        for name, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[name]

    def spawn(self, run_dir: Path, environment: dict[str, str]) -> subprocess.Popen[bytes]:
        with (run_dir / rd.SUPERVISOR_LOG).open('ab') as supervisor_log:
            return subprocess.Popen(
                [sys.executable, '-m', 'finetuner.backends._supervisor', str(run_dir)],
                start_new_session=True,  # its own process group: outlives us, and cancel() kills the group
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=supervisor_log,
                cwd=run_dir,
                close_fds=True,
                env={**os.environ, **environment},
            )

    # --- the pass -----------------------------------------------------------------------------
    def tick(self) -> dict[str, Wait]:
        """One pass (see the module's docstring); what each run that still waits is waiting for."""
        if not self.folder.is_dir():
            return {}  # nothing was ever queued in this home
        with self.locked():
            self.reap()
            self._create_sweep_points()
            line, holding, specs = self._observe()
            if not line:
                return {}
            settings = self.settings()
            result: Plan = plan(line, holding, capacity(settings))
            for admission in result.admit:
                self._admit(admission, specs[admission.name])
            return result.waits

    def _observe(self) -> tuple[list[Waiting], list[Holding], dict[str, FinetuneRunSpec]]:
        """Every queued run as it is now: waiting, holding resources, or gone from the line."""
        line: list[Waiting] = []
        holding: list[Holding] = []
        specs: dict[str, FinetuneRunSpec] = {}
        tickets = self.tickets()
        gpus = len(capacity(self.settings()).gpu_ids) if tickets else 0
        for ticket in tickets:
            run_dir = self.run_dir(ticket.name)
            stored = rd.read_stored(run_dir)
            if stored is None or stored.uid != ticket.uid:
                self._vanished(ticket)
                continue
            spec = FinetuneRunSpec.model_validate(stored.spec)
            state = self._checked(ticket, run_dir, spec)
            if state.phase_is_terminal():
                self.drop_ticket(ticket.name, ticket.uid)
                continue
            pool = pool_of(spec, gpus)
            if state.admitted:
                holding.append(Holding(ticket.name, pool, tuple(state.gpu_ids)))
            else:
                line.append(Waiting(ticket.name, ticket.seq, pool, suspended=spec.suspend))
                specs[ticket.name] = spec
        return line, holding, specs

    def _vanished(self, ticket: Ticket) -> None:
        """A queued run whose folder was deleted by hand: its live supervisor stops it and cleans up;
        without one the pass cleans up (datasets, claim, ticket, debris) and the name is free."""
        if ticket.supervisor_pid is not None and self.supervisor_alive(ticket.name, ticket.supervisor_pid):
            return
        self.forget(ticket.name, ticket.uid)

    def _checked(self, ticket: Ticket, run_dir: Path, spec: FinetuneRunSpec) -> rd.RunState:
        """The run's state, checked against the world: an admitted attempt whose supervisor is gone."""
        state = rd.read_state(run_dir)
        if state.phase_is_terminal() or not state.admitted:
            return state
        pid = rd.read_pid(run_dir) or ticket.supervisor_pid
        restarted = state.boot_id is not None and rd.boot_id() is not None and state.boot_id != rd.boot_id()
        if not restarted and self.supervisor_alive(ticket.name, pid):
            return state
        state = rd.read_state(run_dir)  # it may have written its end just before exiting
        if state.phase_is_terminal() or not state.admitted:
            return state
        state = self._after_restart(run_dir, state, spec) if restarted else self._lost(run_dir, state, pid)
        rd.write_state(run_dir, state)
        return state

    def _lost(self, run_dir: Path, state: rd.RunState, pid: int | None) -> rd.RunState:
        if pid is not None:
            rd.signal_group(pid, signal.SIGKILL)  # an orphaned trainer would hold its GPU or CPU slot
        return state.model_copy(
            update={
                'phase': Phase.FAILED,
                'reason': Reason.SUPERVISOR_LOST.value,
                'details': 'the local process running this run ended without a result '
                '(machine restarted or process killed); see logs() and start a new run',
                'completion_time': state.completion_time or rd.now(),
                'admitted': False,
                'trainer_pid': None,
            }
        )

    def _after_restart(self, run_dir: Path, state: rd.RunState, spec: FinetuneRunSpec) -> rd.RunState:
        """Back in its place in line to resume from its last checkpoint, unless restarts used up backoffLimit."""
        if state.attempts > spec.backoff_limit:
            return state.model_copy(
                update={
                    'phase': Phase.FAILED,
                    'reason': Reason.BACKOFF_LIMIT_EXCEEDED.value,
                    'details': reasons.machine_restarted(state.attempts, spec.backoff_limit),
                    'completion_time': rd.now(),
                    'admitted': False,
                    'trainer_pid': None,
                }
            )
        with (run_dir / rd.TRAINER_LOG).open('a') as log:
            log.write(
                f'\n[finetuner] {rd.now()}: the machine restarted during attempt {state.attempts}; '
                'the run waits in the queue again and resumes from its last checkpoint\n'
            )
        return state.model_copy(
            update={
                'phase': Phase.CREATED,
                'reason': Reason.SUBMITTED.value,
                'details': rd.RunState().details,
                'admitted': False,
                'trainer_pid': None,
                'gpu_ids': [],
            }
        )

    def _admit(self, admission: Admission, spec: FinetuneRunSpec) -> None:
        """Start a supervisor for the run (under the lock, so no other pass starts it too)."""
        run_dir = self.run_dir(admission.name)
        state = rd.read_state(run_dir)
        (run_dir / rd.SUSPEND_MARKER).unlink(missing_ok=True)
        state = state.model_copy(
            update={
                'admitted': True,
                'gpu_ids': list(admission.gpu_ids),
                'boot_id': rd.boot_id(),
                'attempts': state.attempts + 1,
                'admitted_at': rd.now(),
                'reason': Reason.SUBMITTED.value,
                'details': rd.RunState().details,
                'trainer_pid': None,
                'trainer_started_at': None,
                **rd.admission_baseline(run_dir),
            }
        )
        rd.write_state(run_dir, state)
        try:
            child = self.spawn(run_dir, trainer_environment(admission.pool, admission.gpu_ids))
        except OSError as e:
            failed = state.model_copy(
                update={
                    'phase': Phase.FAILED,
                    'admitted': False,
                    'details': f'could not start the trainer: {e}',
                    'reason': Reason.START_FAILED.value,
                    'completion_time': rd.now(),
                }
            )
            rd.write_state(run_dir, failed)
            return
        (run_dir / rd.PID_FILE).write_text(str(child.pid))
        self.children[admission.name] = child
        ticket = self.ticket(admission.name)
        if ticket is not None:
            rd.write_json_atomic(
                self.ticket_path(admission.name), ticket.model_copy(update={'supervisor_pid': child.pid}).model_dump()
            )

    # --- local sweeps -------------------------------------------------------------------------
    def sweep_marker(self, experiment: str) -> Path:
        return self.folder / 'sweeps' / experiment

    def _create_sweep_points(self) -> None:
        """Create the runs of local sweeps that are due (within their parallelism), as the operator does."""
        folder = self.folder / 'sweeps'
        for marker in sorted(folder.iterdir()) if folder.is_dir() else []:
            experiment = rd.read_experiment(self.home / 'experiments' / f'{marker.name}.json')
            if experiment is None or experiment.parsed_spec().sweep is None:
                marker.unlink(missing_ok=True)  # deleted, or no sweep
                continue
            spec = experiment.parsed_spec()
            assert spec.sweep is not None and spec.run_template is not None  # the contract's rule
            points = sweep_points(spec.sweep)
            existing: dict[int, str | None] = {}
            for index in range(len(points)):
                run_dir = self.run_dir(sweep_run_name(marker.name, index))
                if (run_dir / rd.RUN_FILE).is_file():
                    existing[index] = rd.read_state(run_dir).phase
            for index in next_sweep_runs(spec.sweep, existing):
                name = sweep_run_name(marker.name, index)
                run_spec = {**sweep_run_spec(spec.run_template, points[index]), 'experiment': marker.name}
                self.create(name, FinetuneRunSpec.model_validate(run_spec), experiment, points[index])
                existing[index] = Phase.CREATED.value
            if len(existing) == len(points):
                marker.unlink(missing_ok=True)

    def create(
        self, name: str, spec: FinetuneRunSpec, experiment: rd.StoredExperiment, point: dict[str, object]
    ) -> None:
        """Write a sweep point's run and put it in line (under the lock); a name taken by another run
        counts as the point's run, as a 409 does on a cluster."""
        run_dir = self.run_dir(name)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            return
        stored = rd.StoredRun(name=name, spec=spec.to_k8s(), created_at=rd.now(), uid=rd.new_uid(), sweep_point=point)
        rd.write_run(run_dir, stored, spec, experiment.command or rd.trainer_command(), experiment.data_uri)
        self.enqueue(name, stored.uid)
