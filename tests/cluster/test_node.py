"""The simulated node as Job controller and kubelet, driven only through the API (no operator)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.fixtures import api_client
from tests.cluster.harness import ApiServer, wait_for
from tests.cluster.node import SimulatedNode

NS = 'default'
TERMINATION = {'name': 'TERM_LOG', 'value': '/dev/termination-log'}


@pytest.fixture
def node(api_server: tuple[ApiServer, Path], tmp_path: Path) -> Iterator[tuple[Any, SimulatedNode]]:
    server, kubeconfig = api_server
    api = api_client(kubeconfig)
    sim = SimulatedNode(api_client(kubeconfig), tmp_path / 'node', gpus=2, unpullable=('missing:1',))
    server.emu.log_source = sim.read_log
    sim.start()
    yield api, sim
    sim.stop()
    api.close()
    assert not sim.errors, sim.errors


def job(name: str, script: str, *, env: list[dict] | None = None, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        'name': 'trainer',
        'image': spec.pop('image', 'python:3'),
        'command': ['python', '-c', script],
        'env': [TERMINATION, *(env or [])],
        'terminationMessagePath': '/dev/termination-log',
    }
    if 'gpus' in spec:
        container['resources'] = {'limits': {'nvidia.com/gpu': str(spec.pop('gpus'))}}
    for key in ('args', 'volumeMounts'):
        if key in spec:
            container[key] = spec.pop(key)
    pod_spec: dict[str, Any] = {'restartPolicy': 'Never', 'containers': [container]}
    if 'volumes' in spec:
        pod_spec['volumes'] = spec.pop('volumes')
    return {
        'apiVersion': 'batch/v1',
        'kind': 'Job',
        'metadata': {'name': name},
        'spec': {'backoffLimit': 0, 'template': {'metadata': {'labels': {'job': name}}, 'spec': pod_spec}, **spec},
    }


def create(api: Any, body: dict[str, Any]) -> None:
    client.BatchV1Api(api).create_namespaced_job(NS, body)


def pods(api: Any, name: str) -> list[Any]:
    return client.CoreV1Api(api).list_namespaced_pod(NS, label_selector=f'job={name}').items


def condition(api: Any, name: str) -> tuple[str, str] | None:
    status = client.BatchV1Api(api).read_namespaced_job(name, NS).status
    for c in (status and status.conditions) or []:
        if c.type in ('Complete', 'Failed') and c.status == 'True':
            return c.type, c.reason
    return None


WRITE_REASON_AND_EXIT = "import os, sys; open(os.environ['TERM_LOG'], 'w').write('trainData: empty'); sys.exit({code})"
FAIL_JOB_ON_3 = {
    'rules': [
        {'action': 'FailJob', 'onExitCodes': {'containerName': 'trainer', 'operator': 'In', 'values': [3]}},
        {'action': 'Ignore', 'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]},
    ]
}


def test_successful_job_completes_and_serves_its_log(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    create(api, job('ok', "print('hello from the pod')"))
    assert wait_for(lambda: condition(api, 'ok'), what='job ok done') == ('Complete', 'CompletionsReached')
    (pod,) = pods(api, 'ok')
    assert pod.status.phase == 'Succeeded'
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert pod.metadata.owner_references[0].kind == 'Job'
    assert client.CoreV1Api(api).read_namespaced_pod_log(pod.metadata.name, NS) == 'hello from the pod\n'
    assert client.BatchV1Api(api).read_namespaced_job('ok', NS).status.succeeded == 1


def test_exit_code_3_fails_the_job_at_once_with_the_termination_message(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    create(api, job('cfg', WRITE_REASON_AND_EXIT.format(code=3), backoffLimit=4, podFailurePolicy=FAIL_JOB_ON_3))
    assert wait_for(lambda: condition(api, 'cfg'), what='job cfg done') == ('Failed', 'PodFailurePolicy')
    (pod,) = pods(api, 'cfg')
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message) == (3, 'trainData: empty')


def test_other_failures_are_retried_up_to_the_backoff_limit(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    create(api, job('flaky', WRITE_REASON_AND_EXIT.format(code=1), backoffLimit=1, podFailurePolicy=FAIL_JOB_ON_3))
    assert wait_for(lambda: condition(api, 'flaky'), what='job flaky done') == ('Failed', 'BackoffLimitExceeded')
    assert len(pods(api, 'flaky')) == 2
    assert client.BatchV1Api(api).read_namespaced_job('flaky', NS).status.failed == 2


def test_suspended_job_gets_no_pod_until_resumed(node: tuple[Any, SimulatedNode]) -> None:
    api, sim = node
    create(api, job('held', "print('resumed')", suspend=True))

    def suspended() -> bool:
        status = client.BatchV1Api(api).read_namespaced_job('held', NS).status
        return bool(status and any(c.type == 'Suspended' and c.status == 'True' for c in status.conditions or []))

    wait_for(suspended, what='Suspended condition')
    sim.step()
    assert pods(api, 'held') == []
    client.BatchV1Api(api).patch_namespaced_job('held', NS, {'spec': {'suspend': False}})
    assert wait_for(lambda: condition(api, 'held'), what='job held done')[0] == 'Complete'


def test_pod_that_does_not_fit_stays_pending_unschedulable(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    create(api, job('big', "print('never')", gpus=8))

    def unschedulable() -> Any:
        items = pods(api, 'big')
        conditions = (items and items[0].status and items[0].status.conditions) or []
        return [c for c in conditions if c.type == 'PodScheduled' and c.reason == 'Unschedulable']

    (cond,) = wait_for(unschedulable, what='unschedulable condition')
    assert cond.message == '0/1 nodes are available: 1 Insufficient nvidia.com/gpu.'


def test_unpullable_image_waits_with_err_image_pull(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    create(api, job('pull', "print('never')", image='missing:1'))

    def waiting() -> Any:
        items = pods(api, 'pull')
        statuses = (items and items[0].status and items[0].status.container_statuses) or []
        return statuses and statuses[0].state.waiting

    assert wait_for(waiting, what='image pull error').reason == 'ErrImagePull'


def test_environment_secrets_config_maps_and_indexes_reach_the_process(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        NS, {'metadata': {'name': 's'}, 'data': {'TOKEN': base64.b64encode(b'sekret').decode()}}
    )
    core.create_namespaced_config_map(NS, {'metadata': {'name': 'cfg'}, 'data': {'conf.json': '{"a": 1}'}})
    script = (
        "import os, sys; print(os.environ['TOKEN'], os.environ['GREETING'], os.environ['RANK'], "
        'open(sys.argv[1]).read())'
    )
    env = [
        {'name': 'TOKEN', 'valueFrom': {'secretKeyRef': {'name': 's', 'key': 'TOKEN'}}},
        {'name': 'NAME', 'value': 'node'},
        {'name': 'GREETING', 'value': 'hi-$(NAME)'},
        {
            'name': 'RANK',
            'valueFrom': {
                'fieldRef': {'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
    ]
    create(
        api,
        job(
            'envs',
            script,
            env=env,
            args=['/etc/cfg/conf.json'],
            volumeMounts=[{'name': 'cfg', 'mountPath': '/etc/cfg'}],
            volumes=[{'name': 'cfg', 'configMap': {'name': 'cfg'}}],
            completionMode='Indexed',
            completions=2,
            parallelism=2,
        ),
    )
    assert wait_for(lambda: condition(api, 'envs'), what='job envs done')[0] == 'Complete'
    logs = sorted(core.read_namespaced_pod_log(p.metadata.name, NS) for p in pods(api, 'envs'))
    assert logs == ['sekret hi-node 0 {"a": 1}\n', 'sekret hi-node 1 {"a": 1}\n']


def test_missing_secret_is_a_container_config_error(node: tuple[Any, SimulatedNode]) -> None:
    api, _ = node
    env = [{'name': 'TOKEN', 'valueFrom': {'secretKeyRef': {'name': 'absent', 'key': 'TOKEN'}}}]
    create(api, job('nosecret', "print('never')", env=env))

    def waiting() -> Any:
        items = pods(api, 'nosecret')
        statuses = (items and items[0].status and items[0].status.container_statuses) or []
        return statuses and statuses[0].state.waiting

    state = wait_for(waiting, what='config error')
    assert (state.reason, state.message) == ('CreateContainerConfigError', 'secret "absent" not found')
