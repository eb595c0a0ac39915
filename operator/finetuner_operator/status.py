"""Pure mapping of the observed world to a FinetuneRun's status.

``derive_status`` takes what the operator just saw — the trainer Job, its pods and the
trainer's reports in the object store — and returns the whole status. Nothing is remembered
between passes except what the previous status itself carries (transition times, a terminal
phase whose Job is gone), so a restarted operator rebuilds the same status.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from finetuner.api.v1alpha1 import Condition, FinetuneRunSpec, FinetuneRunStatus, Phase, Progress, RunMetrics
from finetuner_operator.builders import COMPLETION_INDEX_ANNOTATION, CONTAINER, job_name

IMAGE_PULL_REASONS = ('ErrImagePull', 'ImagePullBackOff', 'InvalidImageName', 'ErrImageNeverPull')
SUBMITTED = 'Run submitted and awaits execution'
WAITING = 'Waiting'
CANCELLED = 'cancelled'
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


def _details_started(progress: Progress | None) -> str:
    if progress is None or not progress.epochs:
        return 'Training: the trainer is running'
    text = f'Training: epoch {progress.epoch}/{progress.epochs}, {progress.percent:.0f}%'
    if progress.eta_seconds is not None:
        text += f', about {progress.eta_seconds:.0f}s left'
    return text


def _run_metrics(metrics: dict[str, Any] | None) -> RunMetrics | None:
    if not metrics:
        return None
    return RunMetrics(before=metrics.get('before') or {}, after=metrics.get('after') or {})


def _job_failure(
    job: dict[str, Any], failed: dict[str, Any], pods: list[dict[str, Any]], spec: FinetuneRunSpec, observed: Observed
) -> tuple[str, str]:
    """(reason, details) of a Job whose Failed condition is True."""
    job_reason = failed.get('reason') or 'Failed'
    failed_pods = _failed_pods(pods)
    last = _describe_failure(failed_pods, spec.resources.nodes)
    trainer_says = (observed.failure or {}).get('message') or (observed.failure or {}).get('reason')
    if job_reason == 'PodFailurePolicy':
        # The trainer exited with its configuration-error code: its message is the reason.
        message = last or trainer_says or failed.get('message') or 'configuration error'
        return 'ConfigurationError', message
    if job_reason == 'BackoffLimitExceeded':
        attempts = _attempts(len(failed_pods), spec) or spec.backoff_limit + 1
        cause = last or trainer_says or 'see run.logs()'
        return (
            'BackoffLimitExceeded',
            f'The trainer failed {attempts} times (backoffLimit {spec.backoff_limit}); last attempt: {cause}',
        )
    if job_reason == 'DeadlineExceeded':
        return (
            'DeadlineExceeded',
            f'The run exceeded activeDeadlineSeconds={spec.active_deadline_seconds}; '
            'raise spec.activeDeadlineSeconds or train fewer epochs',
        )
    return job_reason, failed.get('message') or last or 'the trainer Job failed'


def _conditions(
    previous: list[Condition], wanted: dict[str, tuple[bool, str, str | None]], now: str
) -> list[Condition]:
    """Standard conditions; a transition time moves only when a condition's status changes."""
    old = {c.type: c for c in previous}
    result = []
    for type_, (value, reason, message) in wanted.items():
        status = 'True' if value else 'False'
        before = old.get(type_)
        changed = before is None or before.status != status
        result.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now if changed else before.last_transition_time,
            )
        )
    return result


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
    stamp = rfc3339(now)
    job = observed.job
    pods = observed.pods
    job_true = _conditions_true(job)
    job_status = (job or {}).get('status') or {}

    if previous.phase in (Phase.FINISHED.value, Phase.FAILED.value):
        # A terminal phase is final; its Job may be gone (deleted after an image-pull failure, TTL), and
        # its reports are no longer read, so nothing observed later may rewrite it.
        return previous

    phase = Phase.CREATED
    reason = 'Submitted'
    details = SUBMITTED
    suspended = False
    started_at = previous.start_time or _started_at(pods)
    completion = previous.completion_time
    artifact_uri = None
    progress = observed.progress

    if observed.cancelled:
        phase, reason, details = Phase.FAILED, 'Cancelled', CANCELLED
    elif job is None:
        if spec.suspend:
            phase, reason, details, suspended = Phase.CREATED, 'Suspended', _suspended_details(), True
        elif observed.waiting_for_slot:
            reason, details = WAITING, waiting_details(observed.waiting_for_slot)
    elif 'Complete' in job_true and observed.store_error:
        # Never FINISHED on the Job's word alone: the artifact exists only once its manifest does.
        phase, reason = Phase.STARTED, 'VerifyingArtifact'
        details = f'Training finished; waiting for the object store to confirm the artifact ({observed.store_error})'
    elif 'Complete' in job_true and not observed.artifact:
        phase, reason = Phase.FAILED, 'ArtifactMissing'
        details = (
            f'The trainer exited successfully but {output_uri}/artifact/manifest.json does not exist, so no complete '
            'model was published; see run.logs() and run the fit again'
        )
        completion = job_status.get('completionTime') or job_true['Complete'].get('lastTransitionTime') or stamp
    elif 'Complete' in job_true:
        phase, reason = Phase.FINISHED, 'Succeeded'
        artifact_uri = f'{output_uri}/artifact'
        details = f'Fine-tuned model at {artifact_uri}'
        completion = job_status.get('completionTime') or job_true['Complete'].get('lastTransitionTime') or stamp
    elif 'Failed' in job_true:
        phase = Phase.FAILED
        reason, details = _job_failure(job, job_true['Failed'], pods, spec, observed)
        completion = job_true['Failed'].get('lastTransitionTime') or stamp
    elif job.get('spec', {}).get('suspend'):
        suspended = True
        if spec.suspend:
            reason, details = 'Suspended', _suspended_details()
        elif queue:
            reason, details = 'Queued', f'Waiting in queue {queue}'
        elif observed.waiting_for_slot:
            suspended = False  # resumed by the user; the operator holds the Job until a slot is free
            reason, details = WAITING, waiting_details(observed.waiting_for_slot)
        else:
            reason, details = 'Suspended', 'The trainer Job is suspended'
    elif (pull := _image_pull_error(pods)) is not None:
        image, message = pull
        phase, reason = Phase.FAILED, 'ImagePullError'
        details = (
            f'Cannot pull the trainer image {image}: {message}; fix spec.image or the operator setting '
            'FINETUNER_TRAINER_IMAGE, or add an image pull secret'
        )
    elif _running_pods(pods):
        phase, reason, details = Phase.STARTED, 'Running', _details_started(progress)
    elif (pending := _unschedulable(pods)) is not None:
        since, message = pending
        waited = (now - since).total_seconds()
        if waited > unschedulable_timeout:
            phase, reason = Phase.FAILED, 'Unschedulable'
            details = (
                f'No node could run the trainer for {waited / 60:.0f} minutes ({message}); lower '
                'spec.resources, fix spec.nodeSelector/tolerations, or add capacity'
            )
        else:
            reason, details = 'Unschedulable', f'Waiting for a node that fits: {message}'
    elif _failed_pods(pods) and job_status.get('active'):
        phase, reason = Phase.STARTED, 'Retrying'
        last = _describe_failure(_failed_pods(pods), spec.resources.nodes) or 'unknown cause'
        details = f'Attempt {_attempts(len(_failed_pods(pods)), spec)} failed ({last}); retrying'
    elif started_at and pods:
        phase, reason, details = Phase.STARTED, 'Running', _details_started(progress)

    if phase in (Phase.FINISHED, Phase.FAILED) and completion is None:
        completion = stamp
    if phase is Phase.CREATED:
        completion = None

    created = job is not None or previous.job_name is not None
    wanted: dict[str, tuple[bool, str, str | None]] = {
        'Created': (created, 'JobCreated' if created else 'Submitted', None),
        'Started': (started_at is not None, 'PodRunning' if started_at else 'NotStarted', None),
        'Suspended': (suspended, reason if suspended else 'NotSuspended', details if suspended else None),
    }
    if phase is Phase.FINISHED:
        wanted['Succeeded'] = (True, reason, details)
    if phase is Phase.FAILED:
        wanted['Failed'] = (True, reason, details)

    counted = sum(int(job_status.get(key) or 0) for key in ('failed', 'succeeded', 'active'))
    attempts = max(_attempts(len(pods), spec), _attempts(counted, spec), previous.attempts if job is None else 0)
    return FinetuneRunStatus(
        phase=phase,
        details=details,
        reason=reason,
        conditions=_conditions(previous.conditions, wanted, stamp),
        start_time=started_at,
        completion_time=completion,
        attempts=attempts,
        progress=progress if progress is not None else previous.progress,
        metrics=_run_metrics(observed.metrics) or previous.metrics,
        artifact_uri=artifact_uri,
        output_uri=output_uri,
        job_name=job_name(run) if created else None,
        observed_generation=generation if generation is not None else previous.observed_generation,
    )


