"""Operator and trainer pods meet the Kubernetes "restricted" Pod Security Standard, plus a read-only root.

The checks follow https://kubernetes.io/docs/concepts/security/pod-security-standards/ (restricted,
latest): a namespace labelled `pod-security.kubernetes.io/enforce: restricted` admits these pods.
The trainer pod is the one the operator really builds (finetuner_operator.builders.build_job), with
the configuration the chart gives the operator.
"""

from __future__ import annotations

from typing import Any

import pytest

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_operator import builders
from finetuner_operator.config import OperatorConfig
from tests.helm.chart_support import VALUE_SETS, manifests_of, one, operator_env

# Volume types the restricted profile allows.
ALLOWED_VOLUMES = {
    'configMap',
    'csi',
    'downwardAPI',
    'emptyDir',
    'ephemeral',
    'persistentVolumeClaim',
    'projected',
    'secret',
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way `pod` (a PodSpec) breaks the restricted profile or leaves its root filesystem writable."""
    problems: list[str] = []
    pod_context = pod.get('securityContext', {})
    for flag in ('hostNetwork', 'hostPID', 'hostIPC'):
        if pod.get(flag):
            problems.append(f'{flag} is set')
    for volume in pod.get('volumes', []):
        kinds = set(volume) - {'name'}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f'volume {volume["name"]} is of a disallowed type {sorted(kinds)}')
    if pod_context.get('runAsUser') == 0:
        problems.append('pod runAsUser is 0')
    containers = pod.get('initContainers', []) + pod['containers']
    for container in containers:
        name = container['name']
        context = container.get('securityContext', {})
        if context.get('privileged'):
            problems.append(f'{name}: privileged')
        if context.get('allowPrivilegeEscalation') is not False:
            problems.append(f'{name}: allowPrivilegeEscalation is not false')
        capabilities = context.get('capabilities', {})
        if 'ALL' not in capabilities.get('drop', []):
            problems.append(f'{name}: capabilities do not drop ALL')
        if set(capabilities.get('add', [])) - {'NET_BIND_SERVICE'}:
            problems.append(f'{name}: adds capabilities {capabilities["add"]}')
        if not (context.get('runAsNonRoot') or pod_context.get('runAsNonRoot')):
            problems.append(f'{name}: runAsNonRoot is not true')
        if context.get('runAsUser') == 0:
            problems.append(f'{name}: runAsUser is 0')
        seccomp = context.get('seccompProfile') or pod_context.get('seccompProfile') or {}
        if seccomp.get('type') not in ('RuntimeDefault', 'Localhost'):
            problems.append(f'{name}: seccompProfile is not RuntimeDefault')
        if any(port.get('hostPort') for port in container.get('ports', [])):
            problems.append(f'{name}: uses a hostPort')
        if context.get('readOnlyRootFilesystem') is not True:
            problems.append(f'{name}: the root filesystem is writable')
    return problems


def writable_mounts(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    scratch = {v['name'] for v in pod.get('volumes', []) if 'emptyDir' in v or 'persistentVolumeClaim' in v}
    return {m['mountPath'] for m in container.get('volumeMounts', []) if m['name'] in scratch}


def test_the_checker_catches_what_restricted_forbids() -> None:
    pod = {
        'hostNetwork': True,
        'volumes': [{'name': 'docker', 'hostPath': {'path': '/var/run/docker.sock'}}],
        'containers': [{'name': 'c', 'securityContext': {'privileged': True, 'capabilities': {'add': ['SYS_ADMIN']}}}],
    }
    problems = '\n'.join(restricted_violations(pod))
    for expected in (
        'hostNetwork',
        'disallowed type',
        'privileged',
        'allowPrivilegeEscalation',
        'drop ALL',
        'SYS_ADMIN',
        'runAsNonRoot',
        'seccompProfile',
        'root filesystem',
    ):
        assert expected in problems


@pytest.mark.parametrize('value_set', sorted(VALUE_SETS))
def test_operator_pod_is_restricted_with_a_writable_tmp(value_set: str) -> None:
    deployment = one(manifests_of(value_set), 'Deployment')
    pod = deployment['spec']['template']['spec']
    assert restricted_violations(pod) == []
    assert writable_mounts(pod, pod['containers'][0]) == {'/tmp'}
    assert pod['securityContext']['runAsUser'] != 0


@pytest.mark.parametrize('value_set', ['namespaced-kueue', 'cluster-wide-created-secret', 'values-gpu.yaml'])
@pytest.mark.parametrize(('gpus', 'nodes'), [(0, 1), (1, 1), (4, 1), (2, 3)])
def test_trainer_pod_the_operator_builds_is_restricted(value_set: str, gpus: int, nodes: int) -> None:
    config = OperatorConfig.from_env(operator_env(manifests_of(value_set)))
    spec = FinetuneRunSpec(
        model='efficientnet_b0', train_data='s3://b/train.jsonl', resources={'gpus': gpus, 'nodes': nodes}
    )
    owner = {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': 'r', 'uid': 'u-1'}}
    job = builders.build_job('r', 'team-a', spec, config, owner)
    pod = job['spec']['template']['spec']
    assert restricted_violations(pod) == []
    assert pod['serviceAccountName'] == config.trainer_service_account
    assert pod['automountServiceAccountToken'] is False
    assert {'/tmp', builders.HOME_DIR} <= writable_mounts(pod, pod['containers'][0])
