"""The chart renders, lints strict and produces objects every supported Kubernetes version accepts."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from finetuner_operator.config import OperatorConfig
from tests.helm.chart_support import (
    CHART,
    FULLNAME,
    KUBE_VERSIONS,
    RELEASE_NAMESPACE,
    ROOT,
    THIRD_PARTY_KINDS,
    VALUE_SETS,
    by_kind,
    chart,
    crds,
    helm,
    manifests,
    manifests_of,
    one,
    operator_container,
    operator_env,
    render,
    render_error,
)

SETS = sorted(VALUE_SETS)


@pytest.mark.parametrize('kube_version', [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
@pytest.mark.parametrize('value_set', SETS)
def test_chart_lints_strict(value_set: str, kube_version: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, kube_version=f'v{kube_version}')
    problems = [m for m in report['messages'] if m['severity'] >= 2]  # 2 warning, 3 error
    assert report['errors'] == [] and problems == [], problems or report['errors']


def test_chart_declares_the_kubernetes_versions_it_is_validated_against() -> None:
    assert chart().metadata['kubeVersion'] == f'>={KUBE_VERSIONS[0]}-0'
    assert chart().metadata['apiVersion'] == 'v2'


@pytest.mark.parametrize('kube_version', KUBE_VERSIONS)
@pytest.mark.parametrize('value_set', SETS)
def test_every_rendered_object_is_valid_kubernetes(value_set: str, kube_version: str) -> None:
    checked = 0
    for doc in manifests_of(value_set):
        if (doc['apiVersion'], doc['kind']) in THIRD_PARTY_KINDS:
            continue  # checked field by field in test_third_party_objects_* below
        kubernetes_validate.validate(doc, kube_version, strict=True)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize('kube_version', KUBE_VERSIONS)
def test_chart_crds_are_valid_kubernetes(kube_version: str) -> None:
    docs = crds()
    assert sorted(d['metadata']['name'] for d in docs) == ['experiments.finetuner.dev', 'finetuneruns.finetuner.dev']
    for doc in docs:
        kubernetes_validate.validate(doc, kube_version, strict=True)


def test_chart_crds_are_the_generated_ones_byte_for_byte() -> None:
    generated = {p.name: p.read_bytes() for p in (ROOT / 'crds').glob('*.yaml')}
    in_chart = {p.name: p.read_bytes() for p in (CHART / 'crds').glob('*.yaml')}
    assert generated and in_chart == generated, 'run `python -m finetuner.api.crdgen` and commit both folders'


def test_operator_deployment_is_one_replica_recreated_with_liveness_and_metrics() -> None:
    """Without leader election; with it (the default) see test_leader_election_lets_replicas_stand_by."""
    docs = manifests({'operator': {'leaderElection': {'enabled': False}}})
    deployment = one(docs, 'Deployment')
    assert deployment['metadata']['namespace'] == RELEASE_NAMESPACE
    assert deployment['spec']['replicas'] == 1
    assert deployment['spec']['strategy'] == {'type': 'Recreate'}
    assert operator_env(docs)['FINETUNER_LEADER_ELECTION'] == 'false'
    assert 'two operators would both act' in render_error(
        {'operator': {'replicas': 2, 'leaderElection': {'enabled': False}}}
    )
    container = operator_container(docs)
    ports = {p['name']: p['containerPort'] for p in container['ports']}
    env = operator_env(docs)
    assert ports == {'metrics': int(env['FINETUNER_METRICS_PORT']), 'health': int(env['FINETUNER_HEALTH_PORT'])}
    assert container['livenessProbe']['httpGet'] == {'path': '/healthz', 'port': 'health'}
    assert container['image'] == 'ghcr.io/kube-finetuner/operator:0.1.0'
    service = one(docs, 'Service')
    assert service['spec']['ports'][0]['targetPort'] == 'metrics'
    assert service['spec']['selector'].items() <= deployment['spec']['template']['metadata']['labels'].items()


@pytest.mark.parametrize('value_set', SETS)
def test_operator_environment_is_read_by_the_operator_config(value_set: str) -> None:
    """Every FINETUNER_* variable the chart sets is a field of OperatorConfig and parses there."""
    env = operator_env(manifests_of(value_set))
    known = {f'FINETUNER_{name.upper()}' for name in OperatorConfig.model_fields}
    unknown = {k for k in env if k.startswith('FINETUNER_')} - known
    assert not unknown, f'the chart sets variables the operator does not read: {sorted(unknown)}'
    config = OperatorConfig.from_env(env)
    assert config.trainer_image.startswith('ghcr.io/kube-finetuner/trainer:') or value_set == 'values-gpu.yaml'


def test_operator_config_follows_the_values() -> None:
    values = VALUE_SETS['namespaced-kueue'] | {
        'objectStore': {
            'bucket': 'ml-data',
            'outputPrefix': 'finetuner/runs',
            'endpoint': 'http://minio:9000',
            'region': 'eu-west-1',
            'credentials': {'existingSecret': 'minio-keys'},
        },
        'huggingFace': {'endpoint': 'https://hf-mirror.example.com', 'token': {'existingSecret': 'hf'}},
        'operator': {'maxConcurrentRuns': 3, 'progressInterval': 5, 'unschedulableTimeout': 120},
    }
    config = OperatorConfig.from_env(operator_env(manifests(values)))
    assert config.namespaces == ['team-a', 'team-b']
    assert config.output == 's3://ml-data/finetuner/runs'
    assert config.data == 's3://ml-data'
    assert (config.s3_endpoint, config.s3_region, config.s3_secret) == ('http://minio:9000', 'eu-west-1', 'minio-keys')
    assert config.node_selector == {'nvidia.com/gpu.present': 'true'}
    assert config.tolerations == [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}]
    assert config.runtime_class == 'nvidia'
    assert config.queue == 'gpus'
    assert (config.hf_endpoint, config.hf_token_secret) == ('https://hf-mirror.example.com', 'hf')
    assert (config.max_concurrent_runs, config.progress_interval, config.unschedulable_timeout) == (3, 5.0, 120.0)
    assert (config.cpu_per_gpu, config.memory_per_gpu, config.gpu_resource) == ('4', '16Gi', 'nvidia.com/gpu')
    assert (config.shm_per_gpu, config.ephemeral_storage) == ('4Gi', '50Gi')
    assert config.trainer_service_account == f'{FULLNAME}-trainer'


def test_cluster_wide_mode_watches_every_namespace() -> None:
    docs = manifests_of('cluster-wide-created-secret')
    assert 'FINETUNER_NAMESPACES' not in operator_env(docs)
    roles = [r['metadata']['name'] for r in by_kind(docs, 'Role') + by_kind(docs, 'RoleBinding')]
    assert roles == [f'{FULLNAME}-leader-election'] * 2, 'only the Lease in the release namespace'
    assert len(by_kind(docs, 'ClusterRole')) == 1


def test_namespaced_mode_watches_the_listed_namespaces_with_a_role_in_each() -> None:
    docs = manifests_of('namespaced-existing-secret')
    assert operator_env(docs)['FINETUNER_NAMESPACES'] == 'team-a,team-b'
    assert sorted(r['metadata']['namespace'] for r in _operator_roles(docs, 'Role')) == ['team-a', 'team-b']
    assert sorted(b['metadata']['namespace'] for b in _operator_roles(docs, 'RoleBinding')) == ['team-a', 'team-b']


def _operator_roles(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Roles (or RoleBindings) of the watched namespaces, not the leader election's in the release namespace."""
    return [r for r in by_kind(docs, kind) if not r['metadata']['name'].endswith('-leader-election')]


