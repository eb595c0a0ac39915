"""Faults injected into the test cluster: every run still ends in the right phase, with one Job at a time,
no artifact claimed before its manifest exists, and a status (or Event) that says what happened.

Most scenarios run the stand-in trainer (``stand_in_trainer.py``, standard library only) so that the
faults, not training, take the time; the two that are about resuming (a killed trainer pod, the object
store going away mid-run) run the real trainer with a tiny model and a checkpoint every step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetuner_operator.builders import CONFIG_PATH
from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.e2e.targets import Target
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, write_jsonl

G, V, NS = 'finetuner.dev', 'v1alpha1', 'default'
STAND_IN = [sys.executable, str(Path(__file__).with_name('stand_in_trainer.py')), '--config', CONFIG_PATH]
stand_in = pytest.mark.node(command=STAND_IN)


def submit(cluster: Cluster, name: str, seconds: float = 0.3, **spec: Any) -> None:
    body = {
        'apiVersion': f'{G}/{V}',
        'kind': 'FinetuneRun',
        'metadata': {'name': name},
        'spec': {
            'model': 'stand-in',
            'trainData': f's3://{cluster.bucket}/data/train.jsonl',
            'modelOptions': {'seconds': seconds},
            'resources': {'gpus': 0},
            'backoffLimit': 3,
            **spec,
        },
    }
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(G, V, NS, 'finetuneruns', body)


def target(cluster: Cluster, timeout: float = 60.0) -> Target:
    return Target('simulated', cluster.api, NS, cluster.bucket, timeout=timeout)


def history(cluster: Cluster, key: str) -> list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    return cluster.server.call(lambda: [(t, o, n) for _, k, t, o, n in cluster.server.emu.history if k == key])


def jobs_created(cluster: Cluster, run: str) -> int:
    return sum(
        1
        for t, _, new in history(cluster, 'batch/v1/jobs')
        if t == 'ADDED' and new['metadata']['name'] == f'{run}-trainer'
    )


def most_pods_active_at_once(cluster: Cluster, run: str) -> int:
    """Over the whole history: the most trainer pods of ``run`` that were Pending or Running together."""
    active: set[str] = set()
    most = 0
    for type_, old, new in history(cluster, 'v1/pods'):
        pod = new or old
        if pod is None or (pod['metadata'].get('labels') or {}).get('finetuner.dev/run') != run:
            continue
        name = pod['metadata']['name']
        phase = (pod.get('status') or {}).get('phase')
        if type_ == 'DELETED' or phase in ('Succeeded', 'Failed') or pod['metadata'].get('deletionTimestamp'):
            active.discard(name)
        else:
            active.add(name)
        most = max(most, len(active))
    return most


def artifact_keys(cluster: Cluster, run: str) -> list[str]:
    return cluster.s3.keys(f'runs/{NS}/{run}/artifact/')


def assert_ends(cluster: Cluster, run: str, phase: str = 'FINISHED', timeout: float = 60.0) -> dict[str, Any]:
    """The run's end: the phase, one trainer pod at a time, and an artifact only with its manifest."""
    try:
        status = target(cluster, timeout).wait_phase(run, ('FINISHED', 'FAILED'))
    except TimeoutError as e:
        last = target(cluster).run_body(run).get('status')
        logs = [cluster.node.read_log(NS, p.metadata.name) for p in target(cluster).pods(run)]
        raise AssertionError(f'{run} never ended: status {last}, trainer logs {logs}') from e
    if status['phase'] != phase:
        logs = [cluster.node.read_log(NS, p.metadata.name) for p in target(cluster).pods(run)]
        keys = cluster.s3.keys(f'runs/{NS}/{run}/')
        from finetuner_operator.reports import StoreReports

        keys.append(repr(StoreReports().read(status['outputUri'])))
        raise AssertionError(f'{run} ended {status["phase"]}, not {phase}: {status}; logs {logs}; keys {keys}')
    assert most_pods_active_at_once(cluster, run) == 1
    manifest = f'runs/{NS}/{run}/artifact/manifest.json'
    if phase == 'FINISHED':
        assert status['artifactUri'] == f's3://{cluster.bucket}/runs/{NS}/{run}/artifact'
        assert manifest in artifact_keys(cluster, run)
    else:
        assert status.get('artifactUri') is None
    return status


