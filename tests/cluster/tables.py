"""Server-side ``Table`` output, as kube-apiserver renders it for ``kubectl get``.

Written from "Receiving resources as Tables" (https://kubernetes.io/docs/reference/using-api/api-concepts/
#receiving-resources-as-tables) and "Additional printer columns" (https://kubernetes.io/docs/tasks/
extend-kubernetes/custom-resources/custom-resource-definitions/#additional-printer-columns):

- a custom resource gets ``Name`` then its CRD's ``additionalPrinterColumns`` (with ``priority``: kubectl
  shows priority > 0 only with ``-o wide``); a ``date`` column is sent as an age (``HumanDuration``: ``45s``,
  ``3m12s``, ``5h``, ``2d3h``); a JSONPath that finds nothing is a null cell (kubectl prints ``<none>``);
- a CRD without printer columns gets ``Name`` and ``Age``; built-in kinds get their own columns (pods,
  jobs, namespaces, config maps, secrets, services) or ``Name`` and ``Created At``;
- each row carries the object as ``includeObject`` asks: ``Metadata`` (the default: a
  PartialObjectMetadata, which is where ``--show-labels`` reads labels), ``Object`` or ``None``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

NAME_DESCRIPTION = (
    'Name must be unique within a namespace. Is required when creating resources, although some resources '
    'may allow a client to request the generation of an appropriate name automatically. Name is primarily '
    'intended for creation idempotence and configuration definition. Cannot be updated. More info: '
    'https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names'
)
AGE_DESCRIPTION = (
    'CreationTimestamp is a timestamp representing the server time when this object was created. It is not '
    'guaranteed to be set in happens-before order across separate operations. Clients may not set this value. '
    'It is represented in RFC3339 form and is in UTC.'
)


def human_duration(seconds: float) -> str:
    """apimachinery's ``duration.HumanDuration``."""
    s = int(seconds)
    if s < -1:
        return '<invalid>'
    if s < 0:
        return '0s'
    if s < 120:
        return f'{s}s'
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f'{minutes}m' if rest == 0 else f'{minutes}m{rest}s'
    if minutes < 180:
        return f'{minutes}m'
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f'{hours}h' if rest == 0 else f'{hours}h{rest}m'
    if hours < 48:
        return f'{hours}h'
    if hours < 24 * 8:
        rest = hours % 24
        return f'{hours // 24}d' if rest == 0 else f'{hours // 24}d{rest}h'
    if hours < 24 * 365 * 2:
        return f'{hours // 24}d'
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f'{hours // 24 // 365}y' if rest == 0 else f'{hours // 24 // 365}y{rest}d'
    return f'{hours // 24 // 365}y'


def age(timestamp: str | None, now: datetime | None = None) -> str | None:
    if not timestamp:
        return None
    when = datetime.strptime(timestamp, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)
    return human_duration(((now or datetime.now(timezone.utc)) - when).total_seconds())


def jsonpath(obj: Any, path: str) -> Any:
    """The simple JSONPath of printer columns: ``.status.phase``, ``.spec.containers[0].image``."""
    value = obj
    for part in re.findall(r'[^.\[\]]+|\[\d+\]', path.strip().strip('{}')):
        if part.startswith('['):
            index = int(part[1:-1])
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return None
    return value


def _column(name: str, type_: str, description: str = '', priority: int = 0, format_: str = '') -> dict[str, Any]:
    return {'name': name, 'type': type_, 'format': format_, 'description': description, 'priority': priority}


def _pod_cells(pod: dict[str, Any]) -> list[Any]:
    spec, status = pod.get('spec') or {}, pod.get('status') or {}
    containers = spec.get('containers') or []
    statuses = status.get('containerStatuses') or []
    ready = sum(1 for c in statuses if c.get('ready'))
    restarts = sum(int(c.get('restartCount') or 0) for c in statuses)
    reason = status.get('reason') or status.get('phase') or 'Pending'
    for c in statuses:
        waiting = (c.get('state') or {}).get('waiting') or {}
        terminated = (c.get('state') or {}).get('terminated') or {}
        reason = waiting.get('reason') or terminated.get('reason') or reason
    if pod['metadata'].get('deletionTimestamp'):
        reason = 'Terminating'
    return [
        f'{ready}/{len(containers)}',
        reason,
        restarts,
        status.get('podIP') or '<none>',
        spec.get('nodeName') or '<none>',
    ]


