"""A single writer: operators elect a leader on a coordination.k8s.io Lease and the others stay passive.

First the elector alone against the test cluster's API server (the Lease rules of client-go's
leaderelection), then two ``python -m finetuner_operator`` processes: the second opens no watch and
creates nothing until the first goes, then takes over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetuner_operator.kube import Kube
from finetuner_operator.leader import LeaderElector
from tests.cluster.fixtures import api_client, create_trainer_service_account
from tests.cluster.harness import ApiServer, free_port, wait_for

LEASE_NS, LEASE = 'default', 'finetuner-operator'


def _elector(kubeconfig: Path, identity: str, **timing: float) -> LeaderElector:
    durations = {'lease_duration': 2.0, 'renew_deadline': 1.0, 'retry_period': 0.2, **timing}
    return LeaderElector(Kube(api_client(kubeconfig)), LEASE_NS, LEASE, identity, **durations)


def _lease(kubeconfig: Path) -> dict[str, Any]:
    lease = Kube(api_client(kubeconfig)).get_lease(LEASE_NS, LEASE)
    assert lease is not None
    return lease['spec']


def test_one_holder_at_a_time_and_a_takeover_only_after_the_lease_expires(
    api_server: tuple[ApiServer, Path],
) -> None:
    _, kubeconfig = api_server
    first, second = _elector(kubeconfig, 'first'), _elector(kubeconfig, 'second')
    assert first.try_acquire_or_renew()
    assert not second.try_acquire_or_renew(), 'held and renewed: not free'
    spec = _lease(kubeconfig)
    assert (spec['holderIdentity'], spec['leaseDurationSeconds'], spec['leaseTransitions']) == ('first', 2, 0)

    first.start_renewing(on_lost=lambda: None)
    stop = threading.Event()
    threading.Timer(2.5, stop.set).start()
    assert not second.acquire(stop), 'a renewed Lease never expires'

    first.stop(release=False)  # as if its process died: the Lease is not given back
    began = time.monotonic()
    assert second.acquire(threading.Event())
    assert time.monotonic() - began >= 1.5, 'taken over only once the record stood still for the lease duration'
    spec = _lease(kubeconfig)
    assert (spec['holderIdentity'], spec['leaseTransitions']) == ('second', 1)

    second.stop(release=True)
    assert _lease(kubeconfig)['holderIdentity'] == ''
    third = _elector(kubeconfig, 'third')
    assert third.try_acquire_or_renew(), 'a released Lease is free at once'


def test_a_leader_that_cannot_renew_gives_up_before_the_lease_expires(api_server: tuple[ApiServer, Path]) -> None:
    _, kubeconfig = api_server
    leader = _elector(kubeconfig, 'leader')
    assert leader.try_acquire_or_renew()
    lost = threading.Event()
    leader.start_renewing(on_lost=lost.set)
    # Someone else writes the Lease as its holder (a partition healed the wrong way): renewals now fail.
    kube = Kube(api_client(kubeconfig))
    lease = kube.get_lease(LEASE_NS, LEASE)
    assert lease is not None
    assert kube.update_lease({**lease, 'spec': {**lease['spec'], 'holderIdentity': 'usurper'}}) is not None
    assert lost.wait(5), 'on_lost within the renew deadline'
    assert leader.lost and not leader.leading
    leader.stop()
    assert _lease(kubeconfig)['holderIdentity'] == 'usurper', 'a leader that lost does not release'


def test_a_renew_deadline_not_shorter_than_the_lease_is_refused(api_server: tuple[ApiServer, Path]) -> None:
    _, kubeconfig = api_server
    with pytest.raises(ValueError, match=r'FINETUNER_LEASE_RENEW_DEADLINE \(15.0\) must be shorter than'):
        _elector(kubeconfig, 'x', lease_duration=15.0, renew_deadline=15.0)


def _health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2) as response:
            return json.loads(response.read() or b'{}')
    except (OSError, ValueError):
        return None


def _operator(kubeconfig: Path, identity: str, health: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        'KUBECONFIG': str(kubeconfig),
        'FINETUNER_LEADER_ELECTION': 'true',
        'FINETUNER_IDENTITY': identity,
        'FINETUNER_LEASE_NAMESPACE': LEASE_NS,
        'FINETUNER_LEASE_DURATION': '3',
        'FINETUNER_LEASE_RENEW_DEADLINE': '2',
        'FINETUNER_LEASE_RETRY_PERIOD': '0.3',
        'FINETUNER_HEALTH_PORT': str(health),
        'FINETUNER_METRICS_PORT': '0',
        'FINETUNER_OUTPUT': 'file:///nowhere/runs',
    }
    env.pop('KUBERNETES_SERVICE_HOST', None)
    with log.open('ab') as sink:
        return subprocess.Popen([sys.executable, '-m', 'finetuner_operator'], env=env, stdout=sink, stderr=sink)


def _run(name: str) -> dict[str, Any]:
    return {
        'apiVersion': 'finetuner.dev/v1alpha1',
        'kind': 'FinetuneRun',
        'metadata': {'name': name},
        'spec': {'model': 'm', 'trainData': 'd'},
    }


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


@pytest.mark.timeout(240)
def test_a_second_operator_stays_passive_until_the_leader_goes(
    api_server: tuple[ApiServer, Path], tmp_path: Path
) -> None:
    server, kubeconfig = api_server
    api = api_client(kubeconfig)
    create_trainer_service_account(api)
    runs = client.CustomObjectsApi(api)
    batch = client.BatchV1Api(api)
    runs_watched = 'finetuner.dev/v1alpha1/finetuneruns'
    health_a, health_b = free_port(), free_port()
    a = _operator(kubeconfig, 'operator-a', health_a, tmp_path / 'a.log')
    b: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: server.emu.watch_starts.get(runs_watched, 0) >= 1, 60, 0.1, what='the leader watches')
        b = _operator(kubeconfig, 'operator-b', health_b, tmp_path / 'b.log')
        assert wait_for(lambda: _health(health_b), 60, 0.2, what='the standby answers its liveness probe') == {
            'standby': True
        }
        runs.create_namespaced_custom_object('finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', _run('one'))
        wait_for(lambda: batch.list_namespaced_job('default').items, 30, 0.1, what='the leader creates the Job')
        time.sleep(2.0)  # several of the standby's retry periods
        assert server.emu.watch_starts.get(runs_watched) == 1, 'the standby opened no watch'
        assert [j.metadata.name for j in batch.list_namespaced_job('default').items] == ['one-trainer']
        assert _stop(a) == 0, (tmp_path / 'a.log').read_text()[-3000:]
        lease = Kube(api_client(kubeconfig)).get_lease(LEASE_NS, LEASE)
        assert lease is not None
        wait_for(lambda: server.emu.watch_starts.get(runs_watched, 0) >= 2, 60, 0.1, what='the standby took over')
        holder = Kube(api_client(kubeconfig)).get_lease(LEASE_NS, LEASE)
        assert holder is not None and holder['spec']['holderIdentity'] == 'operator-b'
        assert holder['spec']['leaseTransitions'] == 1
        runs.create_namespaced_custom_object('finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', _run('two'))
        wait_for(
            lambda: len(batch.list_namespaced_job('default').items) == 2, 30, 0.1, what='the new leader reconciles'
        )
        assert 'standby' not in (_health(health_b) or {'standby': True}), 'Kopf now answers the probe'
    finally:
        _stop(a)
        if b is not None:
            assert _stop(b) == 0, (tmp_path / 'b.log').read_text()[-3000:]
        api.close()
