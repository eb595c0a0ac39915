"""A run's Events: what ``kubectl describe finetunerun NAME`` lists, and the local backend's phase changes.

On Kubernetes these are the Events whose involved object is the run, its trainer Job or one of its
pods (the operator posts transitions on the run; the scheduler and the kubelet post on the pods). The
local backend keeps no Events, so its phase changes are read from the run's status times instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finetuner.api.v1alpha1 import Phase
from finetuner.backends.base import Backend, RunRecord
from finetuner.errors import BackendError

RUN_LABEL = 'finetuner.dev/run'  # the label the operator puts on a run's Job and pods


@dataclass(frozen=True)
class EventRow:
    time: str
    type: str  # Normal or Warning
    reason: str
    message: str
    source: str
    object: str  # Kind/name of the involved object
    count: int = 1


def run_events(backend: Backend, record: RunRecord) -> list[EventRow]:
    """Oldest first. Raises BackendError when the cluster refuses or cannot be reached."""
    if backend.name == 'kubernetes':
        return _kubernetes_events(backend, record)
    return phase_events(record)


def phase_events(record: RunRecord) -> list[EventRow]:
    """The phase changes of a run recorded only in its status (the local backend)."""
    status = record.status
    source, run = f'{record.namespace} backend', f'FinetuneRun/{record.name}'
    rows = []
    if record.created_at:
        rows.append(EventRow(record.created_at, 'Normal', 'Created', 'Run submitted', source, run))
    if status.start_time:
        rows.append(EventRow(status.start_time, 'Normal', 'Started', 'Trainer started', source, run))
    if status.completion_time and status.phase in (Phase.FINISHED.value, Phase.FAILED.value):
        failed = status.phase == Phase.FAILED.value
        reason = status.reason or str(status.phase).title()
        kind = 'Warning' if failed else 'Normal'
        rows.append(EventRow(status.completion_time, kind, reason, status.details or '', source, run))
    return rows


def _kubernetes_events(backend: Any, record: RunRecord) -> list[EventRow]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    namespace = backend.namespace
    try:
        pods = backend.core.list_namespaced_pod(namespace, label_selector=f'{RUN_LABEL}={record.name}').items
        names = {record.name, *(p.metadata.name for p in pods)}
        if record.status.job_name:
            names.add(record.status.job_name)
        items = []
        for name in sorted(names):
            # The field selector keeps the answer small on a real API server; the filter below is what counts.
            found = backend.core.list_namespaced_event(namespace, field_selector=f'involvedObject.name={name}').items
            items.extend(e for e in found if e.involved_object is not None and e.involved_object.name == name)
    except ApiException as e:
        if e.status in (401, 403):
            raise BackendError(
                f'the cluster refused to list Events or pods in namespace {namespace!r} ({e.status} {e.reason}); '
                "reading a run's Events (run.events(), finetuner events, the console) needs list on events and "
                'pods there'
            ) from e
        raise BackendError(f'cannot list the Events of run {record.name!r}: {e.status} {e.reason}') from e
    except HTTPError as e:
        raise BackendError(f'cannot reach the Kubernetes API to list Events: {e}') from e
    unique = {e.metadata.uid or e.metadata.name: e for e in items}
    rows = [_row(e) for e in unique.values()]
    return sorted(rows, key=lambda r: r.time)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace('+00:00', 'Z')
    return str(value) if value else ''


def _row(event: Any) -> EventRow:
    source = event.reporting_component or (event.source.component if event.source else '') or ''
    involved = event.involved_object
    return EventRow(
        time=_when(
            event.last_timestamp or event.event_time or event.first_timestamp or event.metadata.creation_timestamp
        ),
        type=event.type or 'Normal',
        reason=event.reason or '',
        message=event.message or '',
        source=source,
        object=f'{involved.kind}/{involved.name}',
        count=event.count or 1,
    )
