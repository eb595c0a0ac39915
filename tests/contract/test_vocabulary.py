"""One vocabulary: the operator and the local backend give the same reason and details for the same event.

Each event is staged twice, as each backend observes it: for the operator, the Job, its pods and the
trainer's reports handed to ``derive_status``; for the local backend, the files its supervisor and the
trainer leave in the run's folder, read back through ``LocalBackend.get_run``. Both must agree with
each other and with :mod:`finetuner.api.reasons`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from finetuner.api import layout, reasons
from finetuner.api.reasons import ConditionReason, ConditionType, Reason
from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, FinetuneRunSpec, FinetuneRunStatus, Progress
from finetuner.backends import local
from finetuner.backends.local import LocalBackend

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
STAMP = '2026-01-01T12:00:00Z'
MESSAGE = 'trainData: 3 records have no label; labelled training needs tags["finetuner_label"]'
PROGRESS = Progress(epoch=2, epochs=4, step=10, total_steps=20, percent=50.0, eta_seconds=30)


def job(*condition: str, active: int = 0) -> dict[str, Any]:
    """A trainer Job, with one True condition (type, reason) when given."""
    conditions = []
    if condition:
        kind, reason = condition
        conditions.append({'type': kind, 'status': 'True', 'reason': reason, 'lastTransitionTime': STAMP})
    return {'metadata': {'name': 'r-trainer'}, 'spec': {}, 'status': {'active': active, 'conditions': conditions}}


def pod(phase: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        'metadata': {'name': 'r-trainer-x', 'creationTimestamp': STAMP},
        'spec': {'containers': [{'name': 'trainer', 'image': 'trainer:1'}]},
        'status': {'phase': phase, 'containerStatuses': [{'name': 'trainer', 'state': state}]},
    }


RUNNING_POD = pod('Running', {'running': {'startedAt': STAMP}})


@dataclass
class Event:
    """How the operator sees the event, and how to leave it in a local run's folder."""

    name: str
    observed: dict[str, Any]
    stage_locally: Callable[[Path], None]
    reason: str
    details: Callable[[str], str]  # of the run's output URI


def _trainer_ended(exit_code: int, *, cancelled: bool = False, manifest: bool = False, failure: bool = False):
    def stage(run_dir: Path) -> None:
        output = run_dir / local.OUTPUT_DIR
        if cancelled:
            (run_dir / local.CANCEL_MARKER).write_text(STAMP)
        if manifest:
            (output / layout.ARTIFACT).mkdir()
            (output / layout.ARTIFACT_MANIFEST).write_text('{"files": {}}')
        if failure:
            reason = {'reason': 'ConfigError', 'message': MESSAGE, 'exitCode': exit_code}
            (output / layout.FAILURE).write_text(json.dumps(reason))
            (run_dir / local.TERMINATION_LOG).write_text(MESSAGE)
        started = local.RunState(phase='STARTED', start_time=STAMP)
        local.write_state(run_dir, local.final_state(run_dir, exit_code, started))

    return stage


def _training(run_dir: Path) -> None:
    (run_dir / local.OUTPUT_DIR / layout.PROGRESS).write_text(PROGRESS.model_dump_json(by_alias=True))
    local.write_state(run_dir, local.RunState(phase='STARTED', reason=Reason.RUNNING.value, start_time=STAMP))


EVENTS = [
    Event('submitted', {}, lambda run_dir: None, Reason.SUBMITTED.value, lambda out: reasons.SUBMITTED),
    Event(
        'training',
        {'job': job(active=1), 'pods': [RUNNING_POD], 'progress': PROGRESS},
        _training,
        Reason.RUNNING.value,
        lambda out: 'Training: epoch 2/4, 50%, about 30s left',
    ),
    Event(
        'finished',
        {'job': job('Complete', 'CompletionsReached'), 'artifact': True},
        _trainer_ended(0, manifest=True),
        Reason.SUCCEEDED.value,
        lambda out: f'Fine-tuned model at {out}/artifact',
    ),
    Event(
        'no artifact',
        {'job': job('Complete', 'CompletionsReached'), 'artifact': False},
        _trainer_ended(0),
        Reason.ARTIFACT_MISSING.value,
        lambda out: (
            f'The trainer exited successfully but {out}/artifact/manifest.json does not exist, so no '
            'complete model was published; see run.logs() and run the fit again'
        ),
    ),
    Event(
        'configuration error',
        {
            'job': job('Failed', 'PodFailurePolicy'),
            'pods': [pod('Failed', {'terminated': {'exitCode': EXIT_CONFIG_ERROR, 'message': MESSAGE}})],
            'failure': {'reason': 'ConfigError', 'message': MESSAGE},
        },
        _trainer_ended(EXIT_CONFIG_ERROR, failure=True),
        Reason.CONFIGURATION_ERROR.value,
        lambda out: MESSAGE,
    ),
    Event(
        'cancelled',
        {'job': job(active=1), 'pods': [RUNNING_POD], 'cancelled': True},
        _trainer_ended(-15, cancelled=True),
        Reason.CANCELLED.value,
        lambda out: 'Run cancelled by user',
    ),
]


def operator_status(event: Event, output_uri: str) -> FinetuneRunStatus:
    status_module = pytest.importorskip('finetuner_operator.status')
    return status_module.derive_status(
        run='r',
        spec=FinetuneRunSpec(model='m', train_data='d'),
        previous=FinetuneRunStatus(),
        observed=status_module.Observed(**event.observed),
        output_uri=output_uri,
        queue=None,
        unschedulable_timeout=600,
        now=NOW,
    )


def local_status(event: Event, home: Path) -> FinetuneRunStatus:
    """A local run as the backend records it, with the event staged in its folder (no process runs)."""
    backend = LocalBackend(home=home)
    run_dir = backend.run_dir('r')
    (run_dir / local.OUTPUT_DIR).mkdir(parents=True)
    spec = FinetuneRunSpec(model='m', train_data='d')
    stored = {'name': 'r', 'spec': spec.to_k8s(), 'created_at': STAMP}
    (run_dir / local.RUN_FILE).write_text(json.dumps(stored))
    config = {'runName': 'r', 'spec': spec.to_k8s(), 'outputUri': (run_dir / local.OUTPUT_DIR).as_uri()}
    (run_dir / local.CONFIG_FILE).write_text(json.dumps(config))
    local.write_state(run_dir, local.RunState())
    event.stage_locally(run_dir)
    return backend.get_run('r').status


@pytest.mark.parametrize('event', EVENTS, ids=[e.name for e in EVENTS])
def test_both_backends_give_the_same_reason_and_details(event: Event, tmp_path: Path) -> None:
    on_this_machine = local_status(event, tmp_path / 'home')
    assert on_this_machine.output_uri is not None
    on_the_cluster = operator_status(event, on_this_machine.output_uri)
    assert on_this_machine.phase == on_the_cluster.phase
    expected = (event.reason, event.details(on_this_machine.output_uri))
    assert (on_the_cluster.reason, on_the_cluster.details) == expected
    assert (on_this_machine.reason, on_this_machine.details) == expected


def test_condition_reasons_are_part_of_the_vocabulary() -> None:
    """Every reason the operator writes into a condition comes from the contract's enums."""
    known = {r.value for r in Reason} | {r.value for r in ConditionReason}
    for event in EVENTS:
        status = operator_status(event, 's3://b/runs/default/r')
        assert {c.type for c in status.conditions} <= {t.value for t in ConditionType}
        assert {c.reason for c in status.conditions} <= known, event.name
