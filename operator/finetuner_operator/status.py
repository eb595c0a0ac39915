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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetuner.api import reasons
from finetuner.api.reasons import ConditionReason, ConditionType, Reason
from finetuner.api.v1alpha1 import (
    EXIT_CONFIG_ERROR,
    Condition,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
    Progress,
    RunMetrics,
)
from finetuner_operator.builders import (
    CANCEL_ANNOTATION,
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER,
    RESTART_ANNOTATION,
    job_name,
)

IMAGE_PULL_REASONS = ('ErrImagePull', 'ImagePullBackOff', 'InvalidImageName', 'ErrImageNeverPull')
# No retry of the kubelet can fix these: the run fails at once.
FINAL_IMAGE_REASONS = ('InvalidImageName', 'ErrImageNeverPull')
CONTAINER_CONFIG_REASONS = ('CreateContainerConfigError',)
TERMINATION_MESSAGE_LIMIT = 1000
# Seconds a failed multi-node Job may wait for its failed pod to be seen (the pod's watch event can come
# after the Job's) before the restart is decided without the pod's cause.
FAILED_POD_GRACE = 5.0


@dataclass(frozen=True)
class Timeouts:
    """How long a run may wait in each situation that can resolve itself before it fails (seconds)."""

    unschedulable: float = 600.0  # FINETUNER_UNSCHEDULABLE_TIMEOUT
    scale_up: float = 1800.0  # FINETUNER_SCALE_UP_TIMEOUT: unschedulable, and the autoscaler adds a node
    image_pull: float = 600.0  # FINETUNER_IMAGE_PULL_TIMEOUT
    pod_start: float = 600.0  # FINETUNER_POD_START_TIMEOUT: FailedCreate, CreateContainerConfigError

    @classmethod
    def of(cls, config: Any) -> Timeouts:
        """From an :class:`~finetuner_operator.config.OperatorConfig`."""
        return cls(
            config.unschedulable_timeout, config.scale_up_timeout, config.image_pull_timeout, config.pod_start_timeout
        )


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
    # Read only for a run that is stuck (see diagnostics.py): the Job controller's latest FailedCreate Event
    # message and when it first said so; the cluster autoscaler's TriggeredScaleUp message for an
    # unschedulable pod; the Kueue Workload of a queued Job ({}: looked, Kueue made none).
    failed_create: str | None = None
    failed_create_since: str | None = None
    scale_up: str | None = None
    workload: dict[str, Any] | None = None


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


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return (_container_status(pod).get('state') or {}).get('terminated') or {}


def _failure_cause(failed: list[dict[str, Any]], nodes: int) -> str | None:
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
        terminated = _terminated(pod)
        killed = 0 if (terminated.get('exitCode') or 0) > 128 else 1  # on a tie, the killed one went first
        return terminated.get('finishedAt') or '~', killed, _rank(pod) or 0

    first = min(latest.values(), key=order)
    cause = _describe_termination(first) or ('evicted' if _disrupted(first) else 'unknown cause')
    return f'node rank {_rank(first)} of {nodes} (pod {first["metadata"].get("name")}) failed: {cause}'


def _disrupted(pod: dict[str, Any]) -> bool:
    """Whether Kubernetes marked the pod's end as a disruption (preemption, eviction, node drain)."""
    return any(
        c.get('type') == 'DisruptionTarget' and c.get('status') == 'True'
        for c in (pod.get('status') or {}).get('conditions') or []
    )


def _exited_config_error(pods: list[dict[str, Any]]) -> bool:
    return any(_terminated(pod).get('exitCode') == EXIT_CONFIG_ERROR for pod in pods)


def _failed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        (p for p in pods if (p.get('status') or {}).get('phase') == 'Failed'),
        key=_pod_time,
    )


def _running_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if (p.get('status') or {}).get('phase') == 'Running']


@dataclass(frozen=True)
class Waiting:
    """A trainer container waiting for a reason of the kubelet's: which, its message, since when."""

    reason: str
    message: str
    image: str
    since: datetime | None


