"""The one vocabulary of a run's status: its reasons (``status.reason``, condition reasons) and details.

Both backends speak it: the operator derives a FinetuneRun's status from the Job, its pods and the
trainer's reports; the local backend from the trainer process it supervises. The same event (a
cancel, a configuration error, a trainer that exits 0 without an artifact, a finished run) gives the
same reason and the same details on both, so code and people reading a status need not know where
the run trained. A test holds them to it (``tests/contract/test_vocabulary.py``).
"""

from __future__ import annotations

from enum import Enum

from finetuner.api.layout import ARTIFACT, ARTIFACT_MANIFEST
from finetuner.api.mining import SYNTHESIS_DATA_FILE
from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, Progress


class Reason(str, Enum):
    """``status.reason``: why the run is in its phase (CamelCase, as Kubernetes reasons are)."""

    # CREATED
    SUBMITTED = 'Submitted'  # accepted; waits for its trainer to start
    WAITING = 'Waiting'  # no free slot: FINETUNER_MAX_CONCURRENT_RUNS (operator), a GPU or CPU slot (local queue)
    QUEUED = 'Queued'  # its Job waits in a Kueue queue (operator)
    SUSPENDED = 'Suspended'  # spec.suspend is true, or its Job is suspended (operator)
    UNSCHEDULABLE = 'Unschedulable'  # no node fits its pod (CREATED while waiting, FAILED after the timeout)
    # The next three: CREATED while it may still resolve itself, FAILED after the operator's timeout (operator)
    FAILED_CREATE = 'FailedCreate'  # the Job controller cannot create the pod (a quota, a missing ServiceAccount)
    IMAGE_PULL_ERROR = 'ImagePullError'  # the trainer image cannot be pulled (FAILED at once for a bad name)
    CONTAINER_CONFIG_ERROR = 'ContainerConfigError'  # a Secret/ConfigMap (key) the pod refers to is missing
    # STARTED
    RUNNING = 'Running'  # the trainer runs
    RETRYING = 'Retrying'  # an attempt failed; the Job retries it (operator)
    VERIFYING_ARTIFACT = 'VerifyingArtifact'  # the trainer ended; the store could not be read yet (operator)
    RESTARTING = 'Restarting'  # a multi-node run restarts all its pods from the last checkpoint (operator)
    # FINISHED
    SUCCEEDED = 'Succeeded'  # the trainer exited 0 and published a complete artifact
    # FAILED
    CANCELLED = 'Cancelled'  # run.cancel() / the cancel annotation
    CONFIGURATION_ERROR = 'ConfigurationError'  # the trainer exited with EXIT_CONFIG_ERROR: a user mistake
    ARTIFACT_MISSING = 'ArtifactMissing'  # the trainer exited 0 without artifact/manifest.json
    INVALID_SPEC = 'InvalidSpec'  # the contract refused the spec (operator; the SDK refuses it before submitting)
    POLICY_DENIED = 'PolicyDenied'  # the administrator's allow-lists refuse its image, tolerations, nodes (operator)
    NAMESPACE_NOT_PREPARED = 'NamespaceNotPrepared'  # the ServiceAccount its pods run as is missing (operator)
    BACKOFF_LIMIT_EXCEEDED = 'BackoffLimitExceeded'  # infrastructure failures used up spec.backoffLimit (operator)
    DEADLINE_EXCEEDED = 'DeadlineExceeded'  # spec.activeDeadlineSeconds passed (operator)
    TRAINER_FAILED = 'TrainerFailed'  # the trainer failed; nothing retries it (local: one attempt)
    WEIGHTS_UNAVAILABLE = 'WeightsUnavailable'  # pretrained weights neither cached nor downloadable (local)
    SUPERVISOR_LOST = 'SupervisorLost'  # the local process watching the trainer vanished (local)
    START_FAILED = 'StartFailed'  # the trainer process could not be started (local)


class ConditionReason(str, Enum):
    """Reasons of the standard conditions that are not a phase's reason."""

    JOB_CREATED = 'JobCreated'  # Created: True
    NOT_STARTED = 'NotStarted'  # Started: False
    POD_RUNNING = 'PodRunning'  # Started: True
    NOT_SUSPENDED = 'NotSuspended'  # Suspended: False


class ConditionType(str, Enum):
    CREATED = 'Created'
    STARTED = 'Started'
    SUSPENDED = 'Suspended'
    SUCCEEDED = 'Succeeded'
    FAILED = 'Failed'


# --- details: what a person reads, one sentence each ----------------------------------------------

