"""FINETUNER_MAX_CONCURRENT_RUNS: which runs hold a slot, which wait for one, and in what order.

Pure functions over runs and trainer Jobs as the API server (or the operator's cache) shows them,
plain dicts. The reconciler asks them, under its admission lock, whether a run may get its Job now
(see ``Admitter.slot_for`` in :mod:`admitter`); nothing about slots is remembered between passes.

- A run **holds a slot** while its trainer Job is *active*: the Job is not suspended, has no
  ``Complete`` or ``Failed`` condition, carries no Kueue queue label, and its run still exists and is
  not FINISHED or FAILED. (A cancelled or failed run's Job is being deleted; a deleted run's Job goes
  by garbage collection: neither holds a slot.)
- A run **waits for a slot** when it wants to train and holds none: it is not FINISHED or FAILED, not
  cancelled, not being deleted, not suspended (``spec.suspend``), has no Kueue queue, and it has no Job
  (new, or its Job was deleted behind the operator's back) or only a suspended one (resumed by the user).
- Waiting runs get slots oldest first: by ``creationTimestamp``, then name, then namespace.

Runs with a Kueue queue (``spec.queueName`` or FINETUNER_QUEUE) are admitted by Kueue: they neither
count nor wait.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from finetuner_operator.builders import CANCEL_ANNOTATION, QUEUE_LABEL, RUN_LABEL

TERMINAL = ('FINISHED', 'FAILED')
Key = tuple[str, str]  # (namespace, run name)


def run_key(run: dict[str, Any]) -> Key:
    meta = run['metadata']
    return meta.get('namespace') or '', meta['name']


def job_run_key(job: dict[str, Any]) -> Key | None:
    meta = job.get('metadata') or {}
    run = (meta.get('labels') or {}).get(RUN_LABEL)
    return (meta.get('namespace') or '', run) if run else None


def line_order(run: dict[str, Any]) -> tuple[str, str, str]:
    """A waiting run's place in the line: older first (creationTimestamp), then by name."""
    meta = run['metadata']
    return meta.get('creationTimestamp') or '', meta['name'], meta.get('namespace') or ''


def _phase(run: dict[str, Any]) -> str | None:
    return (run.get('status') or {}).get('phase')


def job_done(job: dict[str, Any]) -> bool:
    return any(
        c.get('type') in ('Complete', 'Failed') and c.get('status') == 'True'
        for c in (job.get('status') or {}).get('conditions') or []
    )


def job_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get('spec') or {}).get('suspend'))


def holds_slot(job: dict[str, Any], run: dict[str, Any] | None) -> bool:
    """Whether ``job`` (a trainer Job) counts against the limit; ``run`` is its run, None when gone."""
    if run is None or _phase(run) in TERMINAL:
        return False
    if job_suspended(job) or job_done(job):
        return False
    return QUEUE_LABEL not in ((job.get('metadata') or {}).get('labels') or {})


def wants_slot(run: dict[str, Any], job: dict[str, Any] | None, default_queue: str | None) -> bool:
    """Whether ``run`` (whose trainer Job is ``job``, None when it has none) waits for a slot."""
    meta = run['metadata']
    if meta.get('deletionTimestamp') or _phase(run) in TERMINAL:
        return False
    if (meta.get('annotations') or {}).get(CANCEL_ANNOTATION) == 'true':
        return False
    spec = run.get('spec') or {}
    if spec.get('suspend') or spec.get('queueName') or default_queue:
        return False
    return job is None or (job_suspended(job) and not job_done(job))


def active_count(jobs: Iterable[dict[str, Any]], runs: dict[Key, dict[str, Any]]) -> int:
    """How many runs hold a slot (``runs`` by key)."""
    return sum(1 for job in jobs if (key := job_run_key(job)) is not None and holds_slot(job, runs.get(key)))


def waiting_line(
    runs: dict[Key, dict[str, Any]], jobs: Iterable[dict[str, Any]], default_queue: str | None
) -> list[dict[str, Any]]:
    """Every run waiting for a slot, the next to get one first."""
    jobs_of = {key: job for job in jobs if (key := job_run_key(job)) is not None}
    waiting = [run for key, run in runs.items() if wants_slot(run, jobs_of.get(key), default_queue)]
    return sorted(waiting, key=line_order)


def ahead_of(run: dict[str, Any], line: list[dict[str, Any]]) -> int:
    """How many runs of ``line`` come before ``run`` (which need not be in it)."""
    me, place = run_key(run), line_order(run)
    return sum(1 for other in line if run_key(other) != me and line_order(other) < place)
