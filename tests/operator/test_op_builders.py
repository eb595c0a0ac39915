"""Every manifest builder, validated against the official Kubernetes 1.30 schema (strict)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, FinetuneRunSpec, TrainerConfig
from finetuner_operator import builders
from finetuner_operator.config import OperatorConfig

OWNER = {
    'apiVersion': 'finetuner.dev/v1alpha1',
    'kind': 'FinetuneRun',
    'metadata': {'name': 'run-a', 'namespace': 'team', 'uid': '1f4e3b1c-0000-4000-8000-000000000001'},
}
CONFIG = OperatorConfig(
    trainer_image='registry.local/trainer:1',
    s3_secret='s3-creds',
    s3_endpoint='http://minio.minio:9000',
    s3_region='eu-west-1',
    output='s3://models/runs',
    data='s3://models',
    hf_cache_pvc='hf-cache',
    hf_endpoint='http://hf-mirror.local',
    hf_token_secret='hf-token',
    node_selector={'pool': 'gpu'},
    tolerations=[{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}],
    runtime_class='nvidia',
    cpu_per_gpu='4',
    memory_per_gpu='16Gi',
)


def spec(**fields: Any) -> FinetuneRunSpec:
    return FinetuneRunSpec.model_validate({'model': 'efficientnet_b0', 'trainData': 's3://models/d.jsonl', **fields})


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, '1.30.0', strict=True)


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job['spec']['template']['spec']['containers'][0]


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e['name']: e.get('value', e.get('valueFrom')) for e in container(job)['env']}


@pytest.mark.parametrize(
    'fields',
    [
        {},
        {'resources': {'gpus': 0}},
        {'resources': {'gpus': 4, 'cpu': '16', 'memory': '64Gi'}},
        {'resources': {'gpus': 2, 'nodes': 3}},
        {'queueName': 'team-queue', 'activeDeadlineSeconds': 3600, 'backoffLimit': 0},
        {'suspend': True, 'nodeSelector': {'zone': 'a'}, 'tolerations': [{'key': 'spot', 'operator': 'Exists'}]},
        {'image': 'registry.local/trainer:custom', 'output': 's3://other/prefix'},
    ],
)
def test_every_child_is_a_valid_manifest(fields: dict[str, Any]) -> None:
    job = builders.build_job('run-a', 'team', spec(**fields), CONFIG, OWNER)
    validate(job)
    assert job['metadata']['ownerReferences'][0]['uid'] == OWNER['metadata']['uid']
    created = created_job(job)
    for child in builders.build_job_dependents('run-a', 'team', spec(**fields), CONFIG, created):
        validate(child)
        assert child['metadata']['ownerReferences'] == [
            {
                'apiVersion': 'batch/v1',
                'kind': 'Job',
                'name': 'run-a-trainer',
                'uid': created['metadata']['uid'],
                'controller': True,
                'blockOwnerDeletion': False,
            }
        ], 'owned by the Job: its ttlSecondsAfterFinished takes them along'
        assert child['metadata']['labels'][builders.RUN_LABEL] == 'run-a'


def created_job(job: dict[str, Any]) -> dict[str, Any]:
    """The Job as the API server answers its create: with a uid."""
    return {**job, 'metadata': {**job['metadata'], 'uid': '1f4e3b1c-0000-4000-8000-00000000000j'}}


def test_minimal_config_job_is_valid() -> None:
    job = builders.build_job('r', 'default', spec(), OperatorConfig(), OWNER)
    validate(job)
    assert 'AWS_ACCESS_KEY_ID' not in env(job)


def test_job_runs_the_trainer_with_gpu_limits_and_a_restricted_context() -> None:
    job = builders.build_job('run-a', 'team', spec(resources={'gpus': 1}), CONFIG, OWNER)
    c = container(job)
    pod = job['spec']['template']['spec']
    assert job['metadata']['name'] == 'run-a-trainer'
    assert c['image'] == 'registry.local/trainer:1'
    assert c['command'] == ['python', '-m', 'finetuner_trainer', '--config', '/etc/finetuner/config.json']
    assert c['resources'] == {
        'requests': {'cpu': '4', 'memory': '16Gi', 'ephemeral-storage': '50Gi'},
        'limits': {'memory': '16Gi', 'ephemeral-storage': '50Gi', 'nvidia.com/gpu': '1'},
    }, 'CPU requested, not limited'
    assert c['securityContext'] == {
        'allowPrivilegeEscalation': False,
        'capabilities': {'drop': ['ALL']},
        'readOnlyRootFilesystem': True,
        'runAsNonRoot': True,
    }
    assert pod['securityContext']['seccompProfile'] == {'type': 'RuntimeDefault'}
    assert pod['serviceAccountName'] == 'finetuner-trainer' and pod['automountServiceAccountToken'] is False
    assert pod['restartPolicy'] == 'Never' and pod['runtimeClassName'] == 'nvidia'
    assert pod['nodeSelector'] == {'pool': 'gpu'}
    assert c['terminationMessagePolicy'] == 'FallbackToLogsOnError'
    mounts = {m['mountPath'] for m in c['volumeMounts']}
    assert {'/etc/finetuner', '/tmp', '/home/finetuner', '/cache/huggingface'} <= mounts


def test_gpu_resource_name_is_configurable() -> None:
    config = CONFIG.model_copy(update={'gpu_resource': 'amd.com/gpu'})
    job = builders.build_job('run-a', 'team', spec(resources={'gpus': 2}), config, OWNER)
    assert container(job)['resources']['limits']['amd.com/gpu'] == '2'
    assert 'nvidia.com/gpu' not in container(job)['resources']['limits']


def test_credentials_are_secret_references_never_values() -> None:
    values = env(builders.build_job('run-a', 'team', spec(), CONFIG, OWNER))
    assert values['AWS_ACCESS_KEY_ID'] == {'secretKeyRef': {'name': 's3-creds', 'key': 'AWS_ACCESS_KEY_ID'}}
    assert values['AWS_SECRET_ACCESS_KEY'] == {'secretKeyRef': {'name': 's3-creds', 'key': 'AWS_SECRET_ACCESS_KEY'}}
    assert values['AWS_ENDPOINT_URL'] == values['FINETUNER_S3_ENDPOINT'] == 'http://minio.minio:9000'
    assert values['HF_HOME'] == '/cache/huggingface' and values['HF_ENDPOINT'] == 'http://hf-mirror.local'
    assert values['HF_TOKEN']['secretKeyRef']['name'] == 'hf-token'


def test_pod_failure_policy_fails_at_once_on_the_config_exit_code_and_ignores_disruptions() -> None:
    """(A single-node run; a multi-node run's disruption fails its Job: see test_op_production.py.)"""
    job = builders.build_job('run-a', 'team', spec(backoffLimit=5, activeDeadlineSeconds=600), CONFIG, OWNER)
    rules = job['spec']['podFailurePolicy']['rules']
    assert rules[0] == {
        'action': 'FailJob',
        'onExitCodes': {'containerName': 'trainer', 'operator': 'In', 'values': [EXIT_CONFIG_ERROR]},
    }
    assert rules[1] == {'action': 'Ignore', 'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]}
    assert job['spec']['backoffLimit'] == 5 and job['spec']['activeDeadlineSeconds'] == 600


def test_queue_creates_the_job_suspended_with_kueues_label() -> None:
    job = builders.build_job('run-a', 'team', spec(queueName='gpu-queue'), CONFIG, OWNER)
    assert job['spec']['suspend'] is True
    assert job['metadata']['labels']['kueue.x-k8s.io/queue-name'] == 'gpu-queue'
    default_queue = CONFIG.model_copy(update={'queue': 'default-queue'})
    job = builders.build_job('run-a', 'team', spec(), default_queue, OWNER)
    assert job['metadata']['labels']['kueue.x-k8s.io/queue-name'] == 'default-queue'
    assert builders.build_job('run-a', 'team', spec(), CONFIG, OWNER)['spec']['suspend'] is False


def test_multi_node_is_an_indexed_job_with_a_headless_service_and_rendezvous() -> None:
    run_spec = spec(resources={'gpus': 2, 'nodes': 3})
    job = builders.build_job('run-a', 'team', run_spec, CONFIG, OWNER)
    children = {
        c['kind']: c for c in builders.build_job_dependents('run-a', 'team', run_spec, CONFIG, created_job(job))
    }
    service = children['Service']
    assert job['spec']['completionMode'] == 'Indexed'
    assert job['spec']['completions'] == job['spec']['parallelism'] == 3
    assert job['spec']['template']['spec']['subdomain'] == service['metadata']['name'] == 'run-a-workers'
    assert service['spec']['clusterIP'] == 'None'
    values = env(job)
    assert values['MASTER_ADDR'] == 'run-a-trainer-0.run-a-workers.team.svc.cluster.local', 'fully qualified'
    assert values['NNODES'] == '3'
    assert 'job-completion-index' in values['NODE_RANK']['fieldRef']['fieldPath']
    command = container(job)['command']
    assert command[:3] == ['python', '-m', 'finetuner_trainer.launch'], 'torchrun that keeps exit code 3'
    assert '--nnodes=3' in command and '--nproc-per-node=2' in command
    assert '--node-rank=$(NODE_RANK)' in command


def test_single_node_multi_gpu_uses_standalone_torchrun() -> None:
    job = builders.build_job('run-a', 'team', spec(resources={'gpus': 4}), CONFIG, OWNER)
    assert container(job)['command'][:5] == [
        'python',
        '-m',
        'finetuner_trainer.launch',
        '--standalone',
        '--nproc-per-node=4',
    ]


def test_config_map_holds_the_trainer_config() -> None:
    job = created_job(builders.build_job('run-a', 'team', spec(epochs=2), CONFIG, OWNER))
    cm = builders.build_config_map('run-a', 'team', spec(epochs=2), CONFIG, job)
    assert cm['immutable'] is True
    config = TrainerConfig.model_validate(json.loads(cm['data']['config.json']))
    assert config.run_name == 'run-a' and config.namespace == 'team'
    assert config.output_uri == 's3://models/runs/team/run-a'
    assert config.data_uri == 's3://models'
    assert config.termination_log == '/dev/termination-log'
    assert config.spec.epochs == 2
    other = builders.build_config_map('run-a', 'team', spec(output='s3://mine/out'), CONFIG, job)
    assert json.loads(other['data']['config.json'])['outputUri'] == 's3://mine/out/team/run-a'


def test_owner_without_uid_is_refused_with_a_clear_message() -> None:
    owner = {'kind': 'FinetuneRun', 'metadata': {'name': 'x'}}
    with pytest.raises(ValueError, match=r"FinetuneRun 'x'.*no metadata.uid"):
        builders.build_job('x', 'default', spec(), CONFIG, owner)


def test_sweep_child_run_is_owned_by_the_experiment() -> None:
    experiment = {
        'apiVersion': 'finetuner.dev/v1alpha1',
        'kind': 'Experiment',
        'metadata': {'name': 'exp', 'namespace': 'team', 'uid': 'u-1'},
    }
    run = builders.build_sweep_run(experiment, 'exp-000', {'model': 'm', 'trainData': 'd'}, {'epochs': 2})
    assert run['spec']['experiment'] == 'exp'
    assert run['metadata']['labels'][builders.EXPERIMENT_LABEL] == 'exp'
    assert run['metadata']['ownerReferences'][0]['kind'] == 'Experiment'
    assert json.loads(run['metadata']['annotations'][builders.SWEEP_POINT_ANNOTATION]) == {'epochs': 2}
