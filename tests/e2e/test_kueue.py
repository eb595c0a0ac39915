"""Kueue's admission on the simulated cluster (``tests/cluster/kueue.py``), beyond the unit tests.

The operator creates a queued run's Job suspended with the label ``kueue.x-k8s.io/queue-name``; the
stand-in for Kueue makes the Job's Workload, admits it (unsuspends the Job) when the ClusterQueue behind
the LocalQueue has quota for all of its pods, and the simulated node runs it. While the Job waits, the
run's status carries the Workload's own message (the operator reads the Workload by its
``kueue.x-k8s.io/job-uid`` label). The queues are those the Helm chart creates
(``kueue.createQueues``): a ResourceFlavor, a ClusterQueue with a nominal quota, a LocalQueue.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.cluster.kueue import GROUP, JOB_UID_LABEL, QUEUE_LABEL, VERSION, KueueStandIn, declare, workload_name
from tests.e2e.test_concurrency_limit import job_active, most_active_at_once
from tests.reliability.test_faults import STAND_IN, submit, target

NS = 'default'
QUEUE = 'finetuner-queue'
CLUSTER_QUEUE = 'finetuner'
POOL = {'finetuner.dev/pool': 'gpus'}


def queues(gpus: int, queue: str = QUEUE) -> list[tuple[str, dict[str, Any]]]:
    """(plural, body) of the objects the chart renders for kueue.createQueues (see test_chart_matches)."""
    meta = {'labels': {'app.kubernetes.io/component': 'kueue'}}
    return [
        (
            'resourceflavors',
            {'kind': 'ResourceFlavor', 'metadata': {'name': CLUSTER_QUEUE, **meta}, 'spec': {'nodeLabels': POOL}},
        ),
        (
            'clusterqueues',
            {
                'kind': 'ClusterQueue',
                'metadata': {'name': CLUSTER_QUEUE, **meta},
                'spec': {
                    'namespaceSelector': {},
                    'resourceGroups': [
                        {
                            # the trainer asks for ephemeral-storage: a ClusterQueue must cover it (or Kueue
                            # be told to exclude it), as with real Kueue (docs/OPERATOR.md)
                            'coveredResources': ['cpu', 'memory', 'nvidia.com/gpu', 'ephemeral-storage'],
                            'flavors': [
                                {
                                    'name': CLUSTER_QUEUE,
                                    'resources': [
                                        {'name': 'cpu', 'nominalQuota': '32'},
                                        {'name': 'memory', 'nominalQuota': '128Gi'},
                                        {'name': 'nvidia.com/gpu', 'nominalQuota': gpus},
                                        {'name': 'ephemeral-storage', 'nominalQuota': '1Ti'},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        ),
        (
            'localqueues',
            {
                'kind': 'LocalQueue',
                'metadata': {'name': queue, 'namespace': NS, **meta},
                'spec': {'clusterQueue': CLUSTER_QUEUE},
            },
        ),
    ]


@pytest.fixture
def kueue(cluster: Cluster) -> Iterator[KueueStandIn]:
    declare(cluster.server)
    custom = client.CustomObjectsApi(cluster.api)
    for plural, body in queues(gpus=1):
        body = {'apiVersion': f'{GROUP}/{VERSION}', **body}
        if plural == 'localqueues':
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, plural, body)
        else:
            custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
    stand_in = KueueStandIn(cluster.api).start()
    try:
        yield stand_in
    finally:
        stand_in.stop()
        assert not stand_in.errors, stand_in.errors


def _cluster_queue(cluster: Cluster) -> dict[str, Any]:
    return client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
        GROUP, VERSION, 'clusterqueues', CLUSTER_QUEUE
    )


def _queued(cluster: Cluster, run: str, details: str | None = None) -> dict[str, Any] | None:
    """The run's status while it is queued (and, given ``details``, once they say exactly that)."""
    status = target(cluster).run_body(run).get('status') or {}
    if status.get('reason') != 'Queued' or (details is not None and status.get('details') != details):
        return None
    return status


