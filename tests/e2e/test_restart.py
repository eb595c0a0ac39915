"""The operator restarted in every phase of a run: the run still ends right, with exactly one Job.

Nothing is remembered in the operator's memory: a restarted operator re-finds the Job by its
deterministic name (409 is success), rebuilds the status from the Job, pods and the trainer's
reports, and ``on.resume`` picks up runs it has never seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import finetuner
from finetuner.api.v1alpha1 import FinetuneRunSpec
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


def test_ended_runs_met_at_start_up_are_left_untouched_and_their_deletion_recounts(cluster: Cluster) -> None:
    """Runs that ended before this operator met them (restored from a backup with their Experiment, or left
    by another installation) get no pass and no write at start-up, not even Kopf's bookkeeping annotation;
    deleting one still takes it out of its Experiment's count."""
    from kubernetes import client

    group, version, namespace = 'finetuner.dev', 'v1alpha1', 'default'
    custom = client.CustomObjectsApi(cluster.api)
    cluster.operator.stop()
    experiment = {'apiVersion': f'{group}/{version}', 'kind': 'Experiment', 'metadata': {'name': 'old'}, 'spec': {}}
    uid = custom.create_namespaced_custom_object(group, version, namespace, 'experiments', experiment)['metadata'][
        'uid'
    ]
    owner = {'apiVersion': f'{group}/{version}', 'kind': 'Experiment', 'name': 'old', 'uid': uid, 'controller': False,
             'blockOwnerDeletion': True}  # fmt: skip
    versions = {}
    for name in ('ended-1', 'ended-2'):
        body = {
            'apiVersion': f'{group}/{version}',
            'kind': 'FinetuneRun',
            'metadata': {'name': name, 'labels': {'finetuner.dev/experiment': 'old'}, 'ownerReferences': [owner]},
            'spec': {'model': 'm', 'trainData': 's3://b/d.jsonl', 'experiment': 'old'},
        }
        custom.create_namespaced_custom_object(group, version, namespace, 'finetuneruns', body)
        status = {'status': {'phase': 'FINISHED', 'reason': 'Succeeded', 'details': 'Fine-tuned model at s3://b/a'}}
        ended = custom.patch_namespaced_custom_object_status(group, version, namespace, 'finetuneruns', name, status)
        versions[name] = ended['metadata']['resourceVersion']

    cluster.operator.start()
    target = _target(cluster)
    probe = FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 's3://b/d.jsonl', 'resources': {'gpus': 8}})
    target.login().create_run('probe', probe)  # created after the ended ones; its pod waits for GPUs
    wait_for(lambda: target.jobs('probe'), what="the probe run's Job")

    def counts() -> dict[str, int]:
        body = custom.get_namespaced_custom_object(group, version, namespace, 'experiments', 'old')
        return (body.get('status') or {}).get('runs') or {}

    wait_for(lambda: counts().get('finished') == 2, what='the Experiment counts both ended runs')
    for name, before in versions.items():
        body = target.run_body(name)
        assert body['metadata']['resourceVersion'] == before, f'{name} was written to: {body["metadata"]}'
        assert not any(key.startswith('finetuner.dev/') for key in body['metadata'].get('annotations') or {})

    custom.delete_namespaced_custom_object(group, version, namespace, 'finetuneruns', 'ended-1')
    wait_for(lambda: counts().get('finished') == 1 and counts().get('total') == 1, what='the recount after deletion')
