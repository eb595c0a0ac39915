"""Rendering the chart with Helm's own Go library (helm-python-sdk) and reading what comes out."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip('helm_python', reason='helm-python-sdk (test extra, x86_64 only) is not installed')

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / 'helm' / 'finetuner'
EXAMPLES = ROOT / 'examples'
RELEASE = 'ft'
RELEASE_NAMESPACE = 'finetuner'
FULLNAME = f'{RELEASE}-finetuner'
KUBE_VERSIONS = ('1.28.0', '1.29.0', '1.30.0', '1.31.0', '1.32.0', '1.33.0')

# Kinds of other projects' CRDs: kubernetes-validate only knows the built-in API.
THIRD_PARTY_KINDS = {
    ('monitoring.coreos.com/v1', 'ServiceMonitor'),
    ('kueue.x-k8s.io/v1beta1', 'ResourceFlavor'),
    ('kueue.x-k8s.io/v1beta1', 'ClusterQueue'),
    ('kueue.x-k8s.io/v1beta1', 'LocalQueue'),
}

CREATED_KEYS = {'accessKeyId': 'AKIAEXAMPLE', 'secretAccessKey': 'example-secret-key'}


def example_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


# The value sets every rendering test runs over: both modes, with and without Kueue, an existing
# Secret and a created one, the ServiceMonitor, and the example values files users start from.
VALUE_SETS: dict[str, dict[str, Any]] = {
    'defaults': {},
    'cluster-wide-created-secret': {
        'mode': 'clusterWide',
        'namespaces': ['ml'],
        'objectStore': {'endpoint': 'http://minio.minio:9000', 'region': 'us-east-1', 'credentials': CREATED_KEYS},
        'huggingFace': {'token': {'value': 'hf_example'}, 'cache': {'enabled': True, 'keepOnUninstall': True}},
    },
    'namespaced-existing-secret': {
        'mode': 'namespaced',
        'namespaces': ['team-a', 'team-b'],
        'imagePullSecrets': [{'name': 'regcred'}],
        'objectStore': {'credentials': {'existingSecret': 'my-s3'}, 'outputPrefix': 'ft/runs', 'dataPrefix': 'ft'},
        'huggingFace': {'token': {'existingSecret': 'my-hf'}, 'cache': {'enabled': True, 'existingClaim': 'hf'}},
    },
    'namespaced-kueue': {
        'mode': 'namespaced',
        'namespaces': ['team-a', 'team-b'],
        'kueue': {'queueName': 'gpus', 'createQueues': True, 'quota': {'gpus': 4}},
        'trainer': {
            'nodeSelector': {'nvidia.com/gpu.present': 'true'},
            'tolerations': [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}],
            'runtimeClassName': 'nvidia',
        },
    },
    'kueue-queue-only': {'kueue': {'queueName': 'team-queue'}},
    'service-monitor': {'metrics': {'serviceMonitor': {'enabled': True, 'labels': {'release': 'prom'}}}},
    'values-gpu.yaml': example_values('values-gpu.yaml'),
    'values-kind-cpu.yaml': example_values('values-kind-cpu.yaml'),
}


@functools.cache
def chart() -> Any:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any], namespace: str = RELEASE_NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would produce it (schema checked first)."""
    return chart().render(copy.deepcopy(values), name=RELEASE, namespace=namespace, is_install=True)


@functools.cache
def _rendered_set(name: str) -> str:
    return json.dumps(manifests(VALUE_SETS[name]))


def manifests(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the templates render (NOTES.txt left out), parsed."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith('NOTES.txt'):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def manifests_of(value_set: str) -> list[dict[str, Any]]:
    """The parsed objects of one named value set (rendered once per session)."""
    return json.loads(_rendered_set(value_set))


def crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(entry['data']) for entry in chart().crds]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d['kind'] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f'expected one {kind}, found {len(found)}'
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, 'Deployment')
    return deployment['spec']['template']['spec']['containers'][0]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator's plain environment variables (secret references left out)."""
    return {e['name']: e['value'] for e in operator_container(docs)['env'] if 'value' in e}


def render_error(values: dict[str, Any]) -> str:
    """The message `helm install` fails with for these values."""
    with pytest.raises(helm.HelmError) as info:
        render(values)
    return str(info.value)
