"""What the status of a stuck run needs beyond the cache: the cluster's Events and Kueue's Workloads.

Read only for runs in one of these situations, each at most once per ``interval`` per object (the
re-observation's period), so that a run that trains, or has ended, costs no request here:

- a trainer Job that is neither suspended nor done, has no pod and is older than ``GRACE`` seconds: the
  Job controller's ``FailedCreate`` Events on it say why (a quota, a missing ServiceAccount);
- an unschedulable trainer pod: the cluster autoscaler's ``TriggeredScaleUp`` / ``NotTriggerScaleUp``
  Events on it say whether a node is on its way;
- a Job waiting suspended in a Kueue queue for longer than ``GRACE``: its Workload's conditions say why
  Kueue has not admitted it (a LocalQueue that does not exist, a quota).

A read that fails (the API server busy, no right to read) is left out: the status then says less,
never something wrong.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from finetuner_operator.admission import job_done, job_suspended
from finetuner_operator.kube import Kube

log = logging.getLogger('finetuner_operator')

GRACE = 5.0  # at most this many seconds a new Job has before its lack of pods or of a Workload means anything
JOB_UID_LABEL = 'kueue.x-k8s.io/job-uid'
SCALE_UP_REASONS = ('TriggeredScaleUp', 'NotTriggerScaleUp')
FAILED = object()  # a read that failed: nothing is known


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace('Z', '+00:00')) if value else None


def _age(obj: dict[str, Any], now: datetime) -> float:
    created = _parse((obj.get('metadata') or {}).get('creationTimestamp'))
    return (now - created).total_seconds() if created is not None else float('inf')


def _event_time(event: dict[str, Any], first: bool = False) -> str:
    if first:
        keys = ('firstTimestamp', 'eventTime', 'lastTimestamp')
    else:
        keys = ('lastTimestamp', 'eventTime', 'firstTimestamp')
    for key in keys:
        if event.get(key):
            return str(event[key])
    return (event.get('metadata') or {}).get('creationTimestamp') or ''


def _unschedulable(pod: dict[str, Any]) -> bool:
    status = pod.get('status') or {}
    return status.get('phase') in (None, 'Pending') and any(
        c.get('type') == 'PodScheduled' and c.get('status') == 'False' and c.get('reason') == 'Unschedulable'
        for c in status.get('conditions') or []
    )


class Diagnostics:
    """Throttled reads of Events and Workloads for stuck runs (see the module docstring)."""

    def __init__(self, kube: Kube, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.interval = interval
        self.grace = min(GRACE, 2 * interval)
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, Any]] = {}
        self._guard = threading.Lock()

    def _throttled(self, key: tuple[str, str], read: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._guard:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.interval:
                return seen[1]
            if len(self._seen) > 10_000:  # objects long gone: their entries are only forgotten here
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        try:
            value = read()
        except Exception as e:  # best effort: the status says less, never something wrong
            log.debug('diagnostic read %s failed: %s', key, e)
            value = FAILED
        with self._guard:
            self._seen[key] = (now, value)
        return value

    def failed_create(
        self, job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime
    ) -> tuple[str | None, str | None]:
        """(the latest FailedCreate message, when the first was posted) of a Job without pods."""
        if job is None or pods or job_suspended(job) or job_done(job) or _age(job, now) < self.grace:
            return None, None
        meta = job['metadata']
        if meta.get('deletionTimestamp') or not meta.get('uid'):
            return None, None
        selector = f'involvedObject.uid={meta["uid"]},reason=FailedCreate'
        events = self._throttled(('events', meta['uid']), lambda: self.kube.list_events(meta['namespace'], selector))
        if events is FAILED or not events:
            return None, None
        latest = max(events, key=_event_time)
        earliest = min(events, key=lambda e: _event_time(e, first=True))
        return latest.get('message') or 'FailedCreate', _event_time(earliest, first=True) or None

    def scale_up(self, pods: list[dict[str, Any]]) -> str | None:
        """The cluster autoscaler's TriggeredScaleUp message for an unschedulable pod (None: no scale-up, or
        it said it will not: NotTriggerScaleUp is the later word)."""
        for pod in pods:
            meta = pod['metadata']
            if not _unschedulable(pod) or not meta.get('uid'):
                continue
            events = self._throttled(('events', meta['uid']), self._events_of(meta['namespace'], meta['uid']))
            said = [e for e in ([] if events is FAILED else events) if e.get('reason') in SCALE_UP_REASONS]
            if said:
                latest = max(said, key=_event_time)
                if latest['reason'] == 'TriggeredScaleUp':
                    return latest.get('message') or 'TriggeredScaleUp'
        return None

    def _events_of(self, namespace: str, uid: str) -> Callable[[], list[dict[str, Any]]]:
        return lambda: self.kube.list_events(namespace, f'involvedObject.uid={uid}')

    def workload(self, job: dict[str, Any] | None, queue: str | None, now: datetime) -> dict[str, Any] | None:
        """The Kueue Workload of a Job waiting in ``queue`` ({}: none; None: not looked for)."""
        if job is None or not queue or not job_suspended(job) or job_done(job) or _age(job, now) < self.grace:
            return None
        meta = job['metadata']
        if not meta.get('uid'):
            return None
        found = self._throttled(
            ('workloads', meta['uid']),
            lambda: self.kube.list_workloads(meta['namespace'], f'{JOB_UID_LABEL}={meta["uid"]}'),
        )
        if found is FAILED:
            return None
        return found[0] if found else {}