def events(cluster: Cluster, run: str) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in target(cluster).events(run)]


# --- the API server failing ------------------------------------------------------------------------


@stand_in
def test_api_server_500_on_job_create(cluster: Cluster) -> None:
    fault = cluster.server.emu.inject(500, method='POST', path=r'/jobs$', times=3)
    submit(cluster, 'five-hundred')

    assert_ends(cluster, 'five-hundred')

    assert len(fault.hits) == 3, 'the operator retried the create through the errors'
    assert jobs_created(cluster, 'five-hundred') == 1
    assert [r for r, _ in events(cluster, 'five-hundred')].count('JobCreated') == 1


@stand_in
def test_run_whose_event_kopf_gave_up_on_is_still_reconciled(cluster: Cluster) -> None:
    # Kopf's own PATCH of the new run (its handler bookkeeping) fails past Kopf's retries, so Kopf drops
    # the event and no other event of the run follows: the periodic re-observation of runs that are not
    # yet terminal (a run without any status included) still creates its Job and finishes it.
    cluster.server.emu.inject(500, method='PATCH', path=r'/finetuneruns/abandoned', agents=('kopf',), times=25)
    cluster.server.emu.inject(500, method='POST', path=r'/jobs$', times=6)  # the handler's own create fails too
    submit(cluster, 'abandoned')

    assert_ends(cluster, 'abandoned', timeout=120.0)

    assert jobs_created(cluster, 'abandoned') == 1


@stand_in
def test_api_server_429_with_retry_after_on_every_kind_of_call(cluster: Cluster) -> None:
    # The operator reads through its cache: its GETs are the listings that fill it at start-up (and
    # every relist interval), so a restart under throttling is what exercises GET.
    cluster.operator.stop()
    faults = [
        cluster.server.emu.inject(429, method=method, retry_after=1, times=2)
        for method in ('GET', 'POST', 'PATCH', 'DELETE')
    ]
    cluster.operator.start()
    submit(cluster, 'throttled')

    assert_ends(cluster, 'throttled')

    assert all(len(f.hits) == 2 for f in faults[:3]), [f.hits for f in faults]
    assert jobs_created(cluster, 'throttled') == 1


@stand_in
def test_api_server_flaky_for_a_while(cluster: Cluster) -> None:
    # Every request of the operator, its own and Kopf's, fails until eight have failed.
    fault = cluster.server.emu.inject(500, times=8)
    submit(cluster, 'flaky')

    assert_ends(cluster, 'flaky')

    assert len(fault.hits) == 8
    assert jobs_created(cluster, 'flaky') == 1


@stand_in
def test_api_server_409_on_status_patches_and_on_a_job_that_does_not_exist(cluster: Cluster) -> None:
    conflict = cluster.server.emu.inject(409, method='PATCH', path=r'/finetuneruns/conflicted/status', times=3)
    phantom = cluster.server.emu.inject(409, method='POST', path=r'/jobs$', times=1)  # "exists", yet it does not
    submit(cluster, 'conflicted')

    assert_ends(cluster, 'conflicted')

    assert len(conflict.hits) == 3 and len(phantom.hits) == 1
    assert jobs_created(cluster, 'conflicted') == 1, 'the Job the 409 pretended was there got created'


@stand_in
def test_watch_connections_dropped_for_a_while(cluster: Cluster) -> None:
    cluster.node.pause(True)
    submit(cluster, 'unwatched', seconds=0.5)
    run = target(cluster)
    wait_for(lambda: run.jobs('unwatched'), what='job created')
    emu = cluster.server.emu

    cluster.server.call(lambda: emu.drop_watches(3.0))
    cluster.node.pause(False)  # the run starts and finishes while the operator watches nothing

    status = assert_ends(cluster, 'unwatched')
    assert emu.dropped_watches >= 4, 'every watch of the operator was cut'
    assert status['reason'] == 'Succeeded'


# --- the operator dying ----------------------------------------------------------------------------


