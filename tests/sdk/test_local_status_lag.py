"""A local run's phase is read from the world, not only from what its supervisor has recorded so far.

The supervisor polls its trainer and records STARTED a poll after the trainer shows life; under load
that poll comes late, and a reader used to see a run CREATED whose trainer was already reporting
progress (the console's tests saw it intermittently). Here the scripted trainer stops its supervisor
(SIGSTOP) right after the supervisor recorded the trainer's process, which makes that lag as long as
the test wants, deterministically."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

import finetuner
from finetuner.backends.local import LocalBackend
from tests.sdk.queue_support import wait_until
from tests.support.tiny import labelled_texts

RUNNING = 'Training: epoch 1/1, 50%'


def _state(backend: LocalBackend, name: str) -> dict[str, Any]:
    """state.json as the supervisor wrote it (read without the backend)."""
    return json.loads((backend.run_dir(name) / 'state.json').read_text())


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


@contextmanager
def lagging_supervisor(backend: LocalBackend, name: str) -> Iterator[int]:
    """Wait until the run's supervisor is stopped by its trainer; continue it (SIGCONT) at the end."""
    run_dir = backend.run_dir(name)
    pid = wait_until(lambda: _read_pid(run_dir), what='the supervisor to be recorded')
    try:
        wait_until(lambda: _stopped(pid), timeout=30, what='the trainer to stop its supervisor')
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def _read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / 'supervisor.pid').read_text())
    except (FileNotFoundError, ValueError):
        return None


def _fit(name: str, **options: Any) -> finetuner.Run:
    return finetuner.fit(
        model='scripted:ok',
        train_data=labelled_texts(2, 3),
        run_name=name,
        model_options={k: str(v) for k, v in options.items()},
    )


def test_a_run_whose_trainer_reports_progress_is_started_before_its_supervisor_records_it(
    scripted: LocalBackend, tmp_path: Path
) -> None:
    life, go = tmp_path / 'life', tmp_path / 'go'
    run = _fit('lagging', stop_supervisor_until=life, hold_after_progress=go)
    with lagging_supervisor(scripted, 'lagging'):
        recorded = _state(scripted, 'lagging')
        assert recorded['admitted'] and recorded['trainer_pid'] and recorded['phase'] == 'CREATED'
        assert run.status() == {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}

        life.touch()  # the trainer prints and reports step 1; its supervisor is still stopped
        wait_until(lambda: run.progress() is not None and run.progress().step == 1, what='step 1')
        status = run.full_status()
        assert (status.phase, status.reason, status.details) == ('STARTED', 'Running', RUNNING)
        assert status.start_time == recorded['trainer_started_at'] and status.attempts == 1
        assert [(r.name, r.status.phase) for r in scripted.list_runs()] == [('lagging', 'STARTED')]
        assert finetuner.get_experiment('default').status().runs.started == 1
        assert _state(scripted, 'lagging')['phase'] == 'CREATED'  # the supervisor has not recorded it
    wait_until(lambda: _state(scripted, 'lagging')['phase'] == 'STARTED', what='the supervisor to catch up')
    assert _state(scripted, 'lagging')['start_time'] == status.start_time  # the same start, recorded
    go.touch()
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert run.full_status().start_time == status.start_time


def test_a_resumed_run_is_started_only_when_its_new_trainer_shows_life(scripted: LocalBackend, tmp_path: Path) -> None:
    """The log and progress of the first attempt are no sign that the second attempt's trainer runs."""
    life, go = tmp_path / 'life', tmp_path / 'go'
    life.touch()  # the first attempt's trainer leaves its supervisor alone
    run = _fit('resumed', stop_supervisor_until=life, hold_after_progress=go)
    wait_until(lambda: run.progress() is not None and run.status()['status'] == 'STARTED', what='attempt 1')
    first_start = run.full_status().start_time
    run.suspend()
    assert run.full_status().reason == 'Suspended'
    life.unlink()
    run.resume()  # the slot is free: admitted at once, and its trainer stops its supervisor
    with lagging_supervisor(scripted, 'resumed'):
        recorded = _state(scripted, 'resumed')
        assert (recorded['attempts'], recorded['admitted'], recorded['phase']) == (2, True, 'CREATED')
        assert (scripted.run_dir('resumed') / 'output' / 'progress.json').is_file()  # attempt 1's
        assert 'scripted trainer: run resumed' in run.logs()  # attempt 1's
        assert run.status()['status'] == 'CREATED'

        life.touch()
        wait_until(lambda: run.status()['status'] == 'STARTED', what='the second trainer to show life')
        assert run.full_status().start_time == first_start  # the run's start, as on a cluster
        assert run.full_status().attempts == 2
    go.touch()
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert run.full_status().attempts == 2
