"""Fixtures of the test cluster, shared by tests/cluster and tests/e2e (imported by their conftests)."""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetuner_operator.config import OperatorConfig
from tests.cluster.harness import ApiServer, OperatorContainer, OperatorProcess, OperatorRunner, write_kubeconfig
from tests.cluster.node import SimulatedNode
from tests.cluster.s3 import S3Server, start_s3

TRAINER_IMAGE = 'kube-finetuner/trainer:test'
S3_SECRET = 'finetuner-s3'
NODE_USER_AGENT = 'simulated-node'
NODE_ENV = {
    'HF_HUB_OFFLINE': '1',
    'TRANSFORMERS_OFFLINE': '1',
    'HF_HUB_DISABLE_TELEMETRY': '1',
    'TOKENIZERS_PARALLELISM': 'false',
    'OMP_NUM_THREADS': '1',
    # the container's command runs on this project's Python: the same import path as the test process
    **({'PYTHONPATH': os.environ['PYTHONPATH']} if os.environ.get('PYTHONPATH') else {}),
}


def register_markers(config: pytest.Config) -> None:
    config.addinivalue_line('markers', 'operator_config(**fields): OperatorConfig overrides for the cluster fixture')
    config.addinivalue_line('markers', 'node(**options): SimulatedNode options for the cluster fixture')
    config.addinivalue_line(
        'markers', 'operator_process: the cluster fixture runs the operator as its own process, not a thread'
    )
    config.addinivalue_line(
        'markers', 'operator_image: the cluster fixture runs the operator from its image (podman; built if needed)'
    )


def api_client(kubeconfig: Path) -> Any:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def _built(which: str) -> str:
    from tests.cluster.runtime import BuildUnavailable, build_image, podman_unusable

    reason = podman_unusable()
    if reason:
        pytest.skip(reason)
    try:
        return build_image(which)
    except BuildUnavailable as e:
        pytest.skip(f'scripts/build-images.sh {which} cannot build here: {e}')


@pytest.fixture(scope='session')
def operator_image() -> str:
    """The operator image, built (or brought up to date from the layer cache) by scripts/build-images.sh."""
    return _built('operator')


@pytest.fixture(scope='session')
def trainer_image() -> str:
    """The trainer image, built (or brought up to date) by scripts/build-images.sh: ~6 min the first time."""
    return _built('trainer')


@pytest.fixture
def podman_ready() -> None:
    from tests.cluster.runtime import podman_unusable

    reason = podman_unusable()
    if reason:
        pytest.skip(reason)


@dataclass
class Cluster:
    server: ApiServer
    kubeconfig: Path
    api: Any
    s3: S3Server
    bucket: str
    config: OperatorConfig
    node: SimulatedNode
    operator: OperatorRunner | OperatorProcess | OperatorContainer


@pytest.fixture
def api_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ApiServer, Path]]:
    server = ApiServer().start()
    kubeconfig = write_kubeconfig(server.url, tmp_path / 'kubeconfig')
    monkeypatch.setenv('KUBECONFIG', str(kubeconfig))
    monkeypatch.delenv('KUBERNETES_SERVICE_HOST', raising=False)
    try:
        yield server, kubeconfig
    finally:
        server.stop()


@pytest.fixture(scope='session')
def s3_server() -> Iterator[S3Server]:
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # moto's per-request access log
    s3 = start_s3()
    try:
        yield s3
    finally:
        s3.server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's moto server with a fresh bucket; this process's AWS settings point at it."""
    bucket = f'ft-{uuid.uuid4().hex[:10]}'
    s3_server.client().create_bucket(Bucket=bucket)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return S3Server(endpoint=s3_server.endpoint, bucket=bucket, server=s3_server.server)


def operator_config(s3: S3Server, **overrides: Any) -> OperatorConfig:
    values: dict[str, Any] = {
        'trainer_image': TRAINER_IMAGE,
        'output': f's3://{s3.bucket}/runs',
        'data': f's3://{s3.bucket}',
        's3_endpoint': s3.endpoint,
        's3_secret': S3_SECRET,
        's3_region': 'us-east-1',
        'metrics_port': 0,
        'progress_interval': 0.5,
        **overrides,
    }
    return OperatorConfig(**values)


def create_s3_secret(api: Any, s3: S3Server, namespace: str = 'default') -> None:
    from kubernetes import client

    data = {k: base64.b64encode(v.encode()).decode() for k, v in s3.env.items() if k.startswith('AWS_') and 'KEY' in k}
    body = {'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {'name': S3_SECRET, 'namespace': namespace}, 'data': data}
    client.CoreV1Api(api).create_namespaced_secret(namespace, body)


def create_trainer_service_account(api: Any, name: str = 'finetuner-trainer', namespace: str = 'default') -> None:
    """What the chart creates in each run namespace for trainer pods (the operator checks that it exists)."""
    from kubernetes import client

    body = {'metadata': {'name': name, 'namespace': namespace}, 'automountServiceAccountToken': False}
    client.CoreV1Api(api).create_namespaced_service_account(namespace, body)


@pytest.fixture
def cluster(
    api_server: tuple[ApiServer, Path], s3: S3Server, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """API server + moto S3 + simulated node + the operator, wired like a real installation."""
    server, kubeconfig = api_server
    api = api_client(kubeconfig)
    create_s3_secret(api, s3)
    marker = request.node.get_closest_marker('operator_config')
    config = operator_config(s3, **(marker.kwargs if marker else {}))
    create_trainer_service_account(api, config.trainer_service_account)
    node_marker = request.node.get_closest_marker('node')
    node_options = {'poll': 0.1, **(node_marker.kwargs if node_marker else {})}
    if node_options.get('runtime') == 'podman':
        request.getfixturevalue('podman_ready')
    image = request.getfixturevalue('operator_image') if request.node.get_closest_marker('operator_image') else None
    node_api = api_client(kubeconfig)
    node_api.user_agent = NODE_USER_AGENT  # fault rules and request logs tell the node's calls apart
    node = SimulatedNode(node_api, tmp_path / 'node', extra_env=NODE_ENV, **node_options)
    server.emu.log_source = node.read_log
    node.start()
    operator: OperatorRunner | OperatorProcess | OperatorContainer
    if image is not None:
        operator = OperatorContainer(server, config, kubeconfig, tmp_path / 'operator.log', image).start()
    elif request.node.get_closest_marker('operator_process'):
        operator = OperatorProcess(server, config, kubeconfig, tmp_path / 'operator.log').start()
    else:
        operator = OperatorRunner(server, config).start()
    try:
        yield Cluster(server, kubeconfig, api, s3, s3.bucket, config, node, operator)
    finally:
        operator.stop()
        node.stop()
        api.close()
        assert not operator.errors, 'operator: ' + ''.join(_traceback(e) for e in operator.errors)
        assert not node.errors, 'node: ' + ''.join(_traceback(e) for e in node.errors)


def _traceback(error: BaseException) -> str:
    import traceback

    return ''.join(traceback.format_exception(error))
