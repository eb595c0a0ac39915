"""The simulated node's podman runtime: a pod's container run from its image, driven only through the API.

The image is the operator's (it has a Python), built by ``scripts/build-images.sh operator`` when
needed (cached after the first time). Every check asks the container itself what it got: its user,
working directory, environment (values, Secret, ConfigMap and field references), mounted files,
host name and the cluster names it resolves, and writable emptyDirs; exit codes, termination messages,
logs, a kill, a memory limit, a missing image and a root user refused all come back in the pod status.
(A container killed at its memory limit reads as exit code 137, reason Error: podman does not report
OOMKilled under this machine's cgroup v1.)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.fixtures import api_client
from tests.cluster.fixtures import operator_image as operator_image  # a fixture
from tests.cluster.fixtures import podman_ready as podman_ready  # a fixture
from tests.cluster.harness import ApiServer, wait_for
from tests.cluster.node import SimulatedNode

NS = 'default'
PROBE = """
import json, os, socket, sys
out = {
    'uid': os.getuid(), 'gid': os.getgid(), 'cwd': os.getcwd(), 'hostname': socket.gethostname(),
    'env': {k: os.environ.get(k) for k in ('PLAIN', 'EXPANDED', 'FROM_SECRET', 'FROM_CONFIG', 'POD_NAME', 'RANK')},
    'config': open('/etc/probe/settings.txt').read(),
    'resolves': socket.gethostbyname(os.environ['PEER']),
}
open('/scratch/written', 'w').write('ok')
try:
    open('/etc/probe/new', 'w')
    out['config_writable'] = True
except OSError:
    out['config_writable'] = False
