"""The realism layer's own tests: each gap of kmock listed in TESTING-NOTES.md, closed."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.cluster.fixtures import api_client
from tests.cluster.harness import ApiServer, wait_for

G, V, NS = 'finetuner.dev', 'v1alpha1', 'default'


@pytest.fixture
def api(api_server: tuple[ApiServer, Path]) -> Any:
    _, kubeconfig = api_server
    api = api_client(kubeconfig)
    yield api
    api.close()


def run(name: str, **spec: Any) -> dict[str, Any]:
    return {
        'apiVersion': f'{G}/{V}',
        'kind': 'FinetuneRun',
        'metadata': {'name': name, 'labels': {'team': 'a'}},
        'spec': {'model': 'm', 'trainData': 'd', **spec},
    }


def cm(name: str, owner: dict[str, Any] | None = None, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {'name': name, 'labels': labels}
    if owner is not None:
        meta['ownerReferences'] = [
            {
                'apiVersion': owner['apiVersion'],
                'kind': owner['kind'],
                'name': owner['metadata']['name'],
                'uid': owner['metadata']['uid'],
                'blockOwnerDeletion': True,
            }
        ]
    return {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': meta, 'data': {'k': 'v'}}


def status_code(call: Any) -> int:
    with pytest.raises(ApiException) as info:
        call()
    return info.value.status


def test_create_fills_server_side_metadata_and_answers_201(api: Any) -> None:
    co = client.CustomObjectsApi(api)
    _, code, _ = co.create_namespaced_custom_object_with_http_info(G, V, NS, 'finetuneruns', run('a'))
    assert code == 201
    body = co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a')
    meta = body['metadata']
    assert meta['uid'] and meta['resourceVersion'] and meta['creationTimestamp']
    assert meta['generation'] == 1 and meta['namespace'] == NS
    generated = client.CoreV1Api(api).create_namespaced_config_map(
        NS, {'metadata': {'generateName': 'gen-'}, 'data': {}}
    )
    assert generated.metadata.name.startswith('gen-') and len(generated.metadata.name) == 9


def test_conflicts_missing_objects_and_invalid_names(api: Any) -> None:
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('a'))
    assert status_code(lambda: co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('a'))) == 409
    assert status_code(lambda: co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'nope')) == 404
    assert status_code(lambda: co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('Bad_Name'))) == 422
    stale = {'metadata': {'resourceVersion': '1'}, 'spec': {'epochs': 2}}
    assert status_code(lambda: co.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a', stale)) == 409


def test_failed_json_patch_test_is_422(api: Any) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(NS, cm('c'))
    patch = [{'op': 'test', 'path': '/data/k', 'value': 'other'}, {'op': 'replace', 'path': '/data/k', 'value': 'x'}]
    assert status_code(lambda: core.patch_namespaced_config_map('c', NS, patch)) == 422
    ok = [{'op': 'test', 'path': '/data/k', 'value': 'v'}, {'op': 'replace', 'path': '/data/k', 'value': 'x'}]
    assert core.patch_namespaced_config_map('c', NS, ok).data == {'k': 'x'}


def test_generation_moves_on_spec_changes_only(api: Any) -> None:
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('a'))
    rv1 = co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a')['metadata']['resourceVersion']
    co.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a', {'metadata': {'labels': {'x': 'y'}}})
    body = co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a')
    assert body['metadata']['generation'] == 1 and body['metadata']['resourceVersion'] != rv1
    co.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a', {'spec': {'epochs': 3}})
    assert co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a')['metadata']['generation'] == 2


def test_status_subresource_is_isolated_both_ways(api: Any) -> None:
    co = client.CustomObjectsApi(api)
    created = co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', {**run('a'), 'status': {'phase': 'X'}})
    assert 'status' not in created
    co.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a', {'status': {'phase': 'FINISHED'}})
    assert 'status' not in co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a')
    co.patch_namespaced_custom_object_status(
        G, V, NS, 'finetuneruns', 'a', {'status': {'phase': 'STARTED'}, 'metadata': {'labels': {'hacked': 'y'}}}
    )
    body = co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'a')
    assert body['status'] == {'phase': 'STARTED'}
    assert 'hacked' not in body['metadata']['labels'] and body['metadata']['generation'] == 1


def test_lists_have_kind_and_honour_label_and_field_selectors(api: Any) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(NS, cm('one', app='x', tier='a'))
    core.create_namespaced_config_map(NS, cm('two', app='x', tier='b'))
    core.create_namespaced_config_map(NS, cm('three', app='y'))
    raw = json.loads(core.list_namespaced_config_map(NS, _preload_content=False).data)
    assert (raw['kind'], raw['apiVersion']) == ('ConfigMapList', 'v1') and raw['metadata']['resourceVersion']

    def names(**kwargs: Any) -> list[str]:
        return sorted(i.metadata.name for i in core.list_namespaced_config_map(NS, **kwargs).items)

    assert names(label_selector='app=x') == ['one', 'two']
    assert names(label_selector='app=x,tier!=a') == ['two']
    assert names(label_selector='tier in (a,b)') == ['one', 'two']
    assert names(label_selector='!tier') == ['three']
    assert names(field_selector='metadata.name=two') == ['two']
    assert names(label_selector='app notin (x)') == ['three']


def test_watch_filters_by_selector_and_resumes_from_a_resource_version(api: Any) -> None:
    core = client.CoreV1Api(api)
    start = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, cm('in', app='x'))
    core.create_namespaced_config_map(NS, cm('out', app='y'))
    core.patch_namespaced_config_map('in', NS, {'metadata': {'labels': {'app': 'z'}}})  # leaves the selector
    events = []
    for event in watch.Watch().stream(
        core.list_namespaced_config_map, NS, label_selector='app=x', resource_version=start, timeout_seconds=1
    ):
        events.append((event['type'], event['object'].metadata.name))
    assert events == [('ADDED', 'in'), ('DELETED', 'in')]


def test_garbage_collection_background_foreground_and_orphan(api: Any) -> None:
    core, co = client.CoreV1Api(api), client.CustomObjectsApi(api)
    owner = co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('owner'))
    core.create_namespaced_config_map(NS, cm('child', owner))
    co.delete_namespaced_custom_object(G, V, NS, 'finetuneruns', 'owner')
    assert core.list_namespaced_config_map(NS).items == []

    owner = co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('owner2'))
    core.create_namespaced_config_map(NS, cm('child2', owner))
    co.delete_namespaced_custom_object(G, V, NS, 'finetuneruns', 'owner2', propagation_policy='Foreground')
    assert core.list_namespaced_config_map(NS).items == []
    assert co.list_namespaced_custom_object(G, V, NS, 'finetuneruns')['items'] == []

    batch = client.BatchV1Api(api)
    job = batch.create_namespaced_job(
        NS,
        {
            'metadata': {'name': 'j'},
            'spec': {'template': {'spec': {'restartPolicy': 'Never', 'containers': [{'name': 'c', 'image': 'i'}]}}},
        },
    )
    job_owner = {'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': {'name': 'j', 'uid': job.metadata.uid}}
    core.create_namespaced_config_map(NS, cm('orphan', job_owner))
    batch.delete_namespaced_job('j', NS)  # the API's default for Jobs: orphan the dependents
    left = core.read_namespaced_config_map('orphan', NS)
    assert not left.metadata.owner_references


def test_garbage_collection_of_chains_without_scanning_the_store(
    api_server: tuple[ApiServer, Path], api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run -> Job -> pod chains are collected in the background and in the foreground, and a child
    created after its owner was deleted is collected too, all without a scan of every stored object
    (which made every write O(stored objects) and a burst of runs O(n^2))."""
    server, _ = api_server
    monkeypatch.setattr(server.emu, '_all', lambda: pytest.fail('garbage collection scanned the whole store'))
    core, co, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)

    def chain(name: str) -> None:
        owner = co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run(name))
        job_body = {
            'metadata': {'name': f'{name}-job', 'ownerReferences': cm('x', owner)['metadata']['ownerReferences']},
            'spec': {'template': {'spec': {'restartPolicy': 'Never', 'containers': [{'name': 'c', 'image': 'i'}]}}},
        }
        job = batch.create_namespaced_job(NS, job_body)
        job_owner = {'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': {'name': job.metadata.name}}
        job_owner['metadata']['uid'] = job.metadata.uid
        core.create_namespaced_config_map(NS, cm(f'{name}-leaf', job_owner))

    for name, policy in (('bg', 'Background'), ('fg', 'Foreground')):
        chain(name)
        co.delete_namespaced_custom_object(G, V, NS, 'finetuneruns', name, propagation_policy=policy)
        assert core.list_namespaced_config_map(NS).items == [], policy
        assert batch.list_namespaced_job(NS).items == [], policy
        assert co.list_namespaced_custom_object(G, V, NS, 'finetuneruns')['items'] == [], policy

    gone = co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('gone'))
    co.delete_namespaced_custom_object(G, V, NS, 'finetuneruns', 'gone')
    core.create_namespaced_config_map(NS, cm('late', gone))  # answered 201, then collected
    assert core.list_namespaced_config_map(NS).items == []


