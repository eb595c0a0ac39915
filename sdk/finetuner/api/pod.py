"""Per-run pod settings platform teams need, in Kubernetes' own shapes (part of the contract).

A run's ``imagePullSecrets``, ``affinity``, ``priorityClassName``, ``env``, ``volumes`` and
``serviceAccountName`` go into its trainer pods; the same fields form the cluster-wide runtime template
an administrator sets in the Helm values (``runtime:``), which the operator applies to every run
(``PodSettings.merged``: the run's values win, lists are joined by name). Extra volumes are always mounted
read-only, and neither may replace what the operator itself mounts or sets.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

ENV_NAME_PATTERN = r'^[-._a-zA-Z][-._a-zA-Z0-9]*$'
DNS1123_LABEL_PATTERN = r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'
DNS1123_SUBDOMAIN_PATTERN = r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'
# What the operator sets and mounts itself (builders.py); a run or the runtime template cannot replace it.
RESERVED_ENV = ('HOME', 'PYTHONUNBUFFERED', 'HF_HOME', 'MASTER_ADDR', 'MASTER_PORT', 'NNODES', 'NODE_RANK')
RESERVED_ENV_PREFIX = 'FINETUNER_'
RESERVED_VOLUMES = ('config', 'tmp', 'home', 'hf-cache', 'dshm')
RESERVED_MOUNTS = ('/etc/finetuner', '/tmp', '/home/finetuner', '/cache/huggingface', '/dev/shm', '/dev')


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    entry = {'rule': rule, 'message': message}
    if field_path:
        entry['fieldPath'] = field_path
    return entry


class _K8sModel(BaseModel):
    """camelCase on the wire, unknown fields refused (the same settings as the contract's models)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra='forbid', validate_default=True)

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode='json')


def _name(description: str, pattern: str = DNS1123_SUBDOMAIN_PATTERN, max_length: int = 253) -> Any:
    return Field(min_length=1, max_length=max_length, pattern=pattern, description=description)


class LocalObjectReference(_K8sModel):
    name: str = _name('Name of the Secret in the run namespace.')


class KeySelector(_K8sModel):
    name: str = _name('Name of the Secret or ConfigMap in the run namespace.')
    key: str = Field(min_length=1, max_length=253, description='The key to read.')
    optional: bool | None = Field(default=None, description='Start even when the key or object is missing.')


