"""What the handlers do, without Kopf: reconcile a run's children and rebuild statuses.

:class:`Reconciler` is built once at start-up with the seam (``kube.Kube``) and the config.
Every method is safe to run twice, concurrently and after a restart: children have
deterministic names (409 is success), statuses are derived from the observed Job, pods and
the trainer's reports, and a per-object lock keeps two passes on one run from interleaving.
With FINETUNER_MAX_CONCURRENT_RUNS, every Job create (and every resume) that takes a slot goes
through one admission lock, so that no two passes take the last slot (see :mod:`admission`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from finetuner.api import layout
from finetuner.api.v1alpha1 import (
    ExperimentSpec,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
    Progress,
)
from finetuner.storage import S3Store, open_store, s3_client
from finetuner_operator import admission, builders, experiments, metrics
from finetuner_operator.checks import run_problems
from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube
from finetuner_operator.status import (
    WAITING,
    Observed,
    derive_status,
    describe_validation_error,
    invalid_spec_status,
)

log = logging.getLogger('finetuner_operator')

TERMINAL = (Phase.FINISHED.value, Phase.FAILED.value)
EVENT_REASONS = {
    Phase.CREATED.value: ('Normal', 'Created'),
    Phase.STARTED.value: ('Normal', 'Started'),
    Phase.FINISHED.value: ('Normal', 'Finished'),
    Phase.FAILED.value: ('Warning', 'Failed'),
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def status_patch(status: FinetuneRunStatus | Any) -> dict[str, Any]:
    """The status as a merge patch: every declared field present, None clearing stale values."""
    payload = status.model_dump(by_alias=True, mode='json', exclude_none=True)
    for name, field in type(status).model_fields.items():
        payload.setdefault(field.alias or name, None)
    return payload


def _comparable(status: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (status or {}).items() if v is not None}


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        now: Callable[[], datetime] = utcnow,
        read_outputs: Callable[[str, Collection[str]], dict[str, Any]] | None = None,
        experiment_delay: float | None = None,
        background_admission: bool = False,
    ):
        """``experiment_delay``: None recounts an Experiment at once whenever one of its runs changes
        phase; seconds coalesce those recounts (each lists every run of the Experiment, so doing one
        per transition made a burst of n runs cost n^2) into one per Experiment per delay, done by a
        background thread (:meth:`close` stops it).

        ``background_admission``: with FINETUNER_MAX_CONCURRENT_RUNS, a freed slot is given to the oldest
        waiting run by a background thread (the pass that freed it, or an async watch handler, does not
        wait for that run's pass); False does it at once, in the caller's thread."""
        self.kube = kube
        self.config = config
        self.now = now
        self.read_outputs = read_outputs or read_store_outputs
        self.experiment_delay = experiment_delay
        self._locks: dict[tuple[str, ...], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._waiting: dict[tuple[str, str], int] = {}  # passes of a run waiting for its lock
        self._due: dict[tuple[str, str], float] = {}  # experiments to recount: (namespace, name) -> when
        self._due_changed = threading.Condition()
        self._recounter: threading.Thread | None = None
        self._closed = False
        self._runs: dict[tuple[str, str], str | None] = {}  # every run seen by the watch -> its phase
        self._resyncer: threading.Thread | None = None
        # FINETUNER_MAX_CONCURRENT_RUNS: held around "count the slots, then create (or resume) the Job"
        self._admission = threading.Lock()
        self._background_admission = background_admission
        self._admission_wanted = threading.Event()
        self._admitter: threading.Thread | None = None

    def _lock(self, *key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def close(self) -> None:
        """Stop the background threads (pending recounts are dropped: the next start-up's resume
        handlers recount every Experiment)."""
        with self._due_changed:
            self._closed = True
            self._due_changed.notify_all()
        self._admission_wanted.set()
        for thread in (self._recounter, self._resyncer, self._admitter):
            if thread is not None:
                thread.join(10)

    # --- what the watches saw ------------------------------------------------------------------
    def observe(self, kind: str, event_type: str | None, body: Any) -> None:
        """A watch event (``None``: an initial listing, or a body a handler was given) into the seam's
        cache, if it has one."""
        cache = getattr(self.kube, 'cache', None)
        if cache is not None:
            cache.observe(kind, event_type, body if isinstance(body, dict) and type(body) is dict else _copy(body))

    # --- periodic re-observation of active runs ------------------------------------------------
    def track(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a run seen by the watch (with its phase); ``forget`` it when it is deleted."""
        with self._locks_guard:
            self._runs[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._runs.pop((namespace, name), None)
            self._locks.pop((namespace, name), None)

    def active_runs(self) -> list[tuple[str, str]]:
        """Runs not in a terminal phase, a run without any status included."""
        with self._locks_guard:
            return [key for key, phase in self._runs.items() if phase not in TERMINAL]

    def start_resync(self, interval: float, relist_interval: float | None = None) -> None:
        """Every ``interval`` seconds, re-observe every active run from one background thread: the
        trainer's progress and metrics reach the status, time-based verdicts (unschedulable for too
        long) are reached without any Kubernetes event, and a run whose event Kopf gave up on (the
        API failing past Kopf's own retries) is still reconciled. One thread for all runs instead of a
        Kopf daemon per run: no per-run task, and no progress annotations written for them.

        Every ``relist_interval`` seconds (and at the next round while the cache is not synced) the
        same thread lists runs, experiments, Jobs and pods into the seam's cache, which catches what
        no watch reported (an object deleted while the watches were reconnecting)."""
        if self._resyncer is None:
            self._resyncer = threading.Thread(
                target=self._resync_loop, args=(interval, relist_interval), name='run-resync', daemon=True
            )
            self._resyncer.start()

    def _relist_due(self, last: float, relist_interval: float | None) -> bool:
        cache = getattr(self.kube, 'cache', None)
        if cache is None or relist_interval is None:
            return False
        unsynced = not all(cache.synced(kind) for kind in ('runs', 'experiments', 'jobs', 'pods'))
        return unsynced or time.monotonic() - last >= relist_interval

    def _resync_loop(self, interval: float, relist_interval: float | None) -> None:
        listed = time.monotonic()
        while True:
            deadline = time.monotonic() + interval
            with self._due_changed:  # shared with the recount thread: its notifications must not start a round
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._due_changed.wait(left)
                if self._closed:
                    return
            if self._relist_due(listed, relist_interval):
                try:
                    self.kube.relist(self.config.namespaces)
                    listed = time.monotonic()
                except Exception as e:
                    log.warning('listing runs, Jobs and pods into the cache failed: %s', e)
            for namespace, name in self.active_runs():
                if self._closed:
                    return
                try:
                    with metrics.timed('progress'):
                        self.sync_run(namespace, name, coalesce=True)
                except Exception as e:  # the API server or store failing for a while: the next round retries
                    log.warning('re-observing FinetuneRun %s/%s failed: %s', namespace, name, e)

    def request_experiment_sync(self, namespace: str, name: str) -> None:
        """Recount the Experiment now, or within ``experiment_delay`` seconds (coalesced)."""
        if self.experiment_delay is None:
            self.sync_experiment(namespace, name)
            return
        with self._due_changed:
            if self._closed or (namespace, name) in self._due:
                return
            self._due[(namespace, name)] = time.monotonic() + self.experiment_delay
            if self._recounter is None:
                self._recounter = threading.Thread(target=self._recount_loop, name='experiment-recount', daemon=True)
                self._recounter.start()
            self._due_changed.notify_all()

    def _recount_loop(self) -> None:
        while True:
            with self._due_changed:
                while not self._closed:
                    now = time.monotonic()
                    ready = [key for key, when in self._due.items() if when <= now]
                    if ready:
                        break
                    wait = min(self._due.values(), default=now + 60.0) - now
                    self._due_changed.wait(wait)
                if self._closed:
                    return
                for key in ready:
                    del self._due[key]
            for namespace, name in ready:
                try:
                    self.sync_experiment(namespace, name)
                except Exception as e:  # the API failing for a while: try again after the delay
                    log.warning('recounting Experiment %s/%s failed: %s', namespace, name, e)
                    self.request_experiment_sync(namespace, name)

    # --- FINETUNER_MAX_CONCURRENT_RUNS -------------------------------------------------------------
    def _limited(self, spec: FinetuneRunSpec) -> bool:
        """Whether this run's Job takes a slot: a limit is set, the run is not suspended, and it has no
        Kueue queue (Kueue admits those; they neither count nor wait)."""
        return self.config.max_concurrent_runs > 0 and not spec.suspend and builders.queue_of(spec, self.config) is None

    def _slots(self) -> tuple[int, dict[admission.Key, dict[str, Any]], list[dict[str, Any]]]:
        """(free slots, runs by key, trainer Jobs), from the seam's cache (which has every Job this
        operator created from the create's answer on)."""
        runs = {admission.run_key(r): r for r in self.kube.list_all_runs(self.config.namespaces)}
        jobs = self.kube.list_trainer_jobs(self.config.namespaces)
        return self.config.max_concurrent_runs - admission.active_count(jobs, runs), runs, jobs

    def _slot_free_for(self, body: dict[str, Any]) -> bool:
        """Whether the run may take a slot now: one is free and no older waiting run is owed it.
        Called with ``self._admission`` held, and the caller creates (or resumes) the Job before
        releasing it, so that the next count sees that Job."""
        free, runs, jobs = self._slots()
        if free <= 0:
            return False
        return admission.ahead_of(body, admission.waiting_line(runs, jobs, self.config.queue)) < free

    def request_admission(self) -> None:
        """A slot may have been freed (a run ended, was suspended or deleted): give the free slots to
        the oldest waiting runs, at once or through the background thread (never blocks then)."""
        if self.config.max_concurrent_runs <= 0:
            return
        if not self._background_admission:
            self.admit_waiting()
            return
        if self._admitter is None:
            with self._locks_guard:
                if self._admitter is None and not self._closed:
                    self._admitter = threading.Thread(target=self._admit_loop, name='run-admission', daemon=True)
                    self._admitter.start()
        self._admission_wanted.set()

    def _admit_loop(self) -> None:
        while True:
            self._admission_wanted.wait()
            if self._closed:
                return
            self._admission_wanted.clear()
            try:
                self.admit_waiting()
            except Exception as e:  # the API failing for a while: the periodic re-observation admits them
                log.warning('admitting waiting runs failed: %s', e)

    def admit_waiting(self) -> None:
        """One pass of each of the oldest waiting runs that fit in the free slots; each pass decides for
        itself, under the admission lock, whether it gets its Job (this count is only a hint)."""
        if self.config.max_concurrent_runs <= 0:
            return
        free, runs, jobs = self._slots()
        if free <= 0:
            return
        for run in admission.waiting_line(runs, jobs, self.config.queue)[:free]:
            namespace, name = admission.run_key(run)
            try:
                self.sync_run(namespace, name)
            except Exception as e:  # the periodic re-observation tries it again
                log.warning('admitting FinetuneRun %s/%s failed: %s', namespace, name, e)

    # --- runs --------------------------------------------------------------------------------
    def reconcile_run(self, body: dict[str, Any], metadata_patch: dict[str, Any] | None = None) -> None:
        """Create (or re-find) the run's children, apply suspend/cancel, then rebuild its status.

        ``metadata_patch``: where to put the run's own metadata changes (its experiment label and owner)
        instead of patching the run, for a caller that writes them itself (Kopf's handler patch, which
        is written anyway: one request and one watch event less per new run)."""
        meta = body['metadata']
        namespace, name = meta['namespace'], meta['name']
        previous = _parse_status(body)
        try:
            spec = FinetuneRunSpec.model_validate(body.get('spec') or {})
        except ValidationError as e:
            self._fail_invalid(body, describe_validation_error(e), previous)
            return
        problems = run_problems(name, spec)
        if problems:
            self._fail_invalid(body, 'Invalid spec: ' + '; '.join(problems), previous)
            return
        if previous.phase in TERMINAL:
            self._join_experiment(body, spec, metadata_patch)
            self.sync_run(namespace, name)
            return
        job_name = builders.job_name(name)
        queue = builders.queue_of(spec, self.config)
        fresh: dict[str, Any] | None = None
        freed = False  # a slot of FINETUNER_MAX_CONCURRENT_RUNS given back (the Job suspended)
        if _cancelled(body) or (spec.suspend and queue):
            # Cancelled, or suspended in a queue (Kueue owns the suspend flag of queued Jobs): no Job.
            if self.kube.get_job(namespace, job_name) is not None:
                self.kube.delete_job(namespace, job_name)
        else:
            # The Job first: on a new run nothing else is asked of the API server before it exists.
            fresh = self._create_children(body, spec)
            job = None if fresh is not None else self.kube.get_job(namespace, job_name)
            if job is not None and not queue and bool(job['spec'].get('suspend')) != spec.suspend:
                freed = self._set_suspend(body, spec) and spec.suspend
        self._join_experiment(body, spec, metadata_patch)
        self.sync_run(namespace, name, created_job=fresh)
        if freed:
            self.request_admission()

    def _set_suspend(self, body: dict[str, Any], spec: FinetuneRunSpec) -> bool:
        """Suspend or resume the run's Job as ``spec.suspend`` says; True when it was patched. Under
        FINETUNER_MAX_CONCURRENT_RUNS a resume takes a slot: without a free one the Job stays suspended
        and the run waits (a later pass resumes it)."""
        meta = body['metadata']
        job_name = builders.job_name(meta['name'])
        patch = {'spec': {'suspend': spec.suspend}}
        if self._limited(spec):
            with self._admission:
                if not self._slot_free_for(body):
                    return False
                self.kube.patch_job(meta['namespace'], job_name, patch)
        else:
            self.kube.patch_job(meta['namespace'], job_name, patch)
        what = 'Suspended' if spec.suspend else 'Resumed'
        self.kube.post_event(body, 'Normal', what, f'{what} trainer Job {job_name}')
        return True

    def _create_children(self, body: dict[str, Any], spec: FinetuneRunSpec) -> dict[str, Any] | None:
        """Create the run's children (an existing one answers 409, which is fine); the Job's manifest
        if this call created it, else None.

        Under FINETUNER_MAX_CONCURRENT_RUNS a run that has no Job yet gets its children only with a free
        slot (none are created while it waits), counted and created under the admission lock; a run
        that has its Job already is left as it is."""
        if not self._limited(spec):
            return self._create_all_children(body, spec)
        meta = body['metadata']
        if self.kube.get_job(meta['namespace'], builders.job_name(meta['name'])) is not None:
            return None
        with self._admission:
            if not self._slot_free_for(body):
                return None
            return self._create_all_children(body, spec)

    def _create_all_children(self, body: dict[str, Any], spec: FinetuneRunSpec) -> dict[str, Any] | None:
        meta = body['metadata']
        name, namespace = meta['name'], meta['namespace']
        owner = {**body, 'kind': body.get('kind', 'FinetuneRun')}
        created_job = None
        for child in builders.build_children(name, namespace, spec, self.config, owner):
            if self.kube.create_child(child) and child['kind'] == 'Job':
                created_job = child
                self.kube.post_event(body, 'Normal', 'JobCreated', f'Created trainer Job {builders.job_name(name)}')
        return created_job

    def _replace_lost_job(self, body: dict[str, Any], spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> None:
        """An active run whose Job is gone (deleted behind the operator's back, or a create that was
        answered 409 without the Job existing) gets it back; the trainer resumes from its checkpoint.

        Under FINETUNER_MAX_CONCURRENT_RUNS this is also how a waiting run gets its Job, and a run whose
        Job was lost queues for a slot like any other, at its place by creationTimestamp (see
        docs/OPERATOR.md)."""
        if previous.phase in TERMINAL or _cancelled(body) or body['metadata'].get('deletionTimestamp'):
            return
        if spec.suspend and builders.queue_of(spec, self.config):
            return  # a suspended queued run gave its Job back on purpose
        name = body['metadata']['name']
        if self._create_children(body, spec) is not None and previous.job_name:
            message = (
                f'Trainer Job {builders.job_name(name)} was deleted outside the operator; created it again '
                '(the trainer resumes from its last checkpoint)'
            )
            log.warning('FinetuneRun %s/%s: %s', body['metadata']['namespace'], name, message)
            self.kube.post_event(body, 'Warning', 'JobRecreated', message)

    def _fail_invalid(self, body: dict[str, Any], details: str, previous: FinetuneRunStatus) -> None:
        meta = body['metadata']
        status = invalid_spec_status(details, self.now(), previous)
        if _comparable(previous.model_dump(by_alias=True, mode='json')) != _comparable(
            status.model_dump(by_alias=True, mode='json')
        ):
            self.kube.patch_run_status(meta['namespace'], meta['name'], status_patch(status))
        if previous.reason != 'InvalidSpec':
            self.kube.post_event(body, 'Warning', 'InvalidSpec', details)
            metrics.TRANSITIONS.labels(phase=Phase.FAILED.value).inc()
        metrics.set_phase(meta['namespace'], meta['name'], Phase.FAILED.value)
        if previous.phase not in TERMINAL:
            # A spec edited into an invalid one while the run trains: FAILED must not leave pods running.
            job = self.kube.get_job(meta['namespace'], builders.job_name(meta['name']))
            if job is not None and not _job_done(job):
                self.kube.delete_job(meta['namespace'], builders.job_name(meta['name']))
            self.request_admission()  # it no longer holds a slot, nor a place in the line

    def _join_experiment(
        self, body: dict[str, Any], spec: FinetuneRunSpec, metadata_patch: dict[str, Any] | None = None
    ) -> None:
        """Label the run with its experiment and make the Experiment (if any) an owner (into
        ``metadata_patch`` when given, else patched at once)."""
        meta = body['metadata']
        patch: dict[str, Any] = {}
        if (meta.get('labels') or {}).get(builders.EXPERIMENT_LABEL) != spec.experiment:
            patch['labels'] = {builders.EXPERIMENT_LABEL: spec.experiment}
        refs = meta.get('ownerReferences') or []
        if not patch and any(r.get('kind') == 'Experiment' and r.get('name') == spec.experiment for r in refs):
            return  # joined on an earlier pass: no need to read the Experiment again
        experiment = self.kube.get_experiment(meta['namespace'], spec.experiment)
        if experiment is not None:
            refs = list(meta.get('ownerReferences') or [])
            if not any(r.get('uid') == experiment['metadata']['uid'] for r in refs):
                refs.append({**builders.owner_reference(experiment), 'controller': False})
                patch['ownerReferences'] = refs
        if patch and metadata_patch is not None:
            metadata_patch.update(patch)
        elif patch:
            self.kube.patch_run(meta['namespace'], meta['name'], {'metadata': patch})

    def sync_run(
        self, namespace: str, name: str, created_job: dict[str, Any] | None = None, coalesce: bool = False
    ) -> FinetuneRunStatus | None:
        """Observe the run's Job, pods and reports; write the status if it changed.

        ``created_job`` is the manifest of a Job this pass has just created: it is what the Job is
        (no status, no pods yet), so it is not read back; the Job's own events bring the rest.

        ``coalesce``: return None at once when another pass of this run already waits for its turn:
        that pass reads everything after this call was made, so it sees what this one would have.
        (A burst of Job and pod events otherwise parked every worker thread on one run's lock.)"""
        key = (namespace, name)
        with self._locks_guard:
            if coalesce and key in self._waiting:
                return None
            self._waiting[key] = self._waiting.get(key, 0) + 1
        lock = self._lock(namespace, name)
        lock.acquire()
        with self._locks_guard:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
        try:
            status, freed = self._sync_run_locked(namespace, name, created_job)
        finally:
            lock.release()
        if freed:  # after the run's lock is released: the waiting runs' passes take their own locks
            self.request_admission()
        return status

    def _sync_run_locked(
        self, namespace: str, name: str, created_job: dict[str, Any] | None
    ) -> tuple[FinetuneRunStatus | None, bool]:
        """The status, and whether this pass may have freed a slot of FINETUNER_MAX_CONCURRENT_RUNS (the
        run ended, or is gone)."""
        body = self.kube.get_run(namespace, name)
        if body is None:
            metrics.set_phase(namespace, name, None)
            return None, True
        previous = _parse_status(body)
        try:
            spec = FinetuneRunSpec.model_validate(body.get('spec') or {})
        except ValidationError:
            return previous, False  # reconcile_run reported it; nothing to observe
        if run_problems(name, spec):
            return previous, False
        job = created_job
        pods: list[dict[str, Any]] = []
        limited = (
            self._limited(spec)
            and previous.phase not in TERMINAL
            and not _cancelled(body)
            and not body['metadata'].get('deletionTimestamp')
        )
        if job is None:
            job = self.kube.get_job(namespace, builders.job_name(name))
            if job is None:
                self._replace_lost_job(body, spec, previous)
                job = self.kube.get_job(namespace, builders.job_name(name))
            elif limited and admission.job_suspended(job) and not _job_done(job):
                # Resumed (spec.suspend false) while every slot was taken: resume it once one is free.
                if self._set_suspend(body, spec):
                    job = self.kube.get_job(namespace, builders.job_name(name))
            if job is not None:
                pods = self.kube.list_pods(namespace, f'{builders.RUN_LABEL}={name}')
        output = builders.output_uri(name, namespace, spec, self.config)
        # Only the reports this state of the Job can use (on S3 each one is a request).
        wanted = reports_to_read(job, pods) if previous.phase not in TERMINAL else ()
        reports = self.read_outputs(output, wanted) if wanted else {}
        waiting = limited and (job is None or (admission.job_suspended(job) and not _job_done(job)))
        observed = Observed(
            job=job,
            pods=pods,
            cancelled=_cancelled(body),
            waiting_for_slot=self.config.max_concurrent_runs if waiting else None,
            **reports,
        )
        status = derive_status(
            run=name,
            spec=spec,
            previous=previous,
            observed=observed,
            output_uri=output,
            queue=builders.queue_of(spec, self.config),
            unschedulable_timeout=self.config.unschedulable_timeout,
            now=self.now(),
            generation=body['metadata'].get('generation'),
        )
        before = _comparable(previous.model_dump(by_alias=True, mode='json'))
        if before != _comparable(status.model_dump(by_alias=True, mode='json')):
            if not self.kube.patch_run_status(namespace, name, status_patch(status)):
                return None, True
        if status.phase != previous.phase:
            self._transition(body, previous, status)
        if status.reason == WAITING and previous.reason != WAITING:
            self.kube.post_event(body, 'Normal', 'Waiting', status.details or WAITING)
        elif (
            previous.reason == WAITING
            and status.reason != WAITING
            and status.phase not in TERMINAL
            and job is not None
            and not admission.job_suspended(job)
        ):
            limit = self.config.max_concurrent_runs
            self.kube.post_event(
                body, 'Normal', 'Admitted', f'Got a free slot ({limit} runs allowed at once): trainer Job starts'
            )
        if status.phase == Phase.FAILED.value and job is not None and not _job_done(job):
            # FAILED while the Job still runs (image pull, unschedulable, cancelled): stop its pods.
            self.kube.delete_job(namespace, builders.job_name(name))
        metrics.set_phase(namespace, name, status.phase)
        if status.phase != previous.phase:
            self.request_experiment_sync(namespace, spec.experiment)
        return status, status.phase in TERMINAL and previous.phase not in TERMINAL

    def _transition(self, body: dict[str, Any], previous: FinetuneRunStatus, status: FinetuneRunStatus) -> None:
        assert status.phase is not None
        type_, reason = EVENT_REASONS[status.phase]
        message = f'{previous.phase or "new"} -> {status.phase}: {status.details}'
        self.kube.post_event(body, type_, reason, message)
        metrics.TRANSITIONS.labels(phase=status.phase).inc()
        log.info('FinetuneRun %s/%s %s', body['metadata']['namespace'], body['metadata']['name'], message)

    def run_deleted(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        metrics.set_phase(namespace, name, None)
        experiment = (body.get('spec') or {}).get('experiment') or 'default'
        self.request_experiment_sync(namespace, experiment)
        self.request_admission()

    # --- experiments -------------------------------------------------------------------------
    def sync_experiment(self, namespace: str, name: str) -> None:
        """Adopt the experiment's runs, create due sweep points, recount runs and the best run."""
        with self._lock('experiment', namespace, name):
            body = self.kube.get_experiment(namespace, name)
            if body is None or body['metadata'].get('deletionTimestamp'):
                return
            try:
                spec = ExperimentSpec.model_validate(body.get('spec') or {})
            except ValidationError as e:
                self.kube.post_event(body, 'Warning', 'InvalidSpec', describe_validation_error(e))
                return
            runs = self.kube.list_runs(namespace, f'{builders.EXPERIMENT_LABEL}={name}')
            uid = body['metadata']['uid']
            for run in runs:
                refs = list(run['metadata'].get('ownerReferences') or [])
                if not any(r.get('uid') == uid for r in refs):
                    refs.append({**builders.owner_reference(body), 'controller': False})
                    self.kube.patch_run(namespace, run['metadata']['name'], {'metadata': {'ownerReferences': refs}})
            sweep_created = self._sweep(body, spec, runs)
            status = experiments.experiment_status(
                runs, spec.best_run, sweep_created, body['metadata'].get('generation')
            )
            if _comparable(body.get('status')) != _comparable(status.model_dump(by_alias=True, mode='json')):
                self.kube.patch_experiment_status(namespace, name, status_patch(status))

    def _sweep(self, body: dict[str, Any], spec: ExperimentSpec, runs: list[dict[str, Any]]) -> int:
        if spec.sweep is None or spec.run_template is None:
            return 0
        name = body['metadata']['name']
        points = experiments.sweep_points(spec.sweep)
        by_name = {r['metadata']['name']: r for r in runs}
        existing: dict[int, str | None] = {}
        for index in range(len(points)):
            run = by_name.get(experiments.sweep_run_name(name, index))
            if run is not None:
                existing[index] = (run.get('status') or {}).get('phase')
        created = 0
        for index in experiments.next_sweep_runs(spec.sweep, existing):
            try:
                run_spec = experiments.sweep_run_spec(spec.run_template, points[index])
            except ValidationError as e:
                self.kube.post_event(
                    body, 'Warning', 'InvalidSweepPoint', f'point {points[index]}: {describe_validation_error(e)}'
                )
                break
            run_name = experiments.sweep_run_name(name, index)
            if self.kube.create_run(builders.build_sweep_run(body, run_name, run_spec, points[index])):
                self.kube.post_event(body, 'Normal', 'SweepRunCreated', f'Created run {run_name} for {points[index]}')
            created += 1
        return len(existing) + created


REPORTS = ('artifact', 'metrics', 'failure', 'progress')
_S3_ENV = ('FINETUNER_S3_ENDPOINT', 'AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_DEFAULT_REGION', 'AWS_PROFILE')


@functools.lru_cache(maxsize=4)
def _s3_client(environment: tuple[str | None, ...]) -> Any:
    """One boto3 client per store configuration (clients are thread-safe; building one costs more
    CPU than the few reads a status pass makes)."""
    return s3_client()


def _with_shared_client(store: Any) -> Any:
    if isinstance(store, S3Store):
        return S3Store(store.bucket, store.prefix, client=_s3_client(tuple(os.environ.get(k) for k in _S3_ENV)))
    return store


def read_store_outputs(output_uri: str, wanted: Collection[str] = REPORTS) -> dict[str, Any]:
    """The trainer's reports in a run's output location (only those ``wanted``: each is a request).

    ``store_error`` is set when the store cannot be read (down, unreachable): then nothing about
    the artifact is known, and a completed Job is not reported FINISHED until it is. A report that
    is missing or malformed is only left out.
    """
    reports: dict[str, Any] = {}
    try:
        store = _with_shared_client(open_store(output_uri))
        if 'artifact' in wanted:
            reports['artifact'] = layout.ARTIFACT_MANIFEST in store.list(layout.ARTIFACT)  # raises when unreachable
        for key, name in ((layout.METRICS, 'metrics'), (layout.FAILURE, 'failure'), (layout.PROGRESS, 'progress')):
            if name not in wanted:
                continue
            try:
                reports[name] = store.read_json_or_none(key)
            except ValueError as e:  # a torn or foreign file: the status goes on without it
                log.warning('ignoring malformed %s/%s: %s', output_uri, key, e)
                reports[name] = None
    except Exception as e:
        log.warning('cannot read reports under %s: %s', output_uri, e)
        return {'store_error': ' '.join(str(e).split())[:200]}
    if reports.get('progress') is not None:
        try:
            reports['progress'] = Progress.model_validate(reports['progress'])
        except ValidationError:
            log.warning('ignoring malformed %s/%s', output_uri, layout.PROGRESS)
            reports['progress'] = None
    for name in ('metrics', 'failure'):
        if reports.get(name) is not None and not isinstance(reports[name], dict):
            reports[name] = None
    return reports


def reports_to_read(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> tuple[str, ...]:
    """Which reports the status can use now: the artifact only for a Job that completed, the failure
    only for one that failed, progress and metrics once a pod has run; nothing before."""
    conditions = {
        c.get('type') for c in ((job or {}).get('status') or {}).get('conditions') or [] if c.get('status') == 'True'
    }
    if 'Complete' in conditions:
        return ('artifact', 'metrics', 'progress')
    if 'Failed' in conditions:
        return ('failure', 'metrics', 'progress')
    if any((p.get('status') or {}).get('phase') in ('Running', 'Succeeded', 'Failed') for p in pods):
        return ('metrics', 'progress')
    return ()


def _copy(body: Any) -> dict[str, Any]:
    """A plain dict copy of a body (a Kopf view, or a dict someone else may change)."""
    import json

    return json.loads(json.dumps(dict(body)))


def _parse_status(body: dict[str, Any]) -> FinetuneRunStatus:
    raw = body.get('status') or {}
    known = {f.alias or n for n, f in FinetuneRunStatus.model_fields.items()}
    try:
        return FinetuneRunStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError:
        return FinetuneRunStatus()


def _cancelled(body: dict[str, Any]) -> bool:
    return (body['metadata'].get('annotations') or {}).get(builders.CANCEL_ANNOTATION) == 'true'


def _job_done(job: dict[str, Any]) -> bool:
    for cond in (job.get('status') or {}).get('conditions') or []:
        if cond.get('type') in ('Complete', 'Failed') and cond.get('status') == 'True':
            return True
    return False
