"""The operator's one I/O seam to the Kubernetes API.

Every call the operator's own code makes goes through a method of :class:`Kube`, and each
method declares the (apiGroup, resource, verb) triples it uses with :func:`api_call`. The
union is ``API_CALLS``; ``KOPF_CALLS`` lists what Kopf itself needs. The Helm chart's RBAC
is tested against ``API_CALLS | KOPF_CALLS``: a new call without a rule fails that test.

Objects cross the seam as plain dicts (the wire format). Create treats 409 AlreadyExists as
success (children have deterministic names), reads turn 404 into None, deletes ignore 404.

With an :class:`~finetuner_operator.cache.ObjectCache` (the operator always has one), reads of runs,
experiments, Jobs and pods are answered from it, and every write's answer goes into it: a pass over
a run asks the API server nothing unless it changes something. :meth:`Kube.relist` fills it.

Transient answers are retried inside the seam, a few times within seconds: 429 (after its
``Retry-After``, capped), 500/502/503/504, a 409 Conflict on anything but a create, and a dropped
connection. What still fails reaches the handler, and Kopf retries the handler.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlencode

from finetuner.api.v1alpha1 import GROUP, VERSION
from finetuner_operator.builders import MANAGED_BY, RUN_LABEL
from finetuner_operator.cache import EXPERIMENTS as CACHED_EXPERIMENTS
from finetuner_operator.cache import JOBS, PODS, ObjectCache
from finetuner_operator.cache import RUNS as CACHED_RUNS

F = TypeVar('F', bound=Callable[..., Any])
ApiTriple = tuple[str, str, str]

_DECLARED: set[ApiTriple] = set()


def api_call(*triples: ApiTriple) -> Callable[[F], F]:
    """Declare the (apiGroup, resource, verb) triples a seam method uses."""

    def mark(fn: F) -> F:
        _DECLARED.update(triples)
        fn.__api_calls__ = frozenset(triples)  # type: ignore[attr-defined]
        return fn

    return mark


RUNS = 'finetuneruns'
EXPERIMENTS = 'experiments'
KUEUE_GROUP = 'kueue.x-k8s.io'
KUEUE_VERSION = 'v1beta1'
LEASES_GROUP = 'coordination.k8s.io'
# Children carry an owner reference with blockOwnerDeletion: true. Where the API server enforces
# OwnerReferencesPermissionEnforcement (OpenShift), setting it needs `update` on the owner's
# finalizers subresource, or the create is answered 403. Runs own their Job (which owns the ConfigMap and Service,
# without blockOwnerDeletion, so creating those needs no such right);
# Experiments own their sweep runs and the runs that join them.
OWN_RUNS: ApiTriple = (GROUP, f'{RUNS}/finalizers', 'update')
OWN_EXPERIMENTS: ApiTriple = (GROUP, f'{EXPERIMENTS}/finalizers', 'update')

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_DELAYS = (0.1, 0.3, 1.0, 2.0, 4.0)  # then the error reaches the handler
MAX_RETRY_AFTER = 10.0

log = logging.getLogger('finetuner_operator')


def retry_delay(error: Exception, attempt: int, creating: bool) -> float | None:
    """Seconds to wait before retrying ``error`` (attempt 0, 1, ...); None when it is not transient."""
    from urllib3.exceptions import HTTPError as TransportError

    if attempt >= len(RETRY_DELAYS):
        return None
    status = getattr(error, 'status', None)
    if isinstance(error, TransportError) or status in TRANSIENT_STATUS or (status == 409 and not creating):
        headers = getattr(error, 'headers', None) or {}
        retry_after = headers.get('Retry-After') if hasattr(headers, 'get') else None
        if status == 429 and retry_after:
            try:
                return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER)
            except ValueError:
                pass
        return RETRY_DELAYS[attempt]
    return None


def with_retries(call: Callable[[], Any], what: str, creating: bool = False) -> Any:
    """``call()``, retried on transient API errors (see :func:`retry_delay`)."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            delay = retry_delay(e, attempt, creating)
            if delay is None:
                raise
            log.warning('%s: %s; retrying in %.1fs', what, getattr(e, 'reason', None) or e, delay)
            time.sleep(delay)
            attempt += 1