print('PROBE ' + json.dumps(out), flush=True)
open('/dev/termination-log', 'w').write('probe done')
sys.exit(int(os.environ.get('EXIT', '0')))
"""


@pytest.fixture
def node(
    api_server: tuple[ApiServer, Path], tmp_path: Path, podman_ready: None, operator_image: str
) -> Iterator[tuple[Any, SimulatedNode, str]]:
    server, kubeconfig = api_server
    api = api_client(kubeconfig)
    sim = SimulatedNode(api_client(kubeconfig), tmp_path / 'node', runtime='podman')
    server.emu.log_source = sim.read_log
    sim.start()
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        NS, {'metadata': {'name': 'probe-secret'}, 'data': {'token': base64.b64encode(b's3cret').decode()}}
    )
    core.create_namespaced_config_map(NS, {'metadata': {'name': 'probe-config'}, 'data': {'settings.txt': 'x=1\n'}})
    core.create_namespaced_service(
        NS,
        {
            'metadata': {'name': 'peers'},
            'spec': {'clusterIP': 'None', 'selector': {'job': 'probe'}, 'ports': [{'port': 29500}]},
        },
    )
    yield api, sim, operator_image
    sim.stop()
    api.close()
    assert not sim.errors, sim.errors


def probe_job(name: str, image: str, *, exit_code: int = 0, **pod: Any) -> dict[str, Any]:
    container = {
        'name': 'trainer',
        'image': image,
        'command': ['python', '-c', PROBE],
        'workingDir': '/scratch',
        'env': [
            {'name': 'PLAIN', 'value': 'plain'},
            {'name': 'EXPANDED', 'value': '$(PLAIN)-and-more'},
            {'name': 'FROM_SECRET', 'valueFrom': {'secretKeyRef': {'name': 'probe-secret', 'key': 'token'}}},
            {
                'name': 'FROM_CONFIG',
                'valueFrom': {'configMapKeyRef': {'name': 'probe-config', 'key': 'settings.txt'}},
            },
            {'name': 'POD_NAME', 'valueFrom': {'fieldRef': {'fieldPath': 'metadata.name'}}},
            {
                'name': 'RANK',
                'valueFrom': {
                    'fieldRef': {'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            },
            {'name': 'PEER', 'value': f'{name}-0.peers.{NS}.svc'},
            {'name': 'EXIT', 'value': str(exit_code)},
        ],
        'volumeMounts': [
            {'name': 'config', 'mountPath': '/etc/probe'},
            {'name': 'scratch', 'mountPath': '/scratch'},
        ],
        'terminationMessagePath': '/dev/termination-log',
        'securityContext': {
            'allowPrivilegeEscalation': False,
            'capabilities': {'drop': ['ALL']},
            'readOnlyRootFilesystem': True,
            'runAsNonRoot': True,
        },
        **pod.pop('container', {}),
    }
    spec = {
        'restartPolicy': 'Never',
        'subdomain': 'peers',
        'securityContext': {'runAsUser': 1000, 'runAsGroup': 1000, 'runAsNonRoot': True},
        'containers': [container],
        'volumes': [
            {'name': 'config', 'configMap': {'name': 'probe-config'}},
            {'name': 'scratch', 'emptyDir': {}},
        ],
        **pod,
    }
    return {
        'apiVersion': 'batch/v1',
        'kind': 'Job',
        'metadata': {'name': name},
        'spec': {
            'backoffLimit': 0,
            'completionMode': 'Indexed',
            'completions': 1,
            'parallelism': 1,
            'template': {'metadata': {'labels': {'job': 'probe'}}, 'spec': spec},
        },
    }


def finished_pod(api: Any, job: str, timeout: float = 90.0) -> Any:
    core = client.CoreV1Api(api)

    def done() -> Any:
        pods = core.list_namespaced_pod(NS, label_selector=f'batch.kubernetes.io/job-name={job}').items
        return next((p for p in pods if p.status and p.status.phase in ('Succeeded', 'Failed')), None)

    return wait_for(done, timeout, 0.1, what=f'pod of {job} finished')


def terminated(pod: Any) -> Any:
    return pod.status.container_statuses[0].state.terminated


def test_the_container_gets_the_pods_user_env_mounts_and_names(node: tuple[Any, SimulatedNode, str]) -> None:
    api, sim, image = node
    client.BatchV1Api(api).create_namespaced_job(NS, probe_job('probe', image))

    pod = finished_pod(api, 'probe')
    state = terminated(pod)
    assert (pod.status.phase, state.exit_code, state.reason) == ('Succeeded', 0, 'Completed'), sim.read_log(
        NS, pod.metadata.name
    )
    assert state.message == 'probe done'
    log = client.CoreV1Api(api).read_namespaced_pod_log(pod.metadata.name, NS)
    seen = json.loads(next(line for line in log.splitlines() if line.startswith('PROBE '))[6:])
    assert (seen['uid'], seen['gid'], seen['cwd']) == (1000, 1000, '/scratch')
    assert seen['hostname'] == 'probe-0', 'spec.hostname of an indexed pod'
    assert seen['env'] == {
        'PLAIN': 'plain',
        'EXPANDED': 'plain-and-more',
        'FROM_SECRET': 's3cret',
        'FROM_CONFIG': 'x=1\n',
        'POD_NAME': pod.metadata.name,
        'RANK': '0',
    }
    assert seen['config'] == 'x=1\n' and seen['config_writable'] is False
    assert seen['resolves'] == '127.0.0.1', 'the headless Service name of the pod, through /etc/hosts'


def test_exit_code_termination_message_and_logs_of_a_failure(node: tuple[Any, SimulatedNode, str]) -> None:
    api, _, image = node
    client.BatchV1Api(api).create_namespaced_job(NS, probe_job('fails', image, exit_code=3))
    pod = finished_pod(api, 'fails')
    assert pod.status.phase == 'Failed'
    assert (terminated(pod).exit_code, terminated(pod).reason, terminated(pod).message) == (3, 'Error', 'probe done')


def test_a_killed_container_exits_137(node: tuple[Any, SimulatedNode, str]) -> None:
    api, sim, image = node
    job = probe_job('killed', image, container={'command': ['python', '-c', 'import time; time.sleep(600)']})
    client.BatchV1Api(api).create_namespaced_job(NS, job)
    core = client.CoreV1Api(api)
    running = wait_for(
        lambda: [p for p in core.list_namespaced_pod(NS).items if p.status and p.status.phase == 'Running'],
        90,
        what='the container running',
    )[0]
    assert sim.kill(running.metadata.name)
    pod = finished_pod(api, 'killed')
    assert (pod.status.phase, terminated(pod).exit_code) == ('Failed', 137)


def test_the_memory_limit_is_the_containers_cgroup_limit(node: tuple[Any, SimulatedNode, str]) -> None:
    api, sim, image = node
    had_oom_file = (Path.cwd() / 'oom').exists()
    hog = (
        'import pathlib\n'
        "for f in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):\n"
        '    p = pathlib.Path(f)\n'
        "    if p.exists(): print('LIMIT', p.read_text().strip(), flush=True)\n"
        'b = []\n'
        'while True: b.append(bytearray(16 * 2**20))'
    )
    container = {'command': ['python', '-c', hog], 'resources': {'limits': {'memory': '64Mi'}}}
    client.BatchV1Api(api).create_namespaced_job(NS, probe_job('hog', image, container=container))
    pod = finished_pod(api, 'hog')
    assert (pod.status.phase, terminated(pod).exit_code) == ('Failed', 137), 'killed at its limit'
    assert f'LIMIT {64 * 2**20}' in (sim.read_log(NS, pod.metadata.name) or '')
    # podman leaves a file named oom where it was started: in the pod's folder, not in the test's directory.
    assert not (Path.cwd() / 'oom').exists() or had_oom_file


def test_an_image_not_in_the_nodes_storage_is_err_image_pull(node: tuple[Any, SimulatedNode, str]) -> None:
    api, _, _ = node
    client.BatchV1Api(api).create_namespaced_job(NS, probe_job('nopull', 'localhost/kube-finetuner/missing:0'))
    core = client.CoreV1Api(api)

    def waiting() -> Any:
        for pod in core.list_namespaced_pod(NS).items:
            for status in (pod.status and pod.status.container_statuses) or []:
                if status.state.waiting is not None:
                    return status.state.waiting
        return None

    state = wait_for(waiting, 60, what='ErrImagePull')
    assert state.reason == 'ErrImagePull'
    assert 'localhost/kube-finetuner/missing:0' in state.message and "not in the node's podman storage" in state.message


def test_run_as_non_root_refuses_uid_0(node: tuple[Any, SimulatedNode, str]) -> None:
    api, _, image = node
    job = probe_job('root', image, securityContext={'runAsUser': 0, 'runAsNonRoot': True})
    client.BatchV1Api(api).create_namespaced_job(NS, job)
    core = client.CoreV1Api(api)

    def waiting() -> Any:
        for pod in core.list_namespaced_pod(NS).items:
            for status in (pod.status and pod.status.container_statuses) or []:
                if status.state.waiting is not None:
                    return status.state.waiting
        return None

    state = wait_for(waiting, 60, what='CreateContainerConfigError')
    assert (state.reason, state.message) == (
        'CreateContainerConfigError',
        'container has runAsNonRoot and image will run as root',
    )
