"""Kopf handlers: the only module with decorators. Each one delegates to :mod:`reconcile`.

Run with ``python -m finetuner_operator`` or ``kopf run -m finetuner_operator.handlers``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import kopf

from finetuner.api.v1alpha1 import GROUP, VERSION
from finetuner_operator import cache, metrics
from finetuner_operator.builders import CANCEL_ANNOTATION, MANAGED_BY, RUN_LABEL
from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube
from finetuner_operator.reconcile import Reconciler

PREFIX = 'finetuner.dev'
RUNS = 'finetuneruns'
EXPERIMENTS = 'experiments'
MANAGED = {'app.kubernetes.io/managed-by': MANAGED_BY}
# Sent with the Job and pod watches and listings: the API server streams only the operator's own, not every
# Job and pod of the cluster (the handlers' ``labels=`` filters act after the stream, in this process).
MANAGED_SELECTOR = f'app.kubernetes.io/managed-by={MANAGED_BY}'
SELECTED_KINDS = (('batch', 'jobs'), ('v1', 'pods'))
TERMINAL_PHASES = ('FINISHED', 'FAILED')
# A handler that failed (an API error the seam's own retries did not outlast) runs again after
# this many seconds instead of Kopf's default minute: every pass is safe to repeat.
RETRY_BACKOFF = 2.0
# An Experiment is recounted at most this often (its runs' phase changes are coalesced): a recount lists
# every run of the Experiment, and one per transition made a burst of n runs cost n^2.
EXPERIMENT_RECOUNT_DELAY = 0.25
USER_AGENT = 'finetuner-operator'
MAX_WORKERS = 16  # threads running the (synchronous) handlers
log = logging.getLogger('finetuner_operator')
EVENT_HANDLERS = ('run_event', 'experiment_event', 'job_event', 'pod_event')


class QuietEventHandlers(logging.Filter):
    """Kopf logs every handler call that succeeds. The event handlers run on every watch event of every run,
    experiment, Job and pod: their successes were thousands of lines at each start with many runs, and a
    tenth of the start-up time. Dropped; their failures, and every other handler's lines, are kept."""

    QUIET = frozenset(f"Handler '{name}' succeeded." for name in EVENT_HANDLERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.getMessage() not in self.QUIET


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
    kopf_objects = logging.getLogger('kopf.objects')
    if not any(isinstance(f, QuietEventHandlers) for f in kopf_objects.filters):
        kopf_objects.addFilter(QuietEventHandlers())
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    # Labels are the operator's own bookkeeping (the experiment label) and no handler reacts to them:
    # left out of Kopf's diff base, a label change costs no second write of it.
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key='last-handled-configuration', ignored_fields=[('metadata', 'labels')]
    )
    settings.persistence.finalizer = f'{PREFIX}/finalizer'
    settings.posting.level = logging.WARNING  # transitions are posted as Events by the reconciler
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    for kind in SELECTED_KINDS:
        settings.watching.label_selectors[kind] = MANAGED_SELECTOR
    settings.execution.max_workers = MAX_WORKERS
    kube = Kube(api_client(), cache.ObjectCache())
    try:
        kube.relist(config.namespaces)  # before any handler runs: the cache answers misses from now on
    except Exception as e:  # the API failing at start-up: misses are asked of it until a relist succeeds
        logger.warning('listing runs, Jobs and pods into the cache failed (%s); reading through the API for now', e)
    kube.start_event_poster()  # a pass does not wait for its Events
    memo.reconciler = Reconciler(kube, config, experiment_delay=EXPERIMENT_RECOUNT_DELAY, background_admission=True)
    memo.reconciler.start_resync(config.progress_interval, config.relist_interval)
    metrics.serve(config.metrics_port)
    logger.info('finetuner operator configured: image %s, output %s', config.trainer_image, config.output)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    reconciler = memo.get('reconciler')
    if reconciler is not None:
        reconciler.close()
        reconciler.kube.stop_event_poster()
        reconciler.kube.api_client.close()


@kopf.on.probe(id='runs')
def probe_runs(**_: Any) -> int:
    """Liveness payload: how many runs this operator currently tracks."""
    return metrics.tracked_runs()


# --- FinetuneRun -------------------------------------------------------------------------------


