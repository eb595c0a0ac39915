"""The status mapping table: observed Job + pods (+ trainer reports) -> phase, reason, details."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from finetuner.api.v1alpha1 import FinetuneRunSpec, FinetuneRunStatus, Progress
from finetuner_operator.status import Observed, derive_status, invalid_spec_status

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
OUT = 's3://b/runs/default/r'


def stamp(minutes_ago: float = 0) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).strftime('%Y-%m-%dT%H:%M:%SZ')


def job(*conditions: tuple[str, str], suspend: bool = False, **status: Any) -> dict[str, Any]:
    return {
        'metadata': {'name': 'r-trainer'},
        'spec': {'suspend': suspend},
        'status': {
            **status,
            'conditions': [
                {
                    'type': t,
                    'status': 'True',
                    'reason': reason,
                    'message': f'{t} because {reason}',
                    'lastTransitionTime': stamp(),
                }
                for t, reason in conditions
            ],
        },
    }


def pod(phase: str, *, state: dict[str, Any] | None = None, conditions: list[dict] | None = None, age: float = 1):
    status: dict[str, Any] = {'phase': phase, 'conditions': conditions or []}
    if state is not None:
        status['containerStatuses'] = [{'name': 'trainer', 'state': state}]
    return {
        'metadata': {'name': f'r-trainer-{phase.lower()}', 'creationTimestamp': stamp(age)},
        'spec': {'containers': [{'name': 'trainer', 'image': 'trainer:1'}]},
        'status': status,
    }


RUNNING = {'running': {'startedAt': stamp(2)}}


def terminated(code: int, message: str = '', reason: str = 'Error') -> dict[str, Any]:
    return {'terminated': {'exitCode': code, 'reason': reason, 'message': message, 'startedAt': stamp(3)}}


def unschedulable(minutes: float) -> list[dict[str, Any]]:
    return [
        {
            'type': 'PodScheduled',
            'status': 'False',
            'reason': 'Unschedulable',
            'message': '0/3 nodes are available: 3 Insufficient nvidia.com/gpu.',
            'lastTransitionTime': stamp(minutes),
        }
    ]


def derive(
    observed: Observed, *, queue: str | None = None, previous: FinetuneRunStatus | None = None, **spec: Any
) -> FinetuneRunStatus:
    run_spec = FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 'd', 'backoffLimit': 2, **spec})
    return derive_status(
        run='r',
        spec=run_spec,
        previous=previous or FinetuneRunStatus(),
        observed=observed,
        output_uri=OUT,
        queue=queue,
        unschedulable_timeout=600,
        now=NOW,
    )


TABLE = [
    # (case, observed, extra, phase, reason, details contains)
    ('no job yet', Observed(), {}, 'CREATED', 'Submitted', 'Run submitted and awaits execution'),
    ('job, no pod', Observed(job=job()), {}, 'CREATED', 'Submitted', 'Run submitted and awaits execution'),
    ('queued', Observed(job=job(suspend=True)), {'queue': 'q1'}, 'CREATED', 'Queued', 'Waiting in queue q1'),
    (
        'suspended run',
        Observed(job=job(suspend=True)),
        {'suspend': True},
        'CREATED',
        'Suspended',
        'set spec.suspend to false',
    ),
    ('pending pod', Observed(job=job(active=1), pods=[pod('Pending')]), {}, 'CREATED', 'Submitted', 'awaits'),
    (
        'no free slot (FINETUNER_MAX_CONCURRENT_RUNS)',
        Observed(waiting_for_slot=3),
        {},
        'CREATED',
        'Waiting',
        'Waiting for a free slot: 3 of 3 runs allowed at once (FINETUNER_MAX_CONCURRENT_RUNS) are training',
    ),
    (
        'resumed, no free slot',
        Observed(job=job(suspend=True), waiting_for_slot=2),
        {},
        'CREATED',
        'Waiting',
        'Waiting for a free slot: 2 of 2 runs allowed at once',
    ),
    (
        'suspended while waiting',
        Observed(waiting_for_slot=2),
        {'suspend': True},
        'CREATED',
        'Suspended',
        'set spec.suspend to false',
    ),
    (
        'cancelled while waiting',
        Observed(waiting_for_slot=2, cancelled=True),
        {},
        'FAILED',
        'Cancelled',
        'cancelled',
    ),
    (
        'unschedulable briefly',
        Observed(job=job(active=1), pods=[pod('Pending', conditions=unschedulable(2))]),
        {},
        'CREATED',
        'Unschedulable',
        'Waiting for a node that fits: 0/3 nodes',
    ),
    (
        'unschedulable too long',
        Observed(job=job(active=1), pods=[pod('Pending', conditions=unschedulable(11))]),
        {},
        'FAILED',
        'Unschedulable',
        'No node could run the trainer for 11 minutes',
    ),
    (
        'image pull',
        Observed(
            job=job(active=1),
            pods=[
                pod(
                    'Pending',
                    state={'waiting': {'reason': 'ImagePullBackOff', 'message': 'Back-off pulling image "trainer:1"'}},
                )
            ],
        ),
        {},
        'CREATED',
        'ImagePullError',
        'Pulling the trainer image trainer:1 failed so far (Back-off pulling image "trainer:1"); the kubelet '
        'retries for up to 9 minutes more',
    ),
    (
        'image pull for longer than the image pull timeout',
        Observed(
            job=job(active=1),
            pods=[pod('Pending', state={'waiting': {'reason': 'ErrImagePull', 'message': 'i/o timeout'}}, age=11)],
        ),
        {},
        'FAILED',
        'ImagePullError',
        'Cannot pull the trainer image trainer:1: i/o timeout; fix spec.image',
    ),
    (
        'an image name no retry can fix',
        Observed(
            job=job(active=1),
            pods=[pod('Pending', state={'waiting': {'reason': 'InvalidImageName', 'message': 'bad ref'}})],
        ),
        {},
        'FAILED',
        'ImagePullError',
        'Cannot pull the trainer image trainer:1: bad ref',
    ),
    (
        'running',
        Observed(job=job(active=1), pods=[pod('Running', state=RUNNING)]),
        {},
        'STARTED',
        'Running',
        'Training: the trainer is running',
    ),
    (
        'running with progress',
        Observed(
            job=job(active=1),
            pods=[pod('Running', state=RUNNING)],
            progress=Progress(epoch=2, epochs=4, percent=37.5, eta_seconds=120),
        ),
        {},
        'STARTED',
        'Running',
        'Training: epoch 2/4, 38%, about 120s left',
    ),
    (
        'retrying',
        Observed(
            job=job(active=1, failed=1),
            pods=[pod('Failed', state=terminated(137, reason='OOMKilled'), age=5), pod('Pending')],
        ),
        {},
        'STARTED',
        'Retrying',
        'Attempt 1 failed (out of memory (OOMKilled)',
    ),
    (
        'complete',
        Observed(
            job=job(('Complete', 'CompletionsReached'), succeeded=1),
            pods=[pod('Succeeded', state=terminated(0, reason='Completed'))],
            metrics={'before': {'mrr': 0.1}, 'after': {'mrr': 0.5}},
            artifact=True,
        ),
        {},
        'FINISHED',
        'Succeeded',
        f'Fine-tuned model at {OUT}/artifact',
    ),
    (
        'config error',
        Observed(
            job=job(('Failed', 'PodFailurePolicy'), failed=1),
            pods=[pod('Failed', state=terminated(3, 'trainData: no labels in s3://b/d.jsonl'))],
        ),
        {},
        'FAILED',
        'ConfigurationError',
        'trainData: no labels in s3://b/d.jsonl',
    ),
    (
        'config error, message from failure.json',
        Observed(
            job=job(('Failed', 'PodFailurePolicy'), failed=1),
            pods=[],
            failure={'reason': 'ConfigurationError', 'message': 'loss: ArcFaceLoss needs labels'},
        ),
        {},
        'FAILED',
        'ConfigurationError',
        'loss: ArcFaceLoss needs labels',
    ),
    (
        'retries exhausted',
        Observed(
            job=job(('Failed', 'BackoffLimitExceeded'), failed=3),
            pods=[pod('Failed', state=terminated(1, 'CUDA error: device lost'))],
        ),
        {},
        'FAILED',
        'BackoffLimitExceeded',
        'failed 1 times (backoffLimit 2); last attempt: CUDA error: device lost',
    ),
    (
        'deadline',
        Observed(job=job(('Failed', 'DeadlineExceeded'))),
        {'activeDeadlineSeconds': 600},
        'FAILED',
        'DeadlineExceeded',
        'activeDeadlineSeconds=600',
    ),
    (
        'cancelled',
        Observed(job=job(active=1), pods=[pod('Running', state=RUNNING)], cancelled=True),
        {},
        'FAILED',
        'Cancelled',
        'cancelled',
    ),
]


@pytest.mark.parametrize(('case', 'observed', 'extra', 'phase', 'reason', 'details'), TABLE, ids=[t[0] for t in TABLE])
def test_status_table(case: str, observed: Observed, extra: dict, phase: str, reason: str, details: str) -> None:
    status = derive(observed, **extra)
    assert (status.phase, status.reason) == (phase, reason), status.details
    assert details in (status.details or '')
    true = {c.type for c in status.conditions if c.status == 'True'}
    assert ('Failed' in true) == (phase == 'FAILED')
    assert ('Succeeded' in true) == (phase == 'FINISHED')
    assert ('Created' in true) == (observed.job is not None)
    if phase in ('FINISHED', 'FAILED'):
        assert status.completion_time is not None
    assert status.output_uri == OUT


def test_finished_carries_artifact_metrics_and_times() -> None:
    observed = Observed(
        job=job(('Complete', 'CompletionsReached'), succeeded=1, completionTime=stamp()),
        pods=[pod('Succeeded', state=terminated(0, reason='Completed'))],
        metrics={'before': {'mrr': 0.1}, 'after': {'mrr': 0.5}, 'epochs': []},
        artifact=True,
    )
    status = derive(observed)
    assert status.artifact_uri == f'{OUT}/artifact'
    assert status.metrics is not None and status.metrics.after == {'mrr': 0.5}
    assert status.start_time == stamp(3) and status.completion_time == stamp()
    assert status.attempts == 1 and status.job_name == 'r-trainer'


def test_finished_carries_what_the_int8_model_lost() -> None:
    """metrics.json's quantized section (onnxQuantize) reaches status.metrics.quantized, camelCase on the wire."""
    quantized = {
        'methods': {'text': 'dynamic'},
        'metrics': {'mrr': 0.495},
        'relative_change': {'mrr': -1.0},
    }
    observed = Observed(
        job=job(('Complete', 'CompletionsReached'), succeeded=1, completionTime=stamp()),
        pods=[pod('Succeeded', state=terminated(0, reason='Completed'))],
        metrics={'before': {'mrr': 0.1}, 'after': {'mrr': 0.5}, 'epochs': [], 'quantized': quantized},
        artifact=True,
    )
    status = derive(observed)
    assert status.metrics is not None and status.metrics.quantized is not None
    assert status.metrics.quantized.relative_change == {'mrr': -1.0}
    assert status.to_k8s()['metrics']['quantized'] == {
        'methods': {'text': 'dynamic'},
        'metrics': {'mrr': 0.495},
        'relativeChange': {'mrr': -1.0},
    }