def test_namespaced_mode_without_namespaces_watches_the_release_namespace() -> None:
    docs = manifests({'mode': 'namespaced'})
    assert operator_env(docs)['FINETUNER_NAMESPACES'] == RELEASE_NAMESPACE
    assert [r['metadata']['namespace'] for r in _operator_roles(docs, 'Role')] == [RELEASE_NAMESPACE]


def test_trainer_service_account_has_no_token_and_exists_in_every_run_namespace() -> None:
    docs = manifests_of('namespaced-kueue')
    trainers = [sa for sa in by_kind(docs, 'ServiceAccount') if sa['metadata']['name'] == f'{FULLNAME}-trainer']
    assert sorted(sa['metadata']['namespace'] for sa in trainers) == ['team-a', 'team-b']
    assert all(sa['automountServiceAccountToken'] is False for sa in trainers)


def _secrets(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s['metadata']['namespace'], s['metadata']['name']): s for s in by_kind(docs, 'Secret')}


def test_created_object_store_secret_is_in_the_release_and_every_run_namespace() -> None:
    docs = manifests_of('cluster-wide-created-secret')
    name = f'{FULLNAME}-object-store'
    secrets = _secrets(docs)
    assert {(RELEASE_NAMESPACE, name), ('ml', name)} <= set(secrets)
    assert secrets[('ml', name)]['stringData'] == {
        'AWS_ACCESS_KEY_ID': 'AKIAEXAMPLE',
        'AWS_SECRET_ACCESS_KEY': 'example-secret-key',
    }
    assert operator_env(docs)['FINETUNER_S3_SECRET'] == name
    refs = {
        e['name']: e['valueFrom']['secretKeyRef']
        for e in operator_container(docs)['env']
        if 'secretKeyRef' in e.get('valueFrom', {})
    }
    assert refs['AWS_ACCESS_KEY_ID'] == {'name': name, 'key': 'AWS_ACCESS_KEY_ID'}
    assert secrets[('ml', f'{FULLNAME}-hf-token')]['stringData'] == {'HF_TOKEN': 'hf_example'}


