"""Sweeps from the SDK on the local backend (scripted trainer: its mrr peaks at learning_rate 1e-3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

import finetuner
from finetuner import sweeps
from finetuner.api.v1alpha1 import Sweep
from finetuner.backends.local import LocalBackend
from finetuner.errors import ArgumentError
from tests.sdk.queue_support import TrainerCensus

DOCS = ['a red cat', 'a blue dog', 'a green fish']
TEMPLATE = {'model': 'scripted:ok', 'train_data': DOCS}


def test_a_grid_sweep_runs_every_point_parallelism_at_a_time_and_names_the_best(scripted: LocalBackend) -> None:
    scripted.configure_queue(cpu_runs=4)  # room for more: only the sweep's parallelism holds it to 2
    with TrainerCensus(scripted.home) as census:
        experiment = finetuner.create_experiment(
            'lr',
            run_template=TEMPLATE,
            sweep={'parameters': {'learning_rate': [1e-4, 1e-3, 1e-2], 'epochs': [1, 2]}, 'parallelism': 2},
        )
        assert experiment.status().sweep_created <= 2
        status = experiment.wait(timeout=120, poll=0.2)
    assert (status.runs.total, status.runs.finished, status.sweep_created) == (6, 6, 6)
    assert census.max_alive == 2
    assert experiment.points() == [
        {'epochs': 1, 'learning_rate': 1e-4},
        {'epochs': 1, 'learning_rate': 1e-3},
        {'epochs': 1, 'learning_rate': 1e-2},
        {'epochs': 2, 'learning_rate': 1e-4},
        {'epochs': 2, 'learning_rate': 1e-3},
        {'epochs': 2, 'learning_rate': 1e-2},
    ]
    runs = experiment.runs()
    assert [r.name for r in runs] == [f'lr-00{i}' for i in range(6)]
    assert [(r.config.epochs, r.config.learning_rate) for r in runs] == [
        (p['epochs'], p['learning_rate']) for p in experiment.points()
    ]
    best = experiment.best_run()
    assert best is not None and best.name == 'lr-001'  # mrr 1.0, tied with lr-004: the first name wins
    assert status.best_run is not None and (status.best_run.name, status.best_run.value) == ('lr-001', 1.0)
    uploads = {r.config.train_data for r in runs}
    assert len(uploads) == 1, 'the template data is uploaded once for every point'

    console = Console(record=True, width=140)
    experiment.display(console)
    text = console.export_text()
    assert 'Experiment lr: best run lr-001 (mrr 1.0000, max)' in text
    row = next(line for line in text.splitlines() if line.startswith('│ lr-001 '))
    cells = [cell.strip() for cell in row.split('│')[1:-1]]
    assert cells == ['lr-001', 'FINISHED', '1', '0.001', '0.2500', '1.0000', '*']


def test_best_run_by_a_metric_to_minimise_and_none_before_any_finished(scripted: LocalBackend, tmp_path: Path) -> None:
    gate = tmp_path / 'go'
    experiment = finetuner.sweep(
        'low',
        grid={'learning_rate': [1e-4, 1e-3]},
        parallelism=2,
        metric='mrr',
        mode='min',
        model='scripted:ok',
        train_data=DOCS,
        model_options={'wait_for': str(gate)},
    )
    assert experiment.best_run() is None
    gate.touch()
    experiment.wait(timeout=60, poll=0.2)
    best = experiment.best_run()
    assert best is not None and best.name == 'low-000' and best.metrics().after['mrr'] == 0.9


def test_a_random_sweep_draws_the_points_the_operator_would(scripted: LocalBackend) -> None:
    experiment = finetuner.sweep(
        'drawn',
        random={'learning_rate': [1e-5, 1e-4, 1e-3, 1e-2], 'epochs': [1, 2, 3]},
        count=3,
        seed=5,
        parallelism=3,
        **TEMPLATE,
    )
    expected = sweeps.sweep_points(
        Sweep(
            kind='random', parameters={'learningRate': [1e-5, 1e-4, 1e-3, 1e-2], 'epochs': [1, 2, 3]}, count=3, seed=5
        )
    )
    assert experiment.points() == [{'epochs': p['epochs'], 'learning_rate': p['learningRate']} for p in expected]
    experiment.wait(timeout=60, poll=0.2)
    assert [(r.config.epochs, r.config.learning_rate) for r in experiment.runs()] == [
        (p['epochs'], p['learningRate']) for p in expected
    ]
    from finetuner_operator import experiments

    assert experiments.sweep_points is sweeps.sweep_points, 'one definition for both backends'
    assert experiments.sweep_run_name is sweeps.sweep_run_name


def test_deleting_the_experiment_deletes_its_runs_and_uploads_and_stops_the_sweep(
    scripted: LocalBackend, tmp_path: Path
) -> None:
    experiment = finetuner.sweep(
        'gone',
        grid={'epochs': [1, 2, 3, 4]},
        model='scripted:ok',
        train_data=DOCS,
        model_options={'wait_for': str(tmp_path / 'never')},
    )
    assert [r.name for r in experiment.runs()] == ['gone-000']
    assert len(list((scripted.home / 'datasets').iterdir())) == 1
    finetuner.delete_experiment('gone')
    assert finetuner.list_runs() == []
    assert not list((scripted.home / 'datasets').iterdir())
    finetuner.list_runs()  # another pass of the queue: no point is created any more
    assert finetuner.list_runs() == [] and [e.name for e in finetuner.list_experiments()] == ['default']


@pytest.mark.parametrize(
    ('arguments', 'expected'),
    [
        (
            {'sweep': {'parameters': {'learning_rte': [1e-4]}}},
            "sweep.parameters.learning_rte: is not a fit() argument a sweep can vary; did you mean 'learning_rate'?",
        ),
        (
            {'sweep': {'parameters': {'train_data': ['a', 'b']}}},
            'sweep.parameters.train_data: is not a fit() argument a sweep can vary',
        ),
        (
            {'sweep': {'parameters': {'epochs': 3}}},
            'sweep.parameters.epochs: give a non-empty list of values to try, got 3',
        ),
        ({'sweep': {'parameters': {}}}, 'sweep.parameters: give the fit() arguments to vary and their values'),
        (
            {'sweep': {'parameters': {'epochs': [1]}, 'kind': 'random'}},
            'sweep: a random sweep needs count',
        ),
        (
            {'sweep': {'parameters': {'learning_rate': [1e-3, 5.0]}}},
            "sweep.parameters: point {'learning_rate': 5.0}: learning_rate: must be less than or equal to 1 (got 5.0)",
        ),
        ({'sweep': {'parameters': {'epochs': [1]}}, 'run_template': None}, 'run_template: is required with a sweep'),
        (
            {'sweep': {'parameters': {'epochs': [1]}}, 'run_template': {**TEMPLATE, 'run_name': 'mine'}},
            'run_template.run_name: is set by the experiment (runs exp-000, ...); leave it out',
        ),
        (
            {'sweep': {'parameters': {'epochs': [1]}}, 'run_template': {'model': 'scripted:ok'}},
            'run_template.train_data: is required: the train_data every sweep point trains',
        ),
        (
            {'sweep': {'parameters': {'epochs': [1]}}, 'best_run': {'mode': 'best'}},
            "best_run: mode: Input should be 'max' or 'min'",
        ),
    ],
    ids=[
        'typo',
        'data',
        'not-a-list',
        'empty',
        'random-count',
        'bad-point',
        'no-template',
        'run-name',
        'no-data',
        'mode',
    ],
)
def test_a_bad_sweep_is_refused_before_anything_is_uploaded_or_created(
    scripted: LocalBackend, arguments: dict[str, object], expected: str
) -> None:
    given = {'run_template': TEMPLATE, **arguments}
    with pytest.raises(ArgumentError) as caught:
        finetuner.create_experiment('exp', **given)  # type: ignore[arg-type]
    assert expected in str(caught.value)
    assert [e.name for e in finetuner.list_experiments()] == ['default']
    assert not (scripted.home / 'datasets').exists()


def test_a_sweep_under_a_name_in_use_and_sweep_arguments_are_refused(scripted: LocalBackend) -> None:
    finetuner.create_experiment('taken')
    with pytest.raises(ArgumentError, match=r"name: experiment 'taken' already exists; get it with finetuner"):
        finetuner.sweep('taken', grid={'epochs': [1]}, **TEMPLATE)
    with pytest.raises(ArgumentError, match=r'grid: give grid=\{...\} \(every combination\) or random=\{...\}'):
        finetuner.sweep('both', grid={'epochs': [1]}, random={'epochs': [2]}, count=1, **TEMPLATE)
    assert not (scripted.home / 'datasets').exists()


def test_the_experiment_file_keeps_the_contract_spec(scripted: LocalBackend) -> None:
    finetuner.sweep('kept', grid={'learning_rate': [1e-3]}, parallelism=1, metric='map', **TEMPLATE)
    stored = json.loads((scripted.home / 'experiments' / 'kept.json').read_text())
    assert stored['spec']['sweep'] == {
        'kind': 'grid',
        'parameters': {'learningRate': [0.001]},
        'seed': 0,
        'parallelism': 1,
    }
    assert stored['spec']['bestRun'] == {'metric': 'map', 'mode': 'max'}
    assert stored['spec']['runTemplate']['model'] == 'scripted:ok'
    assert stored['spec']['runTemplate']['trainData'].endswith('-train/data.jsonl')