def test_terminal_phase_is_kept_when_the_job_is_gone() -> None:
    waiting = {'waiting': {'reason': 'ErrImagePull'}}
    failed = derive(Observed(job=job(active=1), pods=[pod('Pending', state=waiting, age=11)]))
    assert failed.phase == 'FAILED'
    assert derive(Observed(), previous=failed) == failed


def test_transition_time_moves_only_when_a_condition_changes() -> None:
    first = derive(Observed(job=job()))
    later = derive_status(
        run='r',
        spec=FinetuneRunSpec(model='m', train_data='d'),
        previous=first,
        observed=Observed(job=job(active=1), pods=[pod('Running', state=RUNNING)]),
        output_uri=OUT,
        queue=None,
        unschedulable_timeout=600,
        now=NOW + timedelta(minutes=5),
    )
    times = {c.type: c.last_transition_time for c in later.conditions}
    assert times['Created'] == stamp()  # unchanged since the first pass
    assert times['Started'] == (NOW + timedelta(minutes=5)).strftime('%Y-%m-%dT%H:%M:%SZ')


def test_invalid_spec_names_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 'd', 'epochs': 0, 'loss': 'TripletLoss'})
    status = invalid_spec_status(info.value, NOW, FinetuneRunStatus())
    assert status.phase == 'FAILED' and status.reason == 'InvalidSpec'
    assert 'spec.epochs: Input should be greater than or equal to 1' in status.details
    assert "spec.loss: unknown loss 'TripletLoss'" in status.details


