"""The production settings of the operator alone: builders, status rules, diagnostics, the reconciler's
restarts and refusals (issue 25). The same situations on the test cluster: tests/e2e/test_production.py."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import kubernetes_validate
import pytest

from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, FinetuneRunSpec, FinetuneRunStatus
from finetuner_operator import builders, quantity
from finetuner_operator.config import OperatorConfig
from finetuner_operator.diagnostics import Diagnostics
from finetuner_operator.reconcile import Reconciler
from finetuner_operator.status import Observed, Situation, Timeouts, derive_phase, derive_status
from tests.operator.test_op_reconcile import FakeKube, Reports, run_body

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
OWNER = {
    'apiVersion': 'finetuner.dev/v1alpha1',
    'kind': 'FinetuneRun',
    'metadata': {'name': 'r', 'namespace': 'ns', 'uid': '1f4e3b1c-0000-4000-8000-000000000001'},
}


def stamp(seconds_ago: float = 0) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime('%Y-%m-%dT%H:%M:%SZ')


def spec(**fields: Any) -> FinetuneRunSpec:
    return FinetuneRunSpec.model_validate({'model': 'm', 'trainData': 's3://b/d.jsonl', **fields})


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job['spec']['template']['spec']


def volume(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod_spec(job)['volumes'] if v['name'] == name)


# --- quantities --------------------------------------------------------------------------------------------


def test_quantities_scale_in_their_own_unit_and_compare_by_value() -> None:
    assert quantity.times('16Gi', 4) == '64Gi'
    assert quantity.times('500m', 3) == '1500m'
    assert quantity.times('2.5', 2) == '5'
    assert quantity.value('1Ki') == Decimal(1024) and quantity.value('250m') == Decimal('0.25')
    assert quantity.of_bytes(Decimal(8 * 2**30)) == '8Gi' and quantity.of_bytes(Decimal(1536 * 2**20)) == '1536Mi'
    assert quantity.smaller('4Gi', '3000M') == '3000M'
    with pytest.raises(ValueError, match=r"'16 gigs' is not a Kubernetes quantity"):
        quantity.value('16 gigs')


# --- builders ----------------------------------------------------------------------------------------------


def test_every_pod_gets_a_sized_memory_backed_dev_shm() -> None:
    """The container runtime's default /dev/shm is 64 MiB: one batch of 128 images at 224 px is 77 MB."""
    batch_bytes = 128 * 3 * 224 * 224 * 4
    for gpus, shm in ((0, '4Gi'), (1, '4Gi'), (4, '16Gi')):
        job = builders.build_job('r', 'ns', spec(resources={'gpus': gpus}), OperatorConfig(), OWNER)
        dshm = volume(job, 'dshm')
        assert dshm['emptyDir'] == {'medium': 'Memory', 'sizeLimit': shm}
        assert quantity.value(shm) > batch_bytes
        assert {'name': 'dshm', 'mountPath': '/dev/shm'} in pod_spec(job)['containers'][0]['volumeMounts']
    small = builders.build_job('r', 'ns', spec(resources={'gpus': 1, 'memory': '6Gi'}), OperatorConfig(), OWNER)
    assert volume(small, 'dshm')['emptyDir']['sizeLimit'] == '3Gi', 'at most half the memory limit'


def test_cpu_memory_and_shm_scale_with_the_gpus_and_cpu_is_not_limited() -> None:
    job = builders.build_job('r', 'ns', spec(resources={'gpus': 8}), OperatorConfig(), OWNER)
    resources = pod_spec(job)['containers'][0]['resources']
    assert resources['requests'] == {'cpu': '32', 'memory': '128Gi', 'ephemeral-storage': '50Gi'}
    assert resources['limits'] == {'memory': '128Gi', 'ephemeral-storage': '50Gi', 'nvidia.com/gpu': '8'}
    own = builders.build_job(
        'r', 'ns', spec(resources={'gpus': 8, 'cpu': '20', 'memory': '300Gi', 'ephemeralStorage': '1Ti'}),
        OperatorConfig(), OWNER,
    )  # fmt: skip
    resources = pod_spec(own)['containers'][0]['resources']
    assert resources['requests'] == {'cpu': '20', 'memory': '300Gi', 'ephemeral-storage': '1Ti'}
    assert volume(own, 'tmp')['emptyDir'] == volume(own, 'home')['emptyDir'] == {'sizeLimit': '1Ti'}
    kubernetes_validate.validate(own, '1.30.0', strict=True)