def test_finalizers_hold_deletion_until_removed(api: Any) -> None:
    co = client.CustomObjectsApi(api)
    body = run('held')
    body['metadata']['finalizers'] = ['finetuner.dev/test']
    co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', body)
    co.delete_namespaced_custom_object(G, V, NS, 'finetuneruns', 'held')
    held = co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'held')
    assert held['metadata']['deletionTimestamp']
    co.patch_namespaced_custom_object(G, V, NS, 'finetuneruns', 'held', {'metadata': {'finalizers': None}})
    assert status_code(lambda: co.get_namespaced_custom_object(G, V, NS, 'finetuneruns', 'held')) == 404


def test_pod_log_is_plain_text_from_the_log_source(api_server: tuple[ApiServer, Path], api: Any) -> None:
    server, _ = api_server
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(NS, {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'c', 'image': 'i'}]}})
    server.emu.log_source = lambda ns, name: f'{ns}/{name}: step 1 loss 0.9\n'
    response = core.read_namespaced_pod_log('p', NS, _preload_content=False)
    assert response.headers['Content-Type'].startswith('text/plain')
    assert response.data.decode() == 'default/p: step 1 loss 0.9\n'


def test_watch_stream_delivers_live_events(api_server: tuple[ApiServer, Path], api: Any) -> None:
    server, _ = api_server
    opened = server.call(lambda: server.emu.watch_starts.get('v1/configmaps', 0))
    core = client.CoreV1Api(api)
    seen: list[str] = []
    stream = watch.Watch()

    def consume() -> None:
        for event in stream.stream(core.list_namespaced_config_map, NS, timeout_seconds=3):
            seen.append(f'{event["type"]} {event["object"].metadata.name}')
            if len(seen) == 2:
                stream.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    # A watch without a resourceVersion starts now: create only once it is open, or both events are missed.
    wait_for(lambda: server.call(lambda: server.emu.watch_starts.get('v1/configmaps', 0)) > opened, what='watch open')
    core.create_namespaced_config_map(NS, cm('live'))
    core.delete_namespaced_config_map('live', NS)
    thread.join(10)
    assert seen == ['ADDED live', 'DELETED live']


