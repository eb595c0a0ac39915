"""Pure mapping of the observed world to a FinetuneRun's status.

``derive_status`` takes what the operator just saw (the trainer Job, its pods and the trainer's
reports in the object store) and returns the whole status, in two steps, as Kubeflow's trainjob
controller does:

1. **the phase**: :func:`derive_phase` asks the rules of :data:`PHASE_RULES` in order; the first
   that recognises the situation gives the :class:`Verdict` (phase, reason, details);
2. **the conditions**: one small setter per standard condition (:func:`set_created_condition`,
   :func:`set_started_condition`, :func:`set_suspended_condition`, :func:`set_succeeded_condition`,
   :func:`set_failed_condition`).

Reasons and details are the contract's vocabulary (:mod:`finetuner.api.reasons`), shared with the
local backend. Nothing is remembered between passes except what the previous status itself
carries (transition times, a terminal phase whose Job is gone), so a restarted operator rebuilds
the same status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetuner.api import reasons
from finetuner.api.reasons import ConditionReason, ConditionType, Reason
from finetuner.api.v1alpha1 import Condition, FinetuneRunSpec, FinetuneRunStatus, Phase, Progress, RunMetrics
from finetuner_operator.builders import CANCEL_ANNOTATION, COMPLETION_INDEX_ANNOTATION, CONTAINER, job_name

IMAGE_PULL_REASONS = ('ErrImagePull', 'ImagePullBackOff', 'InvalidImageName', 'ErrImageNeverPull')
TERMINATION_MESSAGE_LIMIT = 1000


class Observed(BaseModel):
    """What one pass of the operator saw for a run."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = Field(default_factory=list)
    progress: Progress | None = None
    metrics: dict[str, Any] | None = None  # metrics.json
    failure: dict[str, Any] | None = None  # failure.json
    artifact: bool = False  # artifact/manifest.json exists
    store_error: str | None = None  # the reports could not be read (the store is down)
    cancelled: bool = False
    # FINETUNER_MAX_CONCURRENT_RUNS when the run has no running Job because every slot is taken (it has
    # no Job yet, or its Job stays suspended after spec.suspend went false); None otherwise.
    waiting_for_slot: int | None = None


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace('Z', '+00:00'))


# --- reading the Job and its pods -------------------------------------------------------------------


def _conditions_true(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    conditions = ((obj or {}).get('status') or {}).get('conditions') or []
    return {c['type']: c for c in conditions if c.get('status') == 'True'}


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get('status') or {}).get('containerStatuses') or []:
        if status.get('name') == CONTAINER:
            return status
    return {}


def _pod_time(pod: dict[str, Any]) -> str:
    return pod['metadata'].get('creationTimestamp') or ''


def _describe_termination(pod: dict[str, Any]) -> str | None:
    """The trainer's own words for a failed attempt (termination message), or its exit code."""
    terminated = (_container_status(pod).get('state') or {}).get('terminated')
    if not terminated:
        return None
    message = (terminated.get('message') or '').strip()
    if terminated.get('reason') == 'OOMKilled':
        return 'out of memory (OOMKilled): raise spec.resources.memory or lower spec.batchSize'
    lines = [line for line in message.splitlines() if line.strip()]
    last = lines[-1][:TERMINATION_MESSAGE_LIMIT] if lines else None
    code = terminated.get('exitCode')
    if isinstance(code, int) and code > 128:
        # Killed by a signal: the message can only be the log tail (FallbackToLogsOnError), not a reason.
        killed = f'killed by signal {code - 128} (exit code {code})'
        return f'{killed}; last output: {last}' if last else killed
    if last:
        return last
    return f'trainer exited with code {code}' if code is not None else None


def _rank(pod: dict[str, Any]) -> int | None:
    """A pod's completion index: its node rank. Kubernetes >= 1.28 sets it as a label too (the one the
    operator's cache keeps), under the same key as the annotation."""
    meta = pod['metadata']
    index = (meta.get('labels') or {}).get(COMPLETION_INDEX_ANNOTATION)
    if index is None:
        index = (meta.get('annotations') or {}).get(COMPLETION_INDEX_ANNOTATION)
    return int(index) if index is not None and str(index).isdigit() else None