def _not_terminal(status: kopf.Status, **_: Any) -> bool:
    """A run that has ended needs no pass when the operator (re)starts, nor when it first meets one (restored
    from a backup, or ended before Kopf recorded it), nor when its spec or cancel annotation changes: its
    status is final and its Job may be gone with its TTL.

    Every changing handler of runs carries this filter (and a deletion is handled by ``run_event``), so that
    Kopf matches none of them for an ended run and is blind to it: no state is stored and nothing is
    written. With one unfiltered handler left (an ``on.delete``), Kopf wrote its last-handled-configuration
    annotation to every ended run it first met, one PATCH each: 2,000 requests at the start of an operator
    meeting 2,000 ended runs, about half of its start-up."""
    return (status or {}).get('phase') not in TERMINAL_PHASES


@kopf.on.resume(GROUP, VERSION, RUNS, backoff=RETRY_BACKOFF, when=_not_terminal)
@kopf.on.create(GROUP, VERSION, RUNS, backoff=RETRY_BACKOFF, when=_not_terminal)
@kopf.on.update(GROUP, VERSION, RUNS, field='spec', backoff=RETRY_BACKOFF, when=_not_terminal)
@kopf.on.update(
    GROUP,
    VERSION,
    RUNS,
    field=('metadata', 'annotations', CANCEL_ANNOTATION),
    backoff=RETRY_BACKOFF,
    when=_not_terminal,
)
def reconcile_run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    with metrics.timed('run'):
        plain = _plain(body)
        memo.reconciler.observe(cache.RUNS, None, plain)
        metadata: dict[str, Any] = {}
        memo.reconciler.reconcile_run(plain, metadata_patch=metadata)
        for key, value in metadata.items():  # written by Kopf with its own bookkeeping, in one request
            if key == 'labels':
                for label, text in value.items():
                    patch.meta.labels[label] = text
            else:
                patch.meta[key] = value


def run_deleted(body: dict[str, Any], reconciler: Any) -> None:
    """A run is gone (its DELETED watch event, whatever its phase): its metric, its Experiment's count and its
    slot. No finalizer: the Job, ConfigMap and pods go by owner-reference garbage collection."""
    meta = body['metadata']
    with metrics.timed('run'):
        reconciler.run_deleted(meta.get('namespace'), meta['name'], body)


@kopf.on.event('batch', 'v1', 'jobs', labels=MANAGED)
def job_event(
    type: str | None, body: kopf.Body, labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    memo.reconciler.observe(cache.JOBS, type, body)
    _sync_owner(labels, namespace, memo)


@kopf.on.event('', 'v1', 'pods', labels=MANAGED)
def pod_event(
    type: str | None, body: kopf.Body, labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    memo.reconciler.observe(cache.PODS, type, body)
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
    reconciler.observe(cache.RUNS, type, body)
    if type == 'DELETED':
        reconciler.forget(meta.get('namespace'), meta['name'])
        # A recount may read the API (without background recounts): off Kopf's loop. It also frees the run's
        # slot of FINETUNER_MAX_CONCURRENT_RUNS, if any.
        await asyncio.to_thread(run_deleted, _plain(body), reconciler)
    else:
        phase = (body.get('status') or {}).get('phase')
        reconciler.track(meta.get('namespace'), meta['name'], phase)
        if phase in TERMINAL_PHASES:  # counted without a pass (ended runs get none at start-up)
            metrics.set_phase(meta.get('namespace'), meta['name'], phase)


# --- Experiment --------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, EXPERIMENTS, backoff=RETRY_BACKOFF)
@kopf.on.create(GROUP, VERSION, EXPERIMENTS, backoff=RETRY_BACKOFF)
@kopf.on.update(GROUP, VERSION, EXPERIMENTS, field='spec', backoff=RETRY_BACKOFF)
def reconcile_experiment(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    with metrics.timed('experiment'):
        memo.reconciler.observe(cache.EXPERIMENTS, None, body)
        memo.reconciler.sync_experiment(namespace, name)


@kopf.on.event(GROUP, VERSION, EXPERIMENTS)
async def experiment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconciler = memo.get('reconciler')
    if reconciler is not None and (body.get('metadata') or {}).get('name'):
        reconciler.observe(cache.EXPERIMENTS, type, body)


def _plain(body: kopf.Body | dict[str, Any]) -> dict[str, Any]:
    """A plain dict copy of a Kopf body (the live view must not leak into pure code or the cache)."""
    return json.loads(json.dumps(dict(body)))
