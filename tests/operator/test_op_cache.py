"""The operator's object cache and the seam's reads through it: newest wins, deletions stick, a synced
kind answers misses, listings replace what they cover, and a pass reads nothing from the API server."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest

from finetuner.api.v1alpha1 import FinetuneRunSpec, FinetuneRunStatus
from finetuner_operator import builders
from finetuner_operator.cache import JOBS, PODS, RUNS, ObjectCache, strip_job, strip_pod
from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube, _equalities
from finetuner_operator.status import Observed, derive_status

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def obj(name: str, version: int | str, namespace: str = 'ns', **fields: Any) -> dict[str, Any]:
    meta = {'name': name, 'namespace': namespace, 'resourceVersion': str(version), **fields.pop('meta', {})}
    return {'metadata': meta, **fields}


def pod(name: str, run: str, version: int, phase: str = 'Running') -> dict[str, Any]:
    return obj(
        name,
        version,
        meta={'labels': {builders.RUN_LABEL: run}},
        spec={'containers': [{'name': 'trainer', 'image': 'img', 'env': [{'name': 'X', 'value': 'y'}]}]},
        status={'phase': phase},
    )


def test_an_older_object_never_replaces_a_newer_one() -> None:
    cache = ObjectCache()
    assert cache.put(RUNS, obj('r', 5, status={'phase': 'STARTED'}))
    assert not cache.put(RUNS, obj('r', 4, status={'phase': 'CREATED'}))  # a slow write's answer
    assert cache.get(RUNS, 'ns', 'r')['status'] == {'phase': 'STARTED'}
    assert cache.put(RUNS, obj('r', 5, status={'phase': 'STARTED'}))  # the same version again is fine
    assert cache.put(RUNS, obj('r', 'opaque', status={'phase': 'FINISHED'}))  # not a number: taken as newer
    assert cache.get(RUNS, 'ns', 'r')['status'] == {'phase': 'FINISHED'}


def test_a_deletion_is_not_undone_by_a_stale_answer_but_a_new_object_is_taken() -> None:
    cache = ObjectCache()
    cache.put(JOBS, obj('j', 3))
    cache.observe(JOBS, 'DELETED', obj('j', 7))
    assert cache.get(JOBS, 'ns', 'j') is None
    assert not cache.put(JOBS, obj('j', 6))  # the create's answer, arriving after the watch said DELETED
    assert cache.get(JOBS, 'ns', 'j') is None
    assert cache.put(JOBS, obj('j', 9))  # re-created since
    assert cache.get(JOBS, 'ns', 'j') is not None
    cache.observe(JOBS, 'DELETED', obj('j', 8))  # an old deletion does not remove the newer object
    assert cache.get(JOBS, 'ns', 'j') is not None


def test_a_listing_drops_what_it_lacks_unless_newer_and_only_in_its_namespace() -> None:
    cache = ObjectCache()
    for name, version in (('gone', 3), ('kept', 4), ('fresh', 12)):
        cache.put(RUNS, obj(name, version))
    cache.put(RUNS, obj('elsewhere', 2, namespace='other'))
    cache.replace(RUNS, [obj('kept', 4), obj('listed', 9)], list_version='10', namespace='ns')
    assert sorted(name for (_, name) in cache._objects[RUNS]) == ['elsewhere', 'fresh', 'kept', 'listed']
    assert not cache.synced(RUNS)
    cache.mark_synced(RUNS)
    assert cache.synced(RUNS)
    assert not cache.put(RUNS, obj('gone', 3))  # the listing left a tombstone


def test_pods_are_indexed_by_their_run_and_follow_relabels_and_deletions() -> None:
    cache = ObjectCache()
    cache.put(PODS, pod('a-1', 'a', 1))
    cache.put(PODS, pod('a-2', 'a', 2))
    cache.put(PODS, pod('b-1', 'b', 3))
    assert sorted(p['metadata']['name'] for p in cache.pods_of_run('ns', 'a')) == ['a-1', 'a-2']
    cache.put(PODS, pod('a-2', 'b', 4))
    assert [p['metadata']['name'] for p in cache.pods_of_run('ns', 'a')] == ['a-1']
    cache.observe(PODS, 'DELETED', pod('a-1', 'a', 5))
    assert cache.pods_of_run('ns', 'a') == []
    assert sorted(p['metadata']['name'] for p in cache.pods_of_run('ns', 'b')) == ['a-2', 'b-1']
    assert cache.pods_of_run('other', 'b') == []


def test_stripped_jobs_and_pods_keep_what_the_status_is_derived_from() -> None:
    spec = FinetuneRunSpec(model='efficientnet_b0', train_data='s3://b/train.jsonl')
    owner = {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': 'r', 'uid': 'u'}}
    job = builders.build_job('r', 'ns', spec, OperatorConfig(output='s3://b/runs'), owner)
    job['metadata']['resourceVersion'] = '3'
    job['status'] = {'active': 1, 'failed': 1}
    failed = copy.deepcopy(pod('r-trainer-1', 'r', 1, phase='Failed'))
    failed['status']['containerStatuses'] = [
        {'name': builders.CONTAINER, 'state': {'terminated': {'exitCode': 1, 'message': 'CUDA error\n'}}}
    ]
    failed['spec']['containers'][0]['name'] = builders.CONTAINER
    pulling = pod('r-trainer-2', 'r', 2, phase='Pending')
    pulling['spec']['containers'][0]['name'] = builders.CONTAINER
    pulling['status']['containerStatuses'] = [
        {'name': builders.CONTAINER, 'state': {'waiting': {'reason': 'ErrImagePull', 'message': 'not found'}}}
    ]

    def status(job: dict[str, Any], pods: list[dict[str, Any]]) -> FinetuneRunStatus:
        return derive_status(
            run='r',
            spec=spec,
            previous=FinetuneRunStatus(),
            observed=Observed(job=job, pods=pods),
            output_uri='s3://b/runs/ns/r',
            queue=None,
            unschedulable_timeout=600,
            now=NOW,
        )

    for pods in ([failed], [failed, pulling]):
        assert status(strip_job(job), [strip_pod(p) for p in pods]) == status(job, pods)
    stripped = strip_job(job)
    assert 'template' not in stripped['spec'] and stripped['metadata']['labels'] == job['metadata']['labels']
    assert 'env' not in strip_pod(failed)['spec']['containers'][0]


class RecordingKube(Kube):
    """The seam with its transport replaced by a table of answers; every request is recorded."""

    def __init__(self, answers: dict[tuple[str, str], Any], cache: ObjectCache | None) -> None:
        super().__init__(api_client=None, cache=cache)
        self.answers = answers
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, path: str, body: Any = None, query: Any = None, content_type: str = '') -> Any:
        self.requests.append((method, path))
        answer = self.answers[(method, path)]
        return answer(body) if callable(answer) else copy.deepcopy(answer)


JOB_PATH = '/apis/batch/v1/namespaces/ns/jobs'
RUN_PATH = '/apis/finetuner.dev/v1alpha1/namespaces/ns/finetuneruns'


def test_reads_are_answered_from_the_cache_and_writes_fill_it() -> None:
    cache = ObjectCache()
    run = {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', **obj('r', 1)}

    def answered(body: dict[str, Any], base: dict[str, Any], version: str) -> dict[str, Any]:
        return {
            **base,
            **body,
            'metadata': {**base['metadata'], **body.get('metadata', {}), 'resourceVersion': version},
        }

    answers: dict[tuple[str, str], Any] = {
        ('GET', f'{RUN_PATH}/r'): run,
        ('POST', JOB_PATH): lambda body: answered(body, body, '2'),
        ('PATCH', f'{RUN_PATH}/r/status'): lambda body: answered(body, run, '3'),
    }
    kube = RecordingKube(answers, cache)
    assert kube.get_run('ns', 'r') == run  # not synced: asked once ...
    assert kube.get_run('ns', 'r') == run  # ... then remembered
    assert kube.requests == [('GET', f'{RUN_PATH}/r')]
    assert kube.create_job({'kind': 'Job', 'metadata': {'name': 'r-trainer', 'namespace': 'ns'}, 'spec': {}})
    assert kube.get_job('ns', 'r-trainer')['metadata']['resourceVersion'] == '2'
    assert kube.patch_run_status('ns', 'r', {'phase': 'CREATED'})
    assert kube.get_run('ns', 'r')['status'] == {'phase': 'CREATED'}
    assert [m for m, _ in kube.requests] == ['GET', 'POST', 'PATCH']
    for kind in (RUNS, JOBS, PODS):
        cache.mark_synced(kind)
    before = len(kube.requests)
    assert kube.get_job('ns', 'missing') is None  # synced: a miss means absent, nothing asked
    assert kube.get_run('ns', 'missing') is None
    assert kube.list_pods('ns', f'{builders.RUN_LABEL}=r') == []
    assert kube.list_runs('ns', 'a=b') == []
    assert len(kube.requests) == before


def test_without_a_cache_every_read_is_a_request() -> None:
    answers = {('GET', f'{JOB_PATH}/j'): obj('j', 1)}
    kube = RecordingKube(answers, cache=None)
    kube.get_job('ns', 'j')
    kube.get_job('ns', 'j')
    assert len(kube.requests) == 2


@pytest.mark.parametrize(
    ('selector', 'expected'),
    [
        (None, {}),
        ('a=b', {'a': 'b'}),
        ('a=b,c=d', {'a': 'b', 'c': 'd'}),
        ('a==b', None),
        ('a!=b', None),
        ('a in (b)', None),
        ('a', None),
    ],
)
def test_label_selectors_the_cache_can_answer(selector: str | None, expected: dict[str, str] | None) -> None:
    assert _equalities(selector) == expected
