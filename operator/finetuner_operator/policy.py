"""The administrator's allow-lists: what a run may ask of the cluster's nodes (Helm value ``policy``).

Whoever may create a FinetuneRun may have pods created with the run's image, tolerations, node
selector and priority class. ``FINETUNER_POLICY`` (JSON, camelCase keys) restricts them; a list that
is not set allows anything, an empty list allows nothing:

- ``allowedImages``: image prefixes on a path boundary (``ghcr.io/kube-finetuner`` allows
  ``ghcr.io/kube-finetuner/trainer:1`` but not ``ghcr.io/kube-finetuner-evil/x``); Docker Hub
  shorthands are expanded first (``python:3.11`` is ``docker.io/library/python:3.11``). A run without
  ``spec.image`` uses the operator's own trainer image, which is the administrator's choice;
- ``allowedTolerations``: a run's toleration must match one entry (an entry's unset field matches
  anything);
- ``allowedNodeSelectors``: label -> allowed values (``*`` for any value); with it set, a run's own
  ``affinity.nodeAffinity`` is refused (it would choose nodes around the list);
- ``allowedPriorityClasses``: names a run's ``priorityClassName`` may take.

:func:`policy_problems` is pure and checked before a run gets its Job; the same rules as a
ValidatingAdmissionPolicy, which refuses the run at the API server already, are in
``examples/admission-policy.yaml``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetuner.api.v1alpha1 import FinetuneRunSpec, Toleration

HELM_VALUE = 'Helm value policy'


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra='forbid')


class TolerationRule(_Camel):
    """A toleration runs may use; a field left unset matches any value."""

    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None

    def allows(self, toleration: Toleration) -> bool:
        asked = {'key': toleration.key, 'operator': toleration.operator or 'Equal', 'value': toleration.value}
        asked['effect'] = toleration.effect
        return all(getattr(self, name) is None or getattr(self, name) == asked[name] for name in asked)

    def describe(self) -> str:
        parts = [f'{name}={getattr(self, name)}' for name in ('key', 'operator', 'value', 'effect')]
        return '{' + ', '.join(p for p in parts if not p.endswith('=None')) + '}'


class AdmissionPolicy(_Camel):
    allowed_images: list[str] | None = Field(default=None, description='Image prefixes runs may use.')
    allowed_tolerations: list[TolerationRule] | None = Field(default=None, description='Tolerations runs may use.')
    allowed_node_selectors: dict[str, list[str]] | None = Field(
        default=None, description='Node labels runs may select, with their allowed values ("*": any).'
    )
    allowed_priority_classes: list[str] | None = Field(default=None, description='Priority classes runs may use.')


def normalize_image(image: str) -> str:
    """An image reference with Docker Hub's implicit registry and ``library/`` made explicit."""
    first, sep, _ = image.partition('/')
    if not sep:
        return f'docker.io/library/{image}'
    if '.' not in first and ':' not in first and first != 'localhost':
        return f'docker.io/{image}'
    return image


def image_allowed(image: str, prefixes: list[str]) -> bool:
    full = normalize_image(image)
    for prefix in prefixes:
        wanted = prefix.rstrip('/')
        for candidate in {wanted, normalize_image(wanted)}:
            if full == candidate or any(full.startswith(candidate + sep) for sep in '/:@'):
                return True
    return False


def _fix(what: str) -> str:
    return f'or ask the cluster administrator to allow it ({HELM_VALUE}.{what})'


def _image_problems(spec: FinetuneRunSpec, policy: AdmissionPolicy) -> list[str]:
    allowed = policy.allowed_images
    if allowed is None or spec.image is None or image_allowed(spec.image, allowed):
        return []
    listed = ', '.join(allowed) or 'none'
    return [
        f'spec.image: {spec.image!r} is not from a registry this cluster allows ({listed}); use an image under one '
        f'of them, or leave spec.image out for the default trainer image, {_fix("allowedImages")}'
    ]


def _toleration_problems(spec: FinetuneRunSpec, policy: AdmissionPolicy) -> list[str]:
    rules = policy.allowed_tolerations
    if rules is None:
        return []
    listed = ', '.join(rule.describe() for rule in rules) or 'none'
    return [
        f'spec.tolerations[{i}]: {toleration.to_k8s()} is not allowed on this cluster (allowed: {listed}); '
        f'remove it, {_fix("allowedTolerations")}'
        for i, toleration in enumerate(spec.tolerations)
        if not any(rule.allows(toleration) for rule in rules)
    ]


def _node_problems(spec: FinetuneRunSpec, policy: AdmissionPolicy) -> list[str]:
    allowed = policy.allowed_node_selectors
    if allowed is None:
        return []
    problems = []
    for key, value in spec.node_selector.items():
        values = allowed.get(key)
        if values is None:
            listed = ', '.join(sorted(allowed)) or 'none'
            problems.append(
                f'spec.nodeSelector: label {key!r} may not be selected on this cluster (allowed labels: {listed}); '
                f'remove it, {_fix("allowedNodeSelectors")}'
            )
        elif '*' not in values and value not in values:
            problems.append(
                f'spec.nodeSelector: {key}={value!r} is not allowed (allowed values: {", ".join(values)}); '
                f'choose one of them, {_fix("allowedNodeSelectors")}'
            )
    if spec.affinity is not None and spec.affinity.node_affinity is not None:
        problems.append(
            'spec.affinity.nodeAffinity: this cluster restricts the nodes runs may choose '
            f'({HELM_VALUE}.allowedNodeSelectors); use spec.nodeSelector with an allowed label instead'
        )
    return problems


def _priority_problems(spec: FinetuneRunSpec, policy: AdmissionPolicy) -> list[str]:
    allowed = policy.allowed_priority_classes
    if allowed is None or spec.priority_class_name is None or spec.priority_class_name in allowed:
        return []
    listed = ', '.join(allowed) or 'none'
    return [
        f'spec.priorityClassName: {spec.priority_class_name!r} is not allowed on this cluster (allowed: {listed}); '
        f'choose one of them or leave it out, {_fix("allowedPriorityClasses")}'
    ]


def policy_problems(spec: FinetuneRunSpec, policy: AdmissionPolicy) -> list[str]:
    """What the run asks for that the policy does not allow, each as ``<field>: <problem and fix>``."""
    return [
        *_image_problems(spec, policy),
        *_toleration_problems(spec, policy),
        *_node_problems(spec, policy),
        *_priority_problems(spec, policy),
    ]


def from_json(data: Any) -> AdmissionPolicy:
    return AdmissionPolicy.model_validate(data or {})
