"""Kopf handlers: the only module with decorators. Each one delegates to :mod:`reconcile`.

Run with ``python -m finetuner_operator`` or ``kopf run -m finetuner_operator.handlers``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from finetuner.api.v1alpha1 import GROUP, VERSION
from finetuner_operator import metrics
from finetuner_operator.builders import CANCEL_ANNOTATION, MANAGED_BY, RUN_LABEL
from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube
from finetuner_operator.reconcile import Reconciler

PREFIX = 'finetuner.dev'
RUNS = 'finetuneruns'
EXPERIMENTS = 'experiments'
MANAGED = {'app.kubernetes.io/managed-by': MANAGED_BY}
# A handler that failed (an API error the seam's own retries did not outlast) runs again after
# this many seconds instead of Kopf's default minute: every pass is safe to repeat.
RETRY_BACKOFF = 2.0
# An Experiment is recounted at most this often (its runs' phase changes are coalesced): a recount lists
# every run of the Experiment, and one per transition made a burst of n runs cost n^2.
EXPERIMENT_RECOUNT_DELAY = 0.25
USER_AGENT = 'finetuner-operator'
MAX_WORKERS = 16  # threads running the (synchronous) handlers
log = logging.getLogger('finetuner_operator')


def api_client() -> Any:
    """The official client, configured in-cluster or from KUBECONFIG (read now, not at import)."""
    import kubernetes

    configuration = kubernetes.client.Configuration()
    if os.environ.get('KUBERNETES_SERVICE_HOST'):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get('KUBECONFIG') or None, client_configuration=configuration
        )
    # One pooled connection per worker thread (and the background threads): with fewer, urllib3 discards
    # connections under load and opens a new one per request.
    configuration.connection_pool_maxsize = MAX_WORKERS + 8
    api = kubernetes.client.ApiClient(configuration)
    api.user_agent = USER_AGENT  # the operator's own calls are told apart in audit logs
    return api


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    if os.environ.get('KUBERNETES_SERVICE_HOST'):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = memo.get('config') or OperatorConfig.from_env()
    memo.config = config
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key='last-handled-configuration'
    )
    settings.persistence.finalizer = f'{PREFIX}/finalizer'
    settings.posting.level = logging.WARNING  # transitions are posted as Events by the reconciler
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = MAX_WORKERS
    memo.reconciler = Reconciler(Kube(api_client()), config, experiment_delay=EXPERIMENT_RECOUNT_DELAY)
    memo.reconciler.start_resync(config.progress_interval)
    metrics.serve(config.metrics_port)
    logger.info('finetuner operator configured: image %s, output %s', config.trainer_image, config.output)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    reconciler = memo.get('reconciler')
    if reconciler is not None:
        reconciler.close()
        reconciler.kube.api_client.close()


@kopf.on.probe(id='runs')
def probe_runs(**_: Any) -> int:
    """Liveness payload: how many runs this operator currently tracks."""
    return metrics.tracked_runs()


# --- FinetuneRun -------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, RUNS, backoff=RETRY_BACKOFF)
@kopf.on.create(GROUP, VERSION, RUNS, backoff=RETRY_BACKOFF)
@kopf.on.update(GROUP, VERSION, RUNS, field='spec', backoff=RETRY_BACKOFF)
@kopf.on.update(GROUP, VERSION, RUNS, field=('metadata', 'annotations', CANCEL_ANNOTATION), backoff=RETRY_BACKOFF)
def reconcile_run(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    with metrics.timed('run'):
        memo.reconciler.reconcile_run(_plain(body))


@kopf.on.delete(GROUP, VERSION, RUNS, optional=True, backoff=RETRY_BACKOFF)
def run_deleted(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    # optional: no finalizer; the Job, ConfigMap and pods go by owner-reference garbage collection.
    with metrics.timed('run'):
        memo.reconciler.run_deleted(namespace, name, _plain(body))


@kopf.on.event('batch', 'v1', 'jobs', labels=MANAGED)
def job_event(labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _sync_owner(labels, namespace, memo)


@kopf.on.event('', 'v1', 'pods', labels=MANAGED)
def pod_event(labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _sync_owner(labels, namespace, memo)


def _sync_owner(labels: kopf.Labels, namespace: str, memo: kopf.Memo) -> None:
    run = labels.get(RUN_LABEL)
    if run:
        with metrics.timed('run'):
            memo.reconciler.sync_run(namespace, run, coalesce=True)


@kopf.on.event(GROUP, VERSION, RUNS)
async def run_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the reconciler's list of runs (and their phases) for its periodic re-observation.
    Async and without API calls: it runs on Kopf's loop for every event of every run."""
    meta = body.get('metadata') or {}
    reconciler = memo.get('reconciler')
    if reconciler is None or not meta.get('name'):
        return
    if type == 'DELETED':
        reconciler.forget(meta.get('namespace'), meta['name'])
    else:
        reconciler.track(meta.get('namespace'), meta['name'], (body.get('status') or {}).get('phase'))


# --- Experiment --------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, EXPERIMENTS, backoff=RETRY_BACKOFF)
@kopf.on.create(GROUP, VERSION, EXPERIMENTS, backoff=RETRY_BACKOFF)
@kopf.on.update(GROUP, VERSION, EXPERIMENTS, field='spec', backoff=RETRY_BACKOFF)
def reconcile_experiment(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    with metrics.timed('experiment'):
        memo.reconciler.sync_experiment(namespace, name)


def _plain(body: kopf.Body) -> dict[str, Any]:
    """A plain dict copy of a Kopf body (the live view must not leak into pure code)."""
    import copy

    return copy.deepcopy(dict(body))
