"""FINETUNER_MAX_CONCURRENT_RUNS on the test cluster: five runs submitted at once with a limit of two all
finish, never more than two trainer Jobs or pods are active at once in the API server's history, and
the runs beyond the limit wait in CREATED/Waiting, without a Job, until a slot is free."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.reliability.test_faults import STAND_IN, history, submit, target

G, V = 'finetuner.dev', 'v1alpha1'
RUNS = [f'limited-{i}' for i in range(5)]


def _conditions(obj: dict[str, Any]) -> set[str]:
    return {c['type'] for c in (obj.get('status') or {}).get('conditions') or [] if c.get('status') == 'True'}


def job_active(job: dict[str, Any]) -> bool:
    return not job['spec'].get('suspend') and not _conditions(job) & {'Complete', 'Failed'}


def pod_active(pod: dict[str, Any]) -> bool:
    return (pod.get('status') or {}).get('phase') not in ('Succeeded', 'Failed') and not pod['metadata'].get(
        'deletionTimestamp'
    )


def most_active_at_once(cluster: Cluster, key: str, active: Any) -> int:
    """Over the API server's whole history of ``key``: the most trainer objects active together."""
    now: set[str] = set()
    most = 0
    for type_, old, new in history(cluster, key):
        obj = new or old
        if obj is None or 'finetuner.dev/run' not in (obj['metadata'].get('labels') or {}):
            continue
        name = obj['metadata']['name']
        if type_ == 'DELETED' or not active(obj):
            now.discard(name)
        else:
            now.add(name)
        most = max(most, len(now))
    return most


def first_version(cluster: Cluster, key: str, matches: Any) -> dict[str, int]:
    """For each run: the resourceVersion at which ``matches(type, new)`` first held in the history of ``key``."""
    found: dict[str, int] = {}

    def scan() -> None:
        for rv, k, type_, _, new in cluster.server.emu.history:
            if k == key and new is not None and matches(type_, new):
                run = new['metadata'].get('labels', {}).get('finetuner.dev/run') or new['metadata']['name']
                found.setdefault(run, rv)

    cluster.server.call(scan)
    return found


@pytest.mark.operator_config(max_concurrent_runs=2)
@pytest.mark.node(command=STAND_IN)
def test_at_most_two_runs_train_at_once_and_the_others_wait_for_a_slot(cluster: Cluster) -> None:
    for name in RUNS:
        submit(cluster, name, seconds=1.0)
    run = target(cluster, timeout=120.0)

    def three_waiting() -> list[dict[str, Any]] | None:
        statuses = [run.run_body(name).get('status') or {} for name in RUNS]
        waiting = [s for s in statuses if s.get('reason') == 'Waiting']
        return waiting if len(waiting) == 3 else None

    waiting = wait_for(three_waiting, 30, 0.05, what='three runs waiting for a slot')
    assert all(s['phase'] == 'CREATED' for s in waiting)
    assert all('2 of 2 runs allowed at once (FINETUNER_MAX_CONCURRENT_RUNS)' in s['details'] for s in waiting)

    for name in RUNS:
        assert run.wait_phase(name, ('FINISHED', 'FAILED'))['phase'] == 'FINISHED', name
        assert len(run.jobs(name)) == 1

    assert most_active_at_once(cluster, 'batch/v1/jobs', job_active) == 2
    assert most_active_at_once(cluster, 'v1/pods', pod_active) == 2

    # Each run that waited did so before its Job existed, and got it later.
    waited = first_version(
        cluster, f'{G}/{V}/finetuneruns', lambda t, new: (new.get('status') or {}).get('reason') == 'Waiting'
    )
    created = first_version(cluster, 'batch/v1/jobs', lambda t, new: t == 'ADDED')
    assert len(waited) >= 3, waited
    assert set(created) == set(RUNS)
    assert all(waited[name] < created[name] for name in waited), (waited, created)

    def announced() -> bool:
        return all({'Waiting', 'Admitted'} <= {e.reason for e in run.events(name)} for name in waited)

    wait_for(announced, 30, 0.1, what='Waiting and Admitted events of the runs that waited')
