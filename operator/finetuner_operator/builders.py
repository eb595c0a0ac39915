"""Pure builders of the objects a FinetuneRun owns: ConfigMap, trainer Job, headless Service.

Nothing here talks to an API server: every function takes the parsed run and the operator's
configuration and returns the manifest dict handed to the seam (``kube.py``). Names are
deterministic (``<run>-config``, ``<run>-trainer``, ``<run>-workers``), so creating twice is a 409
that the seam treats as success.

The run owns its Job; the Job owns the ConfigMap and the headless Service (:func:`build_job_dependents`),
so the Job's ``ttlSecondsAfterFinished`` takes them along, and a multi-node run restarted as a whole
(a new Job, see :class:`JobAttempt`) gets them afresh. The Job is created first: on a real cluster the
kubelet waits for a pod's ConfigMap volume, and the trainer's rendezvous retries until the Service's
DNS name resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from finetuner.api.pod import PodSettings
from finetuner.api.v1alpha1 import API_VERSION, EXIT_CONFIG_ERROR, FinetuneRunSpec, TrainerConfig
from finetuner_operator import quantity
from finetuner_operator.config import OperatorConfig

MANAGED_BY = 'finetuner-operator'
RUN_LABEL = 'finetuner.dev/run'
EXPERIMENT_LABEL = 'finetuner.dev/experiment'
SWEEP_POINT_ANNOTATION = 'finetuner.dev/sweep-point'
# Not under 'finetuner.dev/': Kopf hides annotations with its storage prefix from its diffs.
CANCEL_ANNOTATION = 'run.finetuner.dev/cancel'
QUEUE_LABEL = 'kueue.x-k8s.io/queue-name'
COMPLETION_INDEX_ANNOTATION = 'batch.kubernetes.io/job-completion-index'
# Which restart of a multi-node run a Job is (0: the first Job): a failure is counted once per Job.
RESTART_ANNOTATION = 'finetuner.dev/restart'
LAUNCHER = ['python', '-m', 'finetuner_trainer.launch']  # torchrun that keeps the trainer's exit code 3

CONTAINER = 'trainer'
CONFIG_DIR = '/etc/finetuner'
CONFIG_FILE = 'config.json'
CONFIG_PATH = f'{CONFIG_DIR}/{CONFIG_FILE}'
TERMINATION_LOG = '/dev/termination-log'
HOME_DIR = '/home/finetuner'
HF_CACHE_DIR = '/cache/huggingface'
RENDEZVOUS_PORT = 29500
RUN_AS_USER = 1000


def config_map_name(run: str) -> str:
    return f'{run}-config'


def job_name(run: str) -> str:
    return f'{run}-trainer'


def service_name(run: str) -> str:
    return f'{run}-workers'


def run_labels(run: str, experiment: str) -> dict[str, str]:
    """Labels on every child of a run: how pods, Jobs and ConfigMaps are found again."""
    return {
        'app.kubernetes.io/name': 'finetuner-trainer',
        'app.kubernetes.io/managed-by': MANAGED_BY,
        RUN_LABEL: run,
        EXPERIMENT_LABEL: experiment,
    }


def owner_reference(owner: dict[str, Any], block: bool = True) -> dict[str, Any]:
    """A controller owner reference to an object's body (needs metadata.uid). ``block``: the owner's
    foreground deletion waits for this dependent (setting it needs update on the owner's finalizers
    where OwnerReferencesPermissionEnforcement is on)."""
    meta = owner['metadata']
    if not meta.get('uid'):
        raise ValueError(f'cannot own objects by {owner.get("kind")} {meta.get("name")!r}: it has no metadata.uid')
    return {
        'apiVersion': owner.get('apiVersion', API_VERSION),
        'kind': owner['kind'],
        'name': meta['name'],
        'uid': meta['uid'],
        'controller': True,
        'blockOwnerDeletion': block,
    }


def output_uri(run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig) -> str:
    """The run's own output prefix: ``<spec.output or FINETUNER_OUTPUT>/<namespace>/<run>``."""
    base = (spec.output or config.output).rstrip('/')
    return f'{base}/{namespace}/{run}'