class EnvVarSource(_K8sModel):
    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [
                _rule(
                    '(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) == 1',
                    'give exactly one of secretKeyRef and configMapKeyRef',
                )
            ]
        }
    )
    secret_key_ref: KeySelector | None = Field(default=None, description='A key of a Secret.')
    config_map_key_ref: KeySelector | None = Field(default=None, description='A key of a ConfigMap.')

    @model_validator(mode='after')
    def _one_source(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError('give exactly one of secretKeyRef and configMapKeyRef')
        return self


class EnvVar(_K8sModel):
    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [
                _rule('!(has(self.value) && has(self.valueFrom))', 'give value or valueFrom, not both'),
                _rule(
                    f"!self.name.startsWith('{RESERVED_ENV_PREFIX}') && !(self.name in {list(RESERVED_ENV)})",
                    f'{", ".join(RESERVED_ENV)} and {RESERVED_ENV_PREFIX}* are set by the operator; '
                    'choose another name',
                    '.name',
                ),
            ]
        }
    )
    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_PATTERN, description='Environment variable name.')
    value: str | None = Field(default=None, max_length=32768, description='Its value.')
    value_from: EnvVarSource | None = Field(default=None, description='Or a value read from a Secret or ConfigMap.')

    @model_validator(mode='after')
    def _allowed(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError('give value or valueFrom, not both')
        if self.name.startswith(RESERVED_ENV_PREFIX) or self.name in RESERVED_ENV:
            raise ValueError(
                f'{self.name} is set by the operator ({", ".join(RESERVED_ENV)} and {RESERVED_ENV_PREFIX}* are); '
                'choose another name'
            )
        return self


class PersistentVolumeClaimSource(_K8sModel):
    claim_name: str = _name('Name of the PersistentVolumeClaim in the run namespace (mounted read-only).')


class ConfigMapSource(_K8sModel):
    name: str = _name('Name of the ConfigMap in the run namespace.')


class SecretSource(_K8sModel):
    secret_name: str = _name('Name of the Secret in the run namespace.')


class Volume(_K8sModel):
    """A volume mounted read-only into the trainer container."""

    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [
                _rule(
                    '(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.configMap) ? 1 : 0) '
                    '+ (has(self.secret) ? 1 : 0) == 1',
                    'give exactly one of persistentVolumeClaim, configMap and secret',
                ),
                _rule(
                    f'!(self.name in {list(RESERVED_VOLUMES)})',
                    f'the operator uses the volume names {", ".join(RESERVED_VOLUMES)}; choose another name',
                    '.name',
                ),
                _rule(
                    f'!{list(RESERVED_MOUNTS)}.exists(p, self.mountPath == p || self.mountPath.startsWith(p + "/"))'
                    " && self.mountPath != '/'",
                    f'mountPath may not be / or under {", ".join(RESERVED_MOUNTS)} (the operator mounts those)',
                    '.mountPath',
                ),
            ]
        }
    )
    name: str = _name('Volume name (a DNS-1123 label).', DNS1123_LABEL_PATTERN, 63)
    mount_path: str = Field(
        min_length=2, max_length=1024, pattern=r'^/', description='Absolute path in the trainer container.'
    )
    sub_path: str | None = Field(default=None, max_length=1024, description='Mount only this path of the volume.')
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(default=None, description='A claim.')
    config_map: ConfigMapSource | None = Field(default=None, description='A ConfigMap.')
    secret: SecretSource | None = Field(default=None, description='A Secret.')

    @model_validator(mode='after')
    def _allowed(self) -> Volume:
        sources = [s for s in (self.persistent_volume_claim, self.config_map, self.secret) if s is not None]
        if len(sources) != 1:
            raise ValueError('give exactly one of persistentVolumeClaim, configMap and secret')
        if self.name in RESERVED_VOLUMES:
            raise ValueError(f'the operator uses the volume names {", ".join(RESERVED_VOLUMES)}; choose another name')
        path = self.mount_path.rstrip('/') or '/'
        if path == '/' or any(path == p or path.startswith(p + '/') for p in RESERVED_MOUNTS):
            raise ValueError(
                f'mountPath may not be / or under {", ".join(RESERVED_MOUNTS)} (the operator mounts those)'
            )
        return self

    def pod_volume(self) -> dict[str, Any]:
        if self.persistent_volume_claim is not None:
            source = {'persistentVolumeClaim': {'claimName': self.persistent_volume_claim.claim_name, 'readOnly': True}}
        elif self.config_map is not None:
            source = {'configMap': {'name': self.config_map.name}}
        else:
            assert self.secret is not None
            source = {'secret': {'secretName': self.secret.secret_name}}
        return {'name': self.name, **source}

    def mount(self) -> dict[str, Any]:
        mount: dict[str, Any] = {'name': self.name, 'mountPath': self.mount_path, 'readOnly': True}
        if self.sub_path:
            mount['subPath'] = self.sub_path
        return mount


# --- affinity, in the shape of core/v1 Affinity ------------------------------------------------------------

LabelOperator = Literal['In', 'NotIn', 'Exists', 'DoesNotExist']


class NodeSelectorRequirement(_K8sModel):
    key: str = Field(min_length=1, max_length=317, description='Node label key.')
    operator: Literal['In', 'NotIn', 'Exists', 'DoesNotExist', 'Gt', 'Lt'] = Field(
        description='In, NotIn, Exists, DoesNotExist, Gt or Lt.'
    )
    values: list[str] = Field(default_factory=list, max_length=64, description='Values (In, NotIn; one for Gt, Lt).')


class NodeSelectorTerm(_K8sModel):
    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=32, description='Requirements on node labels, all of which must hold.'
    )
    match_fields: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=32, description='Requirements on node fields (metadata.name).'
    )


