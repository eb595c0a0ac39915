"""The administrator's allow-lists: the operator's check (policy.py) and the ValidatingAdmissionPolicy example.

The example's CEL is evaluated with cel-cpp (``cel-expr-python``) as kube-apiserver would evaluate it for a
FinetuneRun (``object``, ``variables``), and must refuse exactly the runs the operator refuses with the
equivalent FINETUNER_POLICY, naming the same field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cel_expr_python import cel
from cel_expr_python.ext import ext_strings

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_operator.policy import AdmissionPolicy, image_allowed, normalize_image, policy_problems

EXAMPLE = Path(__file__).resolve().parents[2] / 'examples' / 'admission-policy.yaml'
# The example's lists, as the Helm value policy (FINETUNER_POLICY).
POLICY = AdmissionPolicy.model_validate(
    {
        'allowedImages': ['ghcr.io/kube-finetuner/', 'registry.example.com/ml/'],
        'allowedTolerations': [{'key': 'nvidia.com/gpu'}],
        'allowedNodeSelectors': {'gpu-type': ['a100', 'h100'], 'topology.kubernetes.io/zone': ['*']},
        'allowedPriorityClasses': ['research', 'batch-low'],
    }
)
BASE = {'model': 'efficientnet_b0', 'trainData': 's3://b/d.jsonl'}
ALLOWED = {
    **BASE,
    'image': 'registry.example.com/ml/trainer:2',
    'tolerations': [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}],
    'nodeSelector': {'gpu-type': 'h100', 'topology.kubernetes.io/zone': 'eu-1a'},
    'priorityClassName': 'research',
}
# name -> (spec, the field both refuse)
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    'image': ({**BASE, 'image': 'docker.io/someone/miner:1'}, 'spec.image'),
    'image-lookalike': ({**BASE, 'image': 'registry.example.com/mlx/trainer:2'}, 'spec.image'),
    'toleration': (
        {**BASE, 'tolerations': [{'key': 'node-role.kubernetes.io/control-plane', 'operator': 'Exists'}]},
        'spec.tolerations',
    ),
    'node-label': ({**BASE, 'nodeSelector': {'kubernetes.io/hostname': 'db-1'}}, 'spec.nodeSelector'),
    'node-value': ({**BASE, 'nodeSelector': {'gpu-type': 't4'}}, 'spec.nodeSelector'),
    'node-affinity': (
        {
            **BASE,
            'affinity': {
                'nodeAffinity': {
                    'requiredDuringSchedulingIgnoredDuringExecution': {
                        'nodeSelectorTerms': [
                            {'matchExpressions': [{'key': 'kubernetes.io/hostname', 'operator': 'In', 'values': ['x']}]}
                        ]
                    }
                }
            },
        },
        'spec.affinity.nodeAffinity',
    ),
    'priority': ({**BASE, 'priorityClassName': 'system-cluster-critical'}, 'spec.priorityClassName'),
}


def _items() -> list[dict[str, Any]]:
    return yaml.safe_load(EXAMPLE.read_text())['items']


@lru_cache(maxsize=1)
def _env() -> Any:
    return cel.NewEnv(
        variables={'object': cel.Type.DYN, 'variables': cel.Type.DYN}, extensions=[ext_strings.ExtStrings()]
    )


def _evaluate(expression: str, data: dict[str, Any]) -> Any:
    value = _env().compile(expression).eval(data=data)
    assert value.type() != cel.Type.ERROR, f'{expression}: {value.value()}'
    return value.plain_value()


def _denials(spec: dict[str, Any]) -> list[str]:
    """What the ValidatingAdmissionPolicy says about a FinetuneRun with ``spec`` (its messages)."""
    policy = _items()[0]['spec']
    run = {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': 'r'}, 'spec': spec}
    variables = {v['name']: _evaluate(v['expression'], {'object': run}) for v in policy['variables']}
    data = {'object': run, 'variables': variables}
    messages = []
    for validation in policy['validations']:
        if not _evaluate(validation['expression'], data):
            message = validation.get('message')
            messages.append(_evaluate(validation['messageExpression'], data) if message is None else message.strip())
    return messages


@pytest.mark.parametrize('kube_version', ['1.30.0', '1.31.0', '1.32.0', '1.33.0'])
def test_the_example_is_a_valid_admission_policy_and_binding(kube_version: str) -> None:
    policy, binding = _items()
    for item in (policy, binding):
        kubernetes_validate.validate(item, kube_version, strict=True)
    assert binding['spec']['policyName'] == policy['metadata']['name']
    assert binding['spec']['validationActions'] == ['Deny']
    assert policy['spec']['matchConstraints']['resourceRules'][0]['resources'] == ['finetuneruns']


def test_an_allowed_run_passes_both() -> None:
    assert _denials(ALLOWED) == []
    assert policy_problems(FinetuneRunSpec.model_validate(ALLOWED), POLICY) == []
    assert policy_problems(FinetuneRunSpec.model_validate({**BASE, 'image': None}), POLICY) == [], (
        "the operator's own image needs no listing"
    )


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_the_admission_policy_and_the_operator_refuse_the_same_runs_naming_the_same_field(case: str) -> None:
    spec, field = REFUSED[case]
    denials = _denials(spec)
    assert len(denials) == 1 and denials[0].startswith(f'{field}:'), denials
    problems = policy_problems(FinetuneRunSpec.model_validate(spec), POLICY)
    assert len(problems) == 1 and problems[0].startswith(field), problems
    assert 'Helm value policy' in problems[0] or 'spec.nodeSelector with an allowed label' in problems[0]


def test_the_messages_say_what_is_allowed() -> None:
    assert _denials(REFUSED['image'][0]) == [
        'spec.image: docker.io/someone/miner:1 is not from a registry this cluster allows (ghcr.io/kube-finetuner/, '
        'registry.example.com/ml/)'
    ]
    (operator_says,) = policy_problems(FinetuneRunSpec.model_validate(REFUSED['node-value'][0]), POLICY)
    assert operator_says.startswith("spec.nodeSelector: gpu-type='t4' is not allowed (allowed values: a100, h100)")
    (denied,) = _denials(REFUSED['node-value'][0])
    assert 'gpu-type=a100|h100' in denied and 'topology.kubernetes.io/zone=*' in denied


def test_image_references_are_compared_on_a_path_boundary_after_docker_hubs_shorthands() -> None:
    assert normalize_image('python:3.11') == 'docker.io/library/python:3.11'
    assert normalize_image('someone/miner') == 'docker.io/someone/miner'
    assert normalize_image('localhost:5000/t:1') == 'localhost:5000/t:1'
    assert image_allowed('ghcr.io/kube-finetuner/trainer:1', ['ghcr.io/kube-finetuner'])
    assert not image_allowed('ghcr.io/kube-finetuner-evil/trainer:1', ['ghcr.io/kube-finetuner'])
    assert image_allowed('python:3.11', ['docker.io/library/python'])
    assert image_allowed('registry.corp/ml/t@sha256:abc', ['registry.corp/ml/t'])


def test_unset_lists_allow_anything_and_empty_lists_nothing() -> None:
    spec = FinetuneRunSpec.model_validate(REFUSED['image'][0] | {'priorityClassName': 'x'})
    assert policy_problems(spec, AdmissionPolicy()) == []
    locked = AdmissionPolicy(allowed_images=[], allowed_priority_classes=[])
    assert [p.split(':')[0] for p in policy_problems(spec, locked)] == ['spec.image', 'spec.priorityClassName']
    assert 'this cluster allows (none)' in policy_problems(spec, locked)[0]
