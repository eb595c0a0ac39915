"""FINETUNER_MAX_CONCURRENT_RUNS against the in-memory seam: runs beyond the limit wait without a Job,
freed slots go to the oldest waiting run at once, Kueue runs are not limited, and concurrent passes
never take more slots than there are."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from finetuner_operator import admission
from finetuner_operator.cache import JOBS, RUNS, ObjectCache
from finetuner_operator.config import OperatorConfig
from finetuner_operator.reconcile import Reconciler
from tests.operator.test_op_reconcile import NOW, CallLog, FakeKube, Reports, run_body

WAITING_TEXT = 'runs allowed at once (FINETUNER_MAX_CONCURRENT_RUNS) are training'


def published(uri: str, wanted: Any) -> dict[str, Any]:
    """Every completed Job published its artifact."""
    return {'artifact': True} if 'artifact' in wanted else {}


def limited(fake: Any, limit: int, **config: Any) -> Reconciler:
    settings = OperatorConfig(output='s3://b/runs', max_concurrent_runs=limit, **config)
    return Reconciler(fake, settings, now=lambda: NOW, reports=Reports(published))  # type: ignore[arg-type]


def submit(fake: FakeKube, reconciler: Reconciler, name: str, second: int = 0, **spec: Any) -> None:
    body = run_body(name, **spec)
    body['metadata']['creationTimestamp'] = f'2026-01-01T00:00:{second:02d}Z'
    reconciler.reconcile_run(fake.add('FinetuneRun', body))


def jobs(fake: FakeKube) -> list[str]:
    return sorted(name for kind, name in fake.objects if kind == 'Job')


def status(fake: FakeKube, name: str) -> dict[str, Any]:
    return fake.get_run('default', name).get('status') or {}


def finish(fake: FakeKube, reconciler: Reconciler, name: str) -> None:
    """The run's trainer completes; the Job's event brings a pass of the run."""
    fake.objects[('Job', f'{name}-trainer')]['status'] = {
        'succeeded': 1,
        'conditions': [{'type': 'Complete', 'status': 'True'}],
    }
    reconciler.sync_run('default', name)
    assert status(fake, name)['phase'] == 'FINISHED'


def reasons(fake: FakeKube, name: str) -> list[str]:
    return [reason for run, reason, _ in fake.events if run == name]


def test_beyond_the_limit_a_run_waits_without_any_child() -> None:
    fake = FakeKube()
    reconciler = limited(fake, 2)
    for name in ('a', 'b', 'c'):
        submit(fake, reconciler, name)

    assert jobs(fake) == ['a-trainer', 'b-trainer']
    assert ('ConfigMap', 'c-config') not in fake.objects, 'a waiting run gets its children with its slot'
    waiting = status(fake, 'c')
    assert (waiting['phase'], waiting['reason']) == ('CREATED', 'Waiting')
    assert f'Waiting for a free slot: 2 of 2 {WAITING_TEXT}' in waiting['details']
    assert 'jobName' not in waiting
    assert reasons(fake, 'c') == ['Created', 'Waiting']

    reconciler.reconcile_run(fake.get_run('default', 'c'))  # resume, spec updates: still waiting, no new Event
    reconciler.sync_run('default', 'c')  # the periodic re-observation
    assert jobs(fake) == ['a-trainer', 'b-trainer']
    assert status(fake, 'c') == waiting
    assert reasons(fake, 'c') == ['Created', 'Waiting']
    assert status(fake, 'a')['reason'] == 'Submitted'


def test_a_run_that_ends_gives_its_slot_to_the_oldest_waiting_run_at_once() -> None:
    fake = FakeKube()
    reconciler = limited(fake, 1)
    submit(fake, reconciler, 'first', second=0)
    # Submitted in another order than they were created: the line goes by creationTimestamp, then name.
    submit(fake, reconciler, 'beta', second=2)
    submit(fake, reconciler, 'alpha', second=2)
    submit(fake, reconciler, 'zeta', second=1)
    assert jobs(fake) == ['first-trainer']

    finish(fake, reconciler, 'first')  # no periodic pass: the finishing pass admits the next one

    assert jobs(fake) == ['first-trainer', 'zeta-trainer']
    assert (status(fake, 'zeta')['reason'], status(fake, 'zeta')['jobName']) == ('Submitted', 'zeta-trainer')
    assert reasons(fake, 'zeta') == ['Created', 'Waiting', 'JobCreated', 'Admitted']
    assert status(fake, 'alpha')['reason'] == status(fake, 'beta')['reason'] == 'Waiting'

    reconciler.sync_run('default', 'beta')  # a pass of a younger run does not jump the line
    assert jobs(fake) == ['first-trainer', 'zeta-trainer']

    finish(fake, reconciler, 'zeta')
    assert jobs(fake) == ['alpha-trainer', 'first-trainer', 'zeta-trainer']
    finish(fake, reconciler, 'alpha')
    assert 'beta-trainer' in jobs(fake)
    assert status(fake, 'beta')['reason'] == 'Submitted'


def test_cancelled_failed_and_deleted_runs_free_their_slots() -> None:
    fake = FakeKube()
    reconciler = limited(fake, 1)
    for second, name in enumerate(('a', 'b', 'c', 'd')):
        submit(fake, reconciler, name, second=second)
    assert jobs(fake) == ['a-trainer']

    fake.objects[('FinetuneRun', 'a')]['metadata']['annotations'] = {'run.finetuner.dev/cancel': 'true'}
    reconciler.reconcile_run(fake.get_run('default', 'a'))
    assert status(fake, 'a')['reason'] == 'Cancelled'
    assert jobs(fake) == ['b-trainer'], "the cancelled run's Job is deleted and its slot goes to b"

    fake.objects[('Job', 'b-trainer')]['status'] = {'failed': 1, 'conditions': [{'type': 'Failed', 'status': 'True'}]}
    reconciler.sync_run('default', 'b')
    assert status(fake, 'b')['phase'] == 'FAILED'
    assert jobs(fake) == ['b-trainer', 'c-trainer']

    body = fake.objects.pop(('FinetuneRun', 'c'))  # deleted: its Job goes by garbage collection later
    reconciler.run_deleted('default', 'c', body)
    assert 'd-trainer' in jobs(fake)


def test_queued_runs_are_admitted_by_kueue_and_neither_count_nor_wait() -> None:
    fake = FakeKube()
    reconciler = limited(fake, 1)
    submit(fake, reconciler, 'q1', queueName='team')
    submit(fake, reconciler, 'q2', queueName='team')
    fake.objects[('Job', 'q1-trainer')]['spec']['suspend'] = False  # Kueue admitted q1: it trains
    submit(fake, reconciler, 'plain')
    submit(fake, reconciler, 'plain-2')
    assert jobs(fake) == ['plain-trainer', 'q1-trainer', 'q2-trainer']
    assert status(fake, 'q2')['reason'] == 'Queued'
    assert status(fake, 'plain-2')['reason'] == 'Waiting'

    everything_queued = FakeKube()
    reconciler = limited(everything_queued, 1, queue='default-queue')  # FINETUNER_QUEUE
    for name in ('a', 'b', 'c'):
        submit(everything_queued, reconciler, name)
    assert jobs(everything_queued) == ['a-trainer', 'b-trainer', 'c-trainer']
    assert {status(everything_queued, n)['reason'] for n in ('a', 'b', 'c')} == {'Queued'}


def test_a_suspended_run_does_not_count_and_a_resume_waits_for_a_slot() -> None:
    fake = FakeKube()
    reconciler = limited(fake, 1)
    submit(fake, reconciler, 'a', second=0)
    submit(fake, reconciler, 'b', second=1)
    assert jobs(fake) == ['a-trainer']

    fake.objects[('FinetuneRun', 'a')]['spec']['suspend'] = True
    reconciler.reconcile_run(fake.get_run('default', 'a'))
    assert fake.get_job('default', 'a-trainer')['spec']['suspend'] is True
    assert jobs(fake) == ['a-trainer', 'b-trainer'], "a's slot went to b"

    fake.objects[('FinetuneRun', 'a')]['spec']['suspend'] = False
    reconciler.reconcile_run(fake.get_run('default', 'a'))
    assert fake.get_job('default', 'a-trainer')['spec']['suspend'] is True, 'b holds the only slot'
    assert (status(fake, 'a')['reason'], status(fake, 'a')['phase']) == ('Waiting', 'CREATED')

    finish(fake, reconciler, 'b')
    assert fake.get_job('default', 'a-trainer')['spec']['suspend'] is False
    assert status(fake, 'a')['reason'] == 'Submitted'
    assert reasons(fake, 'a')[-3:] == ['Waiting', 'Resumed', 'Admitted']


@pytest.mark.parametrize('first', ['lost', 'waiting'])
def test_a_run_whose_job_was_deleted_gets_it_back_before_younger_waiting_runs(first: str) -> None:
    fake = FakeKube()
    reconciler = limited(fake, 1)
    submit(fake, reconciler, 'lost', second=0)
    submit(fake, reconciler, 'waiting', second=1)
    del fake.objects[('Job', 'lost-trainer')]  # deleted behind the operator's back

    # Whichever pass comes first (the lost run's Job event, the waiting run's periodic pass), the slot
    # goes to the older run.
    reconciler.sync_run('default', first)
    reconciler.sync_run('default', 'lost')
    reconciler.sync_run('default', 'waiting')

    assert jobs(fake) == ['lost-trainer']
    assert 'JobRecreated' in reasons(fake, 'lost')
    assert status(fake, 'waiting')['reason'] == 'Waiting'


class SlowFakeKube(FakeKube):
    """Requests take a while: a Job being created is not there yet, and runs and Jobs are read one
    after the other, so that a count made meanwhile may see a new run's Job without that run."""

    def create_child(self, body: dict[str, Any]) -> bool:
        if body['kind'] == 'Job':
            time.sleep(0.002)
        return super().create_child(body)

    def list_all_runs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        runs = super().list_all_runs(namespaces)
        time.sleep(0.002)
        return runs