SUBMITTED = 'Run submitted and awaits execution'  # the seed's words for a fresh run
CANCELLED = 'Run cancelled by user'
SUSPENDED = 'Suspended: set spec.suspend to false to resume'
JOB_SUSPENDED = 'The trainer Job is suspended'
CONFIGURATION_ERROR = 'configuration error'  # when the trainer left no message of its own
RUNNING = 'Training: the trainer is running'
RESTARTING = 'Restarting all nodes from the last checkpoint'


SYNTHESIZING = 'Synthesis: the trainer is running'


def running(progress: Progress | None, task: str = 'finetune') -> str:
    """STARTED: the trainer's latest progress report in words (a synthesis run counts its queries)."""
    if task == 'synthesis':
        if progress is None or not progress.total_steps:
            return SYNTHESIZING
        text = f'Synthesis: {progress.step}/{progress.total_steps} queries, {progress.percent:.0f}%'
    elif progress is None or not progress.epochs:
        return RUNNING
    else:
        text = f'Training: epoch {progress.epoch}/{progress.epochs}, {progress.percent:.0f}%'
    if progress.eta_seconds is not None:
        text += f', about {progress.eta_seconds:.0f}s left'
    return text


def succeeded(output_uri: str, task: str = 'finetune') -> str:
    """FINISHED: where the fine-tuned model is (a synthesis run: where its training data is)."""
    if task == 'synthesis':
        return f'Training data at {artifact_uri(output_uri)}/{SYNTHESIS_DATA_FILE} (run.train_data)'
    return f'Fine-tuned model at {artifact_uri(output_uri)}'


def artifact_uri(output_uri: str) -> str:
    return f'{output_uri.rstrip("/")}/{ARTIFACT}'


def artifact_missing(output_uri: str) -> str:
    """FAILED: the trainer exited 0, yet no complete artifact was published."""
    return (
        f'The trainer exited successfully but {output_uri.rstrip("/")}/{ARTIFACT_MANIFEST} does not exist, so no '
        'complete model was published; see run.logs() and run the fit again'
    )


def configuration_error(trainer_message: str | None) -> str:
    """FAILED with a configuration error: the trainer's own one-line message."""
    return (trainer_message or '').strip() or CONFIGURATION_ERROR


def trainer_exited(exit_code: int | None, last_words: str) -> str:
    """FAILED: a trainer that left no message of its own, by its exit code and last log line."""
    return f'trainer exited with code {exit_code}: {last_words}'


def waiting(limit: int) -> str:
    """CREATED/Waiting under FINETUNER_MAX_CONCURRENT_RUNS. The same text however many runs train or
    wait, so that a waiting run's status is written once, not on every change."""
    return (
        f'Waiting for a free slot: {limit} of {limit} runs allowed at once (FINETUNER_MAX_CONCURRENT_RUNS) are '
        'training; this run starts when one of them ends, or raise the limit (Helm value operator.maxConcurrentRuns)'
    )


def waiting_in_line(ahead: int, pool: str) -> str:
    """CREATED/Waiting in the local queue: ``ahead`` runs waiting for the same resource go first (FIFO)."""
    return f'Waiting: {ahead} run{"" if ahead == 1 else "s"} ahead (queued for {pool})'


def waiting_for_gpu(gpus: int) -> str:
    """CREATED/Waiting, first in the local queue's GPU line: every GPU it gives out trains another run."""
    return (
        f"Waiting for a free GPU: the {gpus} GPU{'' if gpus == 1 else 's'} of this machine's queue "
        f'{"is" if gpus == 1 else "are"} training other runs; this run starts when one of them ends'
    )


def waiting_for_cpu(limit: int) -> str:
    """CREATED/Waiting, first in the local queue's CPU line: every CPU slot is taken."""
    return (
        f'Waiting for a free CPU slot: {limit} of {limit} trainings allowed at once on the CPU are running; this run '
        'starts when one of them ends, or raise the limit (finetuner.login(backend="local", cpu_runs=N) or '
        '`finetuner queue --cpu-runs N`)'
    )


def machine_restarted(attempts: int, backoff_limit: int) -> str:
    """FAILED: a local run the machine's restarts interrupted more often than spec.backoffLimit allows."""
    return (
        f'The machine restarted while this run trained, {attempts} times (backoffLimit {backoff_limit}); '
        'start a new run, or raise backoff_limit'
    )


def is_configuration_error(exit_code: int | None) -> bool:
    """Whether the trainer's exit code says the run's configuration or data is at fault (never retried)."""
    return exit_code == EXIT_CONFIG_ERROR