def test_kubectl_get_finetuneruns_by_short_name(api_server: tuple[ApiServer, Path], api: Any) -> None:
    _, kubeconfig = api_server
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(G, V, NS, 'finetuneruns', run('shown'))
    co.patch_namespaced_custom_object_status(G, V, NS, 'finetuneruns', 'shown', {'status': {'phase': 'STARTED'}})
    result = subprocess.run(
        ['kubectl', '--kubeconfig', str(kubeconfig), 'get', 'ftr'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert 'PHASE' in result.stdout and 'shown' in result.stdout and 'STARTED' in result.stdout


def test_put_replaces_with_optimistic_concurrency_and_namespaces_must_agree(api: Any) -> None:
    core = client.CoreV1Api(api)
    created = core.create_namespaced_config_map(NS, cm('r'))
    body = core.read_namespaced_config_map('r', NS)
    body.data = {'k': 'new'}
    replaced = core.replace_namespaced_config_map('r', NS, body)
    assert replaced.data == {'k': 'new'}
    assert replaced.metadata.uid == created.metadata.uid
    body.data = {'k': 'stale'}  # still carries the old resourceVersion
    assert status_code(lambda: core.replace_namespaced_config_map('r', NS, body)) == 409
    other = cm('elsewhere')
    other['metadata']['namespace'] = 'kube-system'
    assert status_code(lambda: core.create_namespaced_config_map(NS, other)) == 400