def test_concurrent_passes_never_take_more_slots_than_the_limit() -> None:
    fake = SlowFakeKube()
    reconciler = limited(fake, 3)
    bodies = [run_body(f'r{i:02d}') for i in range(20)]
    start = threading.Barrier(len(bodies))
    errors: list[BaseException] = []

    def reconcile(body: dict[str, Any]) -> None:
        try:
            start.wait(10)
            body = fake.add('FinetuneRun', body)  # runs arrive while others are being admitted
            reconciler.reconcile_run(body)
            reconciler.sync_run('default', body['metadata']['name'])  # and a periodic pass racing the rest
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reconcile, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    created = [name for kind, name, was_new in fake.creates if kind == 'Job' and was_new]
    assert len(created) == 3, created
    assert len(jobs(fake)) == 3
    waiting = [b['metadata']['name'] for b in bodies if status(fake, b['metadata']['name'])['reason'] == 'Waiting']
    assert len(waiting) == 17


def test_without_a_limit_nothing_is_counted() -> None:
    fake = FakeKube()
    log = CallLog(fake)
    reconciler = limited(log, 0)
    for name in ('a', 'b', 'c'):
        reconciler.reconcile_run(fake.add('FinetuneRun', run_body(name)))
    finish(fake, reconciler, 'a')
    assert not {'list_trainer_jobs', 'list_all_runs'} & set(log.calls), log.calls
    assert jobs(fake) == ['a-trainer', 'b-trainer', 'c-trainer']