def queue_of(spec: FinetuneRunSpec, config: OperatorConfig) -> str | None:
    return spec.queue_name or config.queue


def trainer_config(run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig) -> TrainerConfig:
    return TrainerConfig(
        run_name=run,
        namespace=namespace,
        spec=spec,
        output_uri=output_uri(run, namespace, spec, config),
        data_uri=config.data,
        termination_log=TERMINATION_LOG,
    )


def _metadata(
    name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any], block: bool = True
) -> dict[str, Any]:
    return {
        'name': name,
        'namespace': namespace,
        'labels': dict(labels),
        'ownerReferences': [owner_reference(owner, block)],
    }


def build_config_map(
    run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig, job: dict[str, Any]
) -> dict[str, Any]:
    """The ConfigMap holding the TrainerConfig JSON, mounted at /etc/finetuner/config.json. Immutable (the
    spec is frozen once the run has its Job: the kubelet need not watch it) and owned by the Job."""
    body = trainer_config(run, namespace, spec, config).model_dump_json(by_alias=True, exclude_none=True, indent=2)
    return {
        'apiVersion': 'v1',
        'kind': 'ConfigMap',
        'metadata': _metadata(config_map_name(run), namespace, run_labels(run, spec.experiment), job, block=False),
        'immutable': True,
        'data': {CONFIG_FILE: body},
    }


def build_service(
    run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig, job: dict[str, Any]
) -> dict[str, Any]:
    """Headless Service giving the pods of a multi-node run stable DNS names (rendezvous); owned by the Job."""
    return {
        'apiVersion': 'v1',
        'kind': 'Service',
        'metadata': _metadata(service_name(run), namespace, run_labels(run, spec.experiment), job, block=False),
        'spec': {
            'clusterIP': 'None',
            'publishNotReadyAddresses': True,
            'selector': {RUN_LABEL: run},
            'ports': [{'name': 'rendezvous', 'port': RENDEZVOUS_PORT, 'targetPort': RENDEZVOUS_PORT}],
        },
    }