def _attempts(pods: int, spec: FinetuneRunSpec) -> int:
    """Pods counted as attempts: an attempt of a multi-node run is one pod per node."""
    nodes = max(spec.resources.nodes, 1)
    return -(-pods // nodes)


def _suspended_details() -> str:
    return 'Suspended: set spec.suspend to false to resume'


def waiting_details(limit: int) -> str:
    """Why a run has no Job yet under FINETUNER_MAX_CONCURRENT_RUNS, and what ends the wait. The same text
    however many runs train or wait, so that a waiting run's status is written once, not on every change."""
    return (
        f'Waiting for a free slot: {limit} of {limit} runs allowed at once (FINETUNER_MAX_CONCURRENT_RUNS) are '
        'training; this run starts when one of them ends, or raise the limit (Helm value operator.maxConcurrentRuns)'
    )


def invalid_spec_status(error: Exception | str, now: datetime, previous: FinetuneRunStatus) -> FinetuneRunStatus:
    """FAILED with the offending field named: a spec the contract refuses is never retried.

    ``error`` is the contract's ValidationError, or the operator's own ``Invalid spec: ...`` text.
    """
    details = error if isinstance(error, str) else describe_validation_error(error)
    stamp = rfc3339(now)
    wanted = {'Failed': (True, 'InvalidSpec', details)}
    return FinetuneRunStatus(
        phase=Phase.FAILED,
        reason='InvalidSpec',
        details=details,
        conditions=_conditions(previous.conditions, wanted, stamp),
        completion_time=previous.completion_time or stamp,
    )


def describe_validation_error(error: Exception) -> str:
    """``spec.<field>: <problem>`` for each problem pydantic found, joined by '; '."""
    from pydantic import ValidationError

    from finetuner.api.v1alpha1 import format_validation_error

    if not isinstance(error, ValidationError):
        return f'invalid spec: {error}'
    # The contract's own wording: every field by its wire path (``spec.resources.gpus``), an unknown
    # field with the way to the known ones, a rule about several fields reported on ``spec``.
    return 'Invalid spec: ' + format_validation_error(error, 'spec')