def test_freed_slots_are_given_by_the_background_thread() -> None:
    fake = FakeKube()
    settings = OperatorConfig(output='s3://b/runs', max_concurrent_runs=1)
    reconciler = Reconciler(fake, settings, now=lambda: NOW, reports=Reports(published), background_admission=True)  # type: ignore[arg-type]
    try:
        submit(fake, reconciler, 'a', second=0)
        submit(fake, reconciler, 'b', second=1)
        finish(fake, reconciler, 'a')
        deadline = time.monotonic() + 10
        while 'b-trainer' not in jobs(fake):
            assert time.monotonic() < deadline, 'the waiting run never got the freed slot'
            time.sleep(0.01)
    finally:
        reconciler.close()
    thread = reconciler.admitter.wakeups.thread if reconciler.admitter.wakeups else None
    assert thread is not None and not thread.is_alive()


def test_the_seam_counts_from_the_cache_including_a_job_just_created() -> None:
    from tests.operator.test_op_cache import JOB_PATH, RecordingKube

    cache = ObjectCache()
    created = lambda body: {**body, 'metadata': {**body['metadata'], 'resourceVersion': '5'}}  # noqa: E731
    kube = RecordingKube({('POST', JOB_PATH): created}, cache)
    for kind in (RUNS, JOBS):
        cache.mark_synced(kind)
    cache.put(RUNS, {'metadata': {'name': 'r', 'namespace': 'ns', 'resourceVersion': '1'}, 'spec': {}})
    job = {'kind': 'Job', 'metadata': {'name': 'r-trainer', 'namespace': 'ns', 'labels': {'finetuner.dev/run': 'r'}}}
    assert kube.create_job({**job, 'spec': {'suspend': False}})
    runs = {admission.run_key(r): r for r in kube.list_all_runs(['ns'])}
    assert admission.active_count(kube.list_trainer_jobs(['ns']), runs) == 1
    assert kube.requests == [('POST', JOB_PATH)], 'counted from the cache: no listing'


def test_an_unsynced_seam_lists_what_it_counts() -> None:
    from tests.operator.test_op_cache import JOB_PATH, RUN_PATH, RecordingKube

    listing = {'metadata': {'resourceVersion': '9'}, 'items': []}
    kube = RecordingKube({('GET', JOB_PATH): listing, ('GET', RUN_PATH): listing}, ObjectCache())
    assert kube.list_trainer_jobs(['ns']) == [] and kube.list_all_runs(['ns']) == []
    assert kube.requests == [('GET', JOB_PATH), ('GET', RUN_PATH)]
    assert kube.list_trainer_jobs(['team-*']) == [], 'patterns cannot be listed: the watched objects are counted'
    assert len(kube.requests) == 2
