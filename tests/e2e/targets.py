"""Where the end-to-end scenarios run: the simulated cluster here, or a real one (``-m cluster``).

A :class:`Target` gives a scenario what it needs whatever the cluster: the SDK logged in with
the kubernetes backend, a client of the API server, the bucket of the object store, and a way
to read it. The real target takes its settings from the environment (see docs/OPERATOR.md):

- ``KUBECONFIG`` (or ~/.kube/config): a cluster with the Helm chart installed;
- ``FINETUNER_E2E_NAMESPACE`` (default ``finetuner-e2e``): where runs are created;
- ``FINETUNER_E2E_BUCKET``: the chart's bucket (operator setting FINETUNER_DATA = s3://<bucket>);
- ``FINETUNER_E2E_GPUS`` (default 0): GPUs per run; 0 trains on the CPU (kind);
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``FINETUNER_S3_ENDPOINT``: the store, as the test
  machine reaches it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster.harness import wait_for


@dataclass
class Target:
    name: str
    api: Any
    namespace: str
    bucket: str
    timeout: float
    gpus: int = 1  # the simulated node has two; FINETUNER_E2E_GPUS on a real cluster (default 0: CPU)
    restart_operator: Callable[[], None] | None = None
    pause_node: Callable[[bool], None] | None = None

    def login(self) -> Any:
        import finetuner

        return finetuner.login(backend='kubernetes', namespace=self.namespace, bucket=self.bucket)

    def s3_keys(self, prefix: str) -> list[str]:
        import boto3

        client = boto3.client('s3', endpoint_url=os.environ.get('FINETUNER_S3_ENDPOINT'))
        pages = client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o['Key'] for page in pages for o in page.get('Contents', []))

    def jobs(self, run: str) -> list[Any]:
        from kubernetes import client

        batch = client.BatchV1Api(self.api)
        return batch.list_namespaced_job(self.namespace, label_selector=f'finetuner.dev/run={run}').items

    def pods(self, run: str) -> list[Any]:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        return core.list_namespaced_pod(self.namespace, label_selector=f'finetuner.dev/run={run}').items

    def run_body(self, run: str) -> dict[str, Any]:
        from kubernetes import client

        return client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            'finetuner.dev', 'v1alpha1', self.namespace, 'finetuneruns', run
        )

    def events(self, run: str) -> list[Any]:
        from kubernetes import client

        items = client.CoreV1Api(self.api).list_namespaced_event(self.namespace).items
        return [e for e in items if e.involved_object.name == run and e.involved_object.kind == 'FinetuneRun']

    def wait_phase(self, run: str, phases: tuple[str, ...], timeout: float | None = None) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.run_body(run).get('status') or {}
            return status if status.get('phase') in phases else None

        return wait_for(reached, timeout or self.timeout, 0.1, what=f'run {run} in {phases}')


def real_target() -> Target:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    except Exception as e:  # no kubeconfig: the opt-in suite cannot run here
        pytest.skip(f'-m cluster needs a kubeconfig pointing at a cluster with the chart installed: {e}')
    bucket = os.environ.get('FINETUNER_E2E_BUCKET')
    if not bucket:
        pytest.skip('-m cluster needs FINETUNER_E2E_BUCKET (the bucket the chart was installed with)')
    namespace = os.environ.get('FINETUNER_E2E_NAMESPACE', 'finetuner-e2e')
    gpus = int(os.environ.get('FINETUNER_E2E_GPUS', '0'))
    return Target('real', kubernetes.client.ApiClient(configuration), namespace, bucket, timeout=900.0, gpus=gpus)


def unique(prefix: str) -> str:
    return f'{prefix}-{int(time.time() * 1000) % 10**8}'