class NodeSelector(_K8sModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=32, description='Terms, any of which must match.'
    )


class PreferredSchedulingTerm(_K8sModel):
    weight: int = Field(ge=1, le=100, description='Weight 1-100.')
    preference: NodeSelectorTerm = Field(description='The preferred nodes.')


class NodeAffinity(_K8sModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        default=None, description='Nodes the pod must run on.'
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=32, description='Nodes the scheduler prefers.'
    )


class LabelSelectorRequirement(_K8sModel):
    key: str = Field(min_length=1, max_length=317, description='Label key.')
    operator: LabelOperator = Field(description='In, NotIn, Exists or DoesNotExist.')
    values: list[str] = Field(default_factory=list, max_length=64, description='Values (In, NotIn).')


class LabelSelector(_K8sModel):
    match_labels: dict[str, str] = Field(default_factory=dict, description='Labels that must all be equal.')
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=32, description='Requirements, all of which must hold.'
    )


class PodAffinityTerm(_K8sModel):
    label_selector: LabelSelector | None = Field(default=None, description='Pods this term is about.')
    namespaces: list[str] = Field(default_factory=list, max_length=64, description='Their namespaces.')
    namespace_selector: LabelSelector | None = Field(default=None, description='Or namespaces by label.')
    topology_key: str = Field(min_length=1, max_length=317, description='Node label grouping the nodes.')


class WeightedPodAffinityTerm(_K8sModel):
    weight: int = Field(ge=1, le=100, description='Weight 1-100.')
    pod_affinity_term: PodAffinityTerm = Field(description='The term.')


class PodAffinity(_K8sModel):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=32, description='Terms that must hold.'
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=32, description='Terms the scheduler prefers.'
    )


class Affinity(_K8sModel):
    node_affinity: NodeAffinity | None = Field(default=None, description='Which nodes the pods may use.')
    pod_affinity: PodAffinity | None = Field(default=None, description='Pods to run next to.')
    pod_anti_affinity: PodAffinity | None = Field(default=None, description='Pods to keep away from.')


# --- the settings, for a run and for the runtime template ---------------------------------------------------


def _unique_names(items: list[Any], what: str) -> list[Any]:
    names = [item.name for item in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f'{what} {", ".join(duplicates)} given twice')
    return items


class PodSettings(_K8sModel):
    """Pod settings of a run, or the cluster-wide defaults of every run (the Helm ``runtime`` values)."""

    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description='Secrets for pulling the trainer image (in the run namespace).'
    )
    affinity: Affinity | None = Field(default=None, description='Node and pod affinity of the trainer pods.')
    priority_class_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        description='PriorityClass of the trainer pods.',
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description='Extra environment variables of the trainer container.'
    )
    volumes: list[Volume] = Field(
        default_factory=list, max_length=16, description='Extra volumes, mounted read-only into the trainer container.'
    )
    service_account_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        description='Service account of the trainer pods (its token is never mounted); default: the operator setting.',
    )

    @field_validator('env')
    @classmethod
    def _unique_env(cls, value: list[EnvVar]) -> list[EnvVar]:
        return _unique_names(value, 'env')

    @field_validator('volumes')
    @classmethod
    def _unique_volumes(cls, value: list[Volume]) -> list[Volume]:
        return _unique_names(value, 'volume')

    def merged(self, run: PodSettings) -> PodSettings:
        """These defaults with ``run``'s settings on top: scalars replaced, lists joined (the run wins by name)."""

        def join(defaults: list[Any], own: list[Any]) -> list[Any]:
            names = {item.name for item in own}
            return [item for item in defaults if item.name not in names] + list(own)

        return PodSettings(
            image_pull_secrets=join(self.image_pull_secrets, run.image_pull_secrets),
            affinity=run.affinity or self.affinity,
            priority_class_name=run.priority_class_name or self.priority_class_name,
            env=join(self.env, run.env),
            volumes=join(self.volumes, run.volumes),
            service_account_name=run.service_account_name or self.service_account_name,
        )


POD_SETTING_FIELDS = tuple(PodSettings.model_fields)