def _workload(cluster: Cluster, run: str) -> dict[str, Any]:
    """The Workload of the run's Job, found as the operator and `kubectl get workloads -l` find it."""
    job = target(cluster).jobs(run)[0]
    found = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        GROUP, VERSION, NS, 'workloads', label_selector=f'{JOB_UID_LABEL}={job.metadata.uid}'
    )['items']
    assert [w['metadata']['name'] for w in found] == [workload_name(job.metadata.name, job.metadata.uid)]
    (owner,) = found[0]['metadata']['ownerReferences']
    assert (owner['kind'], owner['name'], owner['uid'], owner['controller']) == (
        'Job',
        job.metadata.name,
        job.metadata.uid,
        True,
    )
    return found[0]


def _conditions(workload: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c['type']: (c['status'], c['reason'], c['message']) for c in workload['status']['conditions']}


@pytest.mark.operator_config(queue=QUEUE)
@pytest.mark.node(command=STAND_IN, labels=POOL)
def test_a_run_waits_in_its_queue_until_kueue_has_quota(cluster: Cluster, kueue: KueueStandIn) -> None:
    submit(cluster, 'first', seconds=4.0, resources={'gpus': 1})
    wait_for(lambda: target(cluster).jobs('first'), what='the Job of the first run')
    submit(cluster, 'second', seconds=0.3, resources={'gpus': 1})

    # One GPU of quota: the first run is admitted and trains, the second waits in the queue, saying why in
    # Kueue's words (its Workload's QuotaReserved condition).
    why = 'insufficient unused quota for nvidia.com/gpu in flavor finetuner, 1 more needed'
    details = f"Waiting in queue {QUEUE}: couldn't assign flavors to pod set main: {why}"
    waiting = wait_for(lambda: _queued(cluster, 'second', details), 30, 0.05, what="Kueue's reason in the status")
    assert waiting['phase'] == 'CREATED'
    assert _conditions(_workload(cluster, 'second')) == {
        'QuotaReserved': ('False', 'Pending', f"couldn't assign flavors to pod set main: {why}")
    }
    first = _workload(cluster, 'first')
    assert _conditions(first) == {
        'QuotaReserved': ('True', 'QuotaReserved', f'Quota reserved in ClusterQueue {CLUSTER_QUEUE}'),
        'Admitted': ('True', 'Admitted', 'The workload is admitted'),
    }
    assert first['status']['admission']['podSetAssignments'][0]['flavors']['nvidia.com/gpu'] == CLUSTER_QUEUE
    assert first['spec']['queueName'] == QUEUE and first['spec']['podSets'][0]['count'] == 1
    assert {c['type']: c['status'] for c in waiting['conditions']}['Suspended'] == 'True'
    second_job = target(cluster).jobs('second')[0]
    assert second_job.spec.suspend is True and second_job.metadata.labels[QUEUE_LABEL] == QUEUE
    usage = wait_for(
        lambda: (s := _cluster_queue(cluster).get('status') or {}).get('pendingWorkloads') == 1 and s,
        10,
        what='the ClusterQueue counting one pending workload',
    )
    assert usage['admittedWorkloads'] == 1
    assert {'name': 'nvidia.com/gpu', 'total': '1'} in usage['flavorsUsage'][0]['resources']
    assert target(cluster).run_body('first')['status']['phase'] in ('CREATED', 'STARTED')

    # The first run's end gives the quota back: the second is admitted, with the flavor's node labels.
    for run in ('first', 'second'):
        assert target(cluster, 60).wait_phase(run, ('FINISHED', 'FAILED'))['phase'] == 'FINISHED', run
    assert kueue.admitted == [f'{NS}/first-trainer', f'{NS}/second-trainer']
    for run in ('first', 'second'):
        job = target(cluster).jobs(run)[0]
        assert job.spec.template.spec.node_selector == POOL
    assert most_active_at_once(cluster, 'batch/v1/jobs', job_active) == 1
    for run in ('first', 'second'):
        finished = wait_for(lambda run=run: 'Finished' in _conditions(_workload(cluster, run)), 10, what='Finished')
        assert finished and _conditions(_workload(cluster, run))['Finished'] == (
            'True',
            'Succeeded',
            'Job finished successfully',
        )
    final = wait_for(
        lambda: (s := _cluster_queue(cluster).get('status') or {}).get('admittedWorkloads') == 0 and s,
        10,
        what='the quota given back',
    )
    assert final['pendingWorkloads'] == 0