@stand_in
def test_operator_killed_in_the_middle_of_a_handler(cluster: Cluster) -> None:
    stuck = cluster.server.emu.inject(500, method='POST', path=r'/jobs$', times=10_000)
    submit(cluster, 'interrupted')
    wait_for(lambda: len(stuck.hits) >= 2, what='the create handler retrying')

    cluster.operator.stop()  # mid-handler: the Job create has not succeeded yet
    stuck.times = len(stuck.hits)  # the API server recovers while no operator runs
    cluster.operator.start()

    assert_ends(cluster, 'interrupted')
    assert jobs_created(cluster, 'interrupted') == 1


@stand_in
def test_operator_restarted_at_each_phase_boundary(cluster: Cluster) -> None:
    run = target(cluster)
    cluster.operator.stop()
    submit(cluster, 'boundaries', seconds=2.0)  # no operator yet: on.resume picks it up
    cluster.node.pause(True)
    cluster.operator.start()
    assert run.wait_phase('boundaries', ('CREATED',))['reason'] == 'Submitted'
    wait_for(lambda: run.jobs('boundaries'), what='job created')

    cluster.operator.restart()  # CREATED, Job without pods
    cluster.node.pause(False)
    run.wait_phase('boundaries', ('STARTED',))
    cluster.operator.restart()  # STARTED, trainer running
    before = assert_ends(cluster, 'boundaries')
    cluster.operator.restart()  # FINISHED

    after = run.wait_phase('boundaries', ('FINISHED',))
    assert after == before, 'a restart changes nothing of a finished run'
    assert jobs_created(cluster, 'boundaries') == 1
    assert len(run.pods('boundaries')) == 1


@stand_in
def test_failed_run_stays_failed_across_restart(cluster: Cluster) -> None:
    submit(cluster, 'broken', modelOptions={'exitCode': 3})

    failed = assert_ends(cluster, 'broken', phase='FAILED')
    cluster.operator.restart()

    assert failed['reason'] == 'ConfigurationError'
    assert 'stand-in trainer failed with exit code 3' in failed['details']
    assert target(cluster).wait_phase('broken', ('FAILED',))['details'] == failed['details']
    assert len(target(cluster).pods('broken')) == 1


# --- the cluster taking things away ------------------------------------------------------------------


@stand_in
def test_job_deleted_behind_the_operators_back_is_recreated(cluster: Cluster) -> None:
    submit(cluster, 'orphaned', seconds=2.0)
    run = target(cluster)
    run.wait_phase('orphaned', ('STARTED',))

    batch = client.BatchV1Api(cluster.api)
    batch.delete_namespaced_job('orphaned-trainer', NS, propagation_policy='Background')  # and its running pod

    status = assert_ends(cluster, 'orphaned')
    assert jobs_created(cluster, 'orphaned') == 2
    recreated = [m for r, m in events(cluster, 'orphaned') if r == 'JobRecreated']
    assert len(recreated) == 1 and 'was deleted outside the operator; created it again' in recreated[0]
    assert status['attempts'] == 1, 'the new Job counts its own attempts'


# 6 s: long enough that a loaded machine still sees the run waiting (CREATED) before it fails.
@pytest.mark.operator_config(unschedulable_timeout=6.0)
@stand_in
def test_full_node_leaves_the_run_waiting_then_failed_with_the_reason(cluster: Cluster) -> None:
    submit(cluster, 'filler', seconds=30.0, resources={'gpus': 2})  # takes both GPUs of the node
    run = target(cluster)
    run.wait_phase('filler', ('STARTED',))
    submit(cluster, 'waiting', resources={'gpus': 1})

    waiting = wait_for(
        lambda: (s := run.run_body('waiting').get('status') or {}).get('reason') == 'Unschedulable' and s,
        what='unschedulable reported',
    )
    assert waiting['phase'] == 'CREATED' and 'Insufficient nvidia.com/gpu' in waiting['details']
    failed = assert_ends(cluster, 'waiting', phase='FAILED')
    assert failed['reason'] == 'Unschedulable' and 'lower spec.resources' in failed['details']
    assert run.jobs('waiting') == [], 'the Job of the failed run is removed'
    assert run.run_body('filler')['status']['phase'] == 'STARTED', 'the other run is untouched'