def _waiting(pods: list[dict[str, Any]], reasons_: tuple[str, ...]) -> Waiting | None:
    for pod in pods:
        waiting = (_container_status(pod).get('state') or {}).get('waiting') or {}
        if waiting.get('reason') in reasons_:
            image = pod['spec']['containers'][0].get('image', '?')
            since = parse_time(_scheduled_at(pod) or _pod_time(pod))
            return Waiting(waiting['reason'], waiting.get('message') or waiting['reason'], image, since)
    return None


def _scheduled_at(pod: dict[str, Any]) -> str | None:
    for cond in (pod.get('status') or {}).get('conditions') or []:
        if cond.get('type') == 'PodScheduled' and cond.get('status') == 'True':
            return cond.get('lastTransitionTime')
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
    restarts: int | None = None  # a multi-node run's restarts as a whole, when this verdict counts them
    failed_attempts: int | None = None  # of those, the failures counted against spec.backoffLimit


SUBMITTED = Verdict(Phase.CREATED, Reason.SUBMITTED.value, reasons.SUBMITTED)


@dataclass(frozen=True)
class Situation:
    """Everything a phase rule may look at: the run's spec and what this pass observed."""

    spec: FinetuneRunSpec
    observed: Observed
    output_uri: str
    queue: str | None
    timeouts: Timeouts
    now: datetime
    started_at: str | None  # when a trainer pod first ran (kept from the previous status)
    previous: FinetuneRunStatus = dataclasses.field(default_factory=FinetuneRunStatus)
    active_deadline: int | None = None  # the run's activeDeadlineSeconds (its own or the operator's default)

    def waited(self, since: datetime | None) -> float:
        return (self.now - since).total_seconds() if since is not None else 0.0

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
    """No Job (yet): suspended, waiting for a slot, between two Jobs of a restart, or just submitted."""
    if seen.observed.job is not None:
        return None
    if seen.spec.suspend:
        return Verdict(Phase.CREATED, Reason.SUSPENDED.value, reasons.SUSPENDED, suspended=True)
    if seen.previous.reason == Reason.RESTARTING.value and seen.previous.phase == Phase.STARTED.value:
        return Verdict(Phase.STARTED, Reason.RESTARTING.value, seen.previous.details or reasons.RESTARTING)
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


def _configuration_error(seen: Situation, failed: dict[str, Any], failed_pods: list[dict[str, Any]]) -> bool:
    """Whether a Job failed by its pod failure policy failed on the trainer's configuration exit code (a
    single-node Job has no other FailJob rule; a multi-node Job also fails on a disruption)."""
    if seen.spec.resources.nodes <= 1 or _exited_config_error(failed_pods):
        return True
    failure = seen.observed.failure or {}
    return (
        failure.get('exitCode') == EXIT_CONFIG_ERROR
        or f'exit code {EXIT_CONFIG_ERROR} ' in (failed.get('message') or '') + ' '
    )


def failed_job_phase(seen: Situation) -> Verdict | None:
    """A Failed Job: a configuration error, retries used up, the deadline, a multi-node run to restart as a
    whole, or the Job's own reason."""
    if 'Failed' not in seen.job_true:
        return None
    failed = seen.job_true['Failed']
    job_reason = failed.get('reason') or 'Failed'
    spec = seen.spec
    failed_pods = _failed_pods(seen.observed.pods)
    last = _failure_cause(failed_pods, spec.resources.nodes)
    failure = seen.observed.failure or {}
    trainer_says = failure.get('message') or failure.get('reason')
    ended = seen.job_ended_at('Failed')
    if job_reason == 'PodFailurePolicy' and _configuration_error(seen, failed, failed_pods):
        # The trainer exited with its configuration-error code: its message is the reason.
        details = reasons.configuration_error(last or trainer_says or failed.get('message'))
        return Verdict(Phase.FAILED, Reason.CONFIGURATION_ERROR.value, details, completion=ended)
    if job_reason == 'DeadlineExceeded':
        return deadline_verdict(seen, ended)
    if spec.resources.nodes > 1 and job_reason in ('BackoffLimitExceeded', 'PodFailurePolicy'):
        if not failed_pods and seen.waited(parse_time(failed.get('lastTransitionTime'))) < FAILED_POD_GRACE:
            return hold_verdict(seen)  # the failed pod's own event follows the Job's: decide with its cause
        disruption = job_reason == 'PodFailurePolicy' or (bool(failed_pods) and all(map(_disrupted, failed_pods)))
        return gang_restart_verdict(seen, last or trainer_says or 'see run.logs()', disruption, ended)
    if job_reason == 'BackoffLimitExceeded':
        attempts = len(failed_pods) or spec.backoff_limit + 1
        cause = last or trainer_says or 'see run.logs()'
        details = f'The trainer failed {attempts} times (backoffLimit {spec.backoff_limit}); last attempt: {cause}'
        return Verdict(Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED.value, details, completion=ended)
    details = failed.get('message') or last or 'the trainer Job failed'
    return Verdict(Phase.FAILED, job_reason, details, completion=ended)