def test_existing_secrets_are_referenced_not_created() -> None:
    docs = manifests_of('namespaced-existing-secret')
    assert by_kind(docs, 'Secret') == []
    env = operator_env(docs)
    assert (env['FINETUNER_S3_SECRET'], env['FINETUNER_HF_TOKEN_SECRET'], env['FINETUNER_HF_CACHE_PVC']) == (
        'my-s3',
        'my-hf',
        'hf',
    )
    assert by_kind(docs, 'PersistentVolumeClaim') == []


def test_image_pull_secrets_reach_the_operator_pod_and_the_trainer_account() -> None:
    docs = manifests_of('namespaced-existing-secret')
    assert one(docs, 'Deployment')['spec']['template']['spec']['imagePullSecrets'] == [{'name': 'regcred'}]
    trainers = [sa for sa in by_kind(docs, 'ServiceAccount') if sa['metadata']['name'].endswith('-trainer')]
    assert len(trainers) == 2 and all(sa['imagePullSecrets'] == [{'name': 'regcred'}] for sa in trainers)


def test_without_credentials_pods_use_their_ambient_identity() -> None:
    docs = manifests_of('defaults')
    assert by_kind(docs, 'Secret') == []
    assert 'FINETUNER_S3_SECRET' not in operator_env(docs)
    assert not [e for e in operator_container(docs)['env'] if 'secretKeyRef' in e.get('valueFrom', {})]


def test_hf_cache_claim_is_created_per_run_namespace_and_can_outlive_the_release() -> None:
    docs = manifests_of('cluster-wide-created-secret')
    (claim,) = by_kind(docs, 'PersistentVolumeClaim')
    assert claim['metadata']['namespace'] == 'ml'
    assert claim['metadata']['annotations'] == {'helm.sh/resource-policy': 'keep'}
    assert claim['spec']['accessModes'] == ['ReadWriteMany']
    assert operator_env(docs)['FINETUNER_HF_CACHE_PVC'] == claim['metadata']['name']


def test_kueue_queue_name_without_created_queues() -> None:
    docs = manifests_of('kueue-queue-only')
    assert operator_env(docs)['FINETUNER_QUEUE'] == 'team-queue'
    assert not [d for d in docs if d['apiVersion'].startswith('kueue.x-k8s.io/')]


