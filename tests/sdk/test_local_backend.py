"""The local backend's lifecycle against the scripted trainer: phases, reasons, cancel, new processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import finetuner
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.backends.local import LocalBackend, process_alive
from finetuner.errors import (
    ArgumentError,
    ExperimentNotFoundError,
    RunFailedError,
    RunNotFinishedError,
    RunNotFoundError,
)
from tests.support.tiny import labelled_texts

ROOT = Path(__file__).resolve().parents[2]


def _fit(model: str = 'scripted:ok', **kwargs: object) -> finetuner.Run:
    return finetuner.fit(model=model, train_data=labelled_texts(2, 3), **kwargs)


def test_fresh_run_is_created_with_the_seed_status(scripted: LocalBackend, tmp_path: Path) -> None:
    go = tmp_path / 'go'
    run = _fit(model_options={'wait_for': str(go)})
    assert run.status() == {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}
    go.touch()
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'


def test_run_goes_created_started_finished(scripted: LocalBackend, tmp_path: Path) -> None:
    go = tmp_path / 'go'
    run = _fit(run_name='phases', model_options={'wait_for': str(go)})
    seen = [run.status()['status']]
    deadline = time.monotonic() + 30
    while run.status()['status'] == 'CREATED' and time.monotonic() < deadline:
        time.sleep(0.05)
    seen.append(run.status()['status'])  # the trainer printed its first line: STARTED
    go.touch()
    final = run.wait(timeout=60, poll=0.1)
    seen.append(final['status'])
    assert seen == ['CREATED', 'STARTED', 'FINISHED']
    status = run.full_status()
    assert status.start_time and status.completion_time
    assert status.progress is not None and status.progress.percent == 100.0
    assert status.artifact_uri and status.artifact_uri.endswith('/phases/output/artifact')
    assert run.metrics().after == {'mrr': 0.75}
    assert 'read 6 records' in run.logs()


def test_failed_run_carries_the_trainers_reason(scripted: LocalBackend, tmp_path: Path) -> None:
    run = _fit(model='scripted:fail')
    final = run.wait(timeout=60, poll=0.1)
    assert final == {
        'status': 'FAILED',
        'details': 'train_data: 3 records have no label; labelled training needs tags["finetuner_label"]',
    }
    assert run.full_status().reason == 'ConfigurationError'
    with pytest.raises(RunFailedError, match='failed, so it has no model: train_data: 3 records have no label'):
        run.save_model(tmp_path / 'model')


def test_crash_without_reason_reports_the_last_log_line(scripted: LocalBackend) -> None:
    final = _fit(model='scripted:crash').wait(timeout=60, poll=0.1)
    assert final == {'status': 'FAILED', 'details': 'trainer exited with code 1: RuntimeError: CUDA out of memory'}


def test_unreachable_weights_get_an_actionable_reason(scripted: LocalBackend) -> None:
    run = _fit(model='scripted:hub-offline')
    final = run.wait(timeout=60, poll=0.1)
    assert final['status'] == 'FAILED'
    assert final['details'].startswith(
        "the pretrained weights of 'scripted:hub-offline' are not on this machine and cannot be downloaded"
    )
    assert 'set HF_ENDPOINT to a reachable hub mirror' in final['details']
    assert 'model=...' in final['details'] and "model_options={'pretrained': False}" in final['details']
    assert run.full_status().reason == 'WeightsUnavailable'


def test_exit_zero_without_artifact_is_a_failure(scripted: LocalBackend) -> None:
    final = _fit(model='scripted:no-artifact').wait(timeout=60, poll=0.1)
    assert final['status'] == 'FAILED'
    assert 'artifact/manifest.json does not exist' in final['details']


def test_save_model_before_the_end_is_refused(scripted: LocalBackend, tmp_path: Path) -> None:
    run = _fit(model_options={'wait_for': str(tmp_path / 'never')})
    with pytest.raises(RunNotFinishedError, match=r'is CREATED, so it has no model yet; call run.wait\(\) first'):
        run.save_model(tmp_path / 'model')
    with pytest.raises(RunNotFinishedError, match='no metrics yet'):
        run.metrics()
    run.cancel()


def test_cancel_stops_the_trainer_process_group(scripted: LocalBackend) -> None:
    run = _fit(model='scripted:slow', run_name='to-cancel')
    deadline = time.monotonic() + 30
    while run.status()['status'] != 'STARTED' and time.monotonic() < deadline:
        time.sleep(0.05)
    run_dir = scripted.run_dir('to-cancel')
    trainer_pid = json.loads((run_dir / 'state.json').read_text())['trainer_pid']
    supervisor_pid = int((run_dir / 'supervisor.pid').read_text())
    assert process_alive(trainer_pid)
    run.cancel()
    assert run.status() == {'status': 'FAILED', 'details': 'Run cancelled by user'}
    deadline = time.monotonic() + 10
    while (process_alive(trainer_pid) or process_alive(supervisor_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(trainer_pid)
    assert not process_alive(supervisor_pid)
    run.cancel()  # cancelling an ended run changes nothing
    assert run.status()['details'] == 'Run cancelled by user'


def test_run_survives_its_submitter_and_a_new_process_sees_it(scripted: LocalBackend, tmp_path: Path) -> None:
    """Submit from one process that exits at once; watch from another."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    submit = (
        'import sys, finetuner, finetuner.backends\n'
        'from finetuner.backends.local import LocalBackend\n'
        f'finetuner.backends.use(LocalBackend(command=[sys.executable, {str(scripted.command[1])!r}]))\n'
        f'run = finetuner.fit(model="scripted:ok", train_data=["red cat", "blue dog"], run_name="survivor",'
        f' model_options={{"wait_for": {str(tmp_path / "go")!r}}})\n'
        'print(run.name, run.status()["status"])\n'
    )
    out = subprocess.run([sys.executable, '-c', submit], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'survivor CREATED'
    (tmp_path / 'go').touch()
    watch = (
        'import finetuner\n'
        'finetuner.login()\n'
        'run = finetuner.get_run("survivor")\n'
        'print(run.wait(timeout=60, poll=0.1)["status"])\n'
    )
    out = subprocess.run([sys.executable, '-c', watch], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'FINISHED'


def test_a_vanished_supervisor_makes_the_run_failed(scripted: LocalBackend, tmp_path: Path) -> None:
    _fit(model_options={'wait_for': str(tmp_path / 'never')}, run_name='orphan')
    run_dir = scripted.run_dir('orphan')
    pid = int((run_dir / 'supervisor.pid').read_text())
    os.killpg(pid, signal.SIGKILL)  # like a reboot: nobody writes a final phase
    fresh = LocalBackend(command=scripted.command)  # another process: no handle on the child
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        scripted._supervisor_alive('orphan', run_dir)  # reap our own child
        time.sleep(0.05)
    status = fresh.get_run('orphan').status
    assert status.phase == 'FAILED'
    assert status.reason == 'SupervisorLost'
    assert 'ended without a result' in (status.details or '')


def test_stream_logs_follows_until_the_end(scripted: LocalBackend) -> None:
    run = _fit()
    lines = list(run.stream_logs())
    assert lines[0].startswith('scripted trainer: run ')
    assert lines[-1] == 'done'
    assert run.status()['status'] == 'FINISHED'


def test_runs_are_listed_got_and_deleted(scripted: LocalBackend) -> None:
    first = _fit(run_name='first')
    second = _fit(run_name='second', experiment_name='exp-a')
    first.wait(timeout=60, poll=0.1)
    second.wait(timeout=60, poll=0.1)
    assert [r.name for r in finetuner.list_runs()] == ['first', 'second']
    assert [r.name for r in finetuner.list_runs('exp-a')] == ['second']
    assert finetuner.get_run('second').experiment_name == 'exp-a'
    finetuner.delete_run('first')
    with pytest.raises(RunNotFoundError, match="run 'first' not found"):
        finetuner.get_run('first')
    assert not scripted.run_dir('first').exists()


def test_name_in_use_is_refused_before_upload(scripted: LocalBackend) -> None:
    _fit(run_name='taken').wait(timeout=60, poll=0.1)
    before = sorted(p.name for p in (scripted.home / 'datasets').iterdir())
    with pytest.raises(ArgumentError, match="run_name: a run named 'taken' already exists"):
        _fit(run_name='taken')
    assert sorted(p.name for p in (scripted.home / 'datasets').iterdir()) == before


def test_experiments_get_or_create_count_and_delete(scripted: LocalBackend) -> None:
    assert [e.name for e in finetuner.list_experiments()] == ['default']
    experiment = finetuner.create_experiment('finetune-flickr-dataset', description='flickr')
    again = finetuner.create_experiment('finetune-flickr-dataset')
    assert again.description == 'flickr'
    run = experiment.create_run(model='scripted:ok', train_data=['a cat'], run_name='in-exp')
    failing = _fit(model='scripted:fail', experiment_name='finetune-flickr-dataset')
    run.wait(timeout=60, poll=0.1)
    failing.wait(timeout=60, poll=0.1)
    counts = finetuner.get_experiment('finetune-flickr-dataset').status().runs
    assert (counts.total, counts.finished, counts.failed) == (2, 1, 1)
    assert sorted(r.name for r in experiment.list_runs()) == sorted(['in-exp', failing.name])
    assert sorted(e.name for e in finetuner.list_experiments()) == ['default', 'finetune-flickr-dataset']
    finetuner.delete_experiment('finetune-flickr-dataset')
    assert finetuner.list_runs() == []
    with pytest.raises(ExperimentNotFoundError, match="experiment 'finetune-flickr-dataset' not found"):
        finetuner.get_experiment('finetune-flickr-dataset')


def test_names_cannot_leave_the_home(scripted: LocalBackend) -> None:
    with pytest.raises(ValueError, match='not a valid name'):
        scripted.run_dir('../etc')
    with pytest.raises(ArgumentError, match=r'run_name: .* is not a valid name'):
        finetuner.get_run('../../etc/passwd')
    with pytest.raises(ValueError, match='not a valid name'):
        scripted.get_experiment('../x')


def test_output_prefix_of_the_spec_is_honoured(scripted: LocalBackend, tmp_path: Path) -> None:
    spec = FinetuneRunSpec(model='scripted:ok', train_data='x', output=(tmp_path / 'out').as_uri())
    assert scripted.output_uri('r1', spec) == f'{(tmp_path / "out").as_uri()}/r1'
