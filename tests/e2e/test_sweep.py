"""An Experiment's sweep of four points with parallelism 2, trained for real on the simulated node.

The operator creates the sweep's runs two at a time (a new one when one ends), each run trains the
tiny timm model with its point's learning rate and reports retrieval metrics, and the Experiment's
status counts the four finished runs and names the best one by its metric.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from finetuner.api.v1alpha1 import BestRunSelector, ExperimentSpec, Sweep
from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.e2e.targets import Target
from tests.e2e.test_concurrency_limit import job_active, most_active_at_once
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, write_jsonl

RATES = [1e-4, 1e-3, 1e-2, 1e-1]


@pytest.mark.slow  # four real trainings, two at a time: ~100 s on a busy 2-core machine
def test_sweep_of_four_points_two_at_a_time(cluster: Cluster, tmp_path: Path) -> None:
    target = Target('simulated', cluster.api, 'default', cluster.bucket, timeout=300.0)
    backend = target.login()
    data = write_jsonl(labelled_images(n_classes=3, per_class=4), tmp_path / 'train.jsonl')
    boto3.client('s3', endpoint_url=cluster.s3.endpoint).upload_file(str(data), cluster.bucket, 'data/train.jsonl')
    uri = f's3://{cluster.bucket}/data/train.jsonl'
    template = {
        'model': TINY_TIMM,
        'modelOptions': TINY_TIMM_OPTIONS,
        'trainData': uri,
        'evalData': uri,
        'epochs': 1,
        'batchSize': 12,
        'device': 'cpu',
        'numWorkers': 0,
        'resources': {'gpus': 0},
    }
    sweep = Sweep(parameters={'learningRate': RATES}, parallelism=2)
    backend.create_experiment(
        'lr-sweep', ExperimentSpec(run_template=template, sweep=sweep, best_run=BestRunSelector())
    )

    def all_finished() -> object:
        status = backend.get_experiment('lr-sweep').status
        return status.runs.finished + status.runs.failed == 4 and status

    status = wait_for(all_finished, 300, 0.2, what='the four sweep runs ended')
    runs = backend.list_runs(experiment='lr-sweep')
    assert status.runs.finished == 4, [(r.name, r.status.phase, r.status.details) for r in runs]
    assert status.sweep_created == 4
    assert sorted(r.spec.learning_rate for r in runs) == RATES
    assert [r.name for r in runs] == [f'lr-sweep-{i:03d}' for i in range(4)]

    # Each point reached its trainer.
    for run in runs:
        pod = target.pods(run.name)[0].metadata.name
        assert f'optimizer Adam (lr {run.spec.learning_rate:g})' in (cluster.node.read_log('default', pod) or '')

    # Never more than two at once, and two at once did happen.
    assert most_active_at_once(cluster, 'batch/v1/jobs', job_active) == 2

    # The best run is the one with the highest MRR after training, as the runs' own statuses say.
    after = {r.name: r.status.metrics.after['mrr'] for r in runs}
    best = wait_for(lambda: backend.get_experiment('lr-sweep').status.best_run, 30, what='the best run named')
    assert best.metric == 'mrr'
    assert best.value == max(after.values())
    assert after[best.name] == best.value