def _job_cells(job: dict[str, Any]) -> list[Any]:
    spec, status = job.get('spec') or {}, job.get('status') or {}
    conditions = {c.get('type'): c.get('status') for c in status.get('conditions') or []}
    if conditions.get('Complete') == 'True':
        state = 'Complete'
    elif conditions.get('Failed') == 'True':
        state = 'Failed'
    elif spec.get('suspend'):
        state = 'Suspended'
    else:
        state = 'Running'
    completions = f'{status.get("succeeded") or 0}/{spec.get("completions") or 1}'
    start, end = status.get('startTime'), status.get('completionTime')
    duration = None
    if start:
        started = datetime.strptime(start, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)
        finished = (
            datetime.strptime(end, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)
            if end
            else datetime.now(timezone.utc)
        )
        duration = human_duration((finished - started).total_seconds())
    return [state, completions, duration]


BUILTIN: dict[str, tuple[list[dict[str, Any]], Any]] = {
    'v1/pods': (
        [
            _column('Ready', 'string', 'The aggregate readiness state of this pod for accepting traffic.'),
            _column('Status', 'string', 'The aggregate status of the containers in this pod.'),
            _column('Restarts', 'string', 'The number of times the containers in this pod have been restarted.'),
            _column('IP', 'string', 'IP address allocated to the pod.', priority=1),
            _column('Node', 'string', 'Name of the Node the Pod is scheduled on.', priority=1),
        ],
        _pod_cells,
    ),
    'batch/v1/jobs': (
        [
            _column('Status', 'string', 'Status of the job.'),
            _column('Completions', 'string', 'The completion status of the job.'),
            _column('Duration', 'string', 'Time required to complete the job.'),
        ],
        _job_cells,
    ),
    'v1/namespaces': (
        [_column('Status', 'string', 'The status of the namespace')],
        lambda o: [(o.get('status') or {}).get('phase') or 'Active'],
    ),
    'v1/configmaps': (
        [_column('Data', 'integer', 'Number of data entries')],
        lambda o: [len(o.get('data') or {}) + len(o.get('binaryData') or {})],
    ),
    'v1/secrets': (
        [_column('Type', 'string', 'Type of the secret'), _column('Data', 'string', 'Number of data entries')],
        lambda o: [o.get('type') or 'Opaque', len(o.get('data') or {})],
    ),
}


def _row_object(obj: dict[str, Any], include: str) -> dict[str, Any] | None:
    if include == 'None':
        return None
    if include == 'Object':
        return obj
    return {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1', 'metadata': obj['metadata']}


def table(
    key: str,
    printer_columns: list[dict[str, Any]] | None,
    items: list[dict[str, Any]],
    resource_version: str,
    include: str = 'Metadata',
) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table of ``items``: CRD printer columns, a built-in layout or Name/Created At."""
    name = _column('Name', 'string', NAME_DESCRIPTION, format_='name')
    if printer_columns is not None:
        columns = printer_columns or [{'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'}]
        definitions = [name] + [
            _column(
                c['name'],
                c.get('type', 'string'),
                c.get('description', ''),
                int(c.get('priority', 0)),
                c.get('format', ''),
            )
            for c in columns
        ]

        def cells(obj: dict[str, Any]) -> list[Any]:
            values = []
            for column in columns:
                value = jsonpath(obj, column['jsonPath'])
                values.append(age(value) if column.get('type') == 'date' and isinstance(value, str) else value)
            return values

    elif key in BUILTIN:
        extra, builder = BUILTIN[key]
        definitions = [name, *extra[:3], _column('Age', 'string', AGE_DESCRIPTION), *extra[3:]]

        def cells(obj: dict[str, Any]) -> list[Any]:
            values = builder(obj)
            return [*values[:3], age(obj['metadata'].get('creationTimestamp')), *values[3:]]

    else:
        definitions = [name, _column('Created At', 'date', AGE_DESCRIPTION)]

        def cells(obj: dict[str, Any]) -> list[Any]:
            return [obj['metadata'].get('creationTimestamp')]

    rows = []
    for obj in items:
        row: dict[str, Any] = {'cells': [obj['metadata']['name'], *cells(obj)]}
        shown = _row_object(obj, include)
        if shown is not None:
            row['object'] = shown
        rows.append(row)
    return {
        'kind': 'Table',
        'apiVersion': 'meta.k8s.io/v1',
        'metadata': {'resourceVersion': resource_version},
        'columnDefinitions': definitions,
        'rows': rows,
    }
