"""The operator's one I/O seam to the Kubernetes API.

Every call the operator's own code makes goes through a method of :class:`Kube`, and each
method declares the (apiGroup, resource, verb) triples it uses with :func:`api_call`. The
union is ``API_CALLS``; ``KOPF_CALLS`` lists what Kopf itself needs. The Helm chart's RBAC
is tested against ``API_CALLS | KOPF_CALLS``: a new call without a rule fails that test.

Objects cross the seam as plain dicts (the wire format). Create treats 409 AlreadyExists as
success (children have deterministic names), reads turn 404 into None, deletes ignore 404.

Transient answers are retried inside the seam, a few times within seconds: 429 (after its
``Retry-After``, capped), 500/502/503/504, a 409 Conflict on anything but a create, and a dropped
connection. What still fails reaches the handler, and Kopf retries the handler.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from finetuner.api.v1alpha1 import GROUP, VERSION

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
# Children carry an owner reference with blockOwnerDeletion: true. Where the API server enforces
# OwnerReferencesPermissionEnforcement (OpenShift), setting it needs `update` on the owner's
# finalizers subresource, or the create is answered 403. Runs own their ConfigMap, Job and Service;
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
    """Thin typed wrapper over the official client; one instance per operator process."""

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # --- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)

    @staticmethod
    def _status(e: Exception) -> int | None:
        return getattr(e, 'status', None)

    def _created(self, create: Callable[[], Any]) -> bool:
        """Run a create; False when it already existed (409)."""
        from kubernetes.client.exceptions import ApiException

        try:
            with_retries(create, 'create', creating=True)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def _read(self, read: Callable[[], Any]) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            result = with_retries(read, 'read')
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return result if isinstance(result, dict) else self._json(result)

    def _delete(self, delete: Callable[[], Any]) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            with_retries(delete, 'delete')
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    # --- children of a run -------------------------------------------------------------------
    @api_call(('', 'configmaps', 'create'), OWN_RUNS)
    def create_config_map(self, body: dict[str, Any]) -> bool:
        ns = body['metadata']['namespace']
        return self._created(lambda: self.core.create_namespaced_config_map(ns, body, _preload_content=False))

    @api_call(('', 'services', 'create'), OWN_RUNS)
    def create_service(self, body: dict[str, Any]) -> bool:
        ns = body['metadata']['namespace']
        return self._created(lambda: self.core.create_namespaced_service(ns, body, _preload_content=False))

    @api_call(('batch', 'jobs', 'create'), OWN_RUNS)
    def create_job(self, body: dict[str, Any]) -> bool:
        ns = body['metadata']['namespace']
        return self._created(lambda: self.batch.create_namespaced_job(ns, body, _preload_content=False))

    def create_child(self, body: dict[str, Any]) -> bool:
        creators = {'ConfigMap': self.create_config_map, 'Service': self.create_service, 'Job': self.create_job}
        return creators[body['kind']](body)

    @api_call(('batch', 'jobs', 'get'))
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(lambda: self.batch.read_namespaced_job(name, namespace, _preload_content=False))

    @api_call(('batch', 'jobs', 'patch'))
    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        with_retries(
            lambda: self.batch.patch_namespaced_job(name, namespace, patch, _preload_content=False), 'patch job'
        )

    @api_call(('batch', 'jobs', 'delete'))
    def delete_job(self, namespace: str, name: str) -> bool:
        # Background propagation: the API's default for Jobs orphans their pods.
        return self._delete(
            lambda: self.batch.delete_namespaced_job(
                name, namespace, propagation_policy='Background', _preload_content=False
            )
        )

    @api_call(('', 'pods', 'list'))
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = with_retries(
            lambda: self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False),
            'list pods',
        )
        return self._json(response).get('items') or []

    # --- runs and experiments ----------------------------------------------------------------
    @api_call((GROUP, RUNS, 'get'))
    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name))

    @api_call((GROUP, RUNS, 'list'))
    def list_runs(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        result = with_retries(
            lambda: self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, label_selector=selector),
            'list runs',
        )
        return result.get('items') or []

    @api_call((GROUP, RUNS, 'create'), OWN_EXPERIMENTS)
    def create_run(self, body: dict[str, Any]) -> bool:
        ns = body['metadata']['namespace']
        return self._created(lambda: self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, RUNS, body))

    @api_call((GROUP, RUNS, 'patch'), OWN_EXPERIMENTS)
    def patch_run(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        with_retries(
            lambda: self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name, patch),
            'patch run',
        )

    @api_call((GROUP, f'{RUNS}/status', 'patch'))
    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            with_retries(
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, RUNS, name, {'status': status}
                ),
                'patch run status',
            )
            return True
        except ApiException as e:
            if e.status == 404:  # deleted meanwhile
                return False
            raise

    @api_call((GROUP, EXPERIMENTS, 'get'))
    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, EXPERIMENTS, name)
        )

    @api_call((GROUP, f'{EXPERIMENTS}/status', 'patch'))
    def patch_experiment_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            with_retries(
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, EXPERIMENTS, name, {'status': status}
                ),
                'patch experiment status',
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    # --- events ------------------------------------------------------------------------------
    @api_call(('', 'events', 'create'))
    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event on ``obj`` (shown by ``kubectl describe``); failures are not fatal."""
        from kubernetes.client.exceptions import ApiException

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
                lambda: self.core.create_namespaced_event(meta['namespace'], event, _preload_content=False),
                'post event',
                creating=True,
            )
        except ApiException:
            pass


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
