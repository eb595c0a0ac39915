"""The operator restarted in every phase of a run: the run still ends right, with exactly one Job.

Nothing is remembered in the operator's memory: a restarted operator re-finds the Job by its
deterministic name (409 is success), rebuilds the status from the Job, pods and the trainer's
reports, and ``on.resume`` picks up runs it has never seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import finetuner
from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.e2e.targets import Target
from tests.e2e.test_lifecycle import FIT, images


def _target(cluster: Cluster) -> Target:
    return Target('simulated', cluster.api, 'default', cluster.bucket, timeout=180.0)


@pytest.mark.slow  # two real trainings under restarts: ~35 s alone, over a minute on a busy machine
def test_restart_in_every_phase_of_a_finishing_run(cluster: Cluster, tmp_path: Path) -> None:
    target = _target(cluster)
    target.login()
    cluster.operator.stop()
    cluster.node.pause(True)

    # Created while no operator runs: on.resume/on.create picks it up when one starts.
    run = finetuner.fit(train_data=str(images(tmp_path)), run_name='restarts', **{**FIT, 'epochs': 2})
    assert target.jobs('restarts') == []
    cluster.operator.start()
    created = target.wait_phase('restarts', ('CREATED',))
    wait_for(lambda: target.jobs('restarts'), what='Job created')
    assert created['details'] == 'Run submitted and awaits execution'

    cluster.operator.restart()  # CREATED: the Job exists, no pod yet
    assert len(target.jobs('restarts')) == 1
    cluster.node.pause(False)
    target.wait_phase('restarts', ('STARTED', 'FINISHED'))

    cluster.operator.restart()  # STARTED (or just finished): the trainer keeps running
    final = target.wait_phase('restarts', ('FINISHED', 'FAILED'))
    assert final['phase'] == 'FINISHED', final
    body_before = target.run_body('restarts')

    cluster.operator.restart()  # FINISHED: nothing is redone, the status stays
    target.wait_phase('restarts', ('FINISHED',))
    assert len(target.jobs('restarts')) == 1
    assert len(target.pods('restarts')) == 1
    assert target.run_body('restarts')['status'] == body_before['status']
    assert run.full_status().attempts == 1


@pytest.mark.slow
def test_restart_after_a_failure_keeps_it_failed(cluster: Cluster, tmp_path: Path) -> None:
    target = _target(cluster)
    target.login()
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "only one item and no label"}\n')
    finetuner.fit(train_data=str(bad), run_name='fails', **FIT)
    failed = target.wait_phase('fails', ('FAILED', 'FINISHED'))
    assert failed['phase'] == 'FAILED'

    cluster.operator.restart()

    assert target.wait_phase('fails', ('FAILED',))['details'] == failed['details']
    assert len(target.jobs('fails')) == 1
    assert len(target.pods('fails')) == 1