@stand_in
def test_trainer_that_exits_0_without_a_manifest_is_not_finished(cluster: Cluster) -> None:
    # A 'successful' exit that published no manifest (a wrong image, a broken entry point).
    cluster.node.command = [sys.executable, '-c', 'print("did nothing")']
    submit(cluster, 'empty-handed')

    status = assert_ends(cluster, 'empty-handed', phase='FAILED')

    assert status['reason'] == 'ArtifactMissing'
    assert 'artifact/manifest.json does not exist' in status['details']


# --- the trainer dying, the object store going away (real trainer) ------------------------------------


def _real_run(cluster: Cluster, tmp_path: Path, name: str, **spec: Any) -> None:
    data = write_jsonl(labelled_images(n_classes=3, per_class=8), tmp_path / 'train.jsonl')
    key = f'data/{name}.jsonl'
    cluster.s3.client().put_object(Bucket=cluster.bucket, Key=key, Body=data.read_bytes())
    body = {
        'apiVersion': f'{G}/{V}',
        'kind': 'FinetuneRun',
        'metadata': {'name': name},
        'spec': {
            'model': TINY_TIMM,
            'modelOptions': TINY_TIMM_OPTIONS,
            'trainData': f's3://{cluster.bucket}/{key}',
            'epochs': 3,
            'batchSize': 6,
            'numItemsPerClass': 2,
            'device': 'cpu',
            'numWorkers': 0,
            'resources': {'gpus': 0},
            'checkpointEverySteps': 1,
            'backoffLimit': 6,
            **spec,
        },
    }
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(G, V, NS, 'finetuneruns', body)


def _first_checkpoint(cluster: Cluster, name: str) -> None:
    latest = f'runs/{NS}/{name}/checkpoints/latest.json'

    def checkpointed() -> bool:
        status = target(cluster).run_body(name).get('status') or {}
        if status.get('phase') in ('FINISHED', 'FAILED'):
            raise AssertionError(f'{name} ended before its first checkpoint: {status}; logs {_logs(cluster, name)}')
        return latest in cluster.s3.keys(f'runs/{NS}/{name}/checkpoints/')

    wait_for(checkpointed, 120, 0.05, what='first checkpoint')


def _logs(cluster: Cluster, name: str) -> list[str]:
    pods = sorted(target(cluster).pods(name), key=lambda p: p.metadata.creation_timestamp)
    return [cluster.node.read_log(NS, p.metadata.name) or '' for p in pods]


def test_trainer_killed_mid_epoch_resumes_from_its_checkpoint(cluster: Cluster, tmp_path: Path) -> None:
    _real_run(cluster, tmp_path, 'killed')
    _first_checkpoint(cluster, 'killed')
    pod = target(cluster).pods('killed')[0].metadata.name

    assert cluster.node.kill(pod), 'the trainer was still running'
    assert artifact_keys(cluster, 'killed') == [], 'no artifact from the killed attempt'

    status = assert_ends(cluster, 'killed', timeout=180.0)
    assert status['attempts'] == 2
    first, second = _logs(cluster, 'killed')
    assert 'resumed from' not in first
    assert 'resumed from' in second, second[-2000:]


def test_object_store_down_during_uploads_then_back(cluster: Cluster, tmp_path: Path, s3_server: Any) -> None:
    from moto.server import ThreadedMotoServer

    _real_run(cluster, tmp_path, 'storeless')
    _first_checkpoint(cluster, 'storeless')
    port = int(cluster.s3.endpoint.rsplit(':', 1)[1])

    cluster.s3.server.stop()  # uploads of checkpoints, progress and the artifact now fail
    try:
        wait_for(
            lambda: any(p.status and p.status.phase == 'Failed' for p in target(cluster).pods('storeless')),
            120,
            what='an attempt failed on the store',
        )
        time.sleep(1.0)  # and the store stays away a little longer
    finally:
        server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
        server.start()  # moto keeps its objects in this process: the bucket comes back as it was
        cluster.s3.server = s3_server.server = server

    status = assert_ends(cluster, 'storeless', timeout=180.0)
    assert status['attempts'] >= 2
    logs = _logs(cluster, 'storeless')
    assert any('resumed from' in log for log in logs[1:]), 'a later attempt resumed from the checkpoint'
