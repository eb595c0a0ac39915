"""The chart's runtime template (``runtime:`` values): checked by values.schema.json, read by the operator,
rendered into every trainer Job."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from finetuner.api import crdgen
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_operator.builders import build_job
from finetuner_operator.config import OperatorConfig
from tests.helm.chart_support import manifests, operator_env, render_error

RUNTIME: dict[str, Any] = {
    'imagePullSecrets': [{'name': 'mirror'}],
    'affinity': {
        'nodeAffinity': {
            'requiredDuringSchedulingIgnoredDuringExecution': {
                'nodeSelectorTerms': [{'matchExpressions': [{'key': 'pool', 'operator': 'In', 'values': ['gpu']}]}]
            }
        }
    },
    'priorityClassName': 'batch-low',
    'env': [{'name': 'HTTPS_PROXY', 'value': 'http://proxy:3128'}],
    'volumes': [{'name': 'site', 'mountPath': '/etc/site', 'configMap': {'name': 'site-config'}}],
    'serviceAccountName': 'trainers',
}


def test_runtime_values_reach_every_trainer_job() -> None:
    env = operator_env(manifests({'runtime': RUNTIME}))
    config = OperatorConfig.from_env(env)
    owner = {'kind': 'FinetuneRun', 'metadata': {'name': 'r', 'uid': 'u'}}
    job = build_job('r', 'ml', FinetuneRunSpec(model='m', train_data='s3://b/d.jsonl'), config, owner)
    kubernetes_validate.validate(job, '1.30.0', strict=True)
    pod = job['spec']['template']['spec']
    assert pod['imagePullSecrets'] == RUNTIME['imagePullSecrets'] and pod['affinity'] == RUNTIME['affinity']
    assert pod['priorityClassName'] == 'batch-low' and pod['serviceAccountName'] == 'trainers'
    assert pod['containers'][0]['env'][-1] == RUNTIME['env'][0]
    assert {'name': 'site', 'mountPath': '/etc/site', 'readOnly': True} in pod['containers'][0]['volumeMounts']


def test_empty_runtime_values_set_nothing() -> None:
    assert 'FINETUNER_RUNTIME_TEMPLATE' not in operator_env(manifests({}))
    partial = operator_env(manifests({'runtime': {'priorityClassName': 'low', 'affinity': {}}}))
    assert partial['FINETUNER_RUNTIME_TEMPLATE'] == '{"priorityClassName":"low"}'


@pytest.mark.parametrize(
    ('runtime', 'message'),
    [
        ({'priorityClassName': 'Low_Priority'}, "at '/runtime/priorityClassName': 'Low_Priority' does not match"),
        ({'env': [{'value': 'x'}]}, "at '/runtime/env/0': missing property 'name'"),
        (
            {'volumes': [{'name': 'v', 'mountPath': 'rel', 'configMap': {'name': 'c'}}]},
            "'/runtime/volumes/0/mountPath'",
        ),
        ({'imagePullSecrets': ['regcred']}, "at '/runtime/imagePullSecrets/0': got string, want object"),
        ({'envs': []}, "additional properties 'envs' not allowed"),
    ],
)
def test_bad_runtime_values_fail_install_naming_the_key(runtime: dict[str, Any], message: str) -> None:
    assert message in render_error({'runtime': runtime})


def test_the_runtime_schema_is_generated_from_the_contract() -> None:
    assert crdgen.VALUES_SCHEMA not in crdgen.drifted(), f'values.schema.json drifted: run `{crdgen.REGENERATE}`'