@pytest.mark.operator_config(queue=QUEUE)
@pytest.mark.node(command=STAND_IN, labels=POOL)
def test_a_run_larger_than_the_quota_stays_queued_until_the_quota_grows(cluster: Cluster, kueue: KueueStandIn) -> None:
    submit(cluster, 'big', seconds=0.3, resources={'gpus': 2})
    why = 'insufficient quota for nvidia.com/gpu in flavor finetuner, request > maximum capacity (2 > 1)'
    details = f"Waiting in queue {QUEUE}: couldn't assign flavors to pod set main: {why}"
    wait_for(lambda: _queued(cluster, 'big', details), 30, 0.05, what="Kueue's reason in the status")
    wait_for(lambda: (_cluster_queue(cluster).get('status') or {}).get('pendingWorkloads') == 1, 10, what='pending')
    for _ in range(10):  # a few admission passes: still nothing fits
        kueue.step()
    assert _queued(cluster, 'big') is not None and target(cluster).pods('big') == []

    quota = _cluster_queue(cluster)['spec']
    quota['resourceGroups'][0]['flavors'][0]['resources'][2]['nominalQuota'] = 2
    client.CustomObjectsApi(cluster.api).patch_cluster_custom_object(
        GROUP, VERSION, 'clusterqueues', CLUSTER_QUEUE, {'spec': quota}
    )

    assert target(cluster).wait_phase('big', ('FINISHED', 'FAILED'))['phase'] == 'FINISHED'
    assert kueue.admitted == [f'{NS}/big-trainer']


@pytest.mark.operator_config(queue=QUEUE)
@pytest.mark.node(command=STAND_IN, labels=POOL)
def test_a_resource_the_cluster_queue_does_not_cover_is_named(cluster: Cluster, kueue: KueueStandIn) -> None:
    """The trainer requests ephemeral-storage: a ClusterQueue that does not cover it never admits the run
    (docs/OPERATOR.md), and the status says so in Kueue's words."""
    quota = _cluster_queue(cluster)['spec']
    group = quota['resourceGroups'][0]
    group['coveredResources'].remove('ephemeral-storage')
    flavor = group['flavors'][0]
    flavor['resources'] = [r for r in flavor['resources'] if r['name'] != 'ephemeral-storage']
    client.CustomObjectsApi(cluster.api).patch_cluster_custom_object(
        GROUP, VERSION, 'clusterqueues', CLUSTER_QUEUE, {'spec': quota}
    )
    submit(cluster, 'uncovered', seconds=0.3, resources={'gpus': 1})
    details = (
        f"Waiting in queue {QUEUE}: couldn't assign flavors to pod set main: resource ephemeral-storage unavailable "
        'in ClusterQueue'
    )
    wait_for(lambda: _queued(cluster, 'uncovered', details), 30, 0.05, what="Kueue's reason in the status")
    assert kueue.admitted == [] and target(cluster).pods('uncovered') == []


@pytest.mark.node(command=STAND_IN, labels=POOL)
def test_a_run_in_a_queue_that_does_not_exist_stays_queued(cluster: Cluster, kueue: KueueStandIn) -> None:
    submit(cluster, 'lost', seconds=0.3, queueName='no-such-queue')
    details = "Waiting in queue no-such-queue: LocalQueue no-such-queue doesn't exist"
    wait_for(lambda: _queued(cluster, 'lost', details), 30, 0.05, what="Kueue's reason in the status")
    assert _conditions(_workload(cluster, 'lost')) == {
        'QuotaReserved': ('False', 'Inadmissible', "LocalQueue no-such-queue doesn't exist")
    }
    for _ in range(5):
        kueue.step()
    assert kueue.admitted == [] and target(cluster).pods('lost') == []


def test_the_queues_are_those_the_chart_creates() -> None:
    helm = pytest.importorskip('tests.helm.chart_support', reason='helm-python-sdk renders the chart')
    import yaml

    values = {'kueue': {'queueName': QUEUE, 'createQueues': True, 'quota': {'gpus': 1}}, 'namespaces': [NS]}
    values['trainer'] = {'nodeSelector': POOL}
    rendered = helm.render(values)
    objects = [d for d in yaml.safe_load_all(rendered['finetuner/templates/kueue.yaml']) if d]
    ours = {body['kind']: body for _, body in queues(gpus=1)}
    assert sorted(o['kind'] for o in objects) == sorted(ours)
    for obj in objects:
        assert obj['spec'] == ours[obj['kind']]['spec'], obj['kind']
        if obj['kind'] == 'LocalQueue':
            assert (obj['metadata']['name'], obj['metadata']['namespace']) == (QUEUE, NS)