def test_the_job_expires_has_a_deadline_and_spares_the_hf_cache_a_chown() -> None:
    job = builders.build_job('r', 'ns', spec(), OperatorConfig(hf_cache_pvc='hf'), OWNER)
    assert job['spec']['ttlSecondsAfterFinished'] == 86400
    assert job['spec']['activeDeadlineSeconds'] == 7 * 86400
    assert pod_spec(job)['securityContext']['fsGroupChangePolicy'] == 'OnRootMismatch'
    kept = builders.build_job(
        'r', 'ns', spec(activeDeadlineSeconds=3600), OperatorConfig(job_ttl=-1, default_active_deadline=0), OWNER
    )
    assert 'ttlSecondsAfterFinished' not in kept['spec'] and kept['spec']['activeDeadlineSeconds'] == 3600
    unbounded = builders.build_job('r', 'ns', spec(), OperatorConfig(default_active_deadline=0), OWNER)
    assert 'activeDeadlineSeconds' not in unbounded['spec']


def test_a_multi_node_job_fails_as_a_whole_for_the_operator_to_restart() -> None:
    run_spec = spec(resources={'gpus': 4, 'nodes': 2}, backoffLimit=5)
    job = builders.build_job('r', 'ns', run_spec, OperatorConfig(cluster_domain='corp.local'), OWNER)
    assert job['spec']['backoffLimit'] == 0, 'the Job controller would replace the failed rank alone'
    rules = job['spec']['podFailurePolicy']['rules']
    assert rules[1] == {'action': 'FailJob', 'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]}
    assert job['metadata']['annotations'] == {builders.RESTART_ANNOTATION: '0'}
    env = {e['name']: e.get('value') for e in pod_spec(job)['containers'][0]['env']}
    assert env['MASTER_ADDR'] == 'r-trainer-0.r-workers.ns.svc.corp.local'
    again = builders.build_job(
        'r', 'ns', run_spec, OperatorConfig(), OWNER, builders.JobAttempt(restart=2, active_deadline_seconds=900)
    )
    assert again['metadata']['annotations'] == {builders.RESTART_ANNOTATION: '2'}
    assert again['spec']['activeDeadlineSeconds'] == 900
    single = builders.build_job('r', 'ns', spec(backoffLimit=5), OperatorConfig(), OWNER)
    assert single['spec']['backoffLimit'] == 5
    assert single['spec']['podFailurePolicy']['rules'][1]['action'] == 'Ignore'


# --- status: the situations that resolve themselves, or not ----------------------------------------------


def job(*conditions: tuple[str, str], restart: int = 0, message: str = '', **status: Any) -> dict[str, Any]:
    return {
        'metadata': {
            'name': 'r-trainer',
            'namespace': 'ns',
            'uid': 'job-uid',
            'creationTimestamp': stamp(60),
            'annotations': {builders.RESTART_ANNOTATION: str(restart)},
        },
        'spec': {},
        'status': {
            **status,
            'conditions': [
                {'type': t, 'status': 'True', 'reason': r, 'message': message, 'lastTransitionTime': stamp(30)}
                for t, r in conditions
            ],
        },
    }


def rank_pod(
    rank: int, *, code: int = 137, finished: float = 40, disrupted: bool = False, phase: str = 'Failed'
) -> dict[str, Any]:
    conditions = [{'type': 'DisruptionTarget', 'status': 'True'}] if disrupted else []
    return {
        'metadata': {
            'name': f'r-trainer-{rank}-x',
            'creationTimestamp': stamp(100),
            'labels': {builders.COMPLETION_INDEX_ANNOTATION: str(rank)},
        },
        'spec': {'containers': [{'name': 'trainer', 'image': 't:1'}]},
        'status': {
            'phase': phase,
            'conditions': conditions,
            'containerStatuses': [
                {
                    'name': 'trainer',
                    'state': {'terminated': {'exitCode': code, 'finishedAt': stamp(finished), 'startedAt': stamp(90)}},
                }
            ],
        },
    }


def situation(
    observed: Observed, previous: FinetuneRunStatus | None = None, started: str | None = stamp(90), **fields: Any
) -> Situation:
    return Situation(
        spec=spec(**{'resources': {'gpus': 1, 'nodes': 2}, 'backoffLimit': 1, **fields}),
        observed=observed,
        output_uri='s3://b/runs/ns/r',
        queue=fields.get('queueName'),
        timeouts=Timeouts(unschedulable=60, scale_up=600, image_pull=120, pod_start=120),
        now=NOW,
        started_at=started,
        previous=previous or FinetuneRunStatus(phase='STARTED', reason='Running', details='Training'),
        active_deadline=fields.get('activeDeadlineSeconds'),
    )


def verdict(seen: Situation) -> tuple[str, str, str, int | None, int | None]:
    decided = derive_phase(seen)
    return decided.phase.value, decided.reason, decided.details, decided.restarts, decided.failed_attempts


def test_a_failed_multi_node_job_is_restarted_as_a_whole_once_per_failure() -> None:
    failed = Observed(
        job=job(('Failed', 'BackoffLimitExceeded')), pods=[rank_pod(1, finished=41), rank_pod(0, code=143)]
    )
    phase, reason, details, restarts, failures = verdict(situation(failed))
    assert (phase, reason, restarts, failures) == ('STARTED', 'Restarting', 1, 1)
    assert details.startswith('node rank 1 of 2 (pod r-trainer-1-x) failed: killed by signal 9 (exit code 137)')
    assert details.endswith(
        'restarting all 2 nodes from the last checkpoint (restart 1; 1 of backoffLimit 1 failures used)'
    )
    counted = FinetuneRunStatus(phase='STARTED', reason='Restarting', details=details, restarts=1, failed_attempts=1)
    assert verdict(situation(failed, counted))[3:] == (1, 1), 'the same Job seen again is not counted twice'
    second = Observed(job=job(('Failed', 'BackoffLimitExceeded'), restart=1), pods=[rank_pod(0, code=1)])
    phase, reason, details, restarts, failures = verdict(situation(second, counted))
    assert (phase, reason, restarts, failures) == ('FAILED', 'BackoffLimitExceeded', 2, 2)
    assert details.startswith('The trainer failed 2 times on its 2 nodes (backoffLimit 1); last attempt: node rank 0')


def test_an_eviction_restarts_without_using_up_the_backoff_limit_but_not_past_the_deadline() -> None:
    evicted = Observed(
        job=job(('Failed', 'PodFailurePolicy'), message='Pod ns/r-trainer-0-x has condition DisruptionTarget'),
        pods=[rank_pod(0, code=143, disrupted=True)],
    )
    phase, reason, details, restarts, failures = verdict(situation(evicted))
    assert (phase, reason, restarts, failures) == ('STARTED', 'Restarting', 1, 0)
    assert details.startswith('evicted (node rank 0 of 2')
    late = verdict(situation(evicted, activeDeadlineSeconds=60))
    assert late[:2] == ('FAILED', 'DeadlineExceeded') and 'activeDeadlineSeconds=60' in late[2]


def test_a_configuration_error_on_a_multi_node_run_is_final() -> None:
    failed = Observed(
        job=job(('Failed', 'PodFailurePolicy'), message='Container trainer for pod ns/x failed with exit code 3 ...'),
        pods=[rank_pod(1, code=EXIT_CONFIG_ERROR)],
        failure={'message': 'trainData: empty', 'exitCode': EXIT_CONFIG_ERROR},
    )
    assert verdict(situation(failed))[:2] == ('FAILED', 'ConfigurationError')


def test_a_restart_waits_for_the_failed_pod_to_be_seen_but_not_for_ever() -> None:
    early = job(('Failed', 'BackoffLimitExceeded'))
    early['status']['conditions'][0]['lastTransitionTime'] = stamp(1)
    assert verdict(situation(Observed(job=early)))[:2] == ('STARTED', 'Running'), 'held: the pod event follows'
    late = verdict(situation(Observed(job=job(('Failed', 'BackoffLimitExceeded')))))
    assert late[:2] == ('STARTED', 'Restarting') and late[2].startswith('see run.logs();')


def test_between_the_jobs_of_a_restart_the_run_stays_restarting() -> None:
    restarting = FinetuneRunStatus(phase='STARTED', reason='Restarting', details='node rank 1 ...; restarting')
    assert verdict(situation(Observed(), restarting))[:3] == ('STARTED', 'Restarting', 'node rank 1 ...; restarting')
    new_job = Observed(job=job(restart=1))
    assert verdict(situation(new_job, restarting))[:2] == ('STARTED', 'Restarting')
    running = Observed(job=job(restart=1, active=2), pods=[rank_pod(0, phase='Running')])
    assert verdict(situation(running, restarting))[:2] == ('STARTED', 'Running')


def waiting_pod(reason: str, message: str, seconds_ago: float) -> dict[str, Any]:
    return {
        'metadata': {'name': 'r-trainer-x', 'creationTimestamp': stamp(seconds_ago)},
        'spec': {'containers': [{'name': 'trainer', 'image': 'registry/trainer:1'}]},
        'status': {
            'phase': 'Pending',
            'conditions': [{'type': 'PodScheduled', 'status': 'True', 'lastTransitionTime': stamp(seconds_ago)}],
            'containerStatuses': [{'name': 'trainer', 'state': {'waiting': {'reason': reason, 'message': message}}}],
        },
    }


@pytest.mark.parametrize(
    ('reason', 'message', 'waiting', 'failed'),
    [
        ('ErrImagePull', 'i/o timeout', 'ImagePullError', 'Cannot pull the trainer image registry/trainer:1'),
        ('ImagePullBackOff', 'Back-off pulling', 'ImagePullError', 'Cannot pull the trainer image registry/trainer:1'),
        ('CreateContainerConfigError', 'secret "s3" not found', 'ContainerConfigError', 'could not be configured for'),
    ],
)
def test_a_pod_that_cannot_start_waits_for_its_timeout_then_fails(
    reason: str, message: str, waiting: str, failed: str
) -> None:
    young = verdict(situation(Observed(job=job(active=1), pods=[waiting_pod(reason, message, 60)]), started=None))
    assert young[:2] == ('CREATED', waiting) and message in young[2]
    old = verdict(situation(Observed(job=job(active=1), pods=[waiting_pod(reason, message, 180)]), started=None))
    assert old[:2] == ('FAILED', waiting) and failed in old[2]


def test_an_image_name_no_retry_can_fix_fails_at_once() -> None:
    bad = verdict(situation(Observed(job=job(), pods=[waiting_pod('InvalidImageName', 'bad', 1)]), started=None))
    assert bad[:2] == ('FAILED', 'ImagePullError')


def test_pods_the_job_controller_cannot_create() -> None:
    refused = 'Error creating: pods "r-trainer-abc" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'
    young = Observed(job=job(), failed_create=refused, failed_create_since=stamp(30))
    assert verdict(situation(young, started=None))[:2] == ('CREATED', 'FailedCreate')
    old = Observed(job=job(), failed_create=refused, failed_create_since=stamp(300))
    phase, reason, details, *_ = verdict(situation(old, started=None))
    assert (phase, reason) == ('FAILED', 'FailedCreate')
    assert details.startswith('The Job controller could not create the trainer pod for 5 minutes: Error creating:')


def unschedulable_pod(seconds_ago: float) -> dict[str, Any]:
    condition = {
        'type': 'PodScheduled',
        'status': 'False',
        'reason': 'Unschedulable',
        'message': '0/3 nodes are available: 3 Insufficient nvidia.com/gpu.',
        'lastTransitionTime': stamp(seconds_ago),
    }
    return {
        'metadata': {'name': 'p', 'creationTimestamp': stamp(seconds_ago)},
        'spec': {'containers': [{'name': 'trainer'}]},
        'status': {'phase': 'Pending', 'conditions': [condition]},
    }


def test_an_autoscaler_scale_up_gives_an_unschedulable_pod_the_longer_timeout() -> None:
    pods = [unschedulable_pod(300)]
    assert verdict(situation(Observed(job=job(), pods=pods), started=None))[:2] == ('FAILED', 'Unschedulable')
    scaling = Observed(job=job(), pods=pods, scale_up='pod triggered scale-up: [{gpu 0->1 (max: 3)}]')
    phase, reason, details, *_ = verdict(situation(scaling, started=None))
    assert (phase, reason) == ('CREATED', 'Unschedulable')
    assert details.startswith('Waiting for the cluster autoscaler to add a node (pod triggered scale-up')
    too_long = Observed(job=job(), pods=[unschedulable_pod(700)], scale_up='pod triggered scale-up')
    assert verdict(situation(too_long, started=None))[:2] == ('FAILED', 'Unschedulable')


@pytest.mark.parametrize(
    ('workload', 'details'),
    [
        (None, 'Waiting in queue q'),
        ({}, 'Waiting in queue q: Kueue has made no Workload for the trainer Job; check that Kueue is installed'),
        (
            {'status': {'conditions': [{'type': 'QuotaReserved', 'status': 'False', 'message': 'couldn\'t assign '
                                        'flavors to pod set main: insufficient quota for nvidia.com/gpu'}]}},
            "Waiting in queue q: couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu",
        ),
        ({'status': {'conditions': [{'type': 'QuotaReserved', 'status': 'True'}]}}, 'Waiting in queue q'),
    ],
)  # fmt: skip
def test_a_queued_run_carries_kueues_reason(workload: dict[str, Any] | None, details: str) -> None:
    queued = job()
    queued['spec']['suspend'] = True
    phase, reason, said, *_ = verdict(situation(Observed(job=queued, workload=workload), started=None, queueName='q'))
    assert (phase, reason) == ('CREATED', 'Queued') and said.startswith(details)


def test_timeouts_come_from_the_operator_config() -> None:
    config = OperatorConfig(unschedulable_timeout=1, scale_up_timeout=2, image_pull_timeout=3, pod_start_timeout=4)
    assert Timeouts.of(config) == Timeouts(1, 2, 3, 4)


# --- diagnostics -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_events_and_workloads_are_read_only_for_stuck_runs_and_at_most_once_per_interval() -> None:
    fake, clock = FakeKube(), Clock()
    reads: list[str] = []
    list_events = fake.list_events
    fake.list_events = lambda ns, selector: reads.append(selector) or list_events(ns, selector)  # type: ignore[method-assign]
    fake.cluster_events = [
        {'involvedObject': {'uid': 'job-uid'}, 'reason': 'FailedCreate', 'message': 'Error creating: first',
         'firstTimestamp': stamp(50), 'lastTimestamp': stamp(50)},
        {'involvedObject': {'uid': 'job-uid'}, 'reason': 'FailedCreate', 'message': 'Error creating: latest',
         'firstTimestamp': stamp(10), 'lastTimestamp': stamp(10)},
    ]  # fmt: skip
    diagnostics = Diagnostics(fake, interval=10.0, clock=clock)  # type: ignore[arg-type]
    stuck = job()
    assert diagnostics.failed_create(stuck, [], NOW) == ('Error creating: latest', stamp(50))
    assert diagnostics.failed_create(stuck, [], NOW) == ('Error creating: latest', stamp(50))
    assert len(reads) == 1, 'throttled'
    clock.now += 11
    diagnostics.failed_create(stuck, [], NOW)
    assert len(reads) == 2
    young = job()
    young['metadata']['creationTimestamp'] = stamp(1)
    assert diagnostics.failed_create(young, [], NOW) == (None, None), 'a new Job has a moment to get its pods'
    assert diagnostics.failed_create(stuck, [rank_pod(0)], NOW) == (None, None), 'it has pods: nothing is read'
    assert len(reads) == 2


def test_a_failed_read_says_nothing_and_kueue_not_installed_says_no_workload() -> None:
    fake = FakeKube()

    def refuse(namespace: str, selector: str) -> list[dict[str, Any]]:
        raise RuntimeError('403 Forbidden')

    fake.list_workloads = refuse  # type: ignore[method-assign]
    queued = job()
    queued['spec']['suspend'] = True
    assert Diagnostics(fake, 1.0).workload(queued, 'q', NOW) is None  # type: ignore[arg-type]
    fake = FakeKube()
    fake.workloads = None  # the API server serves no kueue.x-k8s.io
    assert Diagnostics(fake, 1.0).workload(queued, 'q', NOW) == {}  # type: ignore[arg-type]
    fake.workloads = [{'metadata': {'labels': {'kueue.x-k8s.io/job-uid': 'job-uid'}}, 'status': {}}]
    assert Diagnostics(fake, 1.0).workload(queued, 'q', NOW) == fake.workloads[0]  # type: ignore[arg-type]
    assert Diagnostics(fake, 1.0).workload(job(), 'q', NOW) is None, 'not suspended: not queued'  # type: ignore[arg-type]


def test_the_autoscalers_latest_word_on_an_unschedulable_pod_counts() -> None:
    fake = FakeKube()
    pod = unschedulable_pod(30)
    pod['metadata']['uid'] = 'pod-uid'
    pod['metadata']['namespace'] = 'ns'

    def event(reason: str, message: str, seconds_ago: float) -> dict[str, Any]:
        return {'involvedObject': {'uid': 'pod-uid'}, 'reason': reason, 'message': message,
                'lastTimestamp': stamp(seconds_ago)}  # fmt: skip

    fake.cluster_events = [event('TriggeredScaleUp', 'scale-up', 20), event('FailedScheduling', 'x', 1)]
    assert Diagnostics(fake, 1.0).scale_up([pod]) == 'scale-up'  # type: ignore[arg-type]
    fake.cluster_events.append(event('NotTriggerScaleUp', 'max', 5))
    assert Diagnostics(fake, 1.0).scale_up([pod]) is None  # type: ignore[arg-type]


# --- the reconciler -----------------------------------------------------------------------------------------


def test_a_multi_node_restart_deletes_the_job_and_creates_the_next_with_the_deadline_left() -> None:
    fake = FakeKube()
    reconciler = Reconciler(fake, OperatorConfig(output='s3://b/runs'), now=lambda: NOW, reports=Reports())  # type: ignore[arg-type]
    body = fake.add('FinetuneRun', run_body(resources={'gpus': 1, 'nodes': 2}, activeDeadlineSeconds=3600))
    reconciler.reconcile_run(body)
    first = fake.get_job('default', 'r-trainer')
    assert first['metadata']['annotations'] == {builders.RESTART_ANNOTATION: '0'}
    fake.objects[('FinetuneRun', 'r')]['status']['startTime'] = stamp(600)
    first['status'] = job(('Failed', 'BackoffLimitExceeded'))['status']
    fake.objects[('Job', 'r-trainer')] = first
    fake.pods = [rank_pod(1)]

    reconciler.sync_run('default', 'r')  # counts the failure, deletes the Job
    status = fake.get_run('default', 'r')['status']
    assert (status['reason'], status['restarts'], status['failedAttempts']) == ('Restarting', 1, 1)
    assert fake.get_job('default', 'r-trainer') is None
    fake.pods = []
    reconciler.sync_run('default', 'r')  # the Job is gone: the next one
    second = fake.get_job('default', 'r-trainer')
    assert second['metadata']['annotations'] == {builders.RESTART_ANNOTATION: '1'}
    assert second['spec']['activeDeadlineSeconds'] == 3000, 'what is left of the deadline'
    reasons = [e[1] for e in fake.events]
    assert reasons.count('Restarting') == 1 and reasons.count('Restarted') == 1 and 'JobRecreated' not in reasons
    status = fake.get_run('default', 'r')['status']
    assert (status['phase'], status['reason'], status['attempts']) == ('STARTED', 'Restarting', 2)


@pytest.mark.parametrize(
    ('config', 'spec_fields', 'reason', 'says'),
    [
        (
            {'policy': {'allowedImages': ['registry.corp/']}},
            {'image': 'evil.io/x:1'},
            'PolicyDenied',
            "Not allowed on this cluster: spec.image: 'evil.io/x:1' is not from a registry this cluster allows",
        ),
        (
            {},
            {'serviceAccountName': 'ghost'},
            'NamespaceNotPrepared',
            "Namespace default has no ServiceAccount 'ghost'",
        ),
    ],
)
def test_refused_runs_fail_before_any_job(
    config: dict[str, Any], spec_fields: dict[str, Any], reason: str, says: str
) -> None:
    fake = FakeKube()
    reconciler = Reconciler(fake, OperatorConfig(output='s3://b/runs', **config), now=lambda: NOW, reports=Reports())  # type: ignore[arg-type]
    reconciler.reconcile_run(fake.add('FinetuneRun', run_body(**spec_fields)))
    reconciler.sync_run('default', 'r')
    status = fake.get_run('default', 'r')['status']
    assert (status['phase'], status['reason']) == ('FAILED', reason) and status['details'].startswith(says)
    assert fake.creates == []
    assert [e[1] for e in fake.events] == [reason]


def test_the_service_account_check_can_be_turned_off() -> None:
    fake = FakeKube()
    fake.accounts.clear()
    config = OperatorConfig(output='s3://b/runs', check_service_account=False)
    Reconciler(fake, config, now=lambda: NOW, reports=Reports()).reconcile_run(fake.add('FinetuneRun', run_body()))  # type: ignore[arg-type]
    assert fake.get_job('default', 'r-trainer') is not None


def test_the_policy_and_the_pod_name_are_read_from_the_environment() -> None:
    config = OperatorConfig.from_env(
        {'FINETUNER_POLICY': json.dumps({'allowedImages': ['a.io/']}), 'POD_NAME': 'op-7d9f', 'FINETUNER_JOB_TTL': '-1'}
    )
    assert config.policy.allowed_images == ['a.io/'] and config.identity == 'op-7d9f' and config.job_ttl == -1
    with pytest.raises(ValueError, match='FINETUNER_POLICY is not valid JSON'):
        OperatorConfig.from_env({'FINETUNER_POLICY': '{allowedImages'})
    with pytest.raises(ValueError, match='allowedImagez'):
        OperatorConfig.from_env({'FINETUNER_POLICY': '{"allowedImagez": []}'})


def test_derive_status_keeps_the_restart_counts() -> None:
    status = derive_status(
        run='r',
        spec=spec(resources={'nodes': 2}),
        previous=FinetuneRunStatus(phase='STARTED', reason='Running', restarts=2, failed_attempts=1),
        observed=Observed(job=job(restart=2, active=2), pods=[rank_pod(0, phase='Running')]),
        output_uri='s3://b/runs/ns/r',
        queue=None,
        now=NOW,
    )
    assert (status.restarts, status.failed_attempts, status.attempts) == (2, 1, 3)


# --- runs accumulating: ended runs cost little ------------------------------------------------------------


def _ended_run(i: int) -> dict[str, Any]:
    status = {
        'phase': 'FINISHED',
        'reason': 'Succeeded',
        'metrics': {'before': {f'm{k}': 0.1 * k for k in range(10)}, 'after': {f'm{k}': 0.2 * k for k in range(10)}},
        'conditions': [{'type': t, 'status': 'True', 'lastTransitionTime': stamp()} for t in ('Created', 'Started')],
    }
    return {
        'apiVersion': 'finetuner.dev/v1alpha1',
        'kind': 'FinetuneRun',
        'metadata': {'name': f'r{i}', 'namespace': 'ns', 'resourceVersion': str(10 + i), 'uid': f'u{i}',
                     'labels': {builders.EXPERIMENT_LABEL: 'exp'}, 'creationTimestamp': stamp()},
        'spec': {'model': 'efficientnet_b0', 'trainData': 's3://b/d.jsonl', 'experiment': 'exp'},
        'status': status,
    }  # fmt: skip


def test_ended_runs_are_kept_packed_and_read_back_whole() -> None:
    import tracemalloc

    from finetuner_operator.cache import RUNS, ObjectCache

    cache = ObjectCache()
    run = _ended_run(1)
    cache.put(RUNS, json.loads(json.dumps(run)))
    assert cache.get(RUNS, 'ns', 'r1') == run
    assert cache.select(RUNS, 'ns', {builders.EXPERIMENT_LABEL: 'exp'}) == [run]
    (light,) = cache.objects(RUNS)
    assert light['metadata'] == run['metadata'] and light['status'] == {'phase': 'FINISHED'}
    active = {**_ended_run(2), 'status': {'phase': 'STARTED'}}
    cache.put(RUNS, active)
    assert cache.get(RUNS, 'ns', 'r2') is active, 'a run that has not ended is kept as it is'

    def traced(texts: list[str]) -> int:
        """Memory the cache holds once each body was decoded from its watch event and cached."""
        tracemalloc.start()
        kept = ObjectCache()
        for text in texts:
            kept.put(RUNS, json.loads(text))
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return size

    ended = [json.dumps(_ended_run(i)) for i in range(300)]
    started = [text.replace('"FINISHED"', '"STARTED"') for text in ended]
    assert traced(ended) < 0.5 * traced(started)


def test_kopf_s_lines_for_every_event_handler_call_are_dropped() -> None:
    import logging

    from finetuner_operator.handlers import QuietEventHandlers

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord('kopf.objects', level, __file__, 1, message, None, None)

    quiet = QuietEventHandlers()
    assert not quiet.filter(record(logging.INFO, "Handler 'run_event' succeeded."))
    assert not quiet.filter(record(logging.INFO, "Handler 'pod_event' succeeded."))
    assert quiet.filter(record(logging.INFO, "Handler 'reconcile_run' succeeded."))
    assert quiet.filter(record(logging.ERROR, "Handler 'run_event' failed with an exception. Will retry."))