def hold_verdict(seen: Situation) -> Verdict:
    """The previous verdict, unchanged (a decision waits for what the next event brings)."""
    previous = seen.previous
    if previous.phase is None or previous.reason is None:
        return SUBMITTED
    return Verdict(Phase(previous.phase), previous.reason, previous.details or '')


def deadline_verdict(seen: Situation, ended: str | None = None) -> Verdict:
    deadline = seen.active_deadline or seen.spec.active_deadline_seconds
    details = (
        f'The run exceeded activeDeadlineSeconds={deadline}; raise spec.activeDeadlineSeconds or train fewer epochs'
    )
    return Verdict(Phase.FAILED, Reason.DEADLINE_EXCEEDED.value, details, completion=ended)


def job_restart(job: dict[str, Any] | None) -> int:
    """Which restart of its run a Job is (its annotation; 0 for the first Job)."""
    value = ((job or {}).get('metadata', {}).get('annotations') or {}).get(RESTART_ANNOTATION, '0')
    return int(value) if str(value).isdigit() else 0


def gang_restart_verdict(seen: Situation, cause: str, disruption: bool, ended: str | None) -> Verdict:
    """A multi-node run whose Job failed: restart all its pods from the last checkpoint, unless the failures
    used up spec.backoffLimit (an eviction does not count) or its deadline has passed.

    The failure of a Job is counted once: the status's ``restarts`` moves past the Job's restart number the
    first time it is seen, and a later pass over the same (still failed, or being deleted) Job keeps it."""
    spec, previous = seen.spec, seen.previous
    restarts, failed_attempts = previous.restarts or 0, previous.failed_attempts or 0
    if restarts <= job_restart(seen.observed.job):  # not counted yet
        restarts = job_restart(seen.observed.job) + 1
        failed_attempts += 0 if disruption else 1
    nodes = spec.resources.nodes
    if failed_attempts > spec.backoff_limit:
        details = (
            f'The trainer failed {failed_attempts} times on its {nodes} nodes (backoffLimit {spec.backoff_limit}); '
            f'last attempt: {cause}'
        )
        return Verdict(
            Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED.value, details, None, ended, restarts, failed_attempts
        )
    if deadline_left(seen) is not None and (deadline_left(seen) or 0) <= 0:
        return replace_counts(deadline_verdict(seen, ended), restarts, failed_attempts)
    what = f'evicted ({cause})' if disruption else cause
    details = (
        f'{what}; restarting all {nodes} nodes from the last checkpoint (restart {restarts}; '
        f'{failed_attempts} of backoffLimit {spec.backoff_limit} failures used)'
    )
    return Verdict(Phase.STARTED, Reason.RESTARTING.value, details, restarts=restarts, failed_attempts=failed_attempts)


def replace_counts(verdict: Verdict, restarts: int, failed_attempts: int) -> Verdict:
    return Verdict(
        verdict.phase, verdict.reason, verdict.details, verdict.suspended, verdict.completion, restarts, failed_attempts
    )


def deadline_left(seen: Situation) -> float | None:
    """Seconds left of the run's activeDeadlineSeconds, counted from when a trainer pod first ran (None: no
    deadline, or not started)."""
    started = parse_time(seen.started_at)
    if not seen.active_deadline or started is None:
        return None
    return seen.active_deadline - (seen.now - started).total_seconds()


