"""The status of multi-node runs (an Indexed Job, one pod per node) and of trainers killed by a signal."""

from __future__ import annotations

from typing import Any

from finetuner.api.v1alpha1 import FinetuneRunSpec, FinetuneRunStatus
from finetuner_operator.builders import COMPLETION_INDEX_ANNOTATION
from finetuner_operator.status import Observed, derive_status
from tests.operator.test_op_status import NOW, OUT, RUNNING, job, stamp


def rank_pod(
    index: int, phase: str, *, code: int | None = None, finished: float = 1, message: str = '', label: bool = True
) -> dict[str, Any]:
    """A pod of rank ``index``; Kubernetes >= 1.28 puts the index in a label as well as an annotation."""
    key = 'labels' if label else 'annotations'
    state: dict[str, Any] = RUNNING
    if code is not None:
        state = {
            'terminated': {
                'exitCode': code,
                'reason': 'Error',
                'message': message,
                'startedAt': stamp(5),
                'finishedAt': stamp(finished),
            }
        }
    return {
        'metadata': {
            'name': f'r-trainer-{index}-x{index}',
            'creationTimestamp': stamp(6),
            key: {COMPLETION_INDEX_ANNOTATION: str(index)},
        },
        'spec': {'containers': [{'name': 'trainer', 'image': 'trainer:1'}]},
        'status': {'phase': phase, 'containerStatuses': [{'name': 'trainer', 'state': state}]},
    }


def derive(observed: Observed, nodes: int = 2, backoff: int = 0) -> FinetuneRunStatus:
    spec = FinetuneRunSpec.model_validate(
        {'model': 'm', 'trainData': 'd', 'backoffLimit': backoff, 'resources': {'nodes': nodes}}
    )
    return derive_status(
        run='r',
        spec=spec,
        previous=FinetuneRunStatus(),
        observed=observed,
        output_uri=OUT,
        queue=None,
        unschedulable_timeout=600,
        now=NOW,
    )


GLOO = 'RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234'


def test_the_rank_that_failed_first_is_named() -> None:
    pods = [rank_pod(0, 'Failed', code=1, finished=1, message=GLOO), rank_pod(1, 'Failed', code=137, finished=2)]
    status = derive(Observed(job=job(('Failed', 'BackoffLimitExceeded'), failed=2), pods=pods))
    assert (status.phase, status.reason) == ('FAILED', 'BackoffLimitExceeded')
    assert status.details == (
        'The trainer failed 1 times on its 2 nodes (backoffLimit 0); last attempt: '
        'node rank 1 of 2 (pod r-trainer-1-x1) failed: killed by signal 9 (exit code 137)'
    )


def test_on_the_same_second_the_killed_rank_went_first() -> None:
    pods = [rank_pod(0, 'Failed', code=1, finished=1, message=GLOO), rank_pod(1, 'Failed', code=137, finished=1)]
    status = derive(Observed(job=job(('Failed', 'BackoffLimitExceeded'), failed=2), pods=pods))
    assert 'node rank 1 of 2 (pod r-trainer-1-x1) failed: killed by signal 9' in (status.details or '')


def test_a_rank_that_raised_is_named_with_its_own_words() -> None:
    pods = [rank_pod(0, 'Running'), rank_pod(1, 'Failed', code=1, message='Traceback...\nValueError: bad batch')]
    status = derive(Observed(job=job(('Failed', 'BackoffLimitExceeded'), failed=1, active=1), pods=pods))
    assert status.details is not None
    assert status.details.endswith('node rank 1 of 2 (pod r-trainer-1-x1) failed: ValueError: bad batch')


def test_the_index_annotation_serves_where_the_label_is_missing() -> None:
    pods = [rank_pod(1, 'Failed', code=137, label=False)]
    status = derive(Observed(job=job(('Failed', 'BackoffLimitExceeded'), failed=1), pods=pods))
    assert 'node rank 1 of 2' in (status.details or '')


def test_a_retrying_multi_node_run_counts_attempts_not_pods() -> None:
    pods = [rank_pod(0, 'Failed', code=1, message=GLOO, finished=3), rank_pod(1, 'Failed', code=1, finished=2)]
    pods += [rank_pod(0, 'Running'), rank_pod(1, 'Running')]
    status = derive(Observed(job=job(failed=2, active=2), pods=pods), backoff=3)
    assert (status.phase, status.reason) == ('STARTED', 'Running')
    assert status.attempts == 2, 'two pods per attempt'
    retrying = derive(Observed(job=job(failed=2, active=2), pods=pods[:2]), backoff=3)
    assert retrying.reason == 'Retrying'
    assert retrying.details == (
        'Attempt 1 failed (node rank 0 of 2 (pod r-trainer-0-x0) failed: '
        'RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234); retrying'
    )
    assert retrying.attempts == 2, 'the Job counts two pods active and two failed: two attempts of two nodes'


def test_a_finished_two_node_run_made_one_attempt() -> None:
    done = {'terminated': {'exitCode': 0, 'reason': 'Completed', 'startedAt': stamp(3), 'finishedAt': stamp(1)}}
    pods = [rank_pod(i, 'Succeeded') for i in (0, 1)]
    for pod in pods:
        pod['status']['containerStatuses'][0]['state'] = done
    status = derive(Observed(job=job(('Complete', 'CompletionsReached'), succeeded=2), pods=pods, artifact=True))
    assert (status.phase, status.attempts) == ('FINISHED', 1)


def test_a_single_trainer_killed_by_a_signal_says_so_before_its_last_output() -> None:
    pods = [rank_pod(0, 'Failed', code=137, message='epoch 3/9 step 2/4 (50%) loss 0.91\n')]
    pods[0]['metadata'].pop('labels')
    status = derive(Observed(job=job(('Failed', 'BackoffLimitExceeded'), failed=1), pods=pods), nodes=1)
    assert status.details == (
        'The trainer failed 1 times (backoffLimit 0); last attempt: killed by signal 9 (exit code 137); '
        'last output: epoch 3/9 step 2/4 (50%) loss 0.91'
    )