def test_without_kueue_jobs_are_not_queued() -> None:
    docs = manifests_of('defaults')
    assert 'FINETUNER_QUEUE' not in operator_env(docs)
    assert not [d for d in docs if d['apiVersion'].startswith('kueue.x-k8s.io/')]


def test_third_party_objects_kueue_queues_match_kueue_v1beta1() -> None:
    docs = manifests_of('namespaced-kueue')
    flavor = one(docs, 'ResourceFlavor')
    assert flavor['spec'] == {
        'nodeLabels': {'nvidia.com/gpu.present': 'true'},
        'tolerations': [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}],
    }
    cluster_queue = one(docs, 'ClusterQueue')
    (group,) = cluster_queue['spec']['resourceGroups']
    # trainer pods request ephemeral-storage: a ClusterQueue that does not cover it never admits them
    assert group['coveredResources'] == ['cpu', 'memory', 'nvidia.com/gpu', 'ephemeral-storage']
    (flavor_quota,) = group['flavors']
    assert flavor_quota['name'] == flavor['metadata']['name']
    quotas = {r['name']: r['nominalQuota'] for r in flavor_quota['resources']}
    assert quotas == {'cpu': '32', 'memory': '128Gi', 'nvidia.com/gpu': 4, 'ephemeral-storage': '1Ti'}
    assert set(quotas) == set(group['coveredResources'])
    local_queues = by_kind(docs, 'LocalQueue')
    assert sorted(q['metadata']['namespace'] for q in local_queues) == ['team-a', 'team-b']
    assert {q['metadata']['name'] for q in local_queues} == {operator_env(docs)['FINETUNER_QUEUE']}
    assert {q['spec']['clusterQueue'] for q in local_queues} == {cluster_queue['metadata']['name']}
    assert 'namespace' not in cluster_queue['metadata'] and 'namespace' not in flavor['metadata']


def test_third_party_objects_service_monitor_scrapes_the_metrics_service() -> None:
    docs = manifests_of('service-monitor')
    monitor = one(docs, 'ServiceMonitor')
    service = one(docs, 'Service')
    assert monitor['metadata']['labels']['release'] == 'prom'
    assert monitor['spec']['selector']['matchLabels'].items() <= service['metadata']['labels'].items()
    assert monitor['spec']['namespaceSelector'] == {'matchNames': [service['metadata']['namespace']]}
    (endpoint,) = monitor['spec']['endpoints']
    assert endpoint == {'port': 'metrics', 'path': '/metrics', 'interval': '30s'}
    assert endpoint['port'] in {p['name'] for p in service['spec']['ports']}


def test_no_service_monitor_unless_asked() -> None:
    assert by_kind(manifests_of('defaults'), 'ServiceMonitor') == []


def test_notes_tell_how_to_submit_a_first_run() -> None:
    notes = render({'mode': 'namespaced', 'namespaces': ['ml']})['finetuner/templates/NOTES.txt']
    assert 'kubectl -n ml apply -f examples/run.yaml' in notes
    assert "finetuner.login(backend='kubernetes', namespace='ml', bucket='finetuner')" in notes
    assert 'finetuner.fit(' in notes
    assert (ROOT / 'examples' / 'run.yaml').is_file()
    assert f'deployment/{FULLNAME}-operator' in notes


def test_image_tag_latest_is_refused() -> None:
    message = render_error({'trainer': {'image': {'tag': 'latest'}}})
    assert 'trainer.image.tag "latest" is not allowed: pin a version' in message


def test_keys_and_existing_secret_together_are_refused() -> None:
    message = render_error({'objectStore': {'credentials': {'existingSecret': 's3', 'accessKeyId': 'k'}}})
    assert 'objectStore.credentials: set either existingSecret or accessKeyId/secretAccessKey, not both' in message


def test_half_a_key_pair_is_refused() -> None:
    message = render_error({'objectStore': {'credentials': {'accessKeyId': 'k'}}})
    assert 'accessKeyId and secretAccessKey go together' in message
