"""Load: many runs submitted at once, half through the SDK and half as raw manifests (``kubectl apply``).

Every run reaches a terminal phase exactly once, none is lost or duplicated (one Job, one pod each),
and the resident memory of the operator's own process (``python -m finetuner_operator``, apart from
the API server, the node and moto, which stay in the test's process) does not grow from one wave to
the next. The trainer is the standard-library stand-in: the load is on the operator, the API server
and the node.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import finetuner
from finetuner_operator.builders import CONFIG_PATH
from tests.cluster.fixtures import Cluster
from tests.cluster.harness import OperatorProcess, wait_for
from tests.e2e.targets import Target

G, V, NS = 'finetuner.dev', 'v1alpha1', 'default'
STAND_IN = [sys.executable, str(Path(__file__).with_name('stand_in_trainer.py')), '--config', CONFIG_PATH]
RUNS = int(os.environ.get('FINETUNER_LOAD_RUNS', '100'))  # two waves of RUNS / 2; the size is 500
MAX_GROWTH_MB = 20.0


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    pages = int(Path(f'/proc/{pid}/statm').read_text().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') / 2**20


def manifest(name: str, bucket: str) -> dict[str, Any]:
    return {
        'apiVersion': f'{G}/{V}',
        'kind': 'FinetuneRun',
        'metadata': {'name': name, 'labels': {'load': 'yes'}},
        'spec': {'model': 'stand-in', 'trainData': f's3://{bucket}/data/train.jsonl', 'resources': {'gpus': 0}},
    }


def phases(cluster: Cluster) -> dict[str, str | None]:
    runs = cluster.server.objects(f'{G}/{V}/finetuneruns')
    return {r['metadata']['name']: (r.get('status') or {}).get('phase') for r in runs}


def submit_wave(cluster: Cluster, wave: int, count: int) -> list[str]:
    names = [f'load-{wave}-{i:04d}' for i in range(count)]
    custom = client.CustomObjectsApi(cluster.api)

    def submit(index_name: tuple[int, str]) -> None:
        index, name = index_name
        if index % 2:
            custom.create_namespaced_custom_object(G, V, NS, 'finetuneruns', manifest(name, cluster.bucket))
        else:
            finetuner.fit(model='stand-in', train_data=f's3://{cluster.bucket}/data/train.jsonl', run_name=name, gpus=0)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, enumerate(names)))
    return names


@pytest.mark.slow  # 500 runs through the whole chain
@pytest.mark.node(command=STAND_IN, poll=0.2)
@pytest.mark.operator_config(progress_interval=5.0)
@pytest.mark.operator_process
def test_runs_submitted_at_once_all_end_once_and_memory_stays_flat(cluster: Cluster) -> None:
    assert isinstance(cluster.operator, OperatorProcess)
    Target('simulated', cluster.api, NS, cluster.bucket, timeout=60.0).login()
    half = RUNS // 2
    submitted: list[str] = []
    memory: list[float] = []
    started = time.monotonic()
    for wave in (1, 2):
        submitted += submit_wave(cluster, wave, half)
        wait_for(
            lambda: all(p in ('FINISHED', 'FAILED') for p in phases(cluster).values()),
            600,
            1.0,
            what=f'wave {wave} terminal',
        )
        memory.append(rss_mb(cluster.operator.pid))
    elapsed = time.monotonic() - started

    final = phases(cluster)
    assert sorted(final) == sorted(submitted), 'no run lost, none added'
    assert Counter(final.values()) == {'FINISHED': RUNS}
    jobs = Counter(j['metadata']['labels']['finetuner.dev/run'] for j in cluster.server.objects('batch/v1/jobs'))
    pods = Counter(p['metadata']['labels']['finetuner.dev/run'] for p in cluster.server.objects('v1/pods'))
    assert set(jobs) == set(submitted) and set(jobs.values()) == {1}, 'one Job per run'
    assert set(pods) == set(submitted) and set(pods.values()) == {1}, 'one pod per run, none retried'
    growth = memory[1] - memory[0]
    print(f'\nload: {RUNS} runs in {elapsed:.0f}s; operator process RSS {memory[0]:.1f} -> {memory[1]:.1f} MiB')
    assert growth < MAX_GROWTH_MB, f'memory grew {growth:.0f} MiB over the second wave of {half} runs'
