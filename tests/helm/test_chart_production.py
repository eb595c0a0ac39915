"""The chart's production settings: leader election, the operator's timeouts and allow-lists, the NetworkPolicy."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_operator import builders
from finetuner_operator.config import OperatorConfig
from finetuner_operator.policy import policy_problems
from tests.helm.chart_support import (
    FULLNAME,
    KUBE_VERSIONS,
    RELEASE_NAMESPACE,
    by_kind,
    manifests,
    one,
    operator_container,
    operator_env,
    render_error,
)

OWNER = {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': 'r', 'uid': 'u'}}


def test_leader_election_lets_replicas_stand_by() -> None:
    docs = manifests({'operator': {'replicas': 2}})
    deployment = one(docs, 'Deployment')
    assert deployment['spec']['replicas'] == 2 and deployment['spec']['strategy'] == {'type': 'RollingUpdate'}
    env = operator_env(docs)
    config = OperatorConfig.from_env({**env, 'POD_NAME': 'ft-finetuner-operator-abc'})
    assert config.leader_election is True
    assert (config.lease_name, config.lease_namespace) == (f'{FULLNAME}-operator', RELEASE_NAMESPACE)
    assert (config.lease_duration, config.lease_renew_deadline, config.lease_retry_period) == (15.0, 10.0, 2.0)
    pod_name = next(e for e in operator_container(docs)['env'] if e['name'] == 'POD_NAME')
    assert pod_name['valueFrom'] == {'fieldRef': {'fieldPath': 'metadata.name'}}, 'the holder identity'
    assert config.identity == 'ft-finetuner-operator-abc'


def test_operator_timeouts_and_defaults_follow_the_values() -> None:
    values = {
        'operator': {
            'scaleUpTimeout': 2400,
            'imagePullTimeout': 900,
            'podStartTimeout': 300,
            'jobTTLSeconds': 3600,
            'defaultActiveDeadlineSeconds': 172800,
            'clusterDomain': 'corp.internal',
            'checkServiceAccount': False,
        },
        'trainer': {
            'resources': {'cpuPerGpu': '12', 'memoryPerGpu': '96Gi', 'shmPerGpu': '16Gi', 'ephemeralStorage': '200Gi'}
        },
    }
    config = OperatorConfig.from_env(operator_env(manifests(values)))
    assert (config.scale_up_timeout, config.image_pull_timeout, config.pod_start_timeout) == (2400, 900, 300)
    assert (config.job_ttl, config.default_active_deadline, config.cluster_domain) == (3600, 172800, 'corp.internal')
    assert config.check_service_account is False
    assert (config.cpu_per_gpu, config.memory_per_gpu, config.shm_per_gpu) == ('12', '96Gi', '16Gi')
    job = builders.build_job('r', 'ns', FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 'd',
                             'resources': {'gpus': 4, 'nodes': 2}}), config, OWNER)  # fmt: skip
    container = job['spec']['template']['spec']['containers'][0]
    assert container['resources']['requests'] == {'cpu': '48', 'memory': '384Gi', 'ephemeral-storage': '200Gi'}
    shm = next(v for v in job['spec']['template']['spec']['volumes'] if v['name'] == 'dshm')
    assert shm['emptyDir']['sizeLimit'] == '64Gi'
    assert job['spec']['ttlSecondsAfterFinished'] == 3600 and job['spec']['activeDeadlineSeconds'] == 172800
    master = next(e['value'] for e in container['env'] if e['name'] == 'MASTER_ADDR')
    assert master == 'r-trainer-0.r-workers.ns.svc.corp.internal'


def test_the_policy_values_reach_the_operator_and_refuse_what_they_do_not_list() -> None:
    assert 'FINETUNER_POLICY' not in operator_env(manifests({})), 'off unless enabled'
    policy = {
        'enabled': True,
        'allowedImages': ['registry.corp/ml'],
        'allowedTolerations': [{'key': 'nvidia.com/gpu', 'operator': 'Exists'}],
        'allowedNodeSelectors': {'gpu-type': ['a100']},
        'allowedPriorityClasses': ['research'],
    }
    config = OperatorConfig.from_env(operator_env(manifests({'policy': policy})))
    assert config.policy.allowed_images == ['registry.corp/ml']
    spec = FinetuneRunSpec.model_validate(
        {'model': 'm', 'trainData': 'd', 'image': 'registry.corp/ml/trainer:3', 'nodeSelector': {'gpu-type': 'a100'},
         'tolerations': [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}],
         'priorityClassName': 'research'}
    )  # fmt: skip
    assert policy_problems(spec, config.policy) == []
    locked = OperatorConfig.from_env(operator_env(manifests({'policy': {'enabled': True}})))
    assert len(policy_problems(spec, locked.policy)) == 4, 'enabled with empty lists allows nothing'


def test_policy_values_are_checked_at_install() -> None:
    message = render_error({'policy': {'enabled': True, 'allowedTolerations': [{'key': 'x', 'operator': 'Maybe'}]}})
    assert "at '/policy/allowedTolerations/0/operator': value must be one of 'Exists', 'Equal'" in message


@pytest.mark.parametrize('kube_version', KUBE_VERSIONS)
def test_network_policy_lets_a_runs_pods_reach_each_other_in_every_run_namespace(kube_version: str) -> None:
    values: dict[str, Any] = {
        'mode': 'namespaced',
        'namespaces': ['team-a', 'team-b'],
        'networkPolicy': {'enabled': True, 'egress': [{'to': [{'ipBlock': {'cidr': '10.20.0.0/16'}}]}]},
    }
    policies = by_kind(manifests(values), 'NetworkPolicy')
    assert sorted(p['metadata']['namespace'] for p in policies) == ['team-a', 'team-b']
    for policy in policies:
        kubernetes_validate.validate(policy, kube_version, strict=True)
    spec = policies[0]['spec']
    pod_labels = builders.build_job('r', 'team-a', FinetuneRunSpec(model='m', train_data='d'), OperatorConfig(),
                                    OWNER)['spec']['template']['metadata']['labels']  # fmt: skip
    assert spec['podSelector']['matchLabels'].items() <= pod_labels.items(), 'it selects the pods the operator builds'
    assert spec['ingress'][0]['from'][0]['podSelector'] == spec['podSelector'], 'any port between trainer pods'
    assert 'ports' not in spec['ingress'][0]
    assert {p['port'] for p in spec['egress'][1]['ports']} == {53}
    assert spec['egress'][2] == {'to': [{'ipBlock': {'cidr': '10.20.0.0/16'}}]}
    assert by_kind(manifests({}), 'NetworkPolicy') == [], 'off by default'