# --- the two steps alone: each phase rule, each condition setter -----------------------------------------


def situation(observed: Observed, *, queue: str | None = None, started_at: str | None = None, **spec: Any):
    from finetuner_operator.status import Situation, Timeouts

    return Situation(
        spec=FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 'd', 'backoffLimit': 2, **spec}),
        observed=observed,
        output_uri=OUT,
        queue=queue,
        timeouts=Timeouts(),
        now=NOW,
        started_at=started_at,
    )


def _rule_cases() -> list[tuple[str, Any, Any, tuple[str, str] | None]]:
    """(rule, a situation it decides, one it leaves to the others, its (phase, reason))."""
    running = [pod('Running', state=RUNNING)]
    complete = job(('Complete', 'CompletionsReached'))
    return [
        (
            'cancelled_phase',
            situation(Observed(cancelled=True)),
            situation(Observed()),
            ('FAILED', 'Cancelled'),
        ),
        ('no_job_phase', situation(Observed()), situation(Observed(job=job())), ('CREATED', 'Submitted')),
        (
            'complete_phase',
            situation(Observed(job=complete, artifact=True)),
            situation(Observed(job=job(active=1))),
            ('FINISHED', 'Succeeded'),
        ),
        (
            'failed_job_phase',
            situation(Observed(job=job(('Failed', 'DeadlineExceeded')))),
            situation(Observed(job=complete)),
            ('FAILED', 'DeadlineExceeded'),
        ),
        (
            'suspended_job_phase',
            situation(Observed(job=job(suspend=True)), queue='q'),
            situation(Observed(job=job())),
            ('CREATED', 'Queued'),
        ),
        (
            'failed_create_phase',
            situation(Observed(job=job(), failed_create='pods "r-trainer-" is forbidden: exceeded quota')),
            situation(Observed(job=job(), failed_create='old news', pods=[pod('Pending')])),
            ('CREATED', 'FailedCreate'),
        ),
        (
            'image_pull_phase',
            situation(Observed(job=job(), pods=[pod('Pending', state={'waiting': {'reason': 'ErrImagePull'}})])),
            situation(Observed(job=job(), pods=[pod('Pending')])),
            ('CREATED', 'ImagePullError'),
        ),
        (
            'container_config_phase',
            situation(
                Observed(
                    job=job(),
                    pods=[pod('Pending', state={'waiting': {'reason': 'CreateContainerConfigError', 'message': 'x'}})],
                )
            ),
            situation(Observed(job=job(), pods=[pod('Pending')])),
            ('CREATED', 'ContainerConfigError'),
        ),
        (
            'running_phase',
            situation(Observed(job=job(active=1), pods=running)),
            situation(Observed(job=job(active=1), pods=[pod('Pending')])),
            ('STARTED', 'Running'),
        ),
        (
            'unschedulable_phase',
            situation(Observed(job=job(), pods=[pod('Pending', conditions=unschedulable(1))])),
            situation(Observed(job=job(), pods=running)),
            ('CREATED', 'Unschedulable'),
        ),
        (
            'retrying_phase',
            situation(Observed(job=job(active=1), pods=[pod('Failed', state=terminated(1, 'boom'))])),
            situation(Observed(job=job(), pods=[pod('Failed', state=terminated(1, 'boom'))])),
            ('STARTED', 'Retrying'),
        ),
        (
            'started_earlier_phase',
            situation(Observed(job=job(), pods=[pod('Pending')]), started_at=stamp(5)),
            situation(Observed(job=job(), pods=[pod('Pending')])),
            ('STARTED', 'Running'),
        ),
    ]