class Kube:
    """Thin typed seam over the Kubernetes REST API; one instance per operator process.

    Requests go through the official client's configured connection (authentication, TLS and
    proxies from the kubeconfig or the in-cluster account, token refresh included) but not through
    its generated per-endpoint methods: those validate every argument with pydantic and rebuild the
    body, which cost more CPU than the request itself (0.86 vs 0.52 ms per create measured here).
    Bodies and answers are the wire's JSON as plain dicts."""

    def __init__(self, api_client: Any, cache: ObjectCache | None = None):
        self.api_client = api_client
        self.cache = cache
        self._events: queue.Queue[tuple[dict[str, Any], str, str, str] | None] | None = None
        self._poster: threading.Thread | None = None

    # --- the transport ---------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = 'application/json',
    ) -> Any:
        """One API request; the answer's JSON (None when empty). Non-2xx answers raise the client's
        ``ApiException`` (``status``, ``headers``); a dropped connection raises urllib3's error."""
        from kubernetes.client.exceptions import ApiException

        client = self.api_client
        headers = {**client.default_headers, 'Accept': 'application/json'}
        if body is not None:
            headers['Content-Type'] = content_type
        client.update_params_for_auth(headers, [], ['BearerToken'], path, method, body)
        url = client.configuration.host + path
        if query:
            url += '?' + urlencode(query)
        response = client.call_api(method, url, header_params=headers, body=body)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=data.decode('utf-8', 'replace'), data=None)
        return json.loads(data) if data else None

    def _cached(self, kind: str, namespace: str, name: str) -> tuple[bool, dict[str, Any] | None]:
        """(answered, object): answered from the cache when it holds the object or, once the kind is
        synced, knows it does not exist."""
        if self.cache is None:
            return False, None
        obj = self.cache.get(kind, namespace, name)
        return (obj is not None or self.cache.synced(kind)), obj

    def _remember(self, kind: str, obj: dict[str, Any] | None) -> dict[str, Any] | None:
        if obj is not None and self.cache is not None:
            self.cache.put(kind, obj)
        return obj

    def _create(self, path: str, body: dict[str, Any], kind: str | None = None) -> bool:
        """POST ``body``; False when it already existed (409). The new object of a cached ``kind`` is cached."""
        from kubernetes.client.exceptions import ApiException

        try:
            created = with_retries(lambda: self.request('POST', path, body), 'create', creating=True)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        if kind is not None:
            self._remember(kind, created)
        return True

    def _read(self, path: str, what: str, query: dict[str, str] | None = None) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return with_retries(lambda: self.request('GET', path, query=query), what)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _patch(self, path: str, patch: dict[str, Any], what: str) -> dict[str, Any] | None:
        """A JSON merge patch; None when the object is gone (404)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return with_retries(
                lambda: self.request('PATCH', path, patch, content_type='application/merge-patch+json'), what
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # --- children of a run -------------------------------------------------------------------
    @api_call(('', 'configmaps', 'create'))
    def create_config_map(self, body: dict[str, Any]) -> bool:
        return self._create(f'/api/v1/namespaces/{body["metadata"]["namespace"]}/configmaps', body)

    @api_call(('', 'services', 'create'))
    def create_service(self, body: dict[str, Any]) -> bool:
        return self._create(f'/api/v1/namespaces/{body["metadata"]["namespace"]}/services', body)

    @api_call(('batch', 'jobs', 'create'), OWN_RUNS)
    def create_job(self, body: dict[str, Any]) -> bool:
        return self._create(_jobs(body['metadata']['namespace']), body, JOBS)

    def create_child(self, body: dict[str, Any]) -> bool:
        creators = {'ConfigMap': self.create_config_map, 'Service': self.create_service, 'Job': self.create_job}
        return creators[body['kind']](body)

    @api_call(('batch', 'jobs', 'get'))
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        answered, job = self._cached(JOBS, namespace, name)
        if answered:
            return job
        return self._remember(JOBS, self._read(f'{_jobs(namespace)}/{name}', 'read job'))

    @api_call(('batch', 'jobs', 'patch'))
    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self._remember(JOBS, self._patch(f'{_jobs(namespace)}/{name}', patch, 'patch job'))

    @api_call(('batch', 'jobs', 'delete'))
    def delete_job(self, namespace: str, name: str, propagation: str = 'Background') -> bool:
        """Delete a Job and its pods (the API's default for Jobs orphans pods). ``Foreground``: the Job stays,
        with a deletionTimestamp, until its pods are gone (a multi-node restart waits for that)."""
        from kubernetes.client.exceptions import ApiException

        try:
            deleted = with_retries(
                lambda: self.request('DELETE', f'{_jobs(namespace)}/{name}', query={'propagationPolicy': propagation}),
                'delete job',
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        if propagation == 'Foreground' and isinstance(deleted, dict) and deleted.get('kind') == 'Job':
            self._remember(JOBS, deleted)  # now with its deletionTimestamp
        return True

    @api_call(('', 'pods', 'list'))
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        key, _, run = selector.partition('=')
        if self.cache is not None and self.cache.synced(PODS) and key == RUN_LABEL and run and ',' not in run:
            return self.cache.pods_of_run(namespace, run)
        listing = with_retries(
            lambda: self.request('GET', f'/api/v1/namespaces/{namespace}/pods', query={'labelSelector': selector}),
            'list pods',
        )
        pods = listing.get('items') or []
        for pod in pods:
            self._remember(PODS, pod)
        return pods

    # --- what a stuck run is diagnosed with (diagnostics.py) -----------------------------------
    @api_call(('', 'events', 'list'))
    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        """Events in ``namespace`` matching ``field_selector`` (``involvedObject.uid=...,reason=...``)."""
        listing = with_retries(
            lambda: self.request(
                'GET', f'/api/v1/namespaces/{namespace}/events', query={'fieldSelector': field_selector}
            ),
            'list events',
        )
        return listing.get('items') or []

    @api_call((KUEUE_GROUP, 'workloads', 'list'))
    def list_workloads(self, namespace: str, selector: str) -> list[dict[str, Any]] | None:
        """Kueue Workloads matching ``selector``; None when the cluster serves no Kueue API (not installed)."""
        from kubernetes.client.exceptions import ApiException

        path = f'/apis/{KUEUE_GROUP}/{KUEUE_VERSION}/namespaces/{namespace}/workloads'
        try:
            listing = with_retries(
                lambda: self.request('GET', path, query={'labelSelector': selector}), 'list Kueue workloads'
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return listing.get('items') or []

    @api_call(('', 'serviceaccounts', 'get'))
    def get_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(f'/api/v1/namespaces/{namespace}/serviceaccounts/{name}', 'read service account')

    # --- leader election (leader.py) ---------------------------------------------------------------
    @api_call((LEASES_GROUP, 'leases', 'get'))
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(_leases(namespace, name), 'read lease')

    @api_call((LEASES_GROUP, 'leases', 'create'))
    def create_lease(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Lease; None when another holder created it first (409)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return with_retries(
                lambda: self.request('POST', _leases(body['metadata']['namespace']), body), 'create lease', True
            )
        except ApiException as e:
            if e.status == 409:
                return None
            raise

    @api_call((LEASES_GROUP, 'leases', 'update'))
    def update_lease(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """PUT the Lease at its resourceVersion; None when someone wrote it meanwhile (409: no retry)."""
        from kubernetes.client.exceptions import ApiException

        meta = body['metadata']
        try:
            return with_retries(
                lambda: self.request('PUT', _leases(meta['namespace'], meta['name']), body), 'update lease', True
            )
        except ApiException as e:
            if e.status == 409:
                return None
            raise

    # --- runs and experiments ----------------------------------------------------------------
    @api_call((GROUP, RUNS, 'get'))
    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        answered, run = self._cached(CACHED_RUNS, namespace, name)
        if answered:
            return run
        return self._remember(CACHED_RUNS, self._read(_custom(namespace, RUNS, name), 'read run'))

    @api_call((GROUP, RUNS, 'list'))
    def list_runs(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        """Runs in ``namespace`` (``selector``: ``key=value`` pairs joined by commas)."""
        wanted = _equalities(selector)
        if self.cache is not None and self.cache.synced(CACHED_RUNS) and wanted is not None:
            return self.cache.select(CACHED_RUNS, namespace, wanted)
        query = {'labelSelector': selector} if selector else None
        listing = with_retries(lambda: self.request('GET', _custom(namespace, RUNS), query=query), 'list runs')
        return listing.get('items') or []

    @api_call((GROUP, RUNS, 'create'), OWN_EXPERIMENTS)
    def create_run(self, body: dict[str, Any]) -> bool:
        return self._create(_custom(body['metadata']['namespace'], RUNS), body, CACHED_RUNS)

    @api_call((GROUP, RUNS, 'patch'), OWN_EXPERIMENTS)
    def patch_run(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        patched = self._patch(_custom(namespace, RUNS, name), patch, 'patch run')
        if patched is None:
            raise ApiException(status=404, reason=f'FinetuneRun {namespace}/{name} not found')
        self._remember(CACHED_RUNS, patched)

    @api_call((GROUP, f'{RUNS}/status', 'patch'))
    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """False when the run is gone (deleted meanwhile)."""
        patched = self._patch(f'{_custom(namespace, RUNS, name)}/status', {'status': status}, 'patch run status')
        return self._remember(CACHED_RUNS, patched) is not None

    @api_call((GROUP, EXPERIMENTS, 'get'))
    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        answered, experiment = self._cached(CACHED_EXPERIMENTS, namespace, name)
        if answered:
            return experiment
        return self._remember(CACHED_EXPERIMENTS, self._read(_custom(namespace, EXPERIMENTS, name), 'read experiment'))

    @api_call((GROUP, f'{EXPERIMENTS}/status', 'patch'))
    def patch_experiment_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        path = f'{_custom(namespace, EXPERIMENTS, name)}/status'
        patched = self._patch(path, {'status': status}, 'patch experiment status')
        return self._remember(CACHED_EXPERIMENTS, patched) is not None

    # --- the cache's listings --------------------------------------------------------------------
    @api_call(
        (GROUP, RUNS, 'list'),
        (GROUP, EXPERIMENTS, 'list'),
        ('batch', 'jobs', 'list'),
        ('', 'pods', 'list'),
    )
    def relist(self, namespaces: list[str] | None) -> None:
        """List runs, experiments and the operator's Jobs and pods in ``namespaces`` (None or empty: the
        whole cluster) into the cache, which then answers misses as "absent". A namespace given as a
        pattern (``team-*``, ``!kube-system``) cannot be listed one by one: the cache then stays
        unsynced and misses are asked of the API server."""
        if self.cache is None:
            return
        if _patterns(namespaces):
            return
        for kind in (CACHED_RUNS, CACHED_EXPERIMENTS, JOBS, PODS):
            for namespace in list(namespaces or []) or [None]:
                items, version = self._list(kind, namespace)
                self.cache.replace(kind, items, version, namespace)
            self.cache.mark_synced(kind)

    def _list(self, kind: str, namespace: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """One listing of a cached ``kind`` (Jobs and pods: the operator's own) in ``namespace`` (None: all):
        the items, with their apiVersion and kind, and the list's resourceVersion."""
        api_version, item_kind, path_of, managed = _LISTINGS[kind]
        query = {'labelSelector': f'app.kubernetes.io/managed-by={MANAGED_BY}'} if managed else None
        listing = with_retries(lambda: self.request('GET', path_of(namespace), query=query), f'list {kind}')
        items = [{'apiVersion': api_version, 'kind': item_kind, **item} for item in listing.get('items') or []]
        return items, (listing.get('metadata') or {}).get('resourceVersion')

    # --- what FINETUNER_MAX_CONCURRENT_RUNS counts -------------------------------------------------
    @api_call(('batch', 'jobs', 'list'))
    def list_trainer_jobs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every trainer Job in ``namespaces`` (None or empty: the whole cluster). See :meth:`_everything`."""
        return self._everything(JOBS, namespaces)

    @api_call((GROUP, RUNS, 'list'))
    def list_all_runs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every FinetuneRun in ``namespaces`` (None or empty: the whole cluster). See :meth:`_everything`."""
        return self._everything(CACHED_RUNS, namespaces)

    def _everything(self, kind: str, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """All objects of ``kind``: from the cache once it is synced (no request; a Job this operator
        created is in it from the create's answer on); before that listed from the API server (into
        the cache too); for namespace patterns, which cannot be listed one by one, what the watches
        have put into the cache (without a cache: listed across the cluster)."""
        if self.cache is not None and (self.cache.synced(kind) or _patterns(namespaces)):
            return self.cache.objects(kind)
        found: list[dict[str, Any]] = []
        for namespace in [None] if _patterns(namespaces) else list(namespaces or []) or [None]:
            items, _ = self._list(kind, namespace)
            for item in items:
                self._remember(kind, item)
            found.extend(items)
        return found

    # --- events ------------------------------------------------------------------------------
    @api_call(('', 'events', 'create'))
    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event on ``obj`` (shown by ``kubectl describe``); failures are not fatal.

        With :meth:`start_event_poster` running, the Event is handed to it and posted in order by one
        background thread, so that a reconcile pass does not wait for its Events."""
        if self._events is not None:
            self._events.put((obj, type_, reason, message))
            return
        self._post_event(obj, type_, reason, message)

    def start_event_poster(self, backlog: int = 10_000) -> None:
        """Post Events from a background thread (a full backlog makes ``post_event`` wait)."""
        if self._poster is None:
            self._events = queue.Queue(maxsize=backlog)
            self._poster = threading.Thread(target=self._post_events, name='event-poster', daemon=True)
            self._poster.start()

    def stop_event_poster(self, timeout: float = 10.0) -> None:
        """Post what is queued (within ``timeout``), then post synchronously again."""
        events, poster = self._events, self._poster
        if events is None or poster is None:
            return
        events.put(None)
        poster.join(timeout)
        self._events, self._poster = None, None

    def _post_events(self) -> None:
        assert self._events is not None
        events = self._events
        while (item := events.get()) is not None:
            self._post_event(*item)

    def _post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as TransportError

        meta = obj['metadata']
        now = datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
        event = {
            'apiVersion': 'v1',
            'kind': 'Event',
            'metadata': {'generateName': f'{meta["name"]}.', 'namespace': meta['namespace']},
            'involvedObject': {
                'apiVersion': obj.get('apiVersion'),
                'kind': obj.get('kind'),
                'name': meta['name'],
                'namespace': meta['namespace'],
                'uid': meta.get('uid'),
            },
            'type': type_,
            'reason': reason,
            'message': message[:1024],
            'source': {'component': 'finetuner-operator'},
            'reportingComponent': 'finetuner-operator',
            'firstTimestamp': now,
            'lastTimestamp': now,
            'count': 1,
        }
        try:
            with_retries(
                lambda: self.request('POST', f'/api/v1/namespaces/{meta["namespace"]}/events', event),
                'post event',
                creating=True,
            )
        except (ApiException, TransportError) as e:
            log.warning('could not post Event %s on %s/%s: %s', reason, meta['namespace'], meta['name'], e)


def _patterns(namespaces: list[str] | None) -> bool:
    """Whether ``namespaces`` holds a pattern (``team-*``, ``!kube-system``), which cannot be listed."""
    return bool(namespaces) and any(set(n) & set('*?[]!') for n in namespaces or ())


def _pods(namespace: str | None) -> str:
    return f'/api/v1/namespaces/{namespace}/pods' if namespace else '/api/v1/pods'


def _jobs(namespace: str | None) -> str:
    return f'/apis/batch/v1/namespaces/{namespace}/jobs' if namespace else '/apis/batch/v1/jobs'


def _leases(namespace: str, name: str | None = None) -> str:
    path = f'/apis/{LEASES_GROUP}/v1/namespaces/{namespace}/leases'
    return f'{path}/{name}' if name else path


def _custom(namespace: str | None, plural: str, name: str | None = None) -> str:
    group = f'/apis/{GROUP}/{VERSION}'
    path = f'{group}/namespaces/{namespace}/{plural}' if namespace else f'{group}/{plural}'
    return f'{path}/{name}' if name else path


# What a listing of each cached kind asks for: apiVersion and kind of the items (a list's items have
# neither), the path in a namespace (None: all), and whether only the operator's own objects are listed.
_LISTINGS: dict[str, tuple[str, str, Callable[[str | None], str], bool]] = {
    CACHED_RUNS: (f'{GROUP}/{VERSION}', 'FinetuneRun', lambda ns: _custom(ns, RUNS), False),
    CACHED_EXPERIMENTS: (f'{GROUP}/{VERSION}', 'Experiment', lambda ns: _custom(ns, EXPERIMENTS), False),
    JOBS: ('batch/v1', 'Job', _jobs, True),
    PODS: ('v1', 'Pod', _pods, True),
}


def _equalities(selector: str | None) -> dict[str, str] | None:
    """``a=b,c=d`` as a dict; None for anything else (sets, inequalities, existence)."""
    if not selector:
        return {}
    wanted: dict[str, str] = {}
    for term in selector.split(','):
        key, sep, value = term.partition('=')
        if not sep or value.startswith('=') or key.endswith('!') or not key.strip():
            return None
        wanted[key.strip()] = value.strip()
    return wanted


API_CALLS: frozenset[ApiTriple] = frozenset(_DECLARED)

# What Kopf itself calls: watching and patching the resources it serves (progress annotations,
# finalizers, status), posting events, and discovery. Namespaces are listed and watched only when
# the operator runs cluster-wide; CRDs are read for discovery of the served resources.
KOPF_CALLS: frozenset[ApiTriple] = frozenset(
    {
        *((GROUP, r, v) for r in (RUNS, EXPERIMENTS) for v in ('get', 'list', 'watch', 'patch')),
        (GROUP, f'{RUNS}/status', 'patch'),
        (GROUP, f'{EXPERIMENTS}/status', 'patch'),
        ('batch', 'jobs', 'list'),
        ('batch', 'jobs', 'watch'),
        ('', 'pods', 'watch'),
        ('', 'events', 'create'),
        ('', 'namespaces', 'list'),
        ('', 'namespaces', 'watch'),
        ('apiextensions.k8s.io', 'customresourcedefinitions', 'list'),
        ('apiextensions.k8s.io', 'customresourcedefinitions', 'watch'),
    }
)