def _queue_details(queue: str, workload: dict[str, Any] | None) -> str:
    """Where a queued run waits, with Kueue's own words once its Workload says why it is not admitted."""
    if workload is None:
        return f'Waiting in queue {queue}'
    if not workload:
        return (
            f'Waiting in queue {queue}: Kueue has made no Workload for the trainer Job; check that Kueue is '
            f'installed and manages batch/v1 Jobs, and that LocalQueue {queue} exists in this namespace'
        )
    conditions = {c.get('type'): c for c in (workload.get('status') or {}).get('conditions') or []}
    for kind in ('QuotaReserved', 'Admitted'):
        condition = conditions.get(kind) or {}
        if condition.get('status') == 'False' and condition.get('message'):
            return f'Waiting in queue {queue}: {condition["message"]}'
    return f'Waiting in queue {queue}'


def suspended_job_phase(seen: Situation) -> Verdict | None:
    """A suspended Job: suspended by the user, queued in Kueue, or held for a slot."""
    if not ((seen.observed.job or {}).get('spec') or {}).get('suspend'):
        return None
    if seen.spec.suspend:
        return Verdict(Phase.CREATED, Reason.SUSPENDED.value, reasons.SUSPENDED, suspended=True)
    if seen.queue:
        details = _queue_details(seen.queue, seen.observed.workload)
        return Verdict(Phase.CREATED, Reason.QUEUED.value, details, suspended=True)
    if seen.observed.waiting_for_slot:
        # Resumed by the user; the operator holds the Job until a slot is free.
        return Verdict(Phase.CREATED, Reason.WAITING.value, reasons.waiting(seen.observed.waiting_for_slot))
    return Verdict(Phase.CREATED, Reason.SUSPENDED.value, reasons.JOB_SUSPENDED, suspended=True)


def _minutes(seconds: float) -> str:
    return f'{seconds / 60:.0f} minutes' if seconds >= 90 else f'{seconds:.0f} s'


def failed_create_phase(seen: Situation) -> Verdict | None:
    """The Job controller cannot create the trainer pod (FailedCreate: a quota, a missing ServiceAccount):
    CREATED with its message while that may still be fixed, FAILED after the pod start timeout."""
    message = seen.observed.failed_create
    if message is None or seen.observed.pods:
        return None
    since = parse_time(seen.observed.failed_create_since) or parse_time(
        ((seen.observed.job or {}).get('metadata') or {}).get('creationTimestamp')
    )
    waited = seen.waited(since)
    fix = "check the namespace's ResourceQuota and LimitRange, and that the ServiceAccount the pods run as exists"
    if waited <= seen.timeouts.pod_start:
        details = f'The Job controller cannot create the trainer pod: {message}; {fix}'
        return Verdict(Phase.CREATED, Reason.FAILED_CREATE.value, details)
    details = f'The Job controller could not create the trainer pod for {_minutes(waited)}: {message}; {fix}'
    return Verdict(Phase.FAILED, Reason.FAILED_CREATE.value, details)


def image_pull_phase(seen: Situation) -> Verdict | None:
    """The image cannot be pulled: CREATED while the kubelet retries (a registry hiccup, a large image), FAILED
    after the image pull timeout, or at once for a name no retry can fix."""
    pull = _waiting(seen.observed.pods, IMAGE_PULL_REASONS)
    if pull is None:
        return None
    fix = 'fix spec.image or the operator setting FINETUNER_TRAINER_IMAGE, or add an image pull secret'
    waited = seen.waited(pull.since)
    if pull.reason not in FINAL_IMAGE_REASONS and waited <= seen.timeouts.image_pull:
        left = seen.timeouts.image_pull - waited
        details = (
            f'Pulling the trainer image {pull.image} failed so far ({pull.message}); the kubelet retries for up to '
            f'{_minutes(left)} more, then the run fails: {fix}'
        )
        return Verdict(Phase.CREATED, Reason.IMAGE_PULL_ERROR.value, details)
    details = f'Cannot pull the trainer image {pull.image}: {pull.message}; {fix}'
    return Verdict(Phase.FAILED, Reason.IMAGE_PULL_ERROR.value, details)


