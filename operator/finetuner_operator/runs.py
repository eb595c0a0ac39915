"""FinetuneRuns: make sure a run's children exist, apply suspend and cancel, rebuild its status.

Every method is safe to run twice, concurrently and after a restart: children have deterministic
names (409 is success), the status is derived from the observed Job, pods and the trainer's reports
(:mod:`status`), and a per-run lock keeps two passes on one run from interleaving (:mod:`locks`).
Slots of FINETUNER_MAX_CONCURRENT_RUNS are taken through the :class:`~finetuner_operator.admitter.Admitter`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import FinetuneRunSpec, FinetuneRunStatus, Phase
from finetuner_operator import builders, metrics
from finetuner_operator.admission import job_done, job_suspended
from finetuner_operator.admitter import Admitter
from finetuner_operator.cache import JOBS
from finetuner_operator.checks import run_problems
from finetuner_operator.config import OperatorConfig
from finetuner_operator.diagnostics import Diagnostics
from finetuner_operator.kube import Kube
from finetuner_operator.locks import KeyedLocks
from finetuner_operator.policy import policy_problems
from finetuner_operator.reports import ReportReader, reports_to_read
from finetuner_operator.status import (
    Observed,
    Timeouts,
    cancelled,
    derive_status,
    describe_validation_error,
    job_restart,
    parse_status,
    parse_time,
    refused_status,
    same_status,
    status_patch,
)

log = logging.getLogger('finetuner_operator')

TERMINAL = (Phase.FINISHED.value, Phase.FAILED.value)
EVENT_REASONS = {
    Phase.CREATED.value: ('Normal', 'Created'),
    Phase.STARTED.value: ('Normal', 'Started'),
    Phase.FINISHED.value: ('Normal', 'Finished'),
    Phase.FAILED.value: ('Warning', 'Failed'),
}
WAITING = Reason.WAITING.value
RESTARTING = Reason.RESTARTING.value
ACCOUNT_CHECK_TTL = 60.0  # seconds a ServiceAccount seen to exist is not looked up again


class RunReconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        now: Callable[[], datetime],
        reports: ReportReader,
        admitter: Admitter,
        locks: KeyedLocks,
        phase_changed: Callable[[str, str], None],
    ) -> None:
        """``phase_changed(namespace, experiment)``: a run of that Experiment changed phase (recount it)."""
        self.kube = kube
        self.config = config
        self.now = now
        self.reports = reports
        self.admitter = admitter
        self.locks = locks
        self.phase_changed = phase_changed
        self.timeouts = Timeouts.of(config)
        self.diagnostics = Diagnostics(kube, config.progress_interval)
        self._accounts: dict[tuple[str, str], float] = {}  # (namespace, ServiceAccount) -> when seen
        self._accounts_guard = threading.Lock()

    # --- a change of the run ---------------------------------------------------------------------
    def reconcile_run(self, body: dict[str, Any], metadata_patch: dict[str, Any] | None = None) -> None:
        """Create (or re-find) the run's children, apply suspend/cancel, then rebuild its status.

        ``metadata_patch``: where to put the run's own metadata changes (its experiment label and owner)
        instead of patching the run, for a caller that writes them itself (Kopf's handler patch, which
        is written anyway: one request and one watch event less per new run)."""
        meta = body['metadata']
        namespace, name = meta['namespace'], meta['name']
        previous = parse_status(body)
        spec = self._valid_spec(body, previous)
        if spec is None or self._refused(body, spec, previous):
            return
        created_job: dict[str, Any] | None = None
        freed = False  # a slot of FINETUNER_MAX_CONCURRENT_RUNS given back (the Job suspended)
        if previous.phase not in TERMINAL:
            created_job, freed = self._apply_spec(body, spec)
        self._join_experiment(body, spec, metadata_patch)
        self.sync_run(namespace, name, created_job=created_job)
        if freed:
            self.admitter.request()

    def _valid_spec(self, body: dict[str, Any], previous: FinetuneRunStatus) -> FinetuneRunSpec | None:
        """The run's spec, or None after failing the run for a spec the contract or the operator refuses."""
        try:
            spec = FinetuneRunSpec.model_validate(body.get('spec') or {})
        except ValidationError as e:
            self._fail_before_job(body, Reason.INVALID_SPEC, describe_validation_error(e), previous)
            return None
        problems = run_problems(body['metadata']['name'], spec)
        if problems:
            self._fail_before_job(body, Reason.INVALID_SPEC, 'Invalid spec: ' + '; '.join(problems), previous)
            return None
        return spec

    def _refused(self, body: dict[str, Any], spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> bool:
        """Before a run gets its first Job: fail it (True) when the administrator's allow-lists refuse what it
        asks for (FINETUNER_POLICY), or when the ServiceAccount its pods would run as is missing in its
        namespace (a namespace the installation did not prepare), instead of a Job that cannot start."""
        meta = body['metadata']
        if previous.phase in TERMINAL or previous.job_name or cancelled(body):
            return False
        if self.kube.get_job(meta['namespace'], builders.job_name(meta['name'])) is not None:
            return False
        problems = policy_problems(spec, self.config.policy)
        if problems:
            details = 'Not allowed on this cluster: ' + '; '.join(problems)
            self._fail_before_job(body, Reason.POLICY_DENIED, details, previous)
            return True
        account = builders.service_account_of(spec, self.config)
        if self.config.check_service_account and not self._account_exists(meta['namespace'], account):
            details = (
                f'Namespace {meta["namespace"]} has no ServiceAccount {account!r}, which the trainer pods run as: '
                f'add {meta["namespace"]} to the Helm value namespaces (the chart then creates the ServiceAccount and '
                'the Secrets the pods use there), create it, or set spec.serviceAccountName to one that exists'
            )
            self._fail_before_job(body, Reason.NAMESPACE_NOT_PREPARED, details, previous)
            return True
        return False

    def _account_exists(self, namespace: str, name: str) -> bool:
        """Whether the ServiceAccount exists (one seen within ACCOUNT_CHECK_TTL is not asked again)."""
        now = time.monotonic()
        with self._accounts_guard:
            seen = self._accounts.get((namespace, name))
        if seen is not None and now - seen < ACCOUNT_CHECK_TTL:
            return True
        if self.kube.get_service_account(namespace, name) is None:
            return False
        with self._accounts_guard:
            self._accounts[(namespace, name)] = now
        return True

    def _apply_spec(self, body: dict[str, Any], spec: FinetuneRunSpec) -> tuple[dict[str, Any] | None, bool]:
        """(the Job this call created, whether a slot was given back) after making the children match
        the spec: no Job for a cancelled run or one suspended in a queue (Kueue owns the suspend flag of
        queued Jobs), else the children, suspended or resumed as the spec says."""
        meta = body['metadata']
        job_name = builders.job_name(meta['name'])
        queue = builders.queue_of(spec, self.config)
        if cancelled(body) or (spec.suspend and queue):
            if self.kube.get_job(meta['namespace'], job_name) is not None:
                self.kube.delete_job(meta['namespace'], job_name)
            return None, False
        # The Job first: on a new run nothing else is asked of the API server before it exists.
        fresh = self._create_children(body, spec)
        job = None if fresh is not None else self.kube.get_job(meta['namespace'], job_name)
        if job is not None and not queue and bool(job['spec'].get('suspend')) != spec.suspend:
            return fresh, self._set_suspend(body, spec) and spec.suspend
        return fresh, False

    def _set_suspend(self, body: dict[str, Any], spec: FinetuneRunSpec) -> bool:
        """Suspend or resume the run's Job as ``spec.suspend`` says; True when it was patched. Under
        FINETUNER_MAX_CONCURRENT_RUNS a resume takes a slot: without a free one the Job stays suspended
        and the run waits (a later pass resumes it)."""
        meta = body['metadata']
        job_name = builders.job_name(meta['name'])
        patch = {'spec': {'suspend': spec.suspend}}
        if self.admitter.limited(spec):
            with self.admitter.slot_for(body) as free:
                if not free:
                    return False
                self.kube.patch_job(meta['namespace'], job_name, patch)
        else:
            self.kube.patch_job(meta['namespace'], job_name, patch)
        what = 'Suspended' if spec.suspend else 'Resumed'
        self.kube.post_event(body, 'Normal', what, f'{what} trainer Job {job_name}')
        return True

    def _create_children(
        self, body: dict[str, Any], spec: FinetuneRunSpec, attempt: builders.JobAttempt | None = None
    ) -> dict[str, Any] | None:
        """Create the run's children (an existing one answers 409, which is fine); the Job's manifest
        if this call created it, else None.

        Under FINETUNER_MAX_CONCURRENT_RUNS a run that has no Job yet gets its children only with a free
        slot (none are created while it waits), counted and created under the admission lock; a run
        that has its Job already is left as it is."""
        if not self.admitter.limited(spec):
            return self._create_all_children(body, spec, attempt)
        meta = body['metadata']
        if self.kube.get_job(meta['namespace'], builders.job_name(meta['name'])) is not None:
            return None
        with self.admitter.slot_for(body) as free:
            return self._create_all_children(body, spec, attempt) if free else None

    def _create_all_children(
        self, body: dict[str, Any], spec: FinetuneRunSpec, attempt: builders.JobAttempt | None = None
    ) -> dict[str, Any] | None:
        """The Job first, then what its pods need, owned by it (see builders); the Job's manifest if this call
        created it."""
        meta = body['metadata']
        name, namespace = meta['name'], meta['namespace']
        owner = {**body, 'kind': body.get('kind', 'FinetuneRun')}
        job = builders.build_job(name, namespace, spec, self.config, owner, attempt)
        created = self.kube.create_child(job)
        if created and attempt is not None and attempt.restart:
            message = f'Created trainer Job {job["metadata"]["name"]} for restart {attempt.restart} of all nodes'
            self.kube.post_event(body, 'Normal', 'Restarted', message)
        elif created:
            self.kube.post_event(body, 'Normal', 'JobCreated', f'Created trainer Job {builders.job_name(name)}')
        current = self.kube.get_job(namespace, builders.job_name(name))  # the create's answer, from the cache
        if (
            current is not None
            and (current.get('metadata') or {}).get('uid')
            and not current['metadata'].get('deletionTimestamp')
        ):
            for dependent in builders.build_job_dependents(name, namespace, spec, self.config, current):
                self.kube.create_child(dependent)
        return job if created else None

    def _replace_lost_job(self, body: dict[str, Any], spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> None:
        """An active run whose Job is gone (deleted behind the operator's back, or a create that was
        answered 409 without the Job existing) gets it back; the trainer resumes from its checkpoint.

        Under FINETUNER_MAX_CONCURRENT_RUNS this is also how a waiting run gets its Job, and a run whose
        Job was lost queues for a slot like any other, at its place by creationTimestamp (see
        docs/OPERATOR.md)."""
        if previous.phase in TERMINAL or cancelled(body) or body['metadata'].get('deletionTimestamp'):
            return
        if spec.suspend and builders.queue_of(spec, self.config):
            return  # a suspended queued run gave its Job back on purpose
        name = body['metadata']['name']
        attempt = self._restart_attempt(spec, previous)
        if attempt is not None:  # a multi-node run restarting as a whole: its Job was deleted on purpose
            self._create_children(body, spec, attempt)
            return
        if self._create_children(body, spec) is not None and previous.job_name:
            message = (
                f'Trainer Job {builders.job_name(name)} was deleted outside the operator; created it again '
                '(the trainer resumes from its last checkpoint)'
            )
            log.warning('FinetuneRun %s/%s: %s', body['metadata']['namespace'], name, message)
            self.kube.post_event(body, 'Warning', 'JobRecreated', message)

    def _restart_attempt(self, spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> builders.JobAttempt | None:
        """The next Job of a multi-node run restarting as a whole (None: it is not), with what is left of its
        deadline."""
        if previous.reason != RESTARTING or spec.resources.nodes <= 1:
            return None
        left: int | None = None
        deadline = builders.active_deadline(spec, self.config)
        started = parse_time(previous.start_time)
        if deadline and started is not None:
            left = max(int(deadline - (self.now() - started).total_seconds()), 1)
        return builders.JobAttempt(restart=previous.restarts or 0, active_deadline_seconds=left)

    def _fail_before_job(self, body: dict[str, Any], reason: Reason, details: str, previous: FinetuneRunStatus) -> None:
        """FAILED for what the operator refuses before (or instead of) a Job: never retried."""
        meta = body['metadata']
        status = refused_status(reason, details, self.now(), previous)
        if not same_status(previous, status):
            self.kube.patch_run_status(meta['namespace'], meta['name'], status_patch(status))
        if previous.reason != reason.value:
            self.kube.post_event(body, 'Warning', reason.value, details)
            metrics.TRANSITIONS.labels(phase=Phase.FAILED.value).inc()
        metrics.set_phase(meta['namespace'], meta['name'], Phase.FAILED.value)
        if previous.phase not in TERMINAL:
            # A spec edited into an invalid one while the run trains: FAILED must not leave pods running.
            job = self.kube.get_job(meta['namespace'], builders.job_name(meta['name']))
            if job is not None and not job_done(job):
                self.kube.delete_job(meta['namespace'], builders.job_name(meta['name']))
            self.admitter.request()  # it no longer holds a slot, nor a place in the line

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

    # --- observing the run --------------------------------------------------------------------------
    def sync_run(
        self, namespace: str, name: str, created_job: dict[str, Any] | None = None, coalesce: bool = False
    ) -> FinetuneRunStatus | None:
        """Observe the run's Job, pods and reports; write the status if it changed.

        ``created_job`` is the manifest of a Job this pass has just created: it is what the Job is
        (no status, no pods yet), so it is not read back; the Job's own events bring the rest.

        ``coalesce``: return None at once when another pass of this run already waits for its turn:
        that pass reads everything after this call was made, so it sees what this one would have."""
        with self.locks.hold(namespace, name, coalesce=coalesce) as turn:
            if not turn:
                return None
            status, freed = self._sync_run_locked(namespace, name, created_job)
        if freed:  # after the run's lock is released: the waiting runs' passes take their own locks
            self.admitter.request()
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
        previous = parse_status(body)
        try:
            spec = FinetuneRunSpec.model_validate(body.get('spec') or {})
        except ValidationError:
            return previous, False  # reconcile_run reported it; nothing to observe
        if run_problems(name, spec) or self._refused(body, spec, previous):
            return previous, False
        limited = self._wants_slot(body, spec, previous)
        job, pods = self._children(body, spec, previous, created_job, limited)
        output = builders.output_uri(name, namespace, spec, self.config)
        observed = self._observe(job, pods, output, previous, body, limited)
        self._diagnose(observed, spec, previous)
        status = derive_status(
            run=name,
            spec=spec,
            previous=previous,
            observed=observed,
            output_uri=output,
            queue=builders.queue_of(spec, self.config),
            now=self.now(),
            timeouts=self.timeouts,
            active_deadline=builders.active_deadline(spec, self.config),
            generation=body['metadata'].get('generation'),
        )
        if not same_status(previous, status) and not self.kube.patch_run_status(namespace, name, status_patch(status)):
            return None, True
        self._after_status(body, spec, previous, status, job)
        return status, status.phase in TERMINAL and previous.phase not in TERMINAL

    def _wants_slot(self, body: dict[str, Any], spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> bool:
        """Whether the run's Job takes a slot of FINETUNER_MAX_CONCURRENT_RUNS while it is active."""
        return (
            self.admitter.limited(spec)
            and previous.phase not in TERMINAL
            and not cancelled(body)
            and not body['metadata'].get('deletionTimestamp')
        )

    def _children(
        self,
        body: dict[str, Any],
        spec: FinetuneRunSpec,
        previous: FinetuneRunStatus,
        created_job: dict[str, Any] | None,
        limited: bool,
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The run's Job (replaced when lost, resumed when a slot is free) and its pods. A Job this pass
        has just created is neither read back nor has pods yet, unless the watch has already brought a
        status of it: a fast Job controller (or a Job that failed at once) can report before the creating
        pass gets the run's lock, and the pass its event triggered was dropped for this one, which must
        then read what the event said rather than assume the bare manifest (the run stayed CREATED)."""
        namespace, name = body['metadata']['namespace'], body['metadata']['name']
        if created_job is not None:
            cache = getattr(self.kube, 'cache', None)
            seen = cache.get(JOBS, namespace, builders.job_name(name)) if cache is not None else None
            if not (seen or {}).get('status'):
                return created_job, []
        job = self.kube.get_job(namespace, builders.job_name(name))
        if job is None:
            self._replace_lost_job(body, spec, previous)
            job = self.kube.get_job(namespace, builders.job_name(name))
        elif limited and job_suspended(job) and not job_done(job):
            # Resumed (spec.suspend false) while every slot was taken: resume it once one is free.
            if self._set_suspend(body, spec):
                job = self.kube.get_job(namespace, builders.job_name(name))
        pods = self.kube.list_pods(namespace, f'{builders.RUN_LABEL}={name}') if job is not None else []
        return job, pods

    def _observe(
        self,
        job: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        output: str,
        previous: FinetuneRunStatus,
        body: dict[str, Any],
        limited: bool,
    ) -> Observed:
        # Only the reports this state of the Job can use (on S3 each one is a request).
        wanted = reports_to_read(job, pods) if previous.phase not in TERMINAL else ()
        reports = self.reports.read(output, wanted) if wanted else None
        waiting = limited and (job is None or (job_suspended(job) and not job_done(job)))
        return Observed(
            job=job,
            pods=pods,
            cancelled=cancelled(body),
            waiting_for_slot=self.config.max_concurrent_runs if waiting else None,
            **({field: getattr(reports, field) for field in reports.model_fields_set} if reports else {}),
        )

    def _diagnose(self, observed: Observed, spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> None:
        """Events and Kueue's Workload, only for a run that is stuck (see diagnostics.py)."""
        if previous.phase in TERMINAL:
            return
        now = self.now()
        observed.failed_create, observed.failed_create_since = self.diagnostics.failed_create(
            observed.job, observed.pods, now
        )
        observed.scale_up = self.diagnostics.scale_up(observed.pods)
        observed.workload = self.diagnostics.workload(observed.job, builders.queue_of(spec, self.config), now)

    def _after_status(
        self,
        body: dict[str, Any],
        spec: FinetuneRunSpec,
        previous: FinetuneRunStatus,
        status: FinetuneRunStatus,
        job: dict[str, Any] | None,
    ) -> None:
        """Events, metrics and clean-up that follow a new status."""
        meta = body['metadata']
        if status.phase != previous.phase:
            self._transition(body, previous, status)
        self._post_slot_events(body, previous, status, job)
        if status.phase == Phase.FAILED.value and job is not None and not job_done(job):
            # FAILED while the Job still runs (image pull, unschedulable, cancelled): stop its pods.
            self.kube.delete_job(meta['namespace'], builders.job_name(meta['name']))
        counted = job is not None and (status.restarts or 0) > job_restart(job)
        if status.reason == RESTARTING and job is not None and job_done(job) and counted:
            self._restart(body, previous, status, job)  # this Job's failure is counted: the next Job replaces it
        metrics.set_phase(meta['namespace'], meta['name'], status.phase)
        if status.phase != previous.phase:
            self.phase_changed(meta['namespace'], spec.experiment)

    def _restart(
        self, body: dict[str, Any], previous: FinetuneRunStatus, status: FinetuneRunStatus, job: dict[str, Any]
    ) -> None:
        """A multi-node run restarts as a whole: its failed Job goes first, with all its pods (Foreground), and
        the Job's deletion brings the pass that creates the next one (``_replace_lost_job``)."""
        meta = body['metadata']
        if not job['metadata'].get('deletionTimestamp'):
            self.kube.delete_job(meta['namespace'], builders.job_name(meta['name']), propagation='Foreground')
        if status.restarts != previous.restarts:
            self.kube.post_event(body, 'Warning', RESTARTING, status.details or RESTARTING)

    def _post_slot_events(
        self, body: dict[str, Any], previous: FinetuneRunStatus, status: FinetuneRunStatus, job: dict[str, Any] | None
    ) -> None:
        """``Waiting`` when a run starts waiting for a slot, ``Admitted`` when it gets one."""
        if status.reason == WAITING and previous.reason != WAITING:
            self.kube.post_event(body, 'Normal', 'Waiting', status.details or WAITING)
        elif (
            previous.reason == WAITING
            and status.reason != WAITING
            and status.phase not in TERMINAL
            and job is not None
            and not job_suspended(job)
        ):
            limit = self.config.max_concurrent_runs
            self.kube.post_event(
                body, 'Normal', 'Admitted', f'Got a free slot ({limit} runs allowed at once): trainer Job starts'
            )

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
        self.phase_changed(namespace, experiment)
        self.admitter.request()
