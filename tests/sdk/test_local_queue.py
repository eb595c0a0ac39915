"""The local queue against the scripted trainer: limits from the process table, FIFO, cancel, suspend,
a killed supervisor, a restarted machine, GPUs given out one per run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import finetuner
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.backends import scheduling
from finetuner.backends.local import LocalBackend
from finetuner.backends.scheduling import Capacity, Holding, Pool, Waiting, plan
from finetuner.errors import ArgumentError
from tests.sdk.queue_support import TrainerCensus, wait_until
from tests.support.tiny import labelled_texts

ROOT = Path(__file__).resolve().parents[2]
CPU_FULL_2 = (
    'Waiting for a free CPU slot: 2 of 2 trainings allowed at once on the CPU are running; this run starts when '
    'one of them ends, or raise the limit (finetuner.login(backend="local", cpu_runs=N) or '
    '`finetuner queue --cpu-runs N`)'
)


def _fit(name: str, go: Path | None = None, **kwargs: Any) -> finetuner.Run:
    options = {'wait_for': str(go)} if go is not None else {}
    kwargs.setdefault('model', 'scripted:ok')
    return finetuner.fit(train_data=labelled_texts(2, 3), run_name=name, model_options=options, **kwargs)


def _state(backend: LocalBackend, name: str) -> dict[str, Any]:
    """state.json as written, read without using the backend (no pass of the queue)."""
    return json.loads((backend.run_dir(name) / 'state.json').read_text())


def _phase(run: finetuner.Run) -> str:
    return run.status()['status']


def test_five_runs_with_a_limit_of_two_never_have_more_than_two_trainers(
    scripted: LocalBackend, tmp_path: Path
) -> None:
    scripted.configure_queue(cpu_runs=2)
    names = [f'queued-{i}' for i in range(5)]
    gates = [tmp_path / f'go-{i}' for i in range(5)]  # each run trains until its gate opens
    with TrainerCensus(scripted.home) as census:
        runs = [_fit(name, gate) for name, gate in zip(names, gates, strict=True)]
        wait_until(lambda: [_phase(r) for r in runs[:2]] == ['STARTED'] * 2, what='two runs started')
        statuses = [r.full_status() for r in runs]
        assert [s.phase for s in statuses] == ['STARTED', 'STARTED', 'CREATED', 'CREATED', 'CREATED']
        assert [s.reason for s in statuses[2:]] == ['Waiting'] * 3
        assert [s.details for s in statuses[2:]] == [
            CPU_FULL_2,
            'Waiting: 1 run ahead (queued for a CPU slot)',
            'Waiting: 2 runs ahead (queued for a CPU slot)',
        ]
        assert [r.record.queue_position for r in finetuner.list_runs()] == [None, None, 1, 2, 3]
        for ending, starting in ((0, 2), (1, 3), (2, 4)):  # one slot freed at a time: the oldest waiting run takes it
            gates[ending].touch()
            wait_until(lambda s=starting: _phase(runs[s]) == 'STARTED', what=f'{names[starting]} started')
            assert [_phase(r) for r in runs[starting + 1 :]] == ['CREATED'] * (4 - starting)
        for gate in gates[3:]:
            gate.touch()
        finals = [r.wait(timeout=120, poll=0.1) for r in runs]
    assert [f['status'] for f in finals] == ['FINISHED'] * 5
    assert census.max_alive == 2, 'the process table never showed more than two trainers, and showed two'
    assert set(census.first_seen) == set(names)
    admitted = [_state(scripted, name)['admitted_at'] for name in names]
    assert admitted[1:] == sorted(admitted[1:]) and len(set(admitted[1:])) == 4, 'admitted in submission order'
    seen = [census.first_seen[name] for name in names]
    assert max(seen[:2]) < seen[2] < seen[3] < seen[4], 'trainers appeared in the process table in submission order'


def test_a_queued_run_cancelled_before_it_starts_never_starts(scripted: LocalBackend, tmp_path: Path) -> None:
    go = tmp_path / 'go'
    with TrainerCensus(scripted.home) as census:
        first = _fit('holds-the-slot', go)
        second = _fit('cancelled-in-line', go)
        wait_until(lambda: _phase(first) == 'STARTED', what='the first run started')
        assert second.status() == {
            'status': 'CREATED',
            'details': CPU_FULL_2.replace('2 of 2', '1 of 1'),
        }
        second.cancel()
        assert second.status() == {'status': 'FAILED', 'details': 'Run cancelled by user'}
        assert second.full_status().reason == 'Cancelled'
        go.touch()
        assert first.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
        finetuner.list_runs()  # one more pass of the queue after the slot was freed
    assert 'cancelled-in-line' not in census.first_seen, 'its trainer never ran'
    run_dir = scripted.run_dir('cancelled-in-line')
    assert not (run_dir / 'supervisor.pid').exists() and not (run_dir / 'trainer.log').exists()
    assert _state(scripted, 'cancelled-in-line')['attempts'] == 0
    assert second.status()['status'] == 'FAILED'


def test_queued_runs_start_after_the_supervisor_is_killed_once_the_backend_is_used_again(
    scripted: LocalBackend, tmp_path: Path
) -> None:
    go = tmp_path / 'go'
    first = _fit('killed', go)
    waiting = [_fit('next-1'), _fit('next-2')]
    wait_until(lambda: _phase(first) == 'STARTED', what='the first run started')
    supervisor = int((scripted.run_dir('killed') / 'supervisor.pid').read_text())
    os.killpg(supervisor, signal.SIGKILL)  # supervisor and trainer: nobody records an end or passes the queue
    wait_until(lambda: scripted._supervisor_alive('killed', scripted.run_dir('killed')) is False, what='reaped')
    assert [_state(scripted, r.name)['phase'] for r in waiting] == ['CREATED', 'CREATED']
    assert not any(_state(scripted, r.name)['admitted'] for r in waiting)

    used_again = (
        'import finetuner\nprint([(r.name, r.status.phase) for r in finetuner.backends.current().list_runs()])\n'
    )
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    out = subprocess.run([sys.executable, '-c', used_again], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    assert "('killed', 'FAILED')" in out.stdout
    assert [r.wait(timeout=60, poll=0.1)['status'] for r in waiting] == ['FINISHED', 'FINISHED']
    assert first.full_status().reason == 'SupervisorLost'


def test_the_queue_outlives_the_process_that_submitted(scripted: LocalBackend) -> None:
    """Three runs with one CPU slot, submitted by a process that exits at once: the supervisors hand the
    slot on without any other process using the backend (state.json is read directly)."""
    submit = (
        'import sys, finetuner, finetuner.backends\n'
        'from finetuner.backends.local import LocalBackend\n'
        f'finetuner.backends.use(LocalBackend(command=[sys.executable, {str(scripted.command[1])!r}]))\n'
        'for i in range(3):\n'
        '    finetuner.fit(model="scripted:ok", train_data=["red cat", "blue dog"], run_name=f"orphan-{i}")\n'
    )
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    out = subprocess.run([sys.executable, '-c', submit], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    def ended() -> bool:
        return all(_state(scripted, f'orphan-{i}')['phase'] == 'FINISHED' for i in range(3))

    wait_until(ended, timeout=90, what='three runs FINISHED with nobody using the backend')


def _simulate_restart(backend: LocalBackend, name: str) -> None:
    """Like a machine going down mid-training: the supervisor and trainer vanish without a word, and the
    attempt was admitted under a boot of the machine that is not this one."""
    run_dir = backend.run_dir(name)
    supervisor = int((run_dir / 'supervisor.pid').read_text())
    os.killpg(supervisor, signal.SIGKILL)
    wait_until(lambda: backend._supervisor_alive(name, run_dir) is False, what='the supervisor gone')
    state = _state(backend, name)
    (run_dir / 'state.json').write_text(json.dumps({**state, 'boot_id': 'a-boot-before-the-restart'}))


def test_a_run_training_when_the_machine_restarted_goes_back_in_line_first(
    scripted: LocalBackend, tmp_path: Path
) -> None:
    go = tmp_path / 'go'
    restarted = _fit('restarted', go)
    behind = _fit('behind', go)
    wait_until(lambda: _phase(restarted) == 'STARTED', what='started')
    _simulate_restart(scripted, 'restarted')

    status = finetuner.get_run('restarted').full_status()  # the backend used again after the restart

    assert status.phase in ('CREATED', 'STARTED') and status.reason in ('Submitted', 'Running')
    assert _state(scripted, 'restarted')['attempts'] == 2, 'it kept its place: admitted again before "behind"'
    assert behind.full_status().reason == 'Waiting'
    go.touch()
    assert restarted.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert behind.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert 'the machine restarted during attempt 1; the run waits in the queue again' in restarted.logs()
    assert restarted.full_status().attempts == 2


def test_restarts_beyond_the_backoff_limit_end_the_run(scripted: LocalBackend, tmp_path: Path) -> None:
    run = _fit('fragile', tmp_path / 'never', backoff_limit=0)
    wait_until(lambda: _phase(run) == 'STARTED', what='started')
    _simulate_restart(scripted, 'fragile')
    status = run.full_status()
    assert (status.phase, status.reason) == ('FAILED', 'BackoffLimitExceeded')
    assert status.details == (
        'The machine restarted while this run trained, 1 times (backoff_limit 0); start a new run, or raise '
        'backoff_limit'
    )


def test_suspend_gives_the_slot_away_and_resume_waits_in_line(scripted: LocalBackend, tmp_path: Path) -> None:
    go = tmp_path / 'go'
    first = _fit('suspended', go)
    second = _fit('gets-the-slot', go)
    wait_until(lambda: _phase(first) == 'STARTED', what='started')
    trainer = _state(scripted, 'suspended')['trainer_pid']

    first.suspend()

    assert first.status() == {'status': 'CREATED', 'details': 'Suspended: set suspend to false to resume'}
    assert first.full_status().reason == 'Suspended' and first.config.suspend is True
    wait_until(lambda: _phase(second) == 'STARTED', what='the waiting run took the freed slot')
    wait_until(lambda: not _alive(trainer), what='the suspended trainer stopped')
    first.resume()
    assert first.full_status().reason == 'Waiting' and first.record.queue_position == 1
    go.touch()
    assert second.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert first.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert first.full_status().attempts == 2
    first.suspend()  # an ended run is left as it is
    assert first.status()['status'] == 'FINISHED'


def _alive(pid: int) -> bool:
    from finetuner.backends.local import process_alive

    return process_alive(pid)


def test_gpus_are_given_out_one_per_run_and_cpu_runs_see_none(scripted: LocalBackend, tmp_path: Path) -> None:
    scripted.configure_queue(gpus=[0, 1], cpu_runs=1)  # two GPUs as far as the queue knows
    go = tmp_path / 'go'
    gpu_runs = [_fit(f'gpu-{i}', go, gpus=1) for i in range(3)]
    cpu_run = _fit('on-the-cpu', go, device='cpu')
    wait_until(lambda: [_phase(r) for r in [*gpu_runs[:2], cpu_run]] == ['STARTED'] * 3, what='three started')
    waiting = gpu_runs[2].full_status()
    assert (waiting.phase, waiting.reason) == ('CREATED', 'Waiting')
    assert waiting.details == (
        "Waiting for a free GPU: the 2 GPUs of this machine's queue are training other runs; this run starts when "
        'one of them ends'
    )
    go.touch()
    for run in [*gpu_runs, cpu_run]:
        assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    visible = {r.name: r.logs().splitlines()[1] for r in [*gpu_runs, cpu_run]}
    assert {visible['gpu-0'], visible['gpu-1']} == {"CUDA_VISIBLE_DEVICES='0'", "CUDA_VISIBLE_DEVICES='1'"}
    assert visible['gpu-2'] in ("CUDA_VISIBLE_DEVICES='0'", "CUDA_VISIBLE_DEVICES='1'")
    assert visible['on-the-cpu'] == "CUDA_VISIBLE_DEVICES=''"


def test_queue_settings_are_checked_and_kept_in_the_home(scripted: LocalBackend) -> None:
    with pytest.raises(ArgumentError, match=r'cpu_runs: must be greater than or equal to 1 \(got 0\)'):
        scripted.configure_queue(cpu_runs=0)
    with pytest.raises(ArgumentError, match=r'gpus: must be a valid integer'):
        scripted.configure_queue(gpus=['a'])  # type: ignore[list-item]
    finetuner.login(backend='local', cpu_runs=3)
    assert LocalBackend().queue_settings().cpu_runs == 3, 'another process using the home sees it'
    with pytest.raises(
        ArgumentError, match='cpu_runs: only applies to backend="local" \\(the local queue\'s limits\\)'
    ):
        finetuner.login(backend='kubernetes', cpu_runs=2)


# --- the rules alone --------------------------------------------------------------------------------


def test_each_line_is_first_in_first_out_and_says_what_it_waits_for() -> None:
    line = [
        Waiting('g1', 1, Pool.GPU),
        Waiting('c1', 2, Pool.CPU),
        Waiting('g2', 3, Pool.GPU),
        Waiting('paused', 4, Pool.CPU, suspended=True),
        Waiting('c2', 5, Pool.CPU),
        Waiting('g3', 6, Pool.GPU),
    ]
    holding = [Holding('busy', Pool.GPU, (0,))]
    result = plan(line, holding, Capacity(gpu_ids=(0, 1), cpu_runs=1))
    assert [(a.name, a.gpu_ids) for a in result.admit] == [('g1', (1,)), ('c1', ())]
    assert {name: (w.reason, w.position) for name, w in result.waits.items()} == {
        'g2': ('Waiting', 1),
        'paused': ('Suspended', None),
        'c2': ('Waiting', 1),
        'g3': ('Waiting', 2),
    }
    assert result.waits['g3'].details == 'Waiting: 1 run ahead (queued for a GPU)'
    assert result.waits['c2'].details.startswith('Waiting for a free CPU slot: 1 of 1 trainings')


def test_a_run_asking_for_a_gpu_takes_a_cpu_slot_where_there_is_none() -> None:
    spec = FinetuneRunSpec(model='m', train_data='d')  # gpus 1 by default
    assert scheduling.pool_of(spec, gpus_available=0) is Pool.CPU
    assert scheduling.pool_of(spec, gpus_available=2) is Pool.GPU
    assert scheduling.pool_of(spec.model_copy(update={'device': 'cpu'}), gpus_available=2) is Pool.CPU
    assert scheduling.trainer_environment(Pool.CPU, ()) == {
        'CUDA_DEVICE_ORDER': 'PCI_BUS_ID',
        'CUDA_VISIBLE_DEVICES': '',
    }
