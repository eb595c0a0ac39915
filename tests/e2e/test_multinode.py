"""Multi-node training end to end on the simulated cluster, and a sweep running two points at a time.

A FinetuneRun with ``resources.nodes: 2`` becomes the operator's Indexed Job (two completions, both
at once) and headless Service; the simulated node starts both pods, and each runs
``torchrun --nnodes 2 --node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR)`` where MASTER_ADDR is
the Service's DNS name of pod 0 (``<run>-trainer-0.<run>-workers.default.svc``), which the node maps to
the pods' address on loopback. The ranks meet through that name, train their halves of every global
batch, and rank 0 alone publishes. The result must equal a one-node run with the same global batch,
as ``tests/trainer/advanced/test_torchrun_trainer.py`` checks for two processes on one machine: same
loss per epoch, same weights (1e-4 relative: only summation order differs; see that module).

Every pod of the simulated node shares this machine's network, so the rendezvous port (29500, fixed
by the operator) is taken by one multi-node run at a time on this machine: the tests hold a file lock
on it, so that test sessions running side by side wait instead of failing.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kubernetes import client
from safetensors.torch import load_file

import finetuner
from finetuner_operator.builders import COMPLETION_INDEX_ANNOTATION, RENDEZVOUS_PORT
from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.e2e.targets import Target
from tests.support.tiny import labelled_images, write_jsonl

NS = 'default'
# As in test_torchrun_trainer: GroupNorm (per-item statistics; BatchNorm would normalise each rank's half
# on its own on CPU), a miner over the global batch, and a margin the random start violates.
DDP = {
    'model': 'timm:test_efficientnet_gn',
    'model_options': {'pretrained': False, 'image_size': 32},
    'loss': 'TripletMarginLoss',
    'loss_options': {'margin': 1.0},
    'miner': 'TripletMarginMiner',
    'miner_options': {'margin': 1.0, 'type_of_triplets': 'all'},
    'batch_size': 8,
    'num_items_per_class': 2,
    'learning_rate': 1e-3,
    'epochs': 2,
    'seed': 7,
    'device': 'cpu',
    'num_workers': 0,
    'backoff_limit': 0,
}


@pytest.fixture
def rendezvous_port() -> Iterator[int]:
    """The operator's rendezvous port on this machine, for this test alone (see the module docstring)."""
    with open(f'/tmp/kube-finetuner-rendezvous-{RENDEZVOUS_PORT}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield RENDEZVOUS_PORT
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _target(cluster: Cluster, timeout: float = 300.0) -> Target:
    return Target('simulated', cluster.api, NS, cluster.bucket, timeout=timeout)


def _read(cluster: Cluster, uri: str) -> bytes:
    import boto3

    bucket, _, key = uri.removeprefix('s3://').partition('/')
    s3 = boto3.client('s3', endpoint_url=cluster.s3.endpoint)
    return s3.get_object(Bucket=bucket, Key=key)['Body'].read()


def _by_index(pods: list[Any]) -> dict[int, Any]:
    return {int(p.metadata.annotations[COMPLETION_INDEX_ANNOTATION]): p for p in pods}


def _logs(cluster: Cluster, run: str) -> dict[int, str]:
    pods = _by_index(_target(cluster).pods(run))
    return {index: cluster.node.read_log(NS, pod.metadata.name) or '' for index, pod in pods.items()}


def _wait_end(cluster: Cluster, run: str) -> dict[str, Any]:
    target = _target(cluster)
    status = target.wait_phase(run, ('FINISHED', 'FAILED'))
    assert status['phase'] == 'FINISHED', (status, _logs(cluster, run))
    return status


def test_two_nodes_rendezvous_through_the_service_and_match_one_node(
    cluster: Cluster, tmp_path: Path, rendezvous_port: int
) -> None:
    target = _target(cluster)
    target.login()
    data = write_jsonl(labelled_images(4, 4, seed=0), tmp_path / 'train.jsonl')
    two = finetuner.fit(train_data=str(data), run_name='two-nodes', nodes=2, gpus=1, **DDP)
    one = finetuner.fit(train_data=str(data), run_name='one-node', gpus=0, **DDP)

    # The operator's objects: an Indexed Job of two pods at once, and the headless Service naming them.
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    job = wait_for(lambda: target.jobs('two-nodes'), what='the Job of the two-node run')[0]
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ('Indexed', 2, 2)
    service = core.read_namespaced_service('two-nodes-workers', NS)
    assert service.spec.cluster_ip == 'None' and service.spec.selector == {'finetuner.dev/run': 'two-nodes'}
    assert [p.port for p in service.spec.ports] == [rendezvous_port]
    assert job.spec.template.spec.subdomain == 'two-nodes-workers'

    two_status, one_status = _wait_end(cluster, 'two-nodes'), _wait_end(cluster, 'one-node')

    # Both pods ran (indexes 0 and 1, with their stable hostnames) and succeeded.
    pods = _by_index(target.pods('two-nodes'))
    assert sorted(pods) == [0, 1]
    assert [pods[i].spec.hostname for i in (0, 1)] == ['two-nodes-trainer-0', 'two-nodes-trainer-1']
    assert [pods[i].status.phase for i in (0, 1)] == ['Succeeded', 'Succeeded']
    assert batch.read_namespaced_job('two-nodes-trainer', NS).status.succeeded == 2
    assert two_status['attempts'] == 1, 'one attempt of two pods, not two attempts'
    logs = _logs(cluster, 'two-nodes')
    assert 'distributed training: 2 processes (gloo), global batch 8 = 4 per process' in logs[0], logs[0][-3000:]
    assert 'rank 1 of 2' in logs[1], logs[1][-3000:]
    # Both ranks trained every step; rank 0 alone published.
    assert all('epoch 2/2 done: train_loss' in logs[i] for i in (0, 1))
    assert 'artifact published at' in logs[0] and 'artifact published at' not in logs[1]

    # The same result as one process on the same global batches.
    ours = json.loads(_read(cluster, f'{two_status["outputUri"]}/metrics.json'))
    theirs = json.loads(_read(cluster, f'{one_status["outputUri"]}/metrics.json'))
    assert [row['epoch'] for row in ours['epochs']] == [1, 2]
    for mine, reference in zip(ours['epochs'], theirs['epochs'], strict=True):
        assert mine['train_loss'] == pytest.approx(reference['train_loss'], rel=1e-4)
    assert ours['epochs'][0]['train_loss'] != pytest.approx(ours['epochs'][1]['train_loss'], rel=1e-3)
    weights = {}
    for run in (two, one):
        folder = Path(run.save_model(tmp_path / run.name))
        weights[run.name] = load_file(folder / 'model.safetensors')
    assert weights['two-nodes'].keys() == weights['one-node'].keys()
    for key, value in weights['one-node'].items():
        torch.testing.assert_close(weights['two-nodes'][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_rank_that_dies_fails_the_run_naming_the_rank(cluster: Cluster, tmp_path: Path, rendezvous_port: int) -> None:
    target = _target(cluster)
    target.login()
    data = write_jsonl(labelled_images(4, 4, seed=0), tmp_path / 'train.jsonl')
    finetuner.fit(train_data=str(data), run_name='loses-a-rank', nodes=2, gpus=1, **{**DDP, 'epochs': 200})

    def training() -> bool:
        logs = _logs(cluster, 'loses-a-rank')
        return len(logs) == 2 and 'epoch 1/200 done' in logs[0] and 'rank 1 of 2' in logs[1]

    wait_for(training, 240, 0.2, what='both ranks training')
    rank_one = _by_index(target.pods('loses-a-rank'))[1].metadata.name
    assert cluster.node.kill(rank_one), 'rank 1 was still running'

    status = target.wait_phase('loses-a-rank', ('FINISHED', 'FAILED'), timeout=120)
    assert status['phase'] == 'FAILED', status
    assert status['reason'] == 'BackoffLimitExceeded'
    assert f'node rank 1 of 2 (pod {rank_one}) failed: killed by signal 9 (exit code 137)' in status['details']
    assert status['details'].startswith('The trainer failed 1 times on its 2 nodes (backoffLimit 0); last attempt: ')
    assert status['attempts'] == 1
    wait_for(
        lambda: not [p for p in target.pods('loses-a-rank') if p.status.phase == 'Running'], 60, what='no rank left'
    )
