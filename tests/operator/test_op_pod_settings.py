"""Per-run pod settings and the administrator's runtime template, rendered into the trainer Job."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from finetuner.api.pod import PodSettings
from finetuner.api.v1alpha1 import FinetuneRunSpec, format_validation_error
from finetuner_operator.builders import build_job
from finetuner_operator.config import OperatorConfig

OWNER = {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': 'r', 'uid': 'u-1'}}
AFFINITY = {
    'nodeAffinity': {
        'requiredDuringSchedulingIgnoredDuringExecution': {
            'nodeSelectorTerms': [{'matchExpressions': [{'key': 'gpu', 'operator': 'In', 'values': ['a100']}]}]
        }
    },
    'podAntiAffinity': {
        'preferredDuringSchedulingIgnoredDuringExecution': [
            {
                'weight': 50,
                'podAffinityTerm': {
                    'labelSelector': {'matchLabels': {'app.kubernetes.io/name': 'finetuner-trainer'}},
                    'topologyKey': 'kubernetes.io/hostname',
                },
            }
        ]
    },
}
RUN_SETTINGS: dict[str, Any] = {
    'imagePullSecrets': [{'name': 'team-registry'}],
    'affinity': AFFINITY,
    'priorityClassName': 'research-high',
    'env': [
        {'name': 'HTTPS_PROXY', 'value': 'http://team-proxy:3128'},
        {'name': 'WANDB_API_KEY', 'valueFrom': {'secretKeyRef': {'name': 'wandb', 'key': 'token'}}},
    ],
    'volumes': [
        {'name': 'refdata', 'mountPath': '/data/ref', 'persistentVolumeClaim': {'claimName': 'refdata'}},
        {'name': 'certs', 'mountPath': '/etc/ssl/team', 'secret': {'secretName': 'team-ca'}},
    ],
    'serviceAccountName': 'team-a-trainer',
}
TEMPLATE: dict[str, Any] = {
    'imagePullSecrets': [{'name': 'mirror'}],
    'priorityClassName': 'batch-low',
    'env': [{'name': 'HTTPS_PROXY', 'value': 'http://cluster-proxy:3128'}, {'name': 'NO_PROXY', 'value': '.svc'}],
    'volumes': [{'name': 'site', 'mountPath': '/etc/site', 'configMap': {'name': 'site-config'}}],
}


def _pod(spec: dict[str, Any], template: dict[str, Any] | None = None) -> dict[str, Any]:
    env = {'FINETUNER_RUNTIME_TEMPLATE': json.dumps(template)} if template else {}
    config = OperatorConfig.from_env(env)
    job = build_job('r', 'ml', FinetuneRunSpec.model_validate(spec), config, OWNER)
    for version in ('1.30.0', '1.33.0'):  # as test_op_builders (1.28 wanted onPodConditions in every rule)
        kubernetes_validate.validate(job, version, strict=True)
    return job['spec']['template']['spec']


def test_a_runs_pod_settings_reach_its_trainer_pod() -> None:
    pod = _pod({'model': 'm', 'trainData': 's3://b/d.jsonl', **RUN_SETTINGS})

    assert pod['serviceAccountName'] == 'team-a-trainer' and pod['automountServiceAccountToken'] is False
    assert pod['imagePullSecrets'] == [{'name': 'team-registry'}]
    assert pod['affinity'] == AFFINITY and pod['priorityClassName'] == 'research-high'
    env = pod['containers'][0]['env']
    assert env[-2:] == RUN_SETTINGS['env'], 'extra variables come after the operator own'
    assert {'name': 'refdata', 'persistentVolumeClaim': {'claimName': 'refdata', 'readOnly': True}} in pod['volumes']
    assert {'name': 'certs', 'secret': {'secretName': 'team-ca'}} in pod['volumes']
    mounts = {m['name']: m for m in pod['containers'][0]['volumeMounts']}
    assert mounts['refdata'] == {'name': 'refdata', 'mountPath': '/data/ref', 'readOnly': True}
    assert mounts['certs']['readOnly'] is True


def test_without_settings_the_pod_is_as_before() -> None:
    pod = _pod({'model': 'm', 'trainData': 's3://b/d.jsonl'})

    assert pod['serviceAccountName'] == 'finetuner-trainer'
    assert not {'imagePullSecrets', 'affinity', 'priorityClassName'} & set(pod)
    assert [v['name'] for v in pod['volumes']] == ['config', 'tmp', 'home', 'dshm']


def test_the_runtime_template_applies_to_every_run_and_the_run_wins() -> None:
    plain = _pod({'model': 'm', 'trainData': 's3://b/d.jsonl'}, TEMPLATE)
    assert plain['imagePullSecrets'] == [{'name': 'mirror'}] and plain['priorityClassName'] == 'batch-low'
    assert plain['containers'][0]['env'][-2:] == TEMPLATE['env']
    assert plain['serviceAccountName'] == 'finetuner-trainer'

    own = _pod({'model': 'm', 'trainData': 's3://b/d.jsonl', **RUN_SETTINGS}, TEMPLATE)
    assert own['imagePullSecrets'] == [{'name': 'mirror'}, {'name': 'team-registry'}], 'lists are joined'
    assert own['priorityClassName'] == 'research-high', 'a run replaces a scalar'
    extra = own['containers'][0]['env'][-3:]
    assert extra[0] == {'name': 'NO_PROXY', 'value': '.svc'}
    assert extra[1] == {'name': 'HTTPS_PROXY', 'value': 'http://team-proxy:3128'}, 'the run wins by name'
    assert [v['name'] for v in own['volumes']][-3:] == ['site', 'refdata', 'certs']


@pytest.mark.parametrize(
    ('settings', 'message'),
    [
        (
            {'env': [{'name': 'FINETUNER_RUN', 'value': 'x'}]},
            'spec.env.0: FINETUNER_RUN is set by the operator',
        ),
        ({'env': [{'name': 'HOME', 'value': '/root'}]}, 'HOME is set by the operator'),
        (
            {'env': [{'name': 'A', 'value': '1', 'valueFrom': {'secretKeyRef': {'name': 's', 'key': 'k'}}}]},
            'give value or valueFrom, not both',
        ),
        ({'env': [{'name': 'A', 'value': '1'}, {'name': 'A', 'value': '2'}]}, 'env A given twice'),
        ({'volumes': [{'name': 'v', 'mountPath': '/data'}]}, 'give exactly one of persistentVolumeClaim, configMap'),
        (
            {'volumes': [{'name': 'config', 'mountPath': '/data', 'configMap': {'name': 'c'}}]},
            'the operator uses the volume names config',
        ),
        (
            {'volumes': [{'name': 'v', 'mountPath': '/tmp/x', 'configMap': {'name': 'c'}}]},
            'mountPath may not be / or under /etc/finetuner, /tmp',
        ),
        (
            {'volumes': [{'name': 'v', 'mountPath': 'data', 'configMap': {'name': 'c'}}]},
            "String should match pattern '^/'",
        ),
        ({'priorityClassName': 'High_Priority'}, 'priorityClassName: String should match pattern'),
        (
            {
                'affinity': {
                    'nodeAffinity': {'requiredDuringSchedulingIgnoredDuringExecution': {'nodeSelectorTerms': []}}
                }
            },
            'nodeSelectorTerms: List should have at least 1 item',
        ),
    ],
)
def test_the_contract_refuses_settings_the_operator_could_not_render(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 's3://b/d.jsonl', **settings})
    assert message in format_validation_error(refused.value, 'spec')
    with pytest.raises(ValidationError):  # the same settings in the runtime template
        PodSettings.model_validate(settings)


def test_a_bad_runtime_template_stops_the_operator_at_start_up_naming_the_variable() -> None:
    with pytest.raises(ValueError, match='FINETUNER_RUNTIME_TEMPLATE is not valid JSON'):
        OperatorConfig.from_env({'FINETUNER_RUNTIME_TEMPLATE': '{not json'})
    with pytest.raises(ValidationError, match=r'runtime_template\.env\.0'):
        OperatorConfig.from_env({'FINETUNER_RUNTIME_TEMPLATE': json.dumps({'env': [{'name': 'NNODES', 'value': '2'}]})})
