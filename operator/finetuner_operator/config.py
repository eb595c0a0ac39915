"""The operator's one configuration object, read once from the environment at start-up.

Every variable is documented here; the Helm chart sets them from its values.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from pydantic import BaseModel, Field, field_validator

from finetuner.api.pod import PodSettings
from finetuner.api.v1alpha1 import QUANTITY_PATTERN
from finetuner_operator.policy import AdmissionPolicy


class OperatorConfig(BaseModel):
    trainer_image: str = Field(
        default='ghcr.io/kube-finetuner/trainer:0.1.0', description='FINETUNER_TRAINER_IMAGE: the trainer image.'
    )
    namespaces: list[str] = Field(
        default_factory=list, description='FINETUNER_NAMESPACES: comma-separated; empty watches the whole cluster.'
    )
    output: str = Field(default='s3://finetuner/runs', description='FINETUNER_OUTPUT: default output prefix of runs.')
    data: str = Field(default='s3://finetuner', description='FINETUNER_DATA: prefix holding datasets/<name>/.')
    s3_endpoint: str | None = Field(default=None, description='FINETUNER_S3_ENDPOINT: S3-compatible endpoint URL.')
    s3_secret: str | None = Field(
        default=None,
        description='FINETUNER_S3_SECRET: Secret (in the run namespace) with AWS_ACCESS_KEY_ID and '
        'AWS_SECRET_ACCESS_KEY, handed to trainer pods by reference.',
    )
    s3_region: str | None = Field(default=None, description='FINETUNER_S3_REGION: AWS_DEFAULT_REGION for pods.')
    gpu_resource: str = Field(default='nvidia.com/gpu', description='FINETUNER_GPU_RESOURCE: extended resource name.')
    cpu_per_gpu: str = Field(
        default='4',
        description="FINETUNER_CPU_PER_GPU: CPU request per GPU of a pod (a CPU-only pod gets one GPU's worth) "
        'when the run sets no resources.cpu. Requested, not limited: data loading may use idle cores.',
        pattern=QUANTITY_PATTERN,
    )
    memory_per_gpu: str = Field(
        default='16Gi',
        description='FINETUNER_MEMORY_PER_GPU: memory request and limit per GPU of a pod (a CPU-only pod gets '
        "one GPU's worth) when the run sets no resources.memory; /dev/shm counts against it.",
        pattern=QUANTITY_PATTERN,
    )
    shm_per_gpu: str = Field(
        default='4Gi',
        description='FINETUNER_SHM_PER_GPU: size limit of the memory-backed /dev/shm per GPU of a pod (data '
        'loader workers hand batches over through it; NCCL uses it between GPUs), at most half the memory limit.',
        pattern=QUANTITY_PATTERN,
    )
    ephemeral_storage: str = Field(
        default='50Gi',
        description='FINETUNER_EPHEMERAL_STORAGE: ephemeral-storage request and limit of a trainer pod, and the '
        'size limit of its /tmp and $HOME volumes (checkpoints and the artifact are staged there), when the run '
        'sets no resources.ephemeralStorage.',
        pattern=QUANTITY_PATTERN,
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description='FINETUNER_NODE_SELECTOR: JSON object added to every trainer pod.'
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description='FINETUNER_TOLERATIONS: JSON list added to every trainer pod.'
    )
    runtime_class: str | None = Field(default=None, description='FINETUNER_RUNTIME_CLASS: e.g. nvidia.')
    hf_cache_pvc: str | None = Field(
        default=None, description='FINETUNER_HF_CACHE_PVC: PVC mounted as the Hugging Face cache (HF_HOME).'
    )
    hf_endpoint: str | None = Field(default=None, description='FINETUNER_HF_ENDPOINT: hub mirror URL.')
    hf_token_secret: str | None = Field(
        default=None, description='FINETUNER_HF_TOKEN_SECRET: Secret with key HF_TOKEN.'
    )
    queue: str | None = Field(default=None, description='FINETUNER_QUEUE: default Kueue LocalQueue.')
    max_concurrent_runs: int = Field(
        default=0,
        ge=0,
        description='FINETUNER_MAX_CONCURRENT_RUNS: runs with an active trainer Job at once, over all watched '
        'namespaces; the others wait (CREATED/Waiting) without a Job. Runs with a Kueue queue are not counted. '
        '0 = no limit (Kueue is the better tool).',
    )
    runtime_template: PodSettings = Field(
        default_factory=PodSettings,
        description='FINETUNER_RUNTIME_TEMPLATE: JSON pod settings every trainer pod gets (imagePullSecrets, '
        "affinity, priorityClassName, env, volumes, serviceAccountName); a run's own settings win.",
    )
    trainer_service_account: str = Field(
        default='finetuner-trainer', description='FINETUNER_TRAINER_SERVICE_ACCOUNT: no API rights, no token.'
    )
    metrics_port: int = Field(default=8080, description='FINETUNER_METRICS_PORT: Prometheus metrics.')
    health_port: int = Field(default=8081, description='FINETUNER_HEALTH_PORT: Kopf liveness endpoint.')
    progress_interval: float = Field(
        default=10.0, gt=0, description='FINETUNER_PROGRESS_INTERVAL: seconds between progress reads.'
    )
    relist_interval: float = Field(
        default=300.0,
        gt=0,
        description='FINETUNER_RELIST_INTERVAL: seconds between full listings of runs, Jobs and pods into the '
        "operator's cache (its watches keep it current in between).",
    )
    unschedulable_timeout: float = Field(
        default=600.0, gt=0, description='FINETUNER_UNSCHEDULABLE_TIMEOUT: seconds Pending before FAILED.'
    )
    scale_up_timeout: float = Field(
        default=1800.0,
        gt=0,
        description='FINETUNER_SCALE_UP_TIMEOUT: seconds an unschedulable pod may wait once the cluster '
        'autoscaler has reported TriggeredScaleUp for it (new GPU nodes take minutes to join).',
    )
    image_pull_timeout: float = Field(
        default=600.0,
        ge=0,
        description='FINETUNER_IMAGE_PULL_TIMEOUT: seconds ErrImagePull/ImagePullBackOff may last before the run '
        'fails (the kubelet retries a registry error; a large CUDA image takes minutes). InvalidImageName fails '
        'at once.',
    )
    pod_start_timeout: float = Field(
        default=600.0,
        gt=0,
        description='FINETUNER_POD_START_TIMEOUT: seconds the trainer Job may stay without pods because the Job '
        'controller cannot create them (FailedCreate: a quota, a missing ServiceAccount), or a pod may stay in '
        'CreateContainerConfigError (a missing Secret or key), before the run fails with that message.',
    )
    job_ttl: int = Field(
        default=86400,
        ge=-1,
        description='FINETUNER_JOB_TTL: ttlSecondsAfterFinished of trainer Jobs: seconds after a run ends before '
        'its Job, pods and ConfigMap are deleted (the run, its status, logs and artifact stay); -1 keeps them.',
    )
    default_active_deadline: int = Field(
        default=7 * 86400,
        ge=0,
        description='FINETUNER_DEFAULT_ACTIVE_DEADLINE: activeDeadlineSeconds of runs that set none, so that '
        'repeated evictions cannot retry forever; 0 for none.',
    )
    cluster_domain: str = Field(
        default='cluster.local',
        description='FINETUNER_CLUSTER_DOMAIN: the cluster DNS domain; multi-node runs rendezvous at '
        '<run>-trainer-0.<run>-workers.<namespace>.svc.<domain>.',
    )
    check_service_account: bool = Field(
        default=True,
        description="FINETUNER_CHECK_SERVICE_ACCOUNT: before creating a run's Job, check that the ServiceAccount "
        'its pods run as exists in its namespace, and fail the run with NamespaceNotPrepared if not.',
    )
    policy: AdmissionPolicy = Field(
        default_factory=AdmissionPolicy,
        description='FINETUNER_POLICY: JSON allow-lists of image registries, tolerations, node selectors and '
        'priority classes that runs may use (Helm value policy); unset lists allow anything.',
    )
    leader_election: bool = Field(
        default=False,
        description='FINETUNER_LEADER_ELECTION: hold a coordination.k8s.io Lease before acting (the chart sets '
        'it): a second replica, or an old pod still running after a partition, stays passive.',
    )
    lease_name: str = Field(default='finetuner-operator', description='FINETUNER_LEASE_NAME: the Lease.')
    lease_namespace: str = Field(
        default='default', description="FINETUNER_LEASE_NAMESPACE: the Lease's namespace (the release namespace)."
    )
    lease_duration: float = Field(
        default=15.0, gt=0, description='FINETUNER_LEASE_DURATION: seconds a Lease holds without renewal.'
    )
    lease_renew_deadline: float = Field(
        default=10.0,
        gt=0,
        description='FINETUNER_LEASE_RENEW_DEADLINE: seconds the leader keeps trying to renew before it stops.',
    )
    lease_retry_period: float = Field(
        default=2.0, gt=0, description='FINETUNER_LEASE_RETRY_PERIOD: seconds between tries to acquire or renew.'
    )
    identity: str = Field(
        default_factory=socket.gethostname,
        description='FINETUNER_IDENTITY: holder identity in the Lease (default: POD_NAME or the host name).',
    )

    @field_validator('namespaces', mode='before')
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [n.strip() for n in value.split(',') if n.strip()]
        return value

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(f'FINETUNER_{name.upper()}')
            if raw is None or raw == '':
                continue
            if name in ('node_selector', 'tolerations', 'runtime_template', 'policy'):
                try:
                    values[name] = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f'FINETUNER_{name.upper()} is not valid JSON: {e}') from e
            else:
                values[name] = raw
        if 'identity' not in values and env.get('POD_NAME'):
            values['identity'] = env['POD_NAME']  # the chart's downward-API variable
        return cls(**values)