def _describe_failure(failed: list[dict[str, Any]], nodes: int) -> str | None:
    """What went wrong in the latest failed attempt. A multi-node run names the node rank that failed
    first (the others' errors follow from it: a collective with a dead peer fails on every rank)."""
    if not failed:
        return None
    if nodes <= 1:
        return _describe_termination(failed[-1])
    latest: dict[int | None, dict[str, Any]] = {}
    for pod in failed:  # in creation order: the last pod of each rank is its latest attempt
        latest[_rank(pod)] = pod

    def order(pod: dict[str, Any]) -> tuple[str, int, int]:
        terminated = (_container_status(pod).get('state') or {}).get('terminated') or {}
        killed = 0 if (terminated.get('exitCode') or 0) > 128 else 1  # on a tie, the killed one went first
        return terminated.get('finishedAt') or '', killed, _rank(pod) or 0

    first = min(latest.values(), key=order)
    cause = _describe_termination(first) or 'unknown cause'
    return f'node rank {_rank(first)} of {nodes} (pod {first["metadata"].get("name")}) failed: {cause}'


def _failed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        (p for p in pods if (p.get('status') or {}).get('phase') == 'Failed'),
        key=_pod_time,
    )


def _running_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if (p.get('status') or {}).get('phase') == 'Running']


