"""Reconciler logic against an in-memory seam: idempotency, invalid specs, suspend, experiments, sweeps."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from finetuner.api.v1alpha1 import BestRunSelector, Sweep
from finetuner_operator import experiments, kube
from finetuner_operator.config import OperatorConfig
from finetuner_operator.reconcile import Reconciler
from finetuner_operator.reports import TrainerReports

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


class FakeKube:
    """The seam's methods over dicts; counts calls so idempotency is visible."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.creates: list[tuple[str, str, bool]] = []
        self.pods: list[dict[str, Any]] = []
        # What the chart prepares in a run namespace; Events of the cluster and Kueue's Workloads.
        self.accounts: set[tuple[str, str]] = {('default', 'finetuner-trainer')}
        self.cluster_events: list[dict[str, Any]] = []
        self.workloads: list[dict[str, Any]] | None = []

    def _new(self, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        body['metadata'].setdefault('uid', str(uuid.uuid4()))
        body['metadata'].setdefault('generation', 1)
        return body

    def add(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        body = self._new({'kind': kind, **body})
        self.objects[(kind, body['metadata']['name'])] = body
        return body

    def create_child(self, body: dict[str, Any]) -> bool:
        key = (body['kind'], body['metadata']['name'])
        created = key not in self.objects
        if created:
            self.objects[key] = self._new(body)
        self.creates.append((*key, created))
        return created

    def create_run(self, body: dict[str, Any]) -> bool:
        return self.create_child({**body, 'kind': 'FinetuneRun'})

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(('Job', name)))

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.objects[('Job', name)]['spec'].update(patch['spec'])

    def delete_job(self, namespace: str, name: str, propagation: str = 'Background') -> bool:
        return self.objects.pop(('Job', name), None) is not None

    def get_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = (namespace, name) in self.accounts
        return {'metadata': {'name': name, 'namespace': namespace}} if found else None

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        wanted = dict(term.split('=', 1) for term in field_selector.split(','))

        def field(event: dict[str, Any], path: str) -> Any:
            for part in path.split('.'):
                event = (event or {}).get(part)  # type: ignore[assignment]
            return event

        return [e for e in self.cluster_events if all(field(e, k) == v for k, v in wanted.items())]

    def list_workloads(self, namespace: str, selector: str) -> list[dict[str, Any]] | None:
        if self.workloads is None:
            return None
        key, _, value = selector.partition('=')
        return [w for w in self.workloads if (w['metadata'].get('labels') or {}).get(key) == value]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods)

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(('FinetuneRun', name)))

    def list_runs(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        key, _, value = (selector or '').partition('=')
        return [
            copy.deepcopy(o)
            for (kind, _), o in self.objects.items()
            if kind == 'FinetuneRun' and (not key or (o['metadata'].get('labels') or {}).get(key) == value)
        ]

    def patch_run(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        meta = self.objects[('FinetuneRun', name)]['metadata']
        for key, value in patch['metadata'].items():
            meta[key] = {**meta.get(key, {}), **value} if isinstance(value, dict) else value

    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        run = self.objects.get(('FinetuneRun', name))
        if run is None:
            return False
        run['status'] = {k: v for k, v in {**run.get('status', {}), **status}.items() if v is not None}
        return True

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(('Experiment', name)))

    def patch_experiment_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        self.objects[('Experiment', name)]['status'] = {k: v for k, v in status.items() if v is not None}
        return True

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((obj['metadata']['name'], reason, message))

    def list_trainer_jobs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        return [o for (kind, _), o in list(self.objects.items()) if kind == 'Job']

    def list_all_runs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        return [o for (kind, _), o in list(self.objects.items()) if kind == 'FinetuneRun']


class Reports:
    """The object-store seam answered by a function of (output URI, reports wanted); none by default."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer or (lambda uri, wanted: {})

    def read(self, output_uri: str, wanted: Any) -> TrainerReports:
        return TrainerReports(**self.answer(output_uri, wanted))


def run_body(name: str = 'r', **spec: Any) -> dict[str, Any]:
    return {
        'apiVersion': 'finetuner.dev/v1alpha1',
        'metadata': {'name': name, 'namespace': 'default'},
        'spec': {'model': 'm', 'trainData': 'd', **spec},
    }


@pytest.fixture
def fake() -> FakeKube:
    return FakeKube()


@pytest.fixture
def reconciler(fake: FakeKube) -> Reconciler:
    return Reconciler(fake, OperatorConfig(output='s3://b/runs'), now=lambda: NOW, reports=Reports())  # type: ignore[arg-type]


def test_reconcile_twice_creates_each_child_once(fake: FakeKube, reconciler: Reconciler) -> None:
    body = fake.add('FinetuneRun', run_body())
    reconciler.reconcile_run(body)
    reconciler.reconcile_run(fake.get_run('default', 'r'))
    created = [(kind, name) for kind, name, was_new in fake.creates if was_new]
    assert created == [('Job', 'r-trainer'), ('ConfigMap', 'r-config')], 'the Job first: it owns the ConfigMap'
    job = fake.get_job('default', 'r-trainer')
    config_map = fake.objects[('ConfigMap', 'r-config')]
    assert config_map['metadata']['ownerReferences'][0]['uid'] == job['metadata']['uid']
    assert config_map['immutable'] is True
    status = fake.get_run('default', 'r')['status']
    assert status['phase'] == 'CREATED' and status['details'] == 'Run submitted and awaits execution'
    assert status['outputUri'] == 's3://b/runs/default/r'
    assert [e[1] for e in fake.events].count('JobCreated') == 1
    assert [e[1] for e in fake.events].count('Created') == 1


def test_invalid_spec_fails_once_naming_the_field_and_creates_nothing(fake: FakeKube, reconciler: Reconciler) -> None:
    body = fake.add('FinetuneRun', run_body(epochs=0, optimizer='adam'))
    reconciler.reconcile_run(body)
    reconciler.reconcile_run(fake.get_run('default', 'r'))
    status = fake.get_run('default', 'r')['status']
    assert status['phase'] == 'FAILED' and status['reason'] == 'InvalidSpec'
    assert 'spec.epochs' in status['details'] and "did you mean 'Adam'?" in status['details']
    assert fake.creates == []
    assert [e[1] for e in fake.events] == ['InvalidSpec']


def test_a_spec_edited_invalid_while_training_fails_the_run_and_stops_its_job(
    fake: FakeKube, reconciler: Reconciler
) -> None:
    body = fake.add('FinetuneRun', run_body())
    reconciler.reconcile_run(body)
    assert fake.get_job('default', 'r-trainer') is not None
    fake.objects[('FinetuneRun', 'r')]['spec']['epochs'] = 0
    reconciler.reconcile_run(fake.get_run('default', 'r'))
    status = fake.get_run('default', 'r')['status']
    assert (status['phase'], status['reason']) == ('FAILED', 'InvalidSpec')
    assert fake.get_job('default', 'r-trainer') is None, 'a FAILED run must not keep training'


def test_suspend_toggles_the_job_and_cancel_deletes_it(fake: FakeKube, reconciler: Reconciler) -> None:
    body = fake.add('FinetuneRun', run_body())
    reconciler.reconcile_run(body)
    fake.objects[('FinetuneRun', 'r')]['spec']['suspend'] = True
    reconciler.reconcile_run(fake.get_run('default', 'r'))
    assert fake.get_job('default', 'r-trainer')['spec']['suspend'] is True
    fake.objects[('FinetuneRun', 'r')]['metadata']['annotations'] = {'run.finetuner.dev/cancel': 'true'}
    reconciler.reconcile_run(fake.get_run('default', 'r'))
    assert fake.get_job('default', 'r-trainer') is None
    status = fake.get_run('default', 'r')['status']
    assert (status['phase'], status['reason'], status['details']) == ('FAILED', 'Cancelled', 'Run cancelled by user')


def test_suspending_a_queued_run_gives_its_job_back(fake: FakeKube, reconciler: Reconciler) -> None:
    body = fake.add('FinetuneRun', run_body(queueName='q'))
    reconciler.reconcile_run(body)
    assert fake.get_job('default', 'r-trainer')['spec']['suspend'] is True
    assert fake.get_run('default', 'r')['status']['details'] == 'Waiting in queue q'
    fake.objects[('FinetuneRun', 'r')]['spec']['suspend'] = True
    reconciler.reconcile_run(fake.get_run('default', 'r'))
    assert fake.get_job('default', 'r-trainer') is None


def test_runs_join_their_experiment_and_it_counts_them(fake: FakeKube, reconciler: Reconciler) -> None:
    experiment = fake.add('Experiment', {'metadata': {'name': 'exp', 'namespace': 'default'}, 'spec': {}})
    for name in ('a', 'b'):
        reconciler.reconcile_run(fake.add('FinetuneRun', run_body(name, experiment='exp')))
    fake.objects[('FinetuneRun', 'b')]['status'] = {'phase': 'FINISHED', 'metrics': {'after': {'mrr': 0.7}}}
    reconciler.sync_experiment('default', 'exp')
    run = fake.get_run('default', 'a')
    assert run['metadata']['labels']['finetuner.dev/experiment'] == 'exp'
    assert run['metadata']['ownerReferences'][0]['uid'] == experiment['metadata']['uid']
    status = fake.get_experiment('default', 'exp')['status']
    assert status['runs'] == {'total': 2, 'created': 1, 'started': 0, 'finished': 1, 'failed': 0}
    assert status['bestRun'] == {'name': 'b', 'metric': 'mrr', 'value': 0.7}


def test_sweep_creates_runs_within_parallelism(fake: FakeKube, reconciler: Reconciler) -> None:
    spec = {
        'runTemplate': {'model': 'm', 'trainData': 'd'},
        'sweep': {'parameters': {'learningRate': [1e-4, 1e-3], 'epochs': [1, 2]}, 'parallelism': 2},
    }
    fake.add('Experiment', {'metadata': {'name': 'sw', 'namespace': 'default'}, 'spec': spec})
    reconciler.sync_experiment('default', 'sw')
    runs = fake.list_runs('default', 'finetuner.dev/experiment=sw')
    assert sorted(r['metadata']['name'] for r in runs) == ['sw-000', 'sw-001']
    reconciler.sync_experiment('default', 'sw')
    assert len(fake.list_runs('default', 'finetuner.dev/experiment=sw')) == 2  # still 2 active
    fake.objects[('FinetuneRun', 'sw-000')]['status'] = {'phase': 'FINISHED'}
    reconciler.sync_experiment('default', 'sw')
    assert len(fake.list_runs('default', 'finetuner.dev/experiment=sw')) == 3
    assert fake.get_experiment('default', 'sw')['status']['sweepCreated'] == 3


def test_grid_and_random_sweep_points() -> None:
    grid = Sweep(parameters={'epochs': [1, 2], 'loss': ['TripletMarginLoss', 'ArcFaceLoss']})
    assert len(experiments.sweep_points(grid)) == 4
    drawn = Sweep(kind='random', parameters={'epochs': [1, 2, 3, 4]}, count=3, seed=7)
    first, second = experiments.sweep_points(drawn), experiments.sweep_points(drawn)
    assert first == second and len({p['epochs'] for p in first}) == 3
    assert experiments.sweep_run_name('x' * 60, 3).endswith('-003')
    assert len(experiments.sweep_run_name('x' * 60, 3)) <= 52


def test_best_run_min_mode_and_no_finished_run() -> None:
    runs = [
        {'metadata': {'name': 'a'}, 'status': {'phase': 'FINISHED', 'metrics': {'after': {'loss': 0.3}}}},
        {'metadata': {'name': 'b'}, 'status': {'phase': 'FINISHED', 'metrics': {'after': {'loss': 0.2}}}},
        {'metadata': {'name': 'c'}, 'status': {'phase': 'STARTED', 'metrics': {'after': {'loss': 0.1}}}},
    ]
    best = experiments.best_run(runs, BestRunSelector(metric='loss', mode='min'))
    assert best is not None and best.name == 'b'
    assert experiments.best_run(runs[2:], BestRunSelector(metric='loss')) is None


def test_api_calls_come_from_the_seam_decorators() -> None:
    declared = set()
    for name in dir(kube.Kube):
        declared |= set(getattr(getattr(kube.Kube, name), '__api_calls__', ()))
    assert kube.API_CALLS == frozenset(declared)
    assert ('batch', 'jobs', 'create') in kube.API_CALLS
    assert ('finetuner.dev', 'finetuneruns/status', 'patch') in kube.API_CALLS
    assert ('', 'events', 'create') in kube.KOPF_CALLS


class CallLog:
    """The fake seam with every call recorded in order (method name and first string arguments)."""

    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.fake, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            kind = args[0].get('kind') if args and isinstance(args[0], dict) else None
            self.calls.append(f'{name}:{kind}' if kind else name)
            return method(*args, **kwargs)

        return recorded


def test_a_new_run_asks_for_its_job_first_and_reads_nothing_back(fake: FakeKube) -> None:
    log = CallLog(fake)
    reads: list[str] = []

    def read(uri: str, wanted: Any) -> dict[str, Any]:
        reads.append(uri)
        return {}

    reconciler = Reconciler(log, OperatorConfig(output='s3://b/runs'), now=lambda: NOW, reports=Reports(read))  # type: ignore[arg-type]
    reconciler.reconcile_run(fake.add('FinetuneRun', run_body()))
    # get_job is answered by the operator's cache (no request); the ServiceAccount is looked up once.
    creates = [c for c in log.calls if c.startswith('create_child')]
    assert creates == ['create_child:Job', 'create_child:ConfigMap'], log.calls
    first_event = next(i for i, call in enumerate(log.calls) if call.startswith('post_event'))
    assert log.calls.index('create_child:Job') < first_event, 'nothing is asked before the Job is created'
    assert log.calls.count('get_service_account') == 1 and 'list_pods' not in log.calls, log.calls
    assert reads == [], 'a Job without pods has no reports to read'
    assert fake.get_run('default', 'r')['status']['jobName'] == 'r-trainer'

    log.calls.clear()
    reconciler.reconcile_run(fake.add('FinetuneRun', run_body('second')))
    assert 'get_service_account' not in log.calls, 'a ServiceAccount seen a moment ago is not looked up again'

    log.calls.clear()
    reconciler.reconcile_run(fake.get_run('default', 'r'))  # a second pass (resume) finds the Job
    assert 'get_job' in log.calls
    assert [c for c in fake.creates if c[2] and c[1].startswith('r-')] == [
        ('Job', 'r-trainer', True),
        ('ConfigMap', 'r-config', True),
    ]


def test_a_joined_run_does_not_read_its_experiment_again(fake: FakeKube, reconciler: Reconciler) -> None:
    fake.add('Experiment', {'metadata': {'name': 'exp', 'namespace': 'default'}, 'spec': {}})
    reconciler.reconcile_run(fake.add('FinetuneRun', run_body(experiment='exp')))
    log = CallLog(fake)
    again = Reconciler(log, OperatorConfig(output='s3://b/runs'), now=lambda: NOW, reports=Reports())  # type: ignore[arg-type]
    again.reconcile_run(fake.get_run('default', 'r'))
    assert 'get_experiment' not in log.calls and 'patch_run' not in log.calls, log.calls


def test_experiment_recounts_are_coalesced_in_the_background(fake: FakeKube) -> None:
    import time

    fake.add('Experiment', {'metadata': {'name': 'exp', 'namespace': 'default'}, 'spec': {}})
    log = CallLog(fake)
    config = OperatorConfig(output='s3://b/runs')
    reconciler = Reconciler(log, config, now=lambda: NOW, reports=Reports(), experiment_delay=0.2)  # type: ignore[arg-type]
    try:
        for name in ('a', 'b', 'c'):
            reconciler.reconcile_run(fake.add('FinetuneRun', run_body(name, experiment='exp')))
        assert 'list_runs' not in log.calls, 'recounts wait for the delay'
        deadline = time.monotonic() + 10
        while (fake.get_experiment('default', 'exp').get('status') or {}).get('runs') is None:
            assert time.monotonic() < deadline, 'the Experiment was never recounted'
            time.sleep(0.02)
        assert log.calls.count('list_runs') == 1, 'three transitions, one recount'
        assert fake.get_experiment('default', 'exp')['status']['runs']['created'] == 3
    finally:
        reconciler.close()
    reconciler.request_experiment_sync('default', 'exp')  # after close: dropped, no thread left behind
    assert log.calls.count('list_runs') == 1


def test_only_the_reports_the_job_state_can_use_are_read(tmp_path: Any) -> None:
    from finetuner_operator.reports import StoreReports, reports_to_read

    def job(condition: str | None) -> dict[str, Any]:
        conditions = [{'type': condition, 'status': 'True'}] if condition else []
        return {'spec': {}, 'status': {'conditions': conditions}}

    def pod(phase: str) -> dict[str, Any]:
        return {'metadata': {'name': 'p'}, 'status': {'phase': phase}}

    assert reports_to_read(job(None), []) == ()
    assert reports_to_read(job(None), [pod('Pending')]) == ()
    assert reports_to_read(job(None), [pod('Running')]) == ('metrics', 'progress')
    assert reports_to_read(job('Complete'), []) == ('artifact', 'metrics', 'progress')
    assert reports_to_read(job('Failed'), [pod('Failed')]) == ('failure', 'metrics', 'progress')

    out = tmp_path / 'run'
    (out / 'artifact').mkdir(parents=True)
    (out / 'artifact' / 'manifest.json').write_text('{}')
    (out / 'progress.json').write_text('{"epoch": 1, "epochs": 2, "percent": 50}')
    assert StoreReports().read(out.as_uri(), ('progress',)).model_fields_set == {'progress'}
    assert StoreReports().read(out.as_uri()).artifact is True


def test_event_passes_of_a_busy_run_are_coalesced(fake: FakeKube, reconciler: Reconciler) -> None:
    import threading
    import time

    reconciler.reconcile_run(fake.add('FinetuneRun', run_body()))
    inside, release = threading.Event(), threading.Event()
    reads: list[str] = []
    get_run = fake.get_run

    def slow_get_run(namespace: str, name: str) -> dict[str, Any] | None:
        reads.append(name)
        inside.set()
        release.wait(10)
        return get_run(namespace, name)

    fake.get_run = slow_get_run  # type: ignore[method-assign]
    running = threading.Thread(target=reconciler.sync_run, args=('default', 'r'))
    running.start()
    assert inside.wait(10)
    waiting = threading.Thread(target=reconciler.sync_run, args=('default', 'r'), kwargs={'coalesce': True})
    waiting.start()
    deadline = time.monotonic() + 10
    while not reconciler.locks.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reconciler.sync_run('default', 'r', coalesce=True) is None, 'a pass already waits: this one is dropped'
    release.set()
    running.join(10)
    waiting.join(10)
    assert reads == ['r', 'r'], 'the running pass and the one waiting read the run; the third did not'
    assert reconciler.sync_run('default', 'r', coalesce=True) is not None, 'an idle run is synced at once'


def test_active_runs_are_re_observed_by_one_background_thread(fake: FakeKube) -> None:
    """A run with no status (its create event given up on) and an active run are synced again; a
    terminal or forgotten run is not."""
    import time

    log = CallLog(fake)
    reconciler = Reconciler(log, OperatorConfig(output='s3://b/runs'), now=lambda: NOW, reports=Reports())  # type: ignore[arg-type]
    fake.add('FinetuneRun', run_body('lost'))  # Kopf never handled its creation
    reconciler.track('default', 'lost', None)
    reconciler.track('default', 'done', 'FINISHED')
    reconciler.track('default', 'gone', 'STARTED')
    reconciler.forget('default', 'gone')
    assert reconciler.active_runs() == [('default', 'lost')]
    reconciler.start_resync(0.05)
    try:
        deadline = time.monotonic() + 10
        while (fake.get_run('default', 'lost').get('status') or {}).get('phase') != 'CREATED':
            assert time.monotonic() < deadline, 'the lost run was never reconciled'
            time.sleep(0.02)
    finally:
        reconciler.close()
    assert fake.get_job('default', 'lost-trainer') is not None, 'its Job was created by the periodic pass'


def test_a_job_that_failed_before_its_creating_pass_read_it_is_read_not_assumed(
    fake: FakeKube, reconciler: Reconciler
) -> None:
    """A Job can report (here: fail at once) before the pass that created it takes the run's lock; the pass
    that Job event triggered is then dropped for the creating one, which must read the Job the watch brought
    into the cache instead of taking its bare manifest (the run stayed CREATED: operator_scale's paced runs)."""
    from finetuner_operator.cache import JOBS, ObjectCache

    fake.cache = ObjectCache()  # type: ignore[attr-defined]
    create = fake.create_child
    failed = {'failed': 1, 'conditions': [{'type': 'Failed', 'status': 'True', 'reason': 'BackoffLimitExceeded'}]}

    def create_then_fail(body: dict[str, Any]) -> bool:
        created = create(body)
        if body['kind'] == 'Job':  # the watch event of the failed Job arrives during the pass
            job = fake.objects[('Job', body['metadata']['name'])]
            job['status'] = failed
            fake.cache.put(JOBS, {'apiVersion': 'batch/v1', **copy.deepcopy(job)})  # type: ignore[attr-defined]
        return created

    fake.create_child = create_then_fail  # type: ignore[method-assign]
    reconciler.reconcile_run(fake.add('FinetuneRun', run_body()))
    assert fake.objects[('FinetuneRun', 'r')]['status']['phase'] == 'FAILED'
