"""The ``finetuner`` command line, in-process on main(argv) and once as the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import finetuner
from finetuner.backends.local import LocalBackend
from finetuner.cli import main
from tests.support.tiny import labelled_texts, write_jsonl


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(labelled_texts(2, 3), tmp_path / 'train.jsonl')


def test_fit_wait_runs_status_logs_download_metrics(
    scripted: LocalBackend, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(['fit', '-m', 'scripted:ok', '-d', str(data_file), '--run-name', 'cli-run', '--epochs', '2', '--wait'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[:2] == ['Run name: cli-run', 'Run status: CREATED']
    assert 'read 6 records' in out
    assert out.strip().splitlines()[-1].startswith('Run status: FINISHED: Fine-tuned model at file://')
    assert finetuner.get_run('cli-run').config.epochs == 2

    assert main(['runs']) == 0
    listing = capsys.readouterr().out
    assert 'cli-run' in listing and 'FINISHED' in listing and 'scripted:ok' in listing

    assert main(['status', 'cli-run']) == 0
    assert capsys.readouterr().out.splitlines()[0] == 'cli-run: FINISHED'
    assert main(['status', 'cli-run', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['phase'] == 'FINISHED'

    assert main(['logs', 'cli-run']) == 0
    assert 'done' in capsys.readouterr().out
    assert main(['logs', 'cli-run', '-f']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == 'done'

    assert main(['download', 'cli-run', str(tmp_path / 'model')]) == 0
    assert 'saved to' in capsys.readouterr().out
    assert (tmp_path / 'model' / 'manifest.json').is_file()

    assert main(['metrics', 'cli-run']) == 0
    assert 'mrr' in capsys.readouterr().out

    assert main(['experiments']) == 0
    assert 'default' in capsys.readouterr().out
    assert main(['delete', 'cli-run']) == 0
    assert finetuner.list_runs() == []


def test_fit_options_and_cancel(scripted: LocalBackend, data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            'fit',
            '-m',
            'scripted:slow',
            '-d',
            str(data_file),
            '--run-name',
            'opts',
            '--model-option',
            'max_length=64',
            '--set',
            'output_dim=16',
            '--set',
            'miner_options={"margin": 0.3}',
            '--set',
            'miner=TripletMarginMiner',
            '--device',
            'cpu',
        ]
    )
    assert code == 0, capsys.readouterr().err
    spec = finetuner.get_run('opts').config
    assert (spec.model_options, spec.output_dim, spec.miner_options, spec.device) == (
        {'max_length': 64},
        16,
        {'margin': 0.3},
        'cpu',
    )
    capsys.readouterr()
    assert main(['cancel', 'opts']) == 0
    assert 'Run cancelled by user' in capsys.readouterr().out


def test_errors_are_one_line_with_exit_codes(
    scripted: LocalBackend, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(['fit', '-m', 'scripted:ok', '-d', str(data_file), '--lr', '5']) == 2
    assert capsys.readouterr().err.strip() == 'error: learning_rate: must be less than or equal to 1 (got 5.0)'
    assert main(['fit', '-m', 'scripted:ok', '-d', str(data_file), '--set', 'epochs']) == 2
    assert "error: --set: 'epochs' is not KEY=VALUE" in capsys.readouterr().err
    assert main(['fit', '-m', 'x', '-d', str(data_file), '--epochs', '1', '--set', 'epochs=2']) == 2
    assert 'epochs is also given as its own flag' in capsys.readouterr().err
    assert main(['status', 'nope']) == 1
    assert capsys.readouterr().err.strip().startswith("error: run 'nope' not found in the local backend")
    assert main(['models', '--task', 'text-to-text']) == 0
    out = capsys.readouterr().out
    assert 'bert-base-cased' in out and 'resnet50' not in out


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = shutil.which('finetuner', path=str(Path(sys.executable).parent))
    assert script, 'the finetuner console script is not installed in this environment'
    out = subprocess.run([script, 'models'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'Finetuner backbones' in out.stdout and 'efficientnet_b0' in out.stdout
    out = subprocess.run([script, 'runs'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_runs_show_queue_places_and_the_queue_command(
    scripted: LocalBackend, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = tmp_path / 'go'
    for name in ('first', 'second', 'third'):
        args = ['fit', '-m', 'scripted:ok', '-d', str(data_file), '--run-name', name]
        assert main([*args, '--model-option', f'wait_for={gate}']) == 0
    capsys.readouterr()
    assert main(['runs']) == 0
    rows = {line.split('│')[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith('│')}
    assert rows['second'].split('│')[4].strip() == 'CREATED #1'
    assert rows['third'].split('│')[4].strip() == 'CREATED #2'

    assert main(['queue']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'Local queue of {scripted.home}: 1 at once on the CPU, GPUs []'
    assert out[1].startswith('  #1 second: Waiting for a free CPU slot: 1 of 1 trainings allowed at once')
    assert out[2] == '  #2 third: Waiting: 1 run ahead (queued for a CPU slot)'
    assert main(['queue', '--output', 'json']) == 0
    queue = json.loads(capsys.readouterr().out)
    assert (queue['home'], queue['cpu_runs'], queue['gpus']) == (str(scripted.home), 1, [])
    assert [(w['position'], w['name']) for w in queue['waiting']] == [(1, 'second'), (2, 'third')]
    assert queue['waiting'][1]['details'] == 'Waiting: 1 run ahead (queued for a CPU slot)'

    assert main(['suspend', 'second']) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        'second: CREATED',
        '  Suspended: set suspend to false to resume',
    ]
    assert main(['queue', '--cpu-runs', '2']) == 0  # 'third' takes the second slot; 'second' stays suspended
    assert capsys.readouterr().out.splitlines()[0].endswith('2 at once on the CPU, GPUs []')
    assert finetuner.get_run('third').full_status().reason in ('Submitted', 'Running')
    assert main(['resume', 'second']) == 0
    assert main(['queue', '--gpus', 'zero']) == 2
    assert "error: --gpus: 'zero' is not a list of GPU indices; write e.g. 0,1 or none" in capsys.readouterr().err
    gate.touch()
    for name in ('first', 'second', 'third'):
        assert finetuner.get_run(name).wait(timeout=60, poll=0.1)['status'] == 'FINISHED'


def test_sweep_and_experiment_commands(
    scripted: LocalBackend, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ['sweep', 'cli-sweep', '-m', 'scripted:ok', '-d', str(data_file), '--grid', 'learning_rate=[0.0001,0.001]']
    assert main([*args, '--parallelism', '2', '--wait']) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == 'Experiment cli-sweep: 2 points, 2 at a time'
    assert 'Experiment cli-sweep: best run cli-sweep-001 (mrr 1.0000, max)' in out
    assert main(['experiment', 'cli-sweep']) == 0
    assert 'best run cli-sweep-001' in capsys.readouterr().out
    assert main(['experiment', 'cli-sweep', '-o', 'json']) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed['name'], listed['metric'], listed['mode'], listed['best_run']) == (
        'cli-sweep',
        'mrr',
        'max',
        'cli-sweep-001',
    )
    assert [(r['name'], r['status'], r['parameters'], r['best']) for r in listed['runs']] == [
        ('cli-sweep-000', 'FINISHED', {'learning_rate': 0.0001}, False),
        ('cli-sweep-001', 'FINISHED', {'learning_rate': 0.001}, True),
    ]
    assert listed['runs'][1]['after'] == 1.0
    assert main(['metrics', 'cli-sweep-001', '--output', 'json']) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == finetuner.get_run('cli-sweep-001').metrics().model_dump(exclude_none=True)
    assert metrics['after']['mrr'] == 1.0 and set(metrics) == {'before', 'after'}
    assert main(['experiments']) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('│ cli-sweep '))
    assert [cell.strip() for cell in row.split('│')[1:-1]] == ['cli-sweep', '2', '0', '0', '2', '0', 'cli-sweep-001']
    assert main(['sweep', 'no-points', '-m', 'scripted:ok', '-d', str(data_file)]) == 2
    assert capsys.readouterr().err.strip() == (
        'error: grid: give grid={...} (every combination) or random={...} with count=N, not both'
    )