def _env(run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig, output: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {'name': 'PYTHONUNBUFFERED', 'value': '1'},
        {'name': 'HOME', 'value': HOME_DIR},
        {'name': 'FINETUNER_RUN', 'value': run},
        {'name': 'FINETUNER_OUTPUT_URI', 'value': output},
        {'name': 'HF_HOME', 'value': HF_CACHE_DIR if config.hf_cache_pvc else f'{HOME_DIR}/.cache/huggingface'},
    ]
    if config.s3_secret:
        # Credentials by reference only: the values never appear in the Job.
        for key in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'):
            env.append({'name': key, 'valueFrom': {'secretKeyRef': {'name': config.s3_secret, 'key': key}}})
    if config.s3_endpoint:
        env.append({'name': 'AWS_ENDPOINT_URL', 'value': config.s3_endpoint})
        env.append({'name': 'FINETUNER_S3_ENDPOINT', 'value': config.s3_endpoint})
    if config.s3_region:
        env.append({'name': 'AWS_DEFAULT_REGION', 'value': config.s3_region})
    if config.hf_endpoint:
        env.append({'name': 'HF_ENDPOINT', 'value': config.hf_endpoint})
    if config.hf_token_secret:
        env.append(
            {
                'name': 'HF_TOKEN',
                'valueFrom': {'secretKeyRef': {'name': config.hf_token_secret, 'key': 'HF_TOKEN', 'optional': True}},
            }
        )
    if spec.resources.nodes > 1:
        env += [
            {'name': 'MASTER_ADDR', 'value': master_addr(run, namespace, config)},
            {'name': 'MASTER_PORT', 'value': str(RENDEZVOUS_PORT)},
            {'name': 'NNODES', 'value': str(spec.resources.nodes)},
            {
                'name': 'NODE_RANK',
                'valueFrom': {'fieldRef': {'fieldPath': f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
            },
        ]
    return env


def master_addr(run: str, namespace: str, config: OperatorConfig) -> str:
    """The fully qualified name of node rank 0 (no search-domain lookups from inside the pods)."""
    return f'{job_name(run)}-0.{service_name(run)}.{namespace}.svc.{config.cluster_domain}'


def _command(run: str, spec: FinetuneRunSpec) -> list[str]:
    gpus = spec.resources.gpus
    nodes = spec.resources.nodes
    trainer = ['-m', 'finetuner_trainer', '--config', CONFIG_PATH]
    if nodes > 1:
        return [
            *LAUNCHER,
            f'--nnodes={nodes}',
            f'--nproc-per-node={max(gpus, 1)}',
            '--node-rank=$(NODE_RANK)',
            '--master-addr=$(MASTER_ADDR)',
            '--master-port=$(MASTER_PORT)',
            *trainer,
        ]
    if gpus > 1:
        return [*LAUNCHER, '--standalone', f'--nproc-per-node={gpus}', *trainer]
    return ['python', *trainer]


def _per_gpu(spec: FinetuneRunSpec) -> int:
    """How many GPUs' worth of CPU, memory and /dev/shm a pod gets by default (a CPU-only pod: one)."""
    return max(spec.resources.gpus, 1)


def memory_of(spec: FinetuneRunSpec, config: OperatorConfig) -> str:
    return spec.resources.memory or quantity.times(config.memory_per_gpu, _per_gpu(spec))


def ephemeral_storage_of(spec: FinetuneRunSpec, config: OperatorConfig) -> str:
    return spec.resources.ephemeral_storage or config.ephemeral_storage


def shm_size(spec: FinetuneRunSpec, config: OperatorConfig) -> str:
    """/dev/shm's size limit: the per-GPU share, at most half the memory limit (it is memory)."""
    wanted = quantity.times(config.shm_per_gpu, _per_gpu(spec))
    half = quantity.of_bytes(quantity.value(memory_of(spec, config)) / Decimal(2))
    return quantity.smaller(wanted, half)


def _resources(spec: FinetuneRunSpec, config: OperatorConfig) -> dict[str, Any]:
    """CPU is requested, not limited (a CPU limit throttles data loading for no one's benefit); memory and
    ephemeral storage are requested and limited alike; GPUs are limits (extended resources)."""
    memory = memory_of(spec, config)
    storage = ephemeral_storage_of(spec, config)
    requests = {
        'cpu': spec.resources.cpu or quantity.times(config.cpu_per_gpu, _per_gpu(spec)),
        'memory': memory,
        'ephemeral-storage': storage,
    }
    limits = {'memory': memory, 'ephemeral-storage': storage}
    if spec.resources.gpus > 0:
        # Extended resources are set as limits (requests default to them and must not differ).
        limits[config.gpu_resource] = str(spec.resources.gpus)
    return {'requests': requests, 'limits': limits}


def _volumes(run: str, spec: FinetuneRunSpec, config: OperatorConfig) -> tuple[list[dict], list[dict]]:
    storage = ephemeral_storage_of(spec, config)
    volumes: list[dict[str, Any]] = [
        {'name': 'config', 'configMap': {'name': config_map_name(run)}},
        {'name': 'tmp', 'emptyDir': {'sizeLimit': storage}},
        {'name': 'home', 'emptyDir': {'sizeLimit': storage}},
        # Always memory-backed and sized: the container runtime's default /dev/shm is 64 MiB, less than one
        # batch of 128 images at 224 px (77 MB) that a data-loader worker hands over through it.
        {'name': 'dshm', 'emptyDir': {'medium': 'Memory', 'sizeLimit': shm_size(spec, config)}},
    ]
    mounts: list[dict[str, Any]] = [
        {'name': 'config', 'mountPath': CONFIG_DIR, 'readOnly': True},
        {'name': 'tmp', 'mountPath': '/tmp'},
        {'name': 'home', 'mountPath': HOME_DIR},
        {'name': 'dshm', 'mountPath': '/dev/shm'},
    ]
    if config.hf_cache_pvc:
        volumes.append({'name': 'hf-cache', 'persistentVolumeClaim': {'claimName': config.hf_cache_pvc}})
        mounts.append({'name': 'hf-cache', 'mountPath': HF_CACHE_DIR})
    return volumes, mounts


def _tolerations(spec: FinetuneRunSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    tolerations = [dict(t) for t in config.tolerations]
    tolerations += [t.to_k8s() for t in spec.tolerations]
    return tolerations


def _pod_settings(pod_spec: dict[str, Any], settings: PodSettings) -> None:
    """The runtime template's and the run's pull secrets, affinity and priority class (env, volumes and the
    service account are placed with the container)."""
    if settings.image_pull_secrets:
        pod_spec['imagePullSecrets'] = [secret.to_k8s() for secret in settings.image_pull_secrets]
    if settings.affinity is not None:
        pod_spec['affinity'] = settings.affinity.to_k8s()
    if settings.priority_class_name:
        pod_spec['priorityClassName'] = settings.priority_class_name


def pod_failure_policy(spec: FinetuneRunSpec) -> dict[str, Any]:
    """Fail at once on the trainer's configuration exit code. A single pod's disruption (preemption, eviction)
    does not use up a retry; a multi-node run's disruption fails the Job, whose whole group of pods the
    operator then restarts (the survivors of a lost rank cannot re-form torchrun's static group)."""
    config_error = {
        'action': 'FailJob',
        'onExitCodes': {'containerName': CONTAINER, 'operator': 'In', 'values': [EXIT_CONFIG_ERROR]},
    }
    disruption = {
        'action': 'FailJob' if spec.resources.nodes > 1 else 'Ignore',
        'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}],
    }
    return {'rules': [config_error, disruption]}


@dataclass(frozen=True)
class JobAttempt:
    """Which Job of a run this is: ``restart`` 0 is the first; a multi-node run's Nth restart as a whole gets
    a new Job with ``restart`` N. ``active_deadline_seconds``: what is left of the run's deadline (None: the
    spec's or the operator's default)."""

    restart: int = 0
    active_deadline_seconds: int | None = None


def active_deadline(spec: FinetuneRunSpec, config: OperatorConfig) -> int | None:
    """The run's activeDeadlineSeconds: its own, else the operator's default (0: none)."""
    return spec.active_deadline_seconds or config.default_active_deadline or None


def _pod_spec(run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig) -> dict[str, Any]:
    volumes, mounts = _volumes(run, spec, config)
    settings = config.runtime_template.merged(spec.pod_settings())
    volumes += [volume.pod_volume() for volume in settings.volumes]
    mounts += [volume.mount() for volume in settings.volumes]
    container: dict[str, Any] = {
        'name': CONTAINER,
        'image': spec.image or config.trainer_image,
        'imagePullPolicy': 'IfNotPresent',
        'command': _command(run, spec),
        'env': _env(run, namespace, spec, config, output_uri(run, namespace, spec, config))
        + [variable.to_k8s() for variable in settings.env],
        'resources': _resources(spec, config),
        'volumeMounts': mounts,
        'terminationMessagePath': TERMINATION_LOG,
        'terminationMessagePolicy': 'FallbackToLogsOnError',
        'securityContext': {
            'allowPrivilegeEscalation': False,
            'capabilities': {'drop': ['ALL']},
            'readOnlyRootFilesystem': True,
            'runAsNonRoot': True,
        },
    }
    pod_spec: dict[str, Any] = {
        'restartPolicy': 'Never',
        'serviceAccountName': service_account_of(spec, config),
        'automountServiceAccountToken': False,
        'enableServiceLinks': False,
        'securityContext': {
            'runAsNonRoot': True,
            'runAsUser': RUN_AS_USER,
            'runAsGroup': RUN_AS_USER,
            'fsGroup': RUN_AS_USER,
            # A large Hugging Face cache volume is not re-chowned file by file at every pod start.
            'fsGroupChangePolicy': 'OnRootMismatch',
            'seccompProfile': {'type': 'RuntimeDefault'},
        },
        'containers': [container],
        'volumes': volumes,
    }
    node_selector = {**config.node_selector, **spec.node_selector}
    if node_selector:
        pod_spec['nodeSelector'] = node_selector
    tolerations = _tolerations(spec, config)
    if tolerations:
        pod_spec['tolerations'] = tolerations
    if config.runtime_class:
        pod_spec['runtimeClassName'] = config.runtime_class
    _pod_settings(pod_spec, settings)
    if spec.resources.nodes > 1:
        pod_spec['subdomain'] = service_name(run)
    return pod_spec


def service_account_of(spec: FinetuneRunSpec, config: OperatorConfig) -> str:
    """The ServiceAccount trainer pods run as: the run's, the runtime template's, or the chart's trainer account."""
    settings = config.runtime_template.merged(spec.pod_settings())
    return settings.service_account_name or config.trainer_service_account


def build_job(
    run: str,
    namespace: str,
    spec: FinetuneRunSpec,
    config: OperatorConfig,
    owner: dict[str, Any],
    attempt: JobAttempt | None = None,
) -> dict[str, Any]:
    """The batch/v1 trainer Job (Indexed with a rendezvous for multi-node runs)."""
    attempt = attempt or JobAttempt()
    labels = run_labels(run, spec.experiment)
    queue = queue_of(spec, config)
    job_labels = dict(labels)
    if queue:
        job_labels[QUEUE_LABEL] = queue
    multi_node = spec.resources.nodes > 1
    job_spec: dict[str, Any] = {
        # A multi-node run is restarted as a whole by the operator (a new Job per restart, up to the run's
        # backoffLimit): the Job controller would replace the failed rank alone.
        'backoffLimit': 0 if multi_node else spec.backoff_limit,
        'podFailurePolicy': pod_failure_policy(spec),
        # With a queue the Job waits suspended until Kueue admits it; spec.suspend holds it too.
        'suspend': bool(queue) or spec.suspend,
        'template': {'metadata': {'labels': labels}, 'spec': _pod_spec(run, namespace, spec, config)},
    }
    deadline = attempt.active_deadline_seconds or active_deadline(spec, config)
    if deadline:
        job_spec['activeDeadlineSeconds'] = deadline
    if config.job_ttl >= 0:
        job_spec['ttlSecondsAfterFinished'] = config.job_ttl
    if multi_node:
        job_spec.update(completionMode='Indexed', completions=spec.resources.nodes, parallelism=spec.resources.nodes)
    metadata = _metadata(job_name(run), namespace, job_labels, owner)
    metadata['annotations'] = {RESTART_ANNOTATION: str(attempt.restart)}
    return {'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': metadata, 'spec': job_spec}


def build_job_dependents(
    run: str, namespace: str, spec: FinetuneRunSpec, config: OperatorConfig, job: dict[str, Any]
) -> list[dict[str, Any]]:
    """What the Job's pods need, owned by the Job (``job``: as the API server answered, with its uid): the
    ConfigMap, and the headless Service of a multi-node run."""
    dependents = [build_config_map(run, namespace, spec, config, job)]
    if spec.resources.nodes > 1:
        dependents.append(build_service(run, namespace, spec, config, job))
    return dependents


def build_sweep_run(
    experiment: dict[str, Any], name: str, spec: dict[str, Any], point: dict[str, Any]
) -> dict[str, Any]:
    """A child FinetuneRun of an Experiment's sweep (spec already merged with the point)."""
    meta = experiment['metadata']
    return {
        'apiVersion': API_VERSION,
        'kind': 'FinetuneRun',
        'metadata': {
            'name': name,
            'namespace': meta['namespace'],
            'labels': {EXPERIMENT_LABEL: meta['name'], 'app.kubernetes.io/managed-by': MANAGED_BY},
            'annotations': {SWEEP_POINT_ANNOTATION: _point_json(point)},
            'ownerReferences': [owner_reference(experiment)],
        },
        'spec': {**spec, 'experiment': meta['name']},
    }


def _point_json(point: dict[str, Any]) -> str:
    import json

    return json.dumps(point, sort_keys=True)
