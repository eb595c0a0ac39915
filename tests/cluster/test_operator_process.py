"""``python -m finetuner_operator`` as its own process: config from env, liveness, metrics, a Job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from kubernetes import client

from tests.cluster.fixtures import api_client, create_trainer_service_account
from tests.cluster.harness import ApiServer, free_port, wait_for


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def test_module_entry_point_serves_health_and_metrics_and_reconciles(
    api_server: tuple[ApiServer, Path], tmp_path: Path
) -> None:
    _, kubeconfig = api_server
    health, metrics = free_port(), free_port()
    env = {
        **os.environ,
        'KUBECONFIG': str(kubeconfig),
        'FINETUNER_HEALTH_PORT': str(health),
        'FINETUNER_METRICS_PORT': str(metrics),
        'FINETUNER_TRAINER_IMAGE': 'registry.local/trainer:9',
        'FINETUNER_OUTPUT': 'file:///nowhere/runs',
    }
    log = (tmp_path / 'operator.log').open('wb')
    process = subprocess.Popen([sys.executable, '-m', 'finetuner_operator'], env=env, stdout=log, stderr=log)
    try:
        wait_for(lambda: _get(f'http://127.0.0.1:{health}/healthz'), 60, 0.2, what='liveness endpoint')
        api = api_client(kubeconfig)
        create_trainer_service_account(api)
        body = {
            'apiVersion': 'finetuner.dev/v1alpha1',
            'kind': 'FinetuneRun',
            'metadata': {'name': 'proc'},
            'spec': {'model': 'm', 'trainData': 'd'},
        }
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            'finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', body
        )
        job = wait_for(
            lambda: client.BatchV1Api(api).list_namespaced_job('default').items, 60, 0.1, what='trainer Job'
        )[0]
        assert job.spec.template.spec.containers[0].image == 'registry.local/trainer:9'
        text = wait_for(
            lambda: (
                (t := _get(f'http://127.0.0.1:{metrics}/metrics')) and 'finetuner_runs{phase="CREATED"} 1.0' in t and t
            ),
            30,
            0.2,
            what='runs-by-phase metric',
        )
        assert 'finetuner_reconcile_seconds_count{kind="run"}' in text
        api.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert process.returncode == 0, (tmp_path / 'operator.log').read_text()[-3000:]