def container_config_phase(seen: Situation) -> Verdict | None:
    """CreateContainerConfigError (a Secret or ConfigMap, or a key of one, that the pod refers to is missing):
    CREATED while it may still be created, FAILED after the pod start timeout."""
    found = _waiting(seen.observed.pods, CONTAINER_CONFIG_REASONS)
    if found is None:
        return None
    fix = (
        "create what it names in the run's namespace, or fix spec.env / spec.volumes (or the operator settings "
        'that refer to it)'
    )
    waited = seen.waited(found.since)
    if waited <= seen.timeouts.pod_start:
        details = f'The trainer container cannot be configured: {found.message}; {fix}'
        return Verdict(Phase.CREATED, Reason.CONTAINER_CONFIG_ERROR.value, details)
    details = f'The trainer container could not be configured for {_minutes(waited)}: {found.message}; {fix}'
    return Verdict(Phase.FAILED, Reason.CONTAINER_CONFIG_ERROR.value, details)


def running_phase(seen: Situation) -> Verdict | None:
    if not _running_pods(seen.observed.pods):
        return None
    return Verdict(Phase.STARTED, Reason.RUNNING.value, reasons.running(seen.observed.progress, seen.spec.task))


def unschedulable_phase(seen: Situation) -> Verdict | None:
    """A pod no node fits: CREATED while it waits, FAILED after the unschedulable timeout (the longer scale-up
    timeout once the cluster autoscaler has said it adds a node for it)."""
    pending = _unschedulable(seen.observed.pods)
    if pending is None:
        return None
    since, message = pending
    waited = (seen.now - since).total_seconds()
    scale_up = seen.observed.scale_up
    timeout = seen.timeouts.scale_up if scale_up else seen.timeouts.unschedulable
    if waited <= timeout:
        if scale_up:
            details = f'Waiting for the cluster autoscaler to add a node ({scale_up}); the scheduler says: {message}'
        else:
            details = f'Waiting for a node that fits: {message}'
        return Verdict(Phase.CREATED, Reason.UNSCHEDULABLE.value, details)
    added = f'; the cluster autoscaler was adding a node ({scale_up})' if scale_up else ''
    details = (
        f'No node could run the trainer for {waited / 60:.0f} minutes ({message}{added}); lower '
        'spec.resources, fix spec.nodeSelector/tolerations, or add capacity'
    )
    return Verdict(Phase.FAILED, Reason.UNSCHEDULABLE.value, details)


def retrying_phase(seen: Situation) -> Verdict | None:
    """An attempt failed and the Job is still active: it retries (an infrastructure failure)."""
    failed_pods = _failed_pods(seen.observed.pods)
    if not failed_pods or not seen.job_status.get('active'):
        return None
    last = _failure_cause(failed_pods, seen.spec.resources.nodes) or 'unknown cause'
    attempt = _node_attempts(len(failed_pods), seen.spec)
    return Verdict(Phase.STARTED, Reason.RETRYING.value, f'Attempt {attempt} failed ({last}); retrying')


def started_earlier_phase(seen: Situation) -> Verdict | None:
    """A trainer pod ran before: still STARTED between attempts while the Job has pods, and between the
    Jobs of a multi-node run's restart until the new Job's pods run."""
    if not seen.started_at:
        return None
    if seen.observed.pods:
        return Verdict(Phase.STARTED, Reason.RUNNING.value, reasons.running(seen.observed.progress, seen.spec.task))
    if job_restart(seen.observed.job) > 0 and seen.previous.reason == Reason.RESTARTING.value:
        return Verdict(Phase.STARTED, Reason.RESTARTING.value, seen.previous.details or reasons.RESTARTING)
    return None


