"""One SDK call, two backends: a 4-point grid sweep with parallelism 2 trains for real on the local
backend (through its queue) and on the simulated cluster (an Experiment CR the operator reconciles),
and both name the same best run for the same seeds."""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import finetuner
from finetuner.api.layout import Record
from tests.cluster.fixtures import Cluster
from tests.e2e.targets import Target
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, png_bytes, write_jsonl

NAME = 'tiny-sweep'
GRID = {'learning_rate': [1e-4, 3e-2], 'epochs': [1, 2]}
METRIC = 'average_precision'


def _hard_images(per_class: int, seed: int) -> list[Record]:
    """Four classes of noisy, nearly alike colours: the metric differs from point to point (the
    palette of tests.support.tiny is separated perfectly by every point, a tie everywhere)."""
    records = []
    for label in range(4):
        for i in range(per_class):
            colour = (110 + 12 * label, 128, 140 - 12 * label)
            blob = png_bytes(colour, 32, noise=70, seed=seed * 1000 + label * 100 + i)
            records.append(Record(blob=base64.b64encode(blob).decode(), label=f'c{label}'))
    return records


def _sweep(tmp_path: Path) -> finetuner.Experiment:
    """The SDK call under test: the same on both backends."""
    return finetuner.sweep(
        NAME,
        grid=GRID,
        parallelism=2,
        metric=METRIC,
        model=TINY_TIMM,
        loss='TripletMarginLoss',  # with a constant rate the grid's points score apart (the default
        scheduler='constant',  # recipe's linear warm-up and decay ties two points at AP 1.0)
        # timm's own BatchNorm behaviour: with the default frozen statistics two points tie at AP 1.0
        model_options={**TINY_TIMM_OPTIONS, 'batch_norm': 'train'},
        train_data=str(write_jsonl(_hard_images(6, seed=0), tmp_path / 'train.jsonl')),
        eval_data=str(write_jsonl(_hard_images(5, seed=1), tmp_path / 'eval.jsonl')),
        batch_size=12,
        device='cpu',
        num_workers=0,
        seed=7,
    )


def _most_at_once(runs: list[finetuner.Run]) -> int:
    """The most runs that trained at the same time, from their start and completion times."""
    events = []
    for run in runs:
        status = run.record.status
        assert status.start_time and status.completion_time, run.name
        events += [(_time(status.start_time), 1), (_time(status.completion_time), -1)]
    most = current = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        current += change
        most = max(most, current)
    return most


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace('Z', '+00:00'))


def _finished(experiment: finetuner.Experiment) -> dict[str, Any]:
    status = experiment.wait(timeout=900, poll=0.5)
    runs = experiment.runs()
    assert [r.name for r in runs] == [f'{NAME}-00{i}' for i in range(4)]
    assert [r.record.status.phase for r in runs] == ['FINISHED'] * 4, [r.record.status.details for r in runs]
    assert status.sweep_created == 4 and status.runs.finished == 4
    best = experiment.best_run()
    assert best is not None
    return {
        'points': [(r.config.learning_rate, r.config.epochs) for r in runs],
        'metric': {r.name: r.record.status.metrics.after[METRIC] for r in runs if r.record.status.metrics},
        'best': best.name,
        'status_best': status.best_run.name if status.best_run else None,
        'most_at_once': _most_at_once(runs),
    }


@pytest.mark.slow
def test_a_grid_sweep_finds_the_same_best_run_locally_and_on_the_cluster(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The simulated node's pods run with OMP_NUM_THREADS=1 (tests.cluster.fixtures.NODE_ENV); local trainers
    # get the same, else float sums in another order differ by ~1e-9 before training and, at a learning
    # rate of 3e-2, by ~1e-3 in average precision after it.
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    finetuner.login(backend='local', home=tmp_path / 'home', cpu_runs=2)
    on_this_machine = _finished(_sweep(tmp_path))
    Target('simulated', cluster.api, 'default', cluster.bucket, timeout=900.0).login()
    on_the_cluster = _finished(_sweep(tmp_path))

    assert on_this_machine['points'] == on_the_cluster['points'] == [(1e-4, 1), (3e-2, 1), (1e-4, 2), (3e-2, 2)]
    assert on_this_machine['best'] == on_the_cluster['best']
    assert on_this_machine['status_best'] == on_the_cluster['status_best'] == on_this_machine['best']
    for run, value in on_this_machine['metric'].items():
        assert on_the_cluster['metric'][run] == pytest.approx(value, abs=1e-4), run
    values = sorted(on_this_machine['metric'].values())
    assert values[-1] - values[-2] > 1e-4, f'a clear best run, not a tie broken by name: {values}'
    assert on_this_machine['most_at_once'] <= 2 and on_the_cluster['most_at_once'] <= 2, 'parallelism 2'


def test_the_sdk_sweep_call_creates_the_experiment_cr_and_run_suspend_patches_the_spec(
    cluster: Cluster, tmp_path: Path
) -> None:
    """No training (the node is paused): what the SDK writes to the API server, and the operator's answer."""
    from kubernetes import client

    from tests.cluster.harness import wait_for

    cluster.node.pause(True)
    Target('simulated', cluster.api, 'default', cluster.bucket, timeout=60.0).login()
    experiment = finetuner.sweep(
        'cr-sweep',
        grid={'learning_rate': [1e-4, 1e-3], 'epochs': [1, 2]},
        parallelism=2,
        metric='map',
        model=TINY_TIMM,
        loss='TripletMarginLoss',  # with a constant rate the grid's points score apart (the default
        scheduler='constant',  # recipe's linear warm-up and decay ties two points at AP 1.0)
        train_data=[Record(text='a red cat', label='red'), Record(text='a blue dog', label='blue')],
    )
    body = client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        'finetuner.dev', 'v1alpha1', 'default', 'experiments', 'cr-sweep'
    )
    spec = body['spec']
    assert spec['sweep'] == {
        'kind': 'grid',
        'parameters': {'learningRate': [1e-4, 1e-3], 'epochs': [1, 2]},
        'seed': 0,
        'parallelism': 2,
    }
    assert spec['bestRun'] == {'metric': 'map', 'mode': 'max'}
    assert spec['runTemplate']['model'] == TINY_TIMM
    assert spec['runTemplate']['trainData'].startswith(f's3://{cluster.bucket}/datasets/cr-sweep-')
    wait_for(lambda: [r.name for r in experiment.runs()] == ['cr-sweep-000', 'cr-sweep-001'], what='two points')

    run = finetuner.get_run('cr-sweep-000')
    run.suspend()
    assert run.config.suspend is True
    status = wait_for(lambda: (s := run.full_status()).reason == 'Suspended' and s, what='suspended')
    assert (status.phase, status.details) == ('CREATED', 'Suspended: set suspend to false to resume')
    run.resume()
    assert run.config.suspend is False
    wait_for(lambda: run.full_status().reason != 'Suspended', what='resumed')
    finetuner.delete_experiment('cr-sweep')
