"""The SDK's kubernetes backend against the emulated API server: records, errors, logs, outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetuner.api.v1alpha1 import ExperimentSpec, FinetuneRunSpec
from finetuner.backends.kubernetes import KubernetesBackend
from finetuner.errors import ArgumentError, BackendError, ExperimentNotFoundError, RunNotFinishedError, RunNotFoundError
from tests.cluster.harness import ApiServer, free_port, write_kubeconfig
from tests.cluster.s3 import S3Server

SPEC = FinetuneRunSpec(model='timm:test_resnet', train_data='s3://b/d.jsonl')


@pytest.fixture
def backend(api_server: tuple[ApiServer, Path]) -> KubernetesBackend:
    _, kubeconfig = api_server
    return KubernetesBackend(kubeconfig=str(kubeconfig), data='s3://data-bucket/team')


def test_runs_round_trip_through_the_contract(backend: KubernetesBackend) -> None:
    record = backend.create_run('one', SPEC.model_copy(update={'experiment': 'exp-a'}))
    assert (record.name, record.namespace, record.spec.model) == ('one', 'default', 'timm:test_resnet')
    assert record.created_at
    backend.create_run('two', SPEC)
    assert [r.name for r in backend.list_runs()] == ['one', 'two']
    assert [r.name for r in backend.list_runs(experiment='exp-a')] == ['one']
    assert {e.name for e in backend.list_experiments()} == {'default', 'exp-a'}  # get-or-create on submit
    body = client.CustomObjectsApi(backend.api_client).get_namespaced_custom_object(
        'finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', 'one'
    )
    assert body['metadata']['labels']['finetuner.dev/experiment'] == 'exp-a'
    assert body['spec']['trainData'] == 's3://b/d.jsonl'  # camelCase on the wire


def test_errors_are_domain_errors_naming_the_problem(backend: KubernetesBackend) -> None:
    backend.create_run('dup', SPEC)
    with pytest.raises(ArgumentError, match="run_name: a run named 'dup' already exists"):
        backend.create_run('dup', SPEC)
    with pytest.raises(RunNotFoundError, match="run 'nope' not found in namespace 'default'"):
        backend.get_run('nope')
    with pytest.raises(ExperimentNotFoundError, match="experiment 'nope' not found"):
        backend.get_experiment('nope')
    with pytest.raises(RunNotFinishedError, match="run 'dup' has no output location yet"):
        backend.output_store('dup')
    with pytest.raises(RunNotFinishedError, match="run 'dup' has not started yet"):
        backend.logs('dup')


def test_unreachable_cluster_and_missing_kubeconfig_are_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r'cannot load the Kubernetes configuration from .*missing'):
        KubernetesBackend(kubeconfig=str(tmp_path / 'missing'))
    dead = write_kubeconfig(f'http://127.0.0.1:{free_port()}', tmp_path / 'dead')
    backend = KubernetesBackend(kubeconfig=str(dead))
    backend.api_client.configuration.retries = 0
    with pytest.raises(BackendError, match='cannot reach the Kubernetes API'):
        backend.list_runs()


def test_namespace_comes_from_the_kubeconfig_context(api_server: tuple[ApiServer, Path], tmp_path: Path) -> None:
    server, _ = api_server
    kubeconfig = write_kubeconfig(server.url, tmp_path / 'team', namespace='team-a')
    assert KubernetesBackend(kubeconfig=str(kubeconfig)).namespace == 'team-a'
    assert KubernetesBackend(kubeconfig=str(kubeconfig), namespace='other').namespace == 'other'


def test_cancel_marks_the_run_and_experiment_spec_is_kept(backend: KubernetesBackend) -> None:
    backend.create_run('c', SPEC)
    backend.cancel_run('c')
    body = client.CustomObjectsApi(backend.api_client).get_namespaced_custom_object(
        'finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', 'c'
    )
    assert body['metadata']['annotations'] == {'run.finetuner.dev/cancel': 'true'}
    record = backend.create_experiment('described', ExperimentSpec(description='lr sweep'))
    assert backend.get_experiment('described').spec.description == record.spec.description == 'lr sweep'


def test_logs_come_from_the_pod_then_from_the_stored_copy(
    backend: KubernetesBackend, api_server: tuple[ApiServer, Path], s3: S3Server
) -> None:
    server, _ = api_server
    backend.create_run('logged', SPEC)
    core = client.CoreV1Api(backend.api_client)
    core.create_namespaced_pod(
        'default',
        {
            'metadata': {'name': 'logged-trainer-x', 'labels': {'finetuner.dev/run': 'logged'}},
            'spec': {'containers': [{'name': 'trainer', 'image': 'i'}]},
        },
    )
    server.emu.log_source = lambda ns, name: 'epoch 1 loss 0.5\nepoch 2 loss 0.4\n'
    assert backend.logs('logged') == 'epoch 1 loss 0.5\nepoch 2 loss 0.4\n'

    output = f's3://{s3.bucket}/runs/default/logged'
    s3.client().put_object(Bucket=s3.bucket, Key='runs/default/logged/logs/train.log', Body=b'stored log\n')
    status = {'phase': 'FINISHED', 'outputUri': output, 'details': 'done'}
    client.CustomObjectsApi(backend.api_client).patch_namespaced_custom_object_status(
        'finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', 'logged', {'status': status}
    )
    core.delete_namespaced_pod('logged-trainer-x', 'default')
    assert backend.logs('logged') == 'stored log\n'
    assert list(backend.stream_logs('logged')) == ['stored log']
    assert backend.output_store('logged').uri == output

    backend.delete_run('logged')
    assert s3.keys('runs/default/logged') == []
    with pytest.raises(RunNotFoundError):
        backend.get_run('logged')


def test_data_store_is_the_configured_prefix(backend: KubernetesBackend) -> None:
    store: Any = backend.data_store()
    assert store.uri == 's3://data-bucket/team'


def _event(name: str, kind: str, involved: str, reason: str, when: str, kind_of: str = 'Normal') -> dict[str, Any]:
    return {
        'metadata': {'name': name},
        'involvedObject': {'kind': kind, 'name': involved, 'namespace': 'default'},
        'reason': reason,
        'message': f'{reason} {involved}',
        'type': kind_of,
        'source': {'component': 'test'},
        'lastTimestamp': when,
        'count': 1,
    }


def test_run_events_are_those_of_the_run_its_job_and_its_pods_oldest_first(backend: KubernetesBackend) -> None:
    from finetuner.run import Run

    backend.create_run('evented', SPEC)
    backend.create_run('other', SPEC)
    core = client.CoreV1Api(backend.api_client)
    core.create_namespaced_pod(
        'default',
        {
            'metadata': {'name': 'evented-trainer-abc', 'labels': {'finetuner.dev/run': 'evented'}},
            'spec': {'containers': [{'name': 'trainer', 'image': 'i'}]},
        },
    )
    client.CustomObjectsApi(backend.api_client).patch_namespaced_custom_object_status(
        'finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', 'evented', {'status': {'jobName': 'evented-trainer'}}
    )
    for event in (
        _event('e3', 'Pod', 'evented-trainer-abc', 'Pulled', '2026-12-05T10:00:03Z'),
        _event('e1', 'FinetuneRun', 'evented', 'Created', '2026-12-05T10:00:01Z'),
        _event('e2', 'Job', 'evented-trainer', 'SuccessfulCreate', '2026-12-05T10:00:02Z'),
        _event('e4', 'FinetuneRun', 'evented', 'Failed', '2026-12-05T10:00:04Z', 'Warning'),
        _event('x1', 'FinetuneRun', 'other', 'Created', '2026-12-05T10:00:00Z'),
    ):
        core.create_namespaced_event('default', event)

    events = Run(backend.get_run('evented'), backend).events()
    assert [(e.object, e.reason, e.type) for e in events] == [
        ('FinetuneRun/evented', 'Created', 'Normal'),
        ('Job/evented-trainer', 'SuccessfulCreate', 'Normal'),
        ('Pod/evented-trainer-abc', 'Pulled', 'Normal'),
        ('FinetuneRun/evented', 'Failed', 'Warning'),
    ]
    assert events[0].time == '2026-12-05T10:00:01Z' and events[0].message == 'Created evented'
    assert events[0].source == 'test'


def test_run_events_refused_or_unreachable_say_what_is_missing(
    backend: KubernetesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import MaxRetryError

    from finetuner.run import Run

    run = Run(backend.create_run('guarded', SPEC), backend)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ApiException(status=403, reason='Forbidden')

    monkeypatch.setattr(backend.core, 'list_namespaced_pod', refuse)
    with pytest.raises(BackendError) as caught:
        run.events()
    assert str(caught.value) == (
        "the cluster refused to list Events or pods in namespace 'default' (403 Forbidden); reading a run's Events "
        '(run.events(), finetuner events, the console) needs list on events and pods there'
    )

    def unreachable(*args: object, **kwargs: object) -> None:
        raise MaxRetryError(None, '/api/v1/namespaces/default/pods', 'connection refused')  # type: ignore[arg-type]

    monkeypatch.setattr(backend.core, 'list_namespaced_pod', unreachable)
    with pytest.raises(BackendError, match='cannot reach the Kubernetes API to list Events: '):
        run.events()
