"""console.enabled: the run console in the cluster, read-only by its RBAC, reached by port-forward only."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from finetuner.console import API_CALLS
from tests.helm.chart_support import (
    CHART,
    CREATED_KEYS,
    FULLNAME,
    KUBE_VERSIONS,
    RELEASE_NAMESPACE,
    helm,
    manifests,
    render_error,
)

CONSOLE = f'{FULLNAME}-console'
READ_VERBS = {'get', 'list', 'watch'}
ENABLED: dict[str, Any] = {'console': {'enabled': True}}


def console_objects(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Kind -> the console's object of that kind (the chart makes at most one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for doc in manifests(values):
        if (
            doc['metadata']['name'] == CONSOLE
            or doc['metadata'].get('labels', {}).get('app.kubernetes.io/component') == 'console'
        ):
            assert doc['kind'] not in found, f'two console {doc["kind"]}s'
            found[doc['kind']] = doc
    return found


def container(values: dict[str, Any]) -> dict[str, Any]:
    return console_objects(values)['Deployment']['spec']['template']['spec']['containers'][0]


def test_the_console_is_off_by_default() -> None:
    assert console_objects({}) == {}


@pytest.mark.parametrize('kube_version', KUBE_VERSIONS)
def test_enabled_it_is_a_deployment_a_cluster_ip_service_and_its_own_account(kube_version: str) -> None:
    objects = console_objects(ENABLED)
    assert sorted(objects) == ['Deployment', 'Role', 'RoleBinding', 'Service', 'ServiceAccount']
    for doc in objects.values():
        kubernetes_validate.validate(doc, kube_version, strict=True)
    service = objects['Service']
    assert service['spec']['type'] == 'ClusterIP'  # no Ingress, no LoadBalancer: kubectl port-forward
    assert service['spec']['ports'] == [{'name': 'http', 'port': 80, 'targetPort': 'http', 'protocol': 'TCP'}]
    pod = objects['Deployment']['spec']['template']['spec']
    assert pod['serviceAccountName'] == CONSOLE == objects['ServiceAccount']['metadata']['name']
    assert not [d for d in manifests(ENABLED) if d['kind'] in ('Ingress', 'ClusterRole') and 'console' in str(d)]


def test_chart_lints_strict_with_the_console() -> None:
    report = helm.lint(CHART, {**ENABLED, 'namespaces': ['team-a']}, strict=True, kube_version='v1.30.0')
    problems = [m for m in report['messages'] if m['severity'] >= 2]  # 2 warning, 3 error
    assert report['errors'] == [] and problems == [], problems or report['errors']


@pytest.mark.parametrize('namespaces', [[], ['team-a', 'team-b']])
def test_its_role_only_reads_runs_experiments_events_pods_and_logs(namespaces: list[str]) -> None:
    objects = console_objects({**ENABLED, 'namespaces': namespaces})
    role, binding = objects['Role'], objects['RoleBinding']
    shown = namespaces[0] if namespaces else RELEASE_NAMESPACE
    assert role['metadata']['namespace'] == binding['metadata']['namespace'] == shown
    granted = set()
    for rule in role['rules']:
        assert set(rule) == {'apiGroups', 'resources', 'verbs'}, rule  # no resourceNames, no nonResourceURLs
        assert set(rule['verbs']) <= READ_VERBS, f'a right that is not a read: {rule}'
        assert '*' not in str(rule)
        granted |= {(g, r, v) for g in rule['apiGroups'] for r in rule['resources'] for v in rule['verbs']}
    assert granted == set(API_CALLS)  # exactly what the console's code calls
    assert not [t for t in granted if t[1] == 'secrets' or t[1].endswith('/status') or t[1] == 'pods/exec']
    assert binding['roleRef'] == {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role', 'name': CONSOLE}
    assert binding['subjects'] == [{'kind': 'ServiceAccount', 'name': CONSOLE, 'namespace': RELEASE_NAMESPACE}]
    assert f'--namespace={shown}' in container({**ENABLED, 'namespaces': namespaces})['args']


def test_it_runs_the_console_command_unprivileged_with_probes() -> None:
    c = container(ENABLED)
    assert c['command'] == ['finetuner', 'console']
    assert c['args'] == [
        '--in-cluster',
        f'--namespace={RELEASE_NAMESPACE}',
        '--host=0.0.0.0',
        '--port=8080',
        '--refresh=2',
    ]
    assert c['image'] == 'ghcr.io/kube-finetuner/operator:0.1.0'  # Dockerfile.operator installs the console extra
    assert c['securityContext'] == {
        'runAsNonRoot': True,
        'allowPrivilegeEscalation': False,
        'readOnlyRootFilesystem': True,
        'capabilities': {'drop': ['ALL']},
    }
    assert c['readinessProbe']['httpGet'] == c['livenessProbe']['httpGet'] == {'path': '/healthz', 'port': 'http'}
    custom = container(
        {'console': {'enabled': True, 'port': 9090, 'image': {'repository': 'reg/console', 'tag': '1.2'}}}
    )
    assert custom['image'] == 'reg/console:1.2' and '--port=9090' in custom['args']
    assert custom['ports'] == [{'name': 'http', 'containerPort': 9090, 'protocol': 'TCP'}]


def secret_of(c: dict[str, Any]) -> set[str]:
    return {e['valueFrom']['secretKeyRef']['name'] for e in c.get('env', []) if 'valueFrom' in e}


def test_it_reads_the_object_store_with_the_chart_s_or_its_own_credentials() -> None:
    created = {**ENABLED, 'objectStore': {'endpoint': 'http://minio:9000', 'credentials': CREATED_KEYS}}
    c = container(created)
    assert secret_of(c) == {f'{FULLNAME}-object-store'}
    assert {'name': 'FINETUNER_S3_ENDPOINT', 'value': 'http://minio:9000'} in c['env']
    read_only = {**created, 'console': {'enabled': True, 'objectStoreSecret': 'read-only-key'}}
    assert secret_of(container(read_only)) == {'read-only-key'}
    assert secret_of(container(ENABLED)) == set()  # no keys: ambient identity (IRSA, workload identity)


@pytest.mark.parametrize(
    ('values', 'message'),
    [
        ({'console': {'enabled': True, 'port': 80}}, "at '/console/port': minimum: got 80, want 1,024"),
        ({'console': {'enabled': True, 'ingress': True}}, "additional properties 'ingress' not allowed"),
        ({'console': {'enabled': True, 'image': {'tag': 'latest'}}}, 'console.image.tag "latest" is not allowed'),
        ({'console': {'namespace': 'Team_A'}}, "at '/console/namespace': 'Team_A' does not match pattern"),
    ],
)
def test_bad_console_values_fail_install_with_a_message_naming_them(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)
