"""values.schema.json: bad values fail `helm install` (and `helm lint`) with a message naming the key."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.helm.chart_support import CHART, EXAMPLES, chart, helm, render_error

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ('missing-bucket', {'objectStore': {'bucket': None}}, "at '/objectStore': missing property 'bucket'"),
    (
        'empty-bucket',
        {'objectStore': {'bucket': ''}},
        "at '/objectStore/bucket': '' does not match pattern '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$'",
    ),
    (
        'negative-gpu-quota',
        {'kueue': {'queueName': 'q', 'createQueues': True, 'quota': {'gpus': -1}}},
        "at '/kueue/quota/gpus': minimum: got -1, want 0",
    ),
    ('fractional-gpu-quota', {'kueue': {'quota': {'gpus': 0.5}}}, "at '/kueue/quota/gpus': got number, want integer"),
    ('unknown-mode', {'mode': 'global'}, "at '/mode': value must be one of 'clusterWide', 'namespaced'"),
    ('misspelt-key', {'objectstore': {'bucket': 'b'}}, "additional properties 'objectstore' not allowed"),
    (
        'queues-without-a-name',
        {'kueue': {'createQueues': True}},
        "at '/kueue/queueName': minLength: got 0, want 1",
    ),
    ('bad-namespace', {'namespaces': ['Team_A']}, "at '/namespaces/0': 'Team_A' does not match pattern"),
    (
        'bad-memory',
        {'trainer': {'resources': {'memoryPerGpu': '16GB'}}},
        "at '/trainer/resources/memoryPerGpu': '16GB'",
    ),
    ('privileged-port', {'operator': {'metricsPort': 80}}, "at '/operator/metricsPort': minimum: got 80, want 1,024"),
    ('bad-endpoint', {'objectStore': {'endpoint': 'minio:9000'}}, "at '/objectStore/endpoint': 'minio:9000'"),
]


@pytest.mark.parametrize(('values', 'message'), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_fail_install_with_the_schema_message(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


@pytest.mark.parametrize(('values', 'message'), [c[1:] for c in BAD_VALUES[:3]], ids=[c[0] for c in BAD_VALUES[:3]])
def test_bad_values_fail_lint_with_the_same_message(values: dict[str, Any], message: str) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version='v1.30.0')
    assert any(message in error for error in report['errors']), report['errors']


def test_schema_is_the_one_helm_loads_and_covers_every_default_value() -> None:
    schema = json.loads((CHART / 'values.schema.json').read_text())
    assert chart().schema == schema

    def uncovered(values: dict[str, Any], node: dict[str, Any], path: str) -> list[str]:
        missing = []
        for key, value in values.items():
            child = node.get('properties', {}).get(key)
            if child is None:
                missing.append(f'{path}.{key}')
            elif isinstance(value, dict) and child.get('additionalProperties') is False:
                missing += uncovered(value, child, f'{path}.{key}')
        return missing

    defaults = yaml.safe_load((CHART / 'values.yaml').read_text())
    assert uncovered(defaults, schema, 'values') == []
    chart().validate_schema(defaults)


@pytest.mark.parametrize('name', ['values-gpu.yaml', 'values-kind-cpu.yaml'])
def test_example_values_pass_the_schema(name: str) -> None:
    chart().validate_schema(yaml.safe_load((EXAMPLES / name).read_text()))


def test_every_value_is_commented() -> None:
    """values.yaml is the chart's documentation: a comment sits above each value or above its section."""
    lines = (CHART / 'values.yaml').read_text().splitlines()

    def commented(number: int) -> bool:
        return number > 0 and lines[number - 1].strip().startswith('#')

    bare = []
    headers: list[tuple[int, int]] = []  # (indent, line number) of the enclosing section keys
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(('#', '-')):
            continue
        indent = len(line) - len(line.lstrip())
        headers = [h for h in headers if h[0] < indent]
        if stripped.endswith(':'):
            headers.append((indent, number))
            continue
        if not commented(number) and not any(commented(h[1]) for h in headers):
            bare.append(f'values.yaml:{number + 1}: {stripped}')
    assert bare == []