RULE_CASES = _rule_cases()


@pytest.mark.parametrize(('rule', 'decides', 'leaves', 'verdict'), RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_each_phase_rule_decides_only_its_own_situation(rule: str, decides: Any, leaves: Any, verdict: Any) -> None:
    from finetuner_operator import status as s

    decided = getattr(s, rule)(decides)
    assert decided is not None and (decided.phase, decided.reason) == verdict
    assert getattr(s, rule)(leaves) is None


def test_every_phase_rule_is_tested_and_in_order() -> None:
    from finetuner_operator import status as s

    assert [rule.__name__ for rule in s.PHASE_RULES] == [case[0] for case in RULE_CASES]


def test_the_first_rule_that_recognises_the_situation_decides() -> None:
    from finetuner_operator.status import derive_phase

    running = [pod('Running', state=RUNNING)]
    cancelled_while_complete = situation(
        Observed(job=job(('Complete', 'CompletionsReached')), artifact=True, cancelled=True)
    )
    assert derive_phase(cancelled_while_complete).reason == 'Cancelled'
    ended_with_a_pod_left = situation(Observed(job=job(('Failed', 'BackoffLimitExceeded')), pods=running))
    assert derive_phase(ended_with_a_pod_left).reason == 'BackoffLimitExceeded'
    a_pod_runs_another_waits = [*running, pod('Pending', conditions=unschedulable(20))]
    assert derive_phase(situation(Observed(job=job(active=2), pods=a_pod_runs_another_waits))).reason == 'Running'
    assert derive_phase(situation(Observed(job=job()))).reason == 'Submitted', 'no rule: submitted'


def test_the_job_failure_rule_names_the_cause() -> None:
    from finetuner_operator.status import failed_job_phase

    oom = pod('Failed', state=terminated(137, reason='OOMKilled'))
    retries = failed_job_phase(situation(Observed(job=job(('Failed', 'BackoffLimitExceeded')), pods=[oom])))
    assert retries is not None and 'last attempt: out of memory (OOMKilled): raise spec.resources.memory' in (
        retries.details
    )
    other = failed_job_phase(situation(Observed(job=job(('Failed', 'SomethingElse')))))
    assert other is not None and (other.reason, other.details) == ('SomethingElse', 'Failed because SomethingElse')
    silent = failed_job_phase(situation(Observed(job=job(('Failed', 'PodFailurePolicy')), failure={})))
    assert silent is not None and silent.details == 'Failed because PodFailurePolicy'
    assert silent.completion == stamp()


def _set(setter: str, *args: Any, previous: list[Any] | None = None) -> list[tuple[str, str, str | None]]:
    from finetuner_operator import status as s

    conditions = s.Conditions(previous or [], stamp())
    getattr(s, setter)(conditions, *args)
    return [(c.type, c.status, c.reason) for c in conditions.items]


def test_each_condition_setter_sets_its_condition() -> None:
    from finetuner.api.v1alpha1 import Phase
    from finetuner_operator.status import Verdict

    assert _set('set_created_condition', True) == [('Created', 'True', 'JobCreated')]
    assert _set('set_created_condition', False) == [('Created', 'False', 'Submitted')]
    assert _set('set_started_condition', stamp()) == [('Started', 'True', 'PodRunning')]
    assert _set('set_started_condition', None) == [('Started', 'False', 'NotStarted')]
    held = Verdict(Phase.CREATED, 'Queued', 'Waiting in queue q', suspended=True)
    assert _set('set_suspended_condition', held) == [('Suspended', 'True', 'Queued')]
    running = Verdict(Phase.STARTED, 'Running', 'Training')
    assert _set('set_suspended_condition', running) == [('Suspended', 'False', 'NotSuspended')]
    finished = Verdict(Phase.FINISHED, 'Succeeded', 'Fine-tuned model at x')
    failed = Verdict(Phase.FAILED, 'Cancelled', 'Run cancelled by user')
    assert _set('set_succeeded_condition', finished) == [('Succeeded', 'True', 'Succeeded')]
    assert _set('set_succeeded_condition', failed) == [] == _set('set_succeeded_condition', running)
    assert _set('set_failed_condition', failed) == [('Failed', 'True', 'Cancelled')]
    assert _set('set_failed_condition', finished) == [] == _set('set_failed_condition', running)


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    from finetuner.api.v1alpha1 import Condition
    from finetuner_operator.status import Conditions, set_started_condition

    before = [Condition(type='Started', status='False', reason='NotStarted', last_transition_time=stamp(10))]
    same = Conditions(before, stamp())
    set_started_condition(same, None)
    assert same.items[0].last_transition_time == stamp(10)
    moved = Conditions(before, stamp())
    set_started_condition(moved, stamp(1))
    assert (moved.items[0].status, moved.items[0].last_transition_time) == ('True', stamp())