# In order: the first rule that recognises the situation decides (a cancel beats everything; a Job's
# end beats its pods; a pod that cannot start beats a running sibling; a running pod beats an
# unschedulable sibling).
PHASE_RULES: tuple[Callable[[Situation], Verdict | None], ...] = (
    cancelled_phase,
    no_job_phase,
    complete_phase,
    failed_job_phase,
    suspended_job_phase,
    failed_create_phase,
    image_pull_phase,
    container_config_phase,
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


def _attempts(observed: Observed, previous: FinetuneRunStatus, spec: FinetuneRunSpec, restarts: int | None) -> int:
    """Attempts so far: pods tried (one pod per attempt), or for a multi-node run its Jobs (each attempt is
    a Job with a pod per node)."""
    job_status = (observed.job or {}).get('status') or {}
    counted = sum(int(job_status.get(key) or 0) for key in ('failed', 'succeeded', 'active'))
    if spec.resources.nodes > 1:
        # A Job made by an operator without gang restarts may retry its pods itself: a pod per node each time.
        # The Job on view is attempt job_restart + 1; between a restart's Jobs, the restarts so far.
        jobs = job_restart(observed.job) + 1 if observed.job is not None else (restarts or 0)
        return max(jobs, _node_attempts(len(observed.pods), spec), _node_attempts(counted, spec))
    return max(len(observed.pods), counted, previous.attempts if observed.job is None else 0)


def _node_attempts(pods: int, spec: FinetuneRunSpec) -> int:
    """Pods counted as attempts: an attempt of a multi-node run is one pod per node."""
    return -(-pods // max(spec.resources.nodes, 1))


def derive_status(
    *,
    run: str,
    spec: FinetuneRunSpec,
    previous: FinetuneRunStatus,
    observed: Observed,
    output_uri: str,
    queue: str | None,
    now: datetime,
    unschedulable_timeout: float = Timeouts.unschedulable,
    timeouts: Timeouts | None = None,
    active_deadline: int | None = None,
    generation: int | None = None,
) -> FinetuneRunStatus:
    """The whole status of a run from what was observed (see the table in docs/OPERATOR.md).

    ``timeouts``: how long each self-resolving situation may last (default: the defaults, with
    ``unschedulable_timeout``); ``active_deadline``: the run's activeDeadlineSeconds, its own or the
    operator's default (a multi-node run is not restarted past it)."""
    if previous.phase in (Phase.FINISHED.value, Phase.FAILED.value):
        # A terminal phase is final; its Job may be gone (deleted after an image-pull failure, TTL), and
        # its reports are no longer read, so nothing observed later may rewrite it.
        return previous
    seen = Situation(
        spec=spec,
        observed=observed,
        output_uri=output_uri,
        queue=queue,
        timeouts=timeouts or Timeouts(unschedulable=unschedulable_timeout),
        now=now,
        started_at=previous.start_time or _started_at(observed.pods),
        previous=previous,
        active_deadline=active_deadline or spec.active_deadline_seconds,
    )
    verdict = derive_phase(seen)
    restarts = verdict.restarts if verdict.restarts is not None else previous.restarts
    failed_attempts = verdict.failed_attempts if verdict.failed_attempts is not None else previous.failed_attempts
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
        attempts=_attempts(observed, previous, spec, restarts),
        progress=observed.progress if observed.progress is not None else previous.progress,
        metrics=_run_metrics(observed.metrics) or previous.metrics,
        artifact_uri=reasons.artifact_uri(output_uri) if verdict.phase is Phase.FINISHED else None,
        output_uri=output_uri,
        job_name=job_name(run) if created else None,
        observed_generation=generation if generation is not None else previous.observed_generation,
        restarts=restarts,
        failed_attempts=failed_attempts,
    )


def invalid_spec_status(error: Exception | str, now: datetime, previous: FinetuneRunStatus) -> FinetuneRunStatus:
    """FAILED with the offending field named: a spec the contract refuses is never retried.

    ``error`` is the contract's ValidationError, or the operator's own ``Invalid spec: ...`` text.
    """
    details = error if isinstance(error, str) else describe_validation_error(error)
    return refused_status(Reason.INVALID_SPEC, details, now, previous)


def refused_status(reason: Reason, details: str, now: datetime, previous: FinetuneRunStatus) -> FinetuneRunStatus:
    """FAILED before any Job: an invalid spec, what the cluster's policy does not allow, an unprepared namespace."""
    stamp = rfc3339(now)
    verdict = Verdict(Phase.FAILED, reason.value, details)
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
