"""Experiments, sweeps, suspend, cancel and invalid specs through the API (no training needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

import finetuner
from finetuner.api.v1alpha1 import ExperimentSpec, FinetuneRunSpec, Sweep
from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.e2e.targets import Target

G, V, NS = 'finetuner.dev', 'v1alpha1', 'default'


def _target(cluster: Cluster) -> Target:
    return Target('simulated', cluster.api, NS, cluster.bucket, timeout=60.0)


def _objects(cluster: Cluster, key: str) -> list[str]:
    return sorted(o['metadata']['name'] for o in cluster.server.objects(key))


def test_sweep_runs_join_the_experiment_and_go_with_it(cluster: Cluster) -> None:
    cluster.node.pause(True)
    backend = _target(cluster).login()
    template = {'model': 'timm:test_resnet', 'trainData': 's3://b/d.jsonl', 'device': 'cpu'}
    spec = ExperimentSpec(run_template=template, sweep=Sweep(parameters={'epochs': [1, 2, 3]}, parallelism=2))
    backend.create_experiment('sweep', spec)

    def counted() -> Any:
        status = backend.get_experiment('sweep').status
        return status.runs.total == 2 and status.runs.created == 2 and status

    status = wait_for(counted, what='two sweep runs counted')
    assert status.sweep_created == 2
    runs = backend.list_runs(experiment='sweep')
    assert [r.name for r in runs] == ['sweep-000', 'sweep-001']
    assert [r.spec.epochs for r in runs] == [1, 2]
    wait_for(lambda: _objects(cluster, 'batch/v1/jobs') == ['sweep-000-trainer', 'sweep-001-trainer'], what='jobs')

    finetuner.delete_experiment('sweep')

    wait_for(lambda: not _objects(cluster, f'{G}/{V}/finetuneruns'), what='runs deleted with their experiment')
    wait_for(lambda: not _objects(cluster, 'batch/v1/jobs'), what='jobs garbage-collected')
    assert _objects(cluster, 'v1/configmaps') == []


def test_suspend_and_resume_then_cancel(cluster: Cluster) -> None:
    cluster.node.pause(True)
    backend = _target(cluster).login()
    spec = FinetuneRunSpec(model='timm:test_resnet', train_data='s3://b/d.jsonl', suspend=True)
    backend.create_run('held', spec)
    target = _target(cluster)
    status = wait_for(lambda: (s := backend.get_run('held').status).reason == 'Suspended' and s, what='suspended')
    assert status.phase == 'CREATED' and 'spec.suspend' in (status.details or '')
    batch = client.BatchV1Api(cluster.api)
    assert batch.read_namespaced_job('held-trainer', NS).spec.suspend is True

    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object(
        G, V, NS, 'finetuneruns', 'held', {'spec': {'suspend': False}}
    )
    wait_for(lambda: batch.read_namespaced_job('held-trainer', NS).spec.suspend is False, what='job resumed')

    finetuner.get_run('held').cancel()
    final = target.wait_phase('held', ('FAILED',))
    assert (final['reason'], final['details']) == ('Cancelled', 'Run cancelled by user')
    wait_for(lambda: not target.jobs('held'), what='job of the cancelled run deleted')


def test_an_ended_run_is_final_spec_edits_and_control_change_nothing(cluster: Cluster) -> None:
    """A FINISHED or FAILED run is final: the API server refuses training-spec edits, and the operator
    passes over the edits it admits (suspend, description, the cancel annotation): they neither re-create
    its Job nor rewrite its status (docs/OPERATOR.md, "Suspend and cancel"); the SDK's controls return
    without writing."""
    cluster.node.pause(True)
    backend = _target(cluster).login()
    target = _target(cluster)
    backend.create_run('done', FinetuneRunSpec(model='timm:test_resnet', train_data='s3://b/d.jsonl'))
    wait_for(lambda: target.jobs('done'), what="the run's Job")
    finetuner.get_run('done').cancel()
    final = target.wait_phase('done', ('FAILED',))
    wait_for(lambda: not target.jobs('done'), what='job of the cancelled run deleted')

    custom = client.CustomObjectsApi(cluster.api)
    with pytest.raises(client.exceptions.ApiException) as refused:
        custom.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'done', {'spec': {'epochs': 3}})
    assert refused.value.status == 422
    assert 'only spec.suspend and spec.description may change; create a new run' in refused.value.body
    edit = {'spec': {'suspend': True, 'description': 'edited after it ended'}}
    edit['metadata'] = {'annotations': {'run.finetuner.dev/cancel': 'true'}}
    edited = custom.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'done', edit)
    run = finetuner.get_run('done')
    run.resume()
    run.suspend()
    run.cancel()
    backend.create_run('probe', FinetuneRunSpec(model='timm:test_resnet', train_data='s3://b/d.jsonl'))
    wait_for(lambda: target.jobs('probe'), what="a later run's Job (the operator has passed the edits)")

    body = target.run_body('done')
    assert body['status'] == final
    assert body['metadata']['resourceVersion'] == edited['metadata']['resourceVersion']
    assert target.jobs('done') == []
    assert run.status()['status'] == 'FAILED'


def test_invalid_spec_fails_with_the_field_named_and_no_job(cluster: Cluster) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    body = {
        'apiVersion': f'{G}/{V}',
        'kind': 'FinetuneRun',
        'metadata': {'name': 'broken'},
        'spec': {'model': 'm', 'trainData': 'd', 'optimizer': 'adamw', 'epochs': 0},
    }
    with pytest.raises(client.exceptions.ApiException) as refused:  # the CRD's schema judges these itself
        custom.create_namespaced_custom_object(G, V, NS, 'finetuneruns', body)
    assert refused.value.status == 422
    assert {c['field'] for c in json.loads(refused.value.body)['details']['causes']} >= {
        'spec.optimizer',
        'spec.epochs',
    }

    body['spec'] = {'model': 'm', 'trainData': 'https://h/d.jsonl'}  # only the operator knows the schemes it reads
    custom.create_namespaced_custom_object(G, V, NS, 'finetuneruns', body)
    target = _target(cluster)
    status = target.wait_phase('broken', ('FAILED',))
    assert status['reason'] == 'InvalidSpec'
    assert "spec.trainData: 'https://h/d.jsonl'" in status['details']
    assert target.jobs('broken') == []
    assert [e.reason for e in target.events('broken')].count('InvalidSpec') == 1


@pytest.mark.node(unpullable=('registry.invalid/trainer:missing',))
@pytest.mark.operator_config(image_pull_timeout=3.0)
def test_image_pull_error_fails_the_run_and_removes_its_job(cluster: Cluster) -> None:
    """The kubelet retries a pull (a registry hiccup): CREATED while it may, then FAILED (image pull timeout)."""
    backend = _target(cluster).login()
    spec = FinetuneRunSpec(model='m', train_data='s3://b/d.jsonl', image='registry.invalid/trainer:missing')
    backend.create_run('nopull', spec)
    target = _target(cluster)
    waiting = wait_for(
        lambda: (s := target.run_body('nopull').get('status') or {}).get('reason') == 'ImagePullError' and s,
        what='image pull error reported',
    )
    if waiting['phase'] == 'CREATED':
        assert 'the kubelet retries for up to' in waiting['details']
    status = target.wait_phase('nopull', ('FAILED',))
    assert status['reason'] == 'ImagePullError'
    assert 'Cannot pull the trainer image registry.invalid/trainer:missing' in status['details']
    wait_for(lambda: not target.jobs('nopull'), what='job of the failed run deleted')


@pytest.mark.operator_config(unschedulable_timeout=1.0)
def test_unschedulable_for_too_long_fails_the_run(cluster: Cluster) -> None:
    backend = _target(cluster).login()
    spec = FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 's3://b/d.jsonl', 'resources': {'gpus': 8}})
    backend.create_run('toobig', spec)
    target = _target(cluster)
    status = target.wait_phase('toobig', ('FAILED',))
    assert status['reason'] == 'Unschedulable'
    assert 'Insufficient nvidia.com/gpu' in status['details'] and 'lower spec.resources' in status['details']


def test_deleting_a_run_removes_its_job_pods_and_config(cluster: Cluster) -> None:
    backend = _target(cluster).login()
    spec = FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 's3://b/d.jsonl', 'resources': {'gpus': 8}})
    backend.create_run('doomed', spec)  # its pod waits for GPUs the node does not have
    target = _target(cluster)
    wait_for(lambda: target.pods('doomed'), what='pending trainer pod')
    assert _objects(cluster, 'v1/configmaps') == ['doomed-config']

    finetuner.delete_run('doomed')

    wait_for(lambda: not target.pods('doomed') and not target.jobs('doomed'), what='job and pods collected')
    assert _objects(cluster, 'v1/configmaps') == []
