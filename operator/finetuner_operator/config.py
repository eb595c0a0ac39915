"""The operator's one configuration object, read once from the environment at start-up.

Every variable is documented here; the Helm chart sets them from its values.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, Field, field_validator

from finetuner.api.pod import PodSettings


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
    default_cpu: str | None = Field(default=None, description='FINETUNER_DEFAULT_CPU: CPU per trainer pod.')
    default_memory: str | None = Field(default=None, description='FINETUNER_DEFAULT_MEMORY: memory per trainer pod.')
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
            if name in ('node_selector', 'tolerations', 'runtime_template'):
                try:
                    values[name] = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f'FINETUNER_{name.upper()} is not valid JSON: {e}') from e
            else:
                values[name] = raw
        return cls(**values)