def _image_pull_error(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    for pod in pods:
        waiting = (_container_status(pod).get('state') or {}).get('waiting') or {}
        if waiting.get('reason') in IMAGE_PULL_REASONS:
            image = pod['spec']['containers'][0].get('image', '?')
            return image, waiting.get('message') or waiting['reason']
    return None


def _unschedulable(pods: list[dict[str, Any]]) -> tuple[datetime, str] | None:
    """The oldest still-unschedulable pending pod: since when, and the scheduler's message."""
    found: list[tuple[datetime, str]] = []
    for pod in pods:
        status = pod.get('status') or {}
        if status.get('phase') not in (None, 'Pending'):
            continue
        for cond in status.get('conditions') or []:
            if cond.get('type') == 'PodScheduled' and cond.get('status') == 'False':
                if cond.get('reason') == 'Unschedulable':
                    since = parse_time(cond.get('lastTransitionTime')) or parse_time(_pod_time(pod))
                    if since is not None:
                        found.append((since, cond.get('message') or 'no node fits the pod'))
    return min(found) if found else None


def _started_at(pods: list[dict[str, Any]]) -> str | None:
    times = []
    for pod in pods:
        state = _container_status(pod).get('state') or {}
        started = (state.get('running') or state.get('terminated') or {}).get('startedAt')
        if started:
            times.append(started)
    return min(times) if times else None


def _run_metrics(metrics: dict[str, Any] | None) -> RunMetrics | None:
    if not metrics:
        return None
    return RunMetrics.from_report(metrics)


# --- step 1: the phase ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A run's phase, why (a :class:`Reason`), in words, and what goes with it."""

    phase: Phase
    reason: str
    details: str
    suspended: bool = False  # the Suspended condition is True
    completion: str | None = None  # when the Job says the run ended (its Complete/Failed condition)


SUBMITTED = Verdict(Phase.CREATED, Reason.SUBMITTED.value, reasons.SUBMITTED)


@dataclass(frozen=True)
class Situation:
    """Everything a phase rule may look at: the run's spec and what this pass observed."""

    spec: FinetuneRunSpec
    observed: Observed
    output_uri: str
    queue: str | None
    unschedulable_timeout: float
    now: datetime
    started_at: str | None  # when a trainer pod first ran (kept from the previous status)

    @property
    def job_true(self) -> dict[str, dict[str, Any]]:
        """The Job's conditions that are True, by type."""
        return _conditions_true(self.observed.job)

    @property
    def job_status(self) -> dict[str, Any]:
        return (self.observed.job or {}).get('status') or {}

    def job_ended_at(self, condition: str) -> str:
        ended = self.job_true[condition]
        if condition == 'Complete':
            return self.job_status.get('completionTime') or ended.get('lastTransitionTime') or rfc3339(self.now)
        return ended.get('lastTransitionTime') or rfc3339(self.now)


def cancelled_phase(seen: Situation) -> Verdict | None:
    """``run.cancel()``: FAILED at once, whatever the Job does."""
    if not seen.observed.cancelled:
        return None
    return Verdict(Phase.FAILED, Reason.CANCELLED.value, reasons.CANCELLED)


def no_job_phase(seen: Situation) -> Verdict | None:
    """No Job (yet): suspended, waiting for a slot, or just submitted."""
    if seen.observed.job is not None:
        return None
    if seen.spec.suspend:
        return Verdict(Phase.CREATED, Reason.SUSPENDED.value, reasons.SUSPENDED, suspended=True)
    if seen.observed.waiting_for_slot:
        return Verdict(Phase.CREATED, Reason.WAITING.value, reasons.waiting(seen.observed.waiting_for_slot))
    return SUBMITTED


def complete_phase(seen: Situation) -> Verdict | None:
    """A Complete Job is FINISHED only once the artifact's manifest is in the store."""
    if 'Complete' not in seen.job_true:
        return None
    if seen.observed.store_error:
        # Never FINISHED on the Job's word alone: the artifact exists only once its manifest does.
        details = (
            f'Training finished; waiting for the object store to confirm the artifact ({seen.observed.store_error})'
        )
        return Verdict(Phase.STARTED, Reason.VERIFYING_ARTIFACT.value, details)
    ended = seen.job_ended_at('Complete')
    if not seen.observed.artifact:
        details = reasons.artifact_missing(seen.output_uri)
        return Verdict(Phase.FAILED, Reason.ARTIFACT_MISSING.value, details, completion=ended)
    return Verdict(
        Phase.FINISHED, Reason.SUCCEEDED.value, reasons.succeeded(seen.output_uri, seen.spec.task), completion=ended
    )


def failed_job_phase(seen: Situation) -> Verdict | None:
    """A Failed Job: a configuration error, retries used up, the deadline, or the Job's own reason."""
    if 'Failed' not in seen.job_true:
        return None
    failed = seen.job_true['Failed']
    job_reason = failed.get('reason') or 'Failed'
    spec = seen.spec
    failed_pods = _failed_pods(seen.observed.pods)
    last = _describe_failure(failed_pods, spec.resources.nodes)
    failure = seen.observed.failure or {}
    trainer_says = failure.get('message') or failure.get('reason')
    if job_reason == 'PodFailurePolicy':
        # The trainer exited with its configuration-error code: its message is the reason.
        reason, details = (
            Reason.CONFIGURATION_ERROR.value,
            reasons.configuration_error(last or trainer_says or failed.get('message')),
        )
    elif job_reason == 'BackoffLimitExceeded':
        attempts = _node_attempts(len(failed_pods), spec) or spec.backoff_limit + 1
        cause = last or trainer_says or 'see run.logs()'
        reason = Reason.BACKOFF_LIMIT_EXCEEDED.value
        details = f'The trainer failed {attempts} times (backoffLimit {spec.backoff_limit}); last attempt: {cause}'
    elif job_reason == 'DeadlineExceeded':
        reason = Reason.DEADLINE_EXCEEDED.value
        details = (
            f'The run exceeded activeDeadlineSeconds={spec.active_deadline_seconds}; '
            'raise spec.activeDeadlineSeconds or train fewer epochs'
        )
    else:
        reason, details = job_reason, failed.get('message') or last or 'the trainer Job failed'
    return Verdict(Phase.FAILED, reason, details, completion=seen.job_ended_at('Failed'))


def suspended_job_phase(seen: Situation) -> Verdict | None:
    """A suspended Job: suspended by the user, queued in Kueue, or held for a slot."""
    if not ((seen.observed.job or {}).get('spec') or {}).get('suspend'):
        return None
    if seen.spec.suspend:
        return Verdict(Phase.CREATED, Reason.SUSPENDED.value, reasons.SUSPENDED, suspended=True)
    if seen.queue:
        return Verdict(Phase.CREATED, Reason.QUEUED.value, f'Waiting in queue {seen.queue}', suspended=True)
    if seen.observed.waiting_for_slot:
        # Resumed by the user; the operator holds the Job until a slot is free.
        return Verdict(Phase.CREATED, Reason.WAITING.value, reasons.waiting(seen.observed.waiting_for_slot))
    return Verdict(Phase.CREATED, Reason.SUSPENDED.value, reasons.JOB_SUSPENDED, suspended=True)


def image_pull_phase(seen: Situation) -> Verdict | None:
    pull = _image_pull_error(seen.observed.pods)
    if pull is None:
        return None
    image, message = pull
    details = (
        f'Cannot pull the trainer image {image}: {message}; fix spec.image or the operator setting '
        'FINETUNER_TRAINER_IMAGE, or add an image pull secret'
    )
    return Verdict(Phase.FAILED, Reason.IMAGE_PULL_ERROR.value, details)


def running_phase(seen: Situation) -> Verdict | None:
    if not _running_pods(seen.observed.pods):
        return None
    return Verdict(Phase.STARTED, Reason.RUNNING.value, reasons.running(seen.observed.progress, seen.spec.task))


def unschedulable_phase(seen: Situation) -> Verdict | None:
    """A pod no node fits: CREATED while it waits, FAILED after the unschedulable timeout."""
    pending = _unschedulable(seen.observed.pods)
    if pending is None:
        return None
    since, message = pending
    waited = (seen.now - since).total_seconds()
    if waited <= seen.unschedulable_timeout:
        return Verdict(Phase.CREATED, Reason.UNSCHEDULABLE.value, f'Waiting for a node that fits: {message}')
    details = (
        f'No node could run the trainer for {waited / 60:.0f} minutes ({message}); lower '
        'spec.resources, fix spec.nodeSelector/tolerations, or add capacity'
    )
    return Verdict(Phase.FAILED, Reason.UNSCHEDULABLE.value, details)


def retrying_phase(seen: Situation) -> Verdict | None:
    """An attempt failed and the Job is still active: it retries (an infrastructure failure)."""
    failed_pods = _failed_pods(seen.observed.pods)
    if not failed_pods or not seen.job_status.get('active'):
        return None
    last = _describe_failure(failed_pods, seen.spec.resources.nodes) or 'unknown cause'
    attempt = _node_attempts(len(failed_pods), seen.spec)
    return Verdict(Phase.STARTED, Reason.RETRYING.value, f'Attempt {attempt} failed ({last}); retrying')


def started_earlier_phase(seen: Situation) -> Verdict | None:
    """A trainer pod ran before and the Job still has pods: still STARTED between attempts."""
    if not (seen.started_at and seen.observed.pods):
        return None
    return Verdict(Phase.STARTED, Reason.RUNNING.value, reasons.running(seen.observed.progress, seen.spec.task))


# In order: the first rule that recognises the situation decides (a cancel beats everything; a Job's
# end beats its pods; a running pod beats an unschedulable sibling).
PHASE_RULES: tuple[Callable[[Situation], Verdict | None], ...] = (
    cancelled_phase,
    no_job_phase,
    complete_phase,
    failed_job_phase,
    suspended_job_phase,
    image_pull_phase,
    running_phase,
    unschedulable_phase,
    retrying_phase,
    started_earlier_phase,
)


def derive_phase(seen: Situation) -> Verdict:
    """The phase, reason and details of the situation (see the table in docs/OPERATOR.md)."""
    for rule in PHASE_RULES:
        verdict = rule(seen)
        if verdict is not None:
            return verdict
    return SUBMITTED


# --- step 2: the conditions --------------------------------------------------------------------------


class Conditions:
    """The standard conditions one pass sets, in the order set; a condition's transition time moves
    only when its status changes (as ``meta.SetStatusCondition`` does)."""

    def __init__(self, previous: list[Condition], now: str) -> None:
        self._previous = {c.type: c for c in previous}
        self._now = now
        self.items: list[Condition] = []

    def set(self, type_: ConditionType, value: bool, reason: str, message: str | None = None) -> None:
        status = 'True' if value else 'False'
        before = self._previous.get(type_.value)
        moment = self._now if before is None or before.status != status else before.last_transition_time
        self.items.append(
            Condition(type=type_.value, status=status, reason=reason, message=message, last_transition_time=moment)
        )


def set_created_condition(conditions: Conditions, created: bool) -> None:
    """Created: True once the run has (or had) its trainer Job."""
    reason = ConditionReason.JOB_CREATED.value if created else Reason.SUBMITTED.value
    conditions.set(ConditionType.CREATED, created, reason)


def set_started_condition(conditions: Conditions, started_at: str | None) -> None:
    """Started: True once a trainer pod has run."""
    reason = ConditionReason.POD_RUNNING if started_at else ConditionReason.NOT_STARTED
    conditions.set(ConditionType.STARTED, started_at is not None, reason.value)


def set_suspended_condition(conditions: Conditions, verdict: Verdict) -> None:
    """Suspended: True with the phase's reason and details while the Job is held."""
    if verdict.suspended:
        conditions.set(ConditionType.SUSPENDED, True, verdict.reason, verdict.details)
    else:
        conditions.set(ConditionType.SUSPENDED, False, ConditionReason.NOT_SUSPENDED.value)


def set_succeeded_condition(conditions: Conditions, verdict: Verdict) -> None:
    """Succeeded: only on a FINISHED run."""
    if verdict.phase is Phase.FINISHED:
        conditions.set(ConditionType.SUCCEEDED, True, verdict.reason, verdict.details)


def set_failed_condition(conditions: Conditions, verdict: Verdict) -> None:
    """Failed: only on a FAILED run, with the reason a person can act on."""
    if verdict.phase is Phase.FAILED:
        conditions.set(ConditionType.FAILED, True, verdict.reason, verdict.details)


# --- the whole status ---------------------------------------------------------------------------------


def _completion_time(verdict: Verdict, previous: FinetuneRunStatus, stamp: str) -> str | None:
    if verdict.phase is Phase.CREATED:
        return None
    completion = verdict.completion or previous.completion_time
    if verdict.phase in (Phase.FINISHED, Phase.FAILED) and completion is None:
        return stamp
    return completion


def _node_attempts(pods: int, spec: FinetuneRunSpec) -> int:
    """Pods counted as attempts: an attempt of a multi-node run is one pod per node."""
    nodes = max(spec.resources.nodes, 1)
    return -(-pods // nodes)


def _attempts(observed: Observed, spec: FinetuneRunSpec, previous: FinetuneRunStatus) -> int:
    job_status = (observed.job or {}).get('status') or {}
    counted = sum(int(job_status.get(key) or 0) for key in ('failed', 'succeeded', 'active'))
    return max(
        _node_attempts(len(observed.pods), spec),
        _node_attempts(counted, spec),
        previous.attempts if observed.job is None else 0,
    )


def derive_status(
    *,
    run: str,
    spec: FinetuneRunSpec,
    previous: FinetuneRunStatus,
    observed: Observed,
    output_uri: str,
    queue: str | None,
    unschedulable_timeout: float,
    now: datetime,
    generation: int | None = None,
) -> FinetuneRunStatus:
    """The whole status of a run from what was observed (see the table in docs/OPERATOR.md)."""
    if previous.phase in (Phase.FINISHED.value, Phase.FAILED.value):
        # A terminal phase is final; its Job may be gone (deleted after an image-pull failure, TTL), and
        # its reports are no longer read, so nothing observed later may rewrite it.
        return previous
    seen = Situation(
        spec=spec,
        observed=observed,
        output_uri=output_uri,
        queue=queue,
        unschedulable_timeout=unschedulable_timeout,
        now=now,
        started_at=previous.start_time or _started_at(observed.pods),
    )
    verdict = derive_phase(seen)
    stamp = rfc3339(now)
    created = observed.job is not None or previous.job_name is not None
    conditions = Conditions(previous.conditions, stamp)
    set_created_condition(conditions, created)
    set_started_condition(conditions, seen.started_at)
    set_suspended_condition(conditions, verdict)
    set_succeeded_condition(conditions, verdict)
    set_failed_condition(conditions, verdict)
    return FinetuneRunStatus(
        phase=verdict.phase,
        details=verdict.details,
        reason=verdict.reason,
        conditions=conditions.items,
        start_time=seen.started_at,
        completion_time=_completion_time(verdict, previous, stamp),
        attempts=_attempts(observed, spec, previous),
        progress=observed.progress if observed.progress is not None else previous.progress,
        metrics=_run_metrics(observed.metrics) or previous.metrics,
        artifact_uri=reasons.artifact_uri(output_uri) if verdict.phase is Phase.FINISHED else None,
        output_uri=output_uri,
        job_name=job_name(run) if created else None,
        observed_generation=generation if generation is not None else previous.observed_generation,
    )


def invalid_spec_status(error: Exception | str, now: datetime, previous: FinetuneRunStatus) -> FinetuneRunStatus:
    """FAILED with the offending field named: a spec the contract refuses is never retried.

    ``error`` is the contract's ValidationError, or the operator's own ``Invalid spec: ...`` text.
    """
    details = error if isinstance(error, str) else describe_validation_error(error)
    stamp = rfc3339(now)
    verdict = Verdict(Phase.FAILED, Reason.INVALID_SPEC.value, details)
    conditions = Conditions(previous.conditions, stamp)
    set_failed_condition(conditions, verdict)
    return FinetuneRunStatus(
        phase=Phase.FAILED,
        reason=verdict.reason,
        details=details,
        conditions=conditions.items,
        completion_time=previous.completion_time or stamp,
    )


def describe_validation_error(error: Exception) -> str:
    """``spec.<field>: <problem>`` for each problem pydantic found, joined by '; '."""
    from finetuner.api.v1alpha1 import format_validation_error

    if not isinstance(error, ValidationError):
        return f'invalid spec: {error}'
    # The contract's own wording: every field by its wire path (``spec.resources.gpus``), an unknown
    # field with the way to the known ones, a rule about several fields reported on ``spec``.
    return 'Invalid spec: ' + format_validation_error(error, 'spec')


# --- the status as the API server holds it -----------------------------------------------------------


def parse_status(body: dict[str, Any]) -> FinetuneRunStatus:
    """A run's status as last written (fields this version does not know are left out)."""
    raw = body.get('status') or {}
    known = {f.alias or n for n, f in FinetuneRunStatus.model_fields.items()}
    try:
        return FinetuneRunStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError:
        return FinetuneRunStatus()


def cancelled(body: dict[str, Any]) -> bool:
    """Whether the run carries the cancel annotation (``run.cancel()``)."""
    return (body['metadata'].get('annotations') or {}).get(CANCEL_ANNOTATION) == 'true'


def status_patch(status: BaseModel) -> dict[str, Any]:
    """The status as a merge patch: every declared field present, None clearing stale values."""
    payload = status.model_dump(by_alias=True, mode='json', exclude_none=True)
    for name, field in type(status).model_fields.items():
        payload.setdefault(field.alias or name, None)
    return payload


def comparable(status: dict[str, Any] | None) -> dict[str, Any]:
    """A status as the API server keeps it (empty fields dropped), for comparing two of them."""
    return {k: v for k, v in (status or {}).items() if v is not None}


def same_status(before: BaseModel | dict[str, Any] | None, after: BaseModel) -> bool:
    """Whether writing ``after`` over ``before`` would change nothing."""
    old = before.model_dump(by_alias=True, mode='json') if isinstance(before, BaseModel) else before
    return comparable(old) == comparable(after.model_dump(by_alias=True, mode='json'))
