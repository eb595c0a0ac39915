"""KubeEmu: kmock's Kubernetes emulator with the API-server semantics the operator relies on.

kmock serves the HTTP API (routing, discovery, the request log used in assertions); this
subclass replaces its object store for every declared resource with one that behaves like a
kube-apiserver where the operator can tell the difference (see ``/work/shared/TESTING-NOTES.md``):

- server-side metadata: ``uid``, ``resourceVersion`` (global counter), ``creationTimestamp``,
  ``generation`` bumped only by spec changes, ``generateName``, namespace from the URL;
- 201 on create, 409 AlreadyExists / Conflict (stale resourceVersion), 404, 422 Invalid
  (bad names, a failed JSON-patch ``test``), 400 for a namespace mismatch;
- merge, strategic-merge (as merge) and JSON patches, PUT with optimistic concurrency;
- lists with ``kind``/``apiVersion``/``resourceVersion``; ``labelSelector`` and ``fieldSelector``
  on list, watch and delete-collection; watches resumable from a ``resourceVersion`` (410 when
  too old), ``timeoutSeconds``, BOOKMARKs, ADDED/DELETED when an object enters/leaves a selector;
- the status subresource isolated both ways (status ignored on the main resource and on create,
  everything but status ignored on ``/status``);
- finalizers and ``deletionTimestamp``; owner-reference garbage collection with Background,
  Foreground and Orphan propagation (the API's default for Jobs is Orphan, as on a real server),
  also of an object created after all its owners were deleted;
- pod logs (``/log``, with ``follow``) from a pluggable source, as ``text/plain``;
- CRDs served from their CustomResourceDefinition objects; every write of a custom resource pruned,
  defaulted and validated by the CRD's structural schema and CEL rules, with ``fieldValidation`` and the
  real 422/400 Status shapes (:mod:`tests.cluster.apiextensions`, :mod:`tests.cluster.cel`);
- discovery (legacy and aggregated v2) and OpenAPI v2/v3 documents (:mod:`tests.cluster.openapi`), so that
  kubectl validates on the server and ``kubectl explain`` works;
- server-side Table output (:mod:`tests.cluster.tables`): printer columns, ages, ``-o wide`` priorities;
- a Job's selector and its template labels defaulted on create, as the Job REST strategy does.

Faults for reliability tests: :meth:`KubeEmu.inject` makes the server answer chosen requests with
an error (500, 429 with ``Retry-After``, 409, ...) a number of times, and :meth:`KubeEmu.drop_watches`
cuts every open watch connection and refuses new ones for a while. Faults only hit the clients
whose User-Agent they name (the operator by default), never the simulated node or the test itself.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp.web
import jsonpatch
import kmock

from tests.cluster import apiextensions, openapi, tables

DNS1123_SUBDOMAIN = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')
DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
HISTORY_LIMIT = 20000
BOOKMARK_INTERVAL = 1.0

LogSource = Callable[[str, str], 'str | None']


class ApiError(Exception):
    """An API failure rendered as a ``Status`` object with its HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def response(self) -> aiohttp.web.Response:
        return aiohttp.web.json_response(self.body(), status=self.code)

    def body(self) -> dict[str, Any]:
        return {
            'apiVersion': 'v1',
            'kind': 'Status',
            'metadata': {},
            'status': 'Failure',
            'code': self.code,
            'reason': self.reason,
            'message': self.message,
            'details': self.details,
        }


VERBS = ('create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch')
CRD_KEY = 'apiextensions.k8s.io/v1/customresourcedefinitions'


@dataclass
class Kind:
    """What the server knows about one resource."""

    key: str  # 'batch/v1/jobs', 'v1/pods'
    kind: str
    api_version: str
    namespaced: bool
    status_subresource: bool
    columns: list[dict[str, Any]] | None = None  # a CRD's additionalPrinterColumns; None for built-ins
    singular: str = ''
    shortnames: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = VERBS
    schema: dict[str, Any] | None = None  # a CRD version's openAPIV3Schema: validated on every write
    crd: str | None = None  # the CustomResourceDefinition that serves it

    @property
    def group(self) -> str:
        return self.api_version.rpartition('/')[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition('/')[2]

    @property
    def plural(self) -> str:
        return self.key.rpartition('/')[2]


OPERATOR_AGENTS = ('finetuner-operator', 'kopf')
DROP = {'type': '__DROP__'}  # queued into a watcher: close its connection without an end


@dataclass
class Fault:
    """Answer matching requests with ``code`` until ``times`` of them have been answered so."""

    code: int
    times: int = 1
    method: str | None = None  # GET, POST, PATCH, PUT, DELETE; None: any
    path: str | None = None  # a regular expression searched in the path and query
    retry_after: float | None = None
    agents: tuple[str, ...] = OPERATOR_AGENTS  # User-Agent prefixes it applies to
    watches: bool = False  # also answer watch requests
    hits: list[str] = field(default_factory=list)  # 'METHOD path' of every request answered

    def matches(self, method: str, path: str, agent: str, watch: bool) -> bool:
        return (
            len(self.hits) < self.times
            and (self.method is None or self.method == method)
            and (self.path is None or re.search(self.path, path) is not None)
            and agent.startswith(self.agents)
            and (self.watches or not watch)
        )

    def response(self) -> aiohttp.web.Response:
        reasons = {409: 'Conflict', 429: 'TooManyRequests', 500: 'InternalError', 503: 'ServiceUnavailable'}
        reason = reasons.get(self.code, 'InternalError')
        error = ApiError(self.code, reason, f'injected fault: {reason}')
        headers = {'Retry-After': f'{self.retry_after:g}'} if self.retry_after is not None else None
        if self.code == 429 and self.retry_after is not None:
            error.details = {'retryAfterSeconds': int(self.retry_after)}
        return aiohttp.web.json_response(error.body(), status=self.code, headers=headers)


@dataclass
class Watcher:
    key: str
    namespace: str | None
    labels: list[Callable[[dict[str, str]], bool]]
    fields: list[Callable[[dict[str, Any]], bool]]
    queue: asyncio.Queue[dict[str, Any]]
    agent: str = ''  # the client's User-Agent

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj['metadata']
        if self.namespace is not None and meta.get('namespace') != self.namespace:
            return False
        labels = meta.get('labels') or {}
        return all(test(labels) for test in self.labels) and all(test(obj) for test in self.fields)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


# --- selectors -----------------------------------------------------------------------------------


def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ''
    for ch in selector:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            terms.append(current.strip())
            current = ''
        else:
            current += ch
    if current.strip():
        terms.append(current.strip())
    return terms


def parse_label_selector(selector: str | None) -> list[Callable[[dict[str, str]], bool]]:
    """``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(selector or ''):
        if m := re.fullmatch(r'([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)', term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(',') if v.strip()}
            if op == 'in':
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := re.fullmatch(r'([\w./-]+)\s*!=\s*([\w.-]*)', term):
            tests.append(lambda labels, k=m.group(1), v=m.group(2): labels.get(k) != v)
        elif m := re.fullmatch(r'([\w./-]+)\s*==?\s*([\w.-]*)', term):
            tests.append(lambda labels, k=m.group(1), v=m.group(2): labels.get(k) == v)
        elif m := re.fullmatch(r'!([\w./-]+)', term):
            tests.append(lambda labels, k=m.group(1): k not in labels)
        elif re.fullmatch(r'[\w./-]+', term):
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise ApiError(400, 'BadRequest', f'unable to parse requirement: invalid label selector term {term!r}')
    return tests


def _field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split('.'):
        value = value.get(part) if isinstance(value, dict) else None
    return '' if value is None else str(value)


def parse_field_selector(selector: str | None) -> list[Callable[[dict[str, Any]], bool]]:
    """``metadata.name=x``, ``status.phase!=Running`` (any dotted path, = == !=)."""
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for term in _split_terms(selector or ''):
        if m := re.fullmatch(r'([\w.]+)\s*!=\s*(.*)', term):
            tests.append(lambda obj, p=m.group(1), v=m.group(2): _field_value(obj, p) != v)
        elif m := re.fullmatch(r'([\w.]+)\s*==?\s*(.*)', term):
            tests.append(lambda obj, p=m.group(1), v=m.group(2): _field_value(obj, p) == v)
        else:
            raise ApiError(400, 'BadRequest', f'invalid field selector term {term!r}')
    return tests


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key; lists are replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ('metadata', 'status', 'apiVersion', 'kind')}


def _job_selector(job: dict[str, Any]) -> None:
    """The Job REST strategy's defaults on create: a selector on the Job's uid and the labels that match it
    on the pod template (https://kubernetes.io/docs/concepts/workloads/controllers/job/#specifying-your-own-pod-selector),
    which is what ``kubectl logs job/<name>`` follows to the pods."""
    spec = job.setdefault('spec', {})
    if spec.get('manualSelector') or spec.get('selector'):
        return
    uid, name = job['metadata']['uid'], job['metadata']['name']
    spec['selector'] = {'matchLabels': {'batch.kubernetes.io/controller-uid': uid}}
    labels = spec.setdefault('template', {}).setdefault('metadata', {}).setdefault('labels', {})
    labels.update(
        {
            'batch.kubernetes.io/controller-uid': uid,
            'batch.kubernetes.io/job-name': name,
            'controller-uid': uid,
            'job-name': name,
        }
    )


class KubeEmu(kmock.KubernetesEmulator):
    """The realism layer; see the module docstring. Mutations happen on the serving loop only."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.kinds: dict[str, Kind] = {}
        self.store: dict[str, dict[tuple[str | None, str], dict[str, Any]]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any] | None, dict[str, Any] | None]] = []
        self.watchers: list[Watcher] = []
        self.watch_starts: dict[str, int] = {}
        self.log_source: Callable[[str, str], str | None] | None = None
        self.closing = False
        # kube-apiserver's ServiceAccount admission: a pod naming a ServiceAccount that does not exist in its
        # namespace is refused (403). Off by default: no controller here creates each namespace's "default".
        self.admit_service_accounts = False
        self.requests: list[tuple[str, str, str]] = []  # (method, path with query, user agent), in order
        self.faults: list[Fault] = []
        self.watches_down_until = 0.0  # monotonic time until which watches are refused
        self.dropped_watches = 0
        self._down_agents: tuple[str, ...] = OPERATOR_AGENTS
        self._rv = itertools.count(1)
        self.last_rv = 0
        # Indexes kept by _put/_remove, so that garbage collection looks only at what a write touched.
        self._by_uid: dict[str, tuple[str, tuple[str | None, str]]] = {}  # uid -> (kind key, store key)
        self._children: dict[str, set[str]] = {}  # owner uid -> uids of the objects that reference it
        self._gc_queue: list[str] = []  # uids whose owners or dependents changed
        self._collecting = False
        self._warnings: list[str] = []  # Warning headers of the request being served
        self._documents: dict[str, Any] = {}  # OpenAPI documents, rebuilt when the served kinds change

    # --- declaration ---------------------------------------------------------------------------
    def declare(
        self,
        key: str,
        kind: str,
        *,
        namespaced: bool = True,
        status: bool = False,
        singular: str | None = None,
        shortnames: tuple[str, ...] = (),
        categories: tuple[str, ...] = (),
        columns: list[dict[str, Any]] | None = None,
        subresources: tuple[str, ...] | None = None,
        schema: dict[str, Any] | None = None,
        crd: str | None = None,
    ) -> None:
        """Serve ``group/version/plural`` (``v1/pods`` for the core group) with these semantics."""
        parts = key.split('/')
        api_version = '/'.join(parts[:-1])
        group, version, plural = parts if len(parts) == 3 else ('', *parts)
        subs = subresources if subresources is not None else (('status',) if status else ())
        resource = kmock.resource(group=group, version=version, plural=plural)
        if resource not in self.resources:  # kmock routes requests by these
            self.resources[resource] = kmock.ResourceInfo(
                kind=kind,
                singular=singular or kind.lower(),
                namespaced=namespaced,
                verbs=set(VERBS),
                subresources=set(subs),
                shortnames=set(shortnames),
                categories=set(categories),
            )
        self.kinds[key] = Kind(
            key,
            kind,
            api_version,
            namespaced,
            status,
            columns,
            singular or kind.lower(),
            tuple(shortnames),
            tuple(categories),
            tuple(subs),
            schema=schema,
            crd=crd,
        )
        self.store.setdefault(key, {})
        self._documents.clear()

    def declare_builtins(self) -> None:
        """The built-in kinds the operator, the simulated node and kubectl use, with their real names."""
        self.resources.load_bundled()  # lets kmock parse the URLs of every kind a K3s server has
        self.declare('v1/namespaces', 'Namespace', namespaced=False, status=True, shortnames=('ns',))
        self.declare(
            'v1/pods', 'Pod', status=True, shortnames=('po',), categories=('all',), subresources=('status', 'log')
        )
        self.declare('v1/configmaps', 'ConfigMap', shortnames=('cm',))
        self.declare('v1/secrets', 'Secret')
        self.declare('v1/serviceaccounts', 'ServiceAccount', shortnames=('sa',))
        self.declare('coordination.k8s.io/v1/leases', 'Lease')
        self.declare('v1/services', 'Service', status=True, shortnames=('svc',), categories=('all',))
        self.declare('v1/events', 'Event', shortnames=('ev',))
        self.declare('batch/v1/jobs', 'Job', status=True, categories=('all',))
        self.declare(
            CRD_KEY,
            'CustomResourceDefinition',
            namespaced=False,
            status=True,
            shortnames=('crd', 'crds'),
            categories=('api-extensions',),
        )

    # --- CustomResourceDefinitions -------------------------------------------------------------
    def _check_crd(self, crd: dict[str, Any]) -> list[apiextensions.FieldError]:
        """The part of CRD validation that decides whether its objects can be served as written."""
        errors: list[apiextensions.FieldError] = []
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        expected = f'{names.get("plural")}.{spec.get("group")}'
        if crd['metadata'].get('name') != expected:
            errors.append(
                apiextensions.invalid(
                    'metadata.name', crd['metadata'].get('name'), 'must be spec.names.plural+"."+spec.group'
                )
            )
        for index, version in enumerate(spec.get('versions') or []):
            schema = ((version.get('schema') or {}).get('openAPIV3Schema')) or {}
            errors += apiextensions.compile_errors(schema, f'spec.versions[{index}].schema.openAPIV3Schema')
        return errors

    def _install_crd(self, crd: dict[str, Any]) -> None:
        """Serve the CRD's storage version: its schema, printer columns, names and subresources."""
        spec = crd['spec']
        names = spec['names']
        version = next((v for v in spec['versions'] if v.get('storage')), spec['versions'][0])
        self.declare(
            f'{spec["group"]}/{version["name"]}/{names["plural"]}',
            names['kind'],
            namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
            status='status' in (version.get('subresources') or {}),
            singular=names.get('singular'),
            shortnames=tuple(names.get('shortNames') or ()),
            categories=tuple(names.get('categories') or ()),
            columns=version.get('additionalPrinterColumns') or [],
            schema=(version.get('schema') or {}).get('openAPIV3Schema'),
            crd=crd['metadata']['name'],
        )
        crd['status'] = {
            'acceptedNames': {**names, 'listKind': names.get('listKind', f'{names["kind"]}List')},
            'conditions': [
                {
                    'type': condition,
                    'status': 'True',
                    'reason': reason,
                    'message': message,
                    'lastTransitionTime': now_rfc3339(),
                }
                for condition, reason, message in (
                    ('NamesAccepted', 'NoConflicts', 'no conflicts found'),
                    ('Established', 'InitialNamesAccepted', 'the initial names have been accepted'),
                )
            ],
            'storedVersions': [version['name']],
        }

    def _uninstall_crd(self, name: str) -> None:
        """A deleted CRD takes its objects with it."""
        for key, kind in list(self.kinds.items()):
            if kind.crd == name:
                for store_key, obj in list(self.store[key].items()):
                    self._remove(kind, store_key)
                    self._next_rv()
                    self._emit(kind, 'DELETED', obj, None)
                del self.kinds[key]
                self._documents.clear()

    # --- faults --------------------------------------------------------------------------------
    def inject(self, code: int, **options: Any) -> Fault:
        """Answer the next matching requests with ``code`` (see :class:`Fault` for the options)."""
        fault = Fault(code, **options)
        self.faults.append(fault)
        return fault

    def drop_watches(self, seconds: float, agents: tuple[str, ...] = OPERATOR_AGENTS) -> None:
        """Cut every open watch of ``agents`` and answer their new watches 503 for ``seconds``.

        Call it on the serving loop (``ApiServer.call``). Clients resume from their last
        resourceVersion afterwards and get every event they missed, as from a real server."""
        self.watches_down_until = time.monotonic() + seconds
        self._down_agents = agents
        for watcher in list(self.watchers):
            if watcher.agent.startswith(agents):
                watcher.queue.put_nowait(DROP)
                self.dropped_watches += 1

    def _fault_for(self, raw: Any) -> aiohttp.web.Response | None:
        agent = raw.headers.get('User-Agent', '')
        watch = raw.query.get('watch') in ('true', '1')
        if watch and time.monotonic() < self.watches_down_until and agent.startswith(self._down_agents):
            return ApiError(503, 'ServiceUnavailable', 'injected fault: watches are down').response()
        for fault in self.faults:
            if fault.matches(raw.method, raw.path_qs, agent, watch):
                fault.hits.append(f'{raw.method} {raw.path_qs}')
                return fault.response()
        return None

    # --- HTTP entry ------------------------------------------------------------------------------
    def _kind_of(self, request: Any) -> Kind | None:
        res = request.resource
        if res is None or not res.plural or not isinstance(res.plural, str):
            return None
        key = f'{res.group}/{res.version}/{res.plural}'.lstrip('/')
        return self.kinds.get(key)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        self.requests.append((raw.method, raw.path_qs, raw.headers.get('User-Agent', '')))
        injected = self._fault_for(raw)
        if injected is not None:
            return injected
        published = self._discovery(raw)
        if published is not None:
            return published
        kind = self._kind_of(request)
        if kind is None:
            return await super()._handle(request)
        self._warnings = []
        try:
            response = await self._serve(kind, request)
        except ApiError as e:
            response = aiohttp.web.json_response(e.body(), status=e.code)
        for warning in self._warnings:
            response.headers.add('Warning', f'299 - {apiextensions.go_quote(warning)}')
        return response

    # --- discovery and OpenAPI -----------------------------------------------------------------
    def _discovery(self, raw: Any) -> aiohttp.web.Response | None:
        """``/api``, ``/apis``, group and group-version discovery, ``/openapi/v2`` and ``/openapi/v3``."""
        if raw.method != 'GET':
            return None
        parts = [p for p in raw.path.split('/') if p]
        served = sorted(self.kinds.values(), key=lambda k: k.key)
        accept = raw.headers.get('Accept', '')
        if parts == ['api'] or parts == ['apis']:
            core = parts == ['api']
            if openapi.wants_aggregated(accept):
                body = openapi.aggregated(served, core)
                return aiohttp.web.Response(
                    body=json.dumps(body).encode(), headers={'Content-Type': openapi.AGGREGATED}
                )
            if core:
                return self._json({'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': []})
            return self._json(openapi.api_group_list(served))
        if len(parts) == 2 and parts[0] == 'api':
            return self._json(openapi.resource_list(served, '', parts[1]))
        if parts[:1] == ['apis'] and len(parts) in (2, 3):
            group = parts[1]
            if len(parts) == 2 and any(k.group == group for k in served):
                return self._json(openapi.api_group(served, group))
            if len(parts) == 3 and any((k.group, k.version) == (group, parts[2]) for k in served):
                return self._json(openapi.resource_list(served, group, parts[2]))
            return ApiError(404, 'NotFound', 'the server could not find the requested resource').response()
        if parts[:1] == ['openapi']:
            return self._openapi(parts[1:], accept, served)
        return None

    def _openapi(self, parts: list[str], accept: str, served: list[Kind]) -> aiohttp.web.Response:
        if parts == ['v2']:
            if accept and 'json' not in accept and '*/*' not in accept:
                return ApiError(406, 'NotAcceptable', f'only application/json is served here, not {accept}').response()
            if 'v2' not in self._documents:
                self._documents['v2'] = json.dumps(openapi.openapi_v2(served))
            return aiohttp.web.Response(text=self._documents['v2'], content_type='application/json')
        if parts == ['v3']:
            paths = {}
            for group, version in openapi.group_versions(served):
                path = openapi.v3_path(group, version)
                digest = openapi.document_hash(self._v3_document(served, group, version))
                paths[path] = {'serverRelativeURL': f'/openapi/v3/{path}?hash={digest}'}
            return self._json({'paths': paths})
        if parts[:1] == ['v3'] and len(parts) in (3, 4):
            group, version = ('', parts[2]) if parts[1] == 'api' else (parts[2], parts[3] if len(parts) == 4 else '')
            if any((k.group, k.version) == (group, version) for k in served):
                document = self._v3_document(served, group, version)
                return aiohttp.web.Response(text=json.dumps(document), content_type='application/json')
        return ApiError(404, 'NotFound', 'the server could not find the requested resource').response()

    def _v3_document(self, served: list[Kind], group: str, version: str) -> dict[str, Any]:
        key = f'v3:{group}/{version}'
        if key not in self._documents:
            self._documents[key] = openapi.openapi_v3(served, group, version)
        return self._documents[key]

    async def _serve(self, kind: Kind, request: Any) -> aiohttp.web.StreamResponse:
        method = request.method.value if hasattr(request.method, 'value') else str(request.method)
        method = method.upper()
        params = dict(request.params)
        ns, name, sub = request.namespace, request.name, request.subresource
        if sub not in (None, *kind.subresources):
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        validation = params.get('fieldValidation') or 'Warn'
        if validation not in apiextensions.FIELD_VALIDATION:
            raise ApiError(
                400,
                'BadRequest',
                f'fieldValidation parameter unsupported: {validation}; use one of Ignore, Warn or Strict',
            )
        accept = request.headers.get('Accept', '')
        if method == 'GET' and params.get('watch') in ('true', '1'):
            return await self._watch(kind, request, ns, name, params)
        if method == 'GET' and name and sub == 'log':
            return await self._log(request, ns, name, params)
        if method == 'GET' and name:
            obj = self._get(kind, ns, name)
            return self._json(self._table(kind, [obj], params) if 'as=Table' in accept else obj)
        if method == 'GET':
            return self._json(self._list(kind, ns, params, accept))
        if method == 'POST' and not name:
            return self._json(self._create(kind, ns, request.data, validation), 201)
        if method == 'PATCH' and name:
            content_type = request.headers.get('Content-Type', 'application/merge-patch+json')
            patched = self._patch(
                kind, ns, name, request.data, content_type, status_only=sub == 'status', validation=validation
            )
            return self._json(patched)
        if method == 'PUT' and name:
            replaced = self._replace(kind, ns, name, request.data, status_only=sub == 'status', validation=validation)
            return self._json(replaced)
        if method == 'DELETE' and name:
            return self._json(self._delete(kind, ns, name, self._policy(kind, params, request.data)))
        if method == 'DELETE':
            return self._json(self._delete_collection(kind, ns, params, request.data))
        raise ApiError(405, 'MethodNotAllowed', f'{method} is not supported on {kind.key}')

    @staticmethod
    def _json(body: dict[str, Any], status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(body, status=status)

    # --- reads -----------------------------------------------------------------------------------
    def _bucket(self, kind: Kind) -> dict[tuple[str | None, str], dict[str, Any]]:
        return self.store[kind.key]

    def _key(self, kind: Kind, ns: str | None, name: str) -> tuple[str | None, str]:
        return (ns if kind.namespaced else None, name)

    def _get(self, kind: Kind, ns: str | None, name: str) -> dict[str, Any]:
        obj = self._bucket(kind).get(self._key(kind, ns, name))
        if obj is None:
            raise ApiError(
                404,
                'NotFound',
                f'{kind.key.split("/")[-1]} "{name}" not found',
                {'name': name, 'kind': kind.key.split('/')[-1]},
            )
        return copy.deepcopy(obj)

    def _select(self, kind: Kind, ns: str | None, params: dict[str, str]) -> list[dict[str, Any]]:
        labels = parse_label_selector(params.get('labelSelector'))
        fields = parse_field_selector(params.get('fieldSelector'))
        result = []
        for (obj_ns, _), obj in sorted(self._bucket(kind).items(), key=lambda item: (item[0][0] or '', item[0][1])):
            if kind.namespaced and ns is not None and obj_ns != ns:
                continue
            if all(t(obj['metadata'].get('labels') or {}) for t in labels) and all(t(obj) for t in fields):
                result.append(obj)
        return result

    def _list(self, kind: Kind, ns: str | None, params: dict[str, str], accept: str) -> dict[str, Any]:
        items = [copy.deepcopy(o) for o in self._select(kind, ns, params)]
        if 'as=Table' in accept:
            return self._table(kind, items, params)
        return {
            'apiVersion': kind.api_version,
            'kind': f'{kind.kind}List',
            'metadata': {'resourceVersion': str(self.last_rv)},
            'items': items,
        }

    def _table(self, kind: Kind, items: list[dict[str, Any]], params: dict[str, str]) -> dict[str, Any]:
        include = params.get('includeObject') or 'Metadata'
        return tables.table(kind.key, kind.columns, items, str(self.last_rv), include)

    # --- writes ----------------------------------------------------------------------------------
    def _next_rv(self) -> str:
        self.last_rv = next(self._rv)
        return str(self.last_rv)

    def _emit(self, kind: Kind, type_: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        rv = self.last_rv
        # Stored objects are never mutated in place (every write stores a new dict), so the history
        # and the watch events can share them: they are serialised, never changed.
        self.history.append((rv, kind.key, type_, old, new))
        del self.history[:-HISTORY_LIMIT]
        for watcher in list(self.watchers):
            if watcher.key == kind.key:
                event = self._event_for(watcher, type_, old, new)
                if event is not None:
                    watcher.queue.put_nowait(event)

    @staticmethod
    def _event_for(
        watcher: Watcher, type_: str, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        was, now_ = watcher.matches(old), watcher.matches(new)
        if type_ == 'DELETED':
            return {'type': 'DELETED', 'object': old} if was else None
        if was and now_:
            return {'type': type_, 'object': new}
        if now_:
            return {'type': 'ADDED', 'object': new}
        if was:
            return {'type': 'DELETED', 'object': new}
        return None

    @staticmethod
    def _name_errors(name: Any) -> list[apiextensions.FieldError]:
        """ObjectMeta's name check for every kind (a DNS-1123 subdomain), worded as apimachinery words it."""
        if not isinstance(name, str) or not name:
            return [apiextensions.required('metadata.name', 'name or generateName is required')]
        errors = []
        if len(name) > 253:
            errors.append(apiextensions.invalid('metadata.name', name, 'must be no more than 253 characters'))
        if not DNS1123_SUBDOMAIN.match(name):
            errors.append(apiextensions.invalid('metadata.name', name, DNS1123_SUBDOMAIN_MESSAGE))
        return errors

    def _invalid(self, kind: Kind, name: str, errors: list[apiextensions.FieldError]) -> ApiError:
        status = apiextensions.status_invalid(kind.kind, kind.group, name, errors)
        return ApiError(422, 'Invalid', status['message'], status['details'])

    def _admit(self, kind: Kind, obj: dict[str, Any], old: dict[str, Any] | None, validation: str) -> dict[str, Any]:
        """Name check, then the CRD's pruning, defaulting, schema and CEL rules (apiextensions.admit)."""
        errors = self._name_errors(obj['metadata'].get('name'))
        if kind.schema is not None:
            try:
                admitted = apiextensions.admit(
                    obj, old, kind.schema, kind=kind.kind, version=kind.version, field_validation=validation
                )
            except apiextensions.StrictDecodingError as e:
                raise ApiError(400, 'BadRequest', str(e)) from e
            self._warnings += admitted.warnings
            obj, errors = admitted.obj, errors + admitted.errors
        if kind.key == CRD_KEY:
            errors += self._check_crd(obj)
        if errors:
            raise self._invalid(kind, obj['metadata'].get('name') or '', errors)
        return obj

    def _check_service_account(self, pod: dict[str, Any]) -> None:
        """The ServiceAccount admission plugin's refusal, in its words."""
        meta = pod['metadata']
        account = (pod.get('spec') or {}).get('serviceAccountName') or 'default'
        if (meta['namespace'], account) not in self.store.get('v1/serviceaccounts', {}):
            raise ApiError(
                403,
                'Forbidden',
                f'pods "{meta["name"]}" is forbidden: error looking up service account '
                f'{meta["namespace"]}/{account}: serviceaccount "{account}" not found',
                {'name': meta['name'], 'kind': 'pods'},
            )

    def _create(self, kind: Kind, ns: str | None, data: Any, validation: str = 'Warn') -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ApiError(400, 'BadRequest', 'the request body is not a JSON object')
        obj = copy.deepcopy(data)
        meta = obj.setdefault('metadata', {})
        if kind.namespaced:
            if meta.get('namespace') and ns and meta['namespace'] != ns:
                raise ApiError(
                    400,
                    'BadRequest',
                    'the namespace of the provided object does not match the namespace sent on the request',
                )
            meta['namespace'] = ns or meta.get('namespace')
            if not meta['namespace']:
                raise ApiError(400, 'BadRequest', f'{kind.kind} is namespaced: create it in a namespace')
        else:
            meta.pop('namespace', None)
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + uuid.uuid4().hex[:5]
        if kind.status_subresource:
            obj.pop('status', None)
        obj = self._admit(kind, obj, None, validation)
        meta = obj['metadata']
        if kind.key == 'v1/pods' and self.admit_service_accounts:
            self._check_service_account(obj)
        key = self._key(kind, meta.get('namespace'), meta['name'])
        if key in self._bucket(kind):
            plural = kind.key.split('/')[-1]
            raise ApiError(
                409,
                'AlreadyExists',
                f'{plural}.{kind.group} "{meta["name"]}" already exists'
                if kind.group
                else f'{plural} "{meta["name"]}" already exists',
                {'name': meta['name'], 'group': kind.group, 'kind': plural},
            )
        obj['apiVersion'], obj['kind'] = kind.api_version, kind.kind
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
            generation=1,
            resourceVersion=self._next_rv(),
        )
        for stale in ('deletionTimestamp', 'deletionGracePeriodSeconds'):
            meta.pop(stale, None)
        if kind.key == CRD_KEY:
            self._install_crd(obj)
        if kind.key == 'batch/v1/jobs':
            _job_selector(obj)
        self._put(kind, key, obj)
        self._emit(kind, 'ADDED', None, obj)
        created = copy.deepcopy(obj)
        # The garbage collector also removes an object created with owners that are all gone
        # (a child created a moment after its owner was deleted): it is answered 201, then collected.
        self._collect_garbage()
        return created

    def _patch(
        self,
        kind: Kind,
        ns: str | None,
        name: str,
        data: Any,
        content_type: str,
        *,
        status_only: bool,
        validation: str = 'Warn',
    ) -> dict[str, Any]:
        current = self._get(kind, ns, name)
        if 'json-patch' in content_type:
            if not isinstance(data, list):
                raise ApiError(400, 'BadRequest', 'a JSON patch must be a list of operations')
            try:
                patched = jsonpatch.apply_patch(current, data, in_place=False)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(
                    422, 'Invalid', f'the server rejected our request due to an error in our request: {e}'
                ) from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, 'Invalid', f'invalid JSON patch: {e}') from e
        else:
            if not isinstance(data, dict):
                raise ApiError(400, 'BadRequest', 'a merge patch must be a JSON object')
            wanted_rv = (data.get('metadata') or {}).get('resourceVersion')
            if wanted_rv and wanted_rv != current['metadata']['resourceVersion']:
                raise self._conflict(kind, name)
            patched = merge_patch(current, data)
        return self._update(kind, current, patched, status_only=status_only, validation=validation)

    def _replace(
        self, kind: Kind, ns: str | None, name: str, data: Any, *, status_only: bool, validation: str = 'Warn'
    ) -> dict[str, Any]:
        current = self._get(kind, ns, name)
        if not isinstance(data, dict):
            raise ApiError(400, 'BadRequest', 'the request body is not a JSON object')
        wanted_rv = (data.get('metadata') or {}).get('resourceVersion')
        if wanted_rv and wanted_rv != current['metadata']['resourceVersion']:
            raise self._conflict(kind, name)
        return self._update(kind, current, copy.deepcopy(data), status_only=status_only, validation=validation)

    @staticmethod
    def _conflict(kind: Kind, name: str) -> ApiError:
        return ApiError(
            409,
            'Conflict',
            f'Operation cannot be fulfilled on {kind.key.split("/")[-1]} "{name}": the object has been modified; '
            'please apply your changes to the latest version and try again',
        )

    def _update(
        self,
        kind: Kind,
        current: dict[str, Any],
        patched: dict[str, Any],
        *,
        status_only: bool,
        validation: str = 'Warn',
    ) -> dict[str, Any]:
        if status_only:
            new = copy.deepcopy(current)
            if patched.get('status') is None:
                new.pop('status', None)
            else:
                new['status'] = patched['status']
        else:
            new = patched
            if kind.status_subresource:
                if current.get('status') is None:
                    new.pop('status', None)
                else:
                    new['status'] = current['status']
        meta = new.setdefault('metadata', {})
        old_meta = current['metadata']
        for immutable in ('uid', 'creationTimestamp', 'name', 'namespace', 'deletionTimestamp', 'generation'):
            if immutable in old_meta:
                meta[immutable] = old_meta[immutable]
            else:
                meta.pop(immutable, None)
        new['apiVersion'], new['kind'] = kind.api_version, kind.kind
        if kind.schema is not None or kind.key == CRD_KEY:
            new = self._admit(kind, new, current, validation)
            meta = new['metadata']
            if kind.key == CRD_KEY and not status_only:
                self._install_crd(new)
        if not status_only and _spec_part(new) != _spec_part(current):
            meta['generation'] = int(old_meta.get('generation') or 1) + 1
        if new == current:
            return current  # a no-op write neither bumps resourceVersion nor notifies watchers
        meta['resourceVersion'] = self._next_rv()
        key = self._key(kind, meta.get('namespace'), meta['name'])
        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            self._remove(kind, key)
            self._emit(kind, 'DELETED', current, new)
            self._collect_garbage()
            return copy.deepcopy(new)
        self._put(kind, key, new)
        self._emit(kind, 'MODIFIED', current, new)
        self._collect_garbage()
        return copy.deepcopy(new)

    # --- deletion and garbage collection ---------------------------------------------------------
    @staticmethod
    def _policy(kind: Kind, params: dict[str, str], data: Any) -> str:
        policy = params.get('propagationPolicy')
        if policy is None and isinstance(data, dict):
            policy = data.get('propagationPolicy')
            if policy is None and data.get('orphanDependents') is True:
                policy = 'Orphan'
        if policy is None:
            # A real API server orphans a Job's pods unless asked otherwise (kubectl asks Background).
            policy = 'Orphan' if kind.key == 'batch/v1/jobs' else 'Background'
        if policy not in ('Orphan', 'Background', 'Foreground'):
            raise ApiError(422, 'Invalid', f'propagationPolicy: Unsupported value: {policy!r}')
        return policy

    def _delete(self, kind: Kind, ns: str | None, name: str, policy: str) -> dict[str, Any]:
        current = self._get(kind, ns, name)
        uid = current['metadata']['uid']
        if policy == 'Orphan':
            self._orphan(uid)
        meta = current['metadata']
        finalizers = list(meta.get('finalizers') or [])
        if policy == 'Foreground' and self._dependents(uid) and 'foregroundDeletion' not in finalizers:
            finalizers.append('foregroundDeletion')
        if finalizers:
            if meta.get('deletionTimestamp') and finalizers == meta.get('finalizers'):
                return current
            new = copy.deepcopy(current)
            new['metadata'].update(
                finalizers=finalizers,
                deletionTimestamp=meta.get('deletionTimestamp') or now_rfc3339(),
                deletionGracePeriodSeconds=0,
                resourceVersion=self._next_rv(),
            )
            self._put(kind, self._key(kind, meta.get('namespace'), name), new)
            self._emit(kind, 'MODIFIED', current, new)
            self._collect_garbage()
            return copy.deepcopy(new)
        self._remove(kind, self._key(kind, meta.get('namespace'), name))
        self._next_rv()
        self._emit(kind, 'DELETED', current, None)
        if kind.key == CRD_KEY:
            self._uninstall_crd(name)
        self._collect_garbage()
        return current

    def _delete_collection(self, kind: Kind, ns: str | None, params: dict[str, str], data: Any) -> dict[str, Any]:
        policy = self._policy(kind, params, data)
        deleted = []
        for obj in [copy.deepcopy(o) for o in self._select(kind, ns, params)]:
            meta = obj['metadata']
            if self._key(kind, meta.get('namespace'), meta['name']) in self._bucket(kind):
                deleted.append(self._delete(kind, meta.get('namespace'), meta['name'], policy))
        return {
            'apiVersion': kind.api_version,
            'kind': f'{kind.kind}List',
            'metadata': {'resourceVersion': str(self.last_rv)},
            'items': deleted,
        }

    # --- the store and its indexes ---------------------------------------------------------------
    def _put(self, kind: Kind, key: tuple[str | None, str], obj: dict[str, Any]) -> None:
        """Store ``obj`` (a new dict: stored objects are never changed in place) and index it."""
        bucket = self._bucket(kind)
        old = bucket.get(key)
        if old is not None:
            self._unindex(old)
        bucket[key] = obj
        uid = obj['metadata']['uid']
        self._by_uid[uid] = (kind.key, key)
        for ref in obj['metadata'].get('ownerReferences') or []:
            if ref.get('uid'):
                self._children.setdefault(ref['uid'], set()).add(uid)
        self._gc_queue.append(uid)

    def _remove(self, kind: Kind, key: tuple[str | None, str]) -> None:
        obj = self._bucket(kind).pop(key)
        self._unindex(obj)
        self._by_uid.pop(obj['metadata']['uid'], None)
        # Its dependents may have lost their last owner; its owners may wait for it (foreground).
        self._gc_queue.extend(self._children.get(obj['metadata']['uid'], ()))
        self._gc_queue.extend(ref['uid'] for ref in obj['metadata'].get('ownerReferences') or [] if ref.get('uid'))

    def _unindex(self, obj: dict[str, Any]) -> None:
        uid = obj['metadata']['uid']
        for ref in obj['metadata'].get('ownerReferences') or []:
            children = self._children.get(ref.get('uid') or '')
            if children is not None:
                children.discard(uid)
                if not children:
                    del self._children[ref['uid']]

    def _lookup(self, uid: str | None) -> tuple[Kind, dict[str, Any]] | None:
        where = self._by_uid.get(uid or '')
        if where is None:
            return None
        kind = self.kinds[where[0]]
        return kind, self._bucket(kind)[where[1]]

    def _all(self) -> list[tuple[Kind, dict[str, Any]]]:
        return [(self.kinds[key], obj) for key, objs in self.store.items() for obj in list(objs.values())]

    def _dependents(self, uid: str) -> list[tuple[Kind, dict[str, Any]]]:
        found = (self._lookup(child) for child in sorted(self._children.get(uid, ())))
        return [item for item in found if item is not None]

    def _orphan(self, uid: str) -> None:
        for kind, obj in self._dependents(uid):
            refs = [r for r in obj['metadata']['ownerReferences'] if r.get('uid') != uid]
            new = copy.deepcopy(obj)
            new['metadata']['ownerReferences'] = refs
            if not refs:
                del new['metadata']['ownerReferences']
            new['metadata']['resourceVersion'] = self._next_rv()
            self._put(kind, self._key(kind, obj['metadata'].get('namespace'), obj['metadata']['name']), new)
            self._emit(kind, 'MODIFIED', obj, new)

    def _collect_garbage(self) -> None:
        """Delete dependents whose owners are all gone; finish foreground deletions.

        Only the objects a write touched are looked at (``_gc_queue``, filled by ``_put`` and
        ``_remove``): the object itself, the dependents of a removed object and its owners."""
        if self._collecting:
            return  # a deletion below queues more work; the outer loop takes it
        self._collecting = True
        try:
            while self._gc_queue:
                found = self._lookup(self._gc_queue.pop())
                if found is not None:
                    self._collect_one(*found)
        finally:
            self._collecting = False

    def _collect_one(self, kind: Kind, obj: dict[str, Any]) -> None:
        meta = obj['metadata']
        refs = meta.get('ownerReferences') or []
        if refs and not meta.get('deletionTimestamp'):
            owners = [self._lookup(ref.get('uid')) for ref in refs]
            foreground = any(
                owner is not None
                and owner[1]['metadata'].get('deletionTimestamp')
                and 'foregroundDeletion' in (owner[1]['metadata'].get('finalizers') or [])
                for owner in owners
            )
            if all(owner is None for owner in owners) or foreground:
                self._delete(kind, meta.get('namespace'), meta['name'], 'Foreground' if foreground else 'Background')
                return
        if meta.get('deletionTimestamp') and 'foregroundDeletion' in (meta.get('finalizers') or []):
            dependents = self._children.get(meta['uid'])
            if dependents:
                self._gc_queue.extend(dependents)  # each is deleted in the foreground
            else:
                patched = copy.deepcopy(obj)
                patched['metadata']['finalizers'] = [f for f in meta['finalizers'] if f != 'foregroundDeletion']
                self._update(kind, copy.deepcopy(obj), patched, status_only=False)

    # --- watch and logs --------------------------------------------------------------------------
    async def _watch(
        self, kind: Kind, request: Any, ns: str | None, name: str | None, params: dict[str, str]
    ) -> aiohttp.web.StreamResponse:
        field_selector = params.get('fieldSelector') or ''
        if name:
            field_selector = ','.join(filter(None, [field_selector, f'metadata.name={name}']))
        watcher = Watcher(
            key=kind.key,
            namespace=ns if kind.namespaced else None,
            labels=parse_label_selector(params.get('labelSelector')),
            fields=parse_field_selector(field_selector),
            queue=asyncio.Queue(),
            agent=request._raw_request.headers.get('User-Agent', ''),
        )
        since = params.get('resourceVersion')
        initial: list[dict[str, Any]] = []
        if since and since != '0':
            oldest = self.history[0][0] if self.history else self.last_rv + 1
            if int(since) < oldest - 1 and int(since) < self.last_rv:
                initial.append(
                    {
                        'type': 'ERROR',
                        'object': ApiError(410, 'Expired', f'too old resource version: {since} ({oldest})').body(),
                    }
                )
            else:
                for rv, key, type_, old, new in self.history:
                    if key == kind.key and rv > int(since):
                        event = self._event_for(watcher, type_, old, new)
                        if event is not None:
                            initial.append(event)
        else:
            initial = [{'type': 'ADDED', 'object': copy.deepcopy(o)} for o in self._select(kind, ns, params)]
            initial = [e for e in initial if watcher.matches(e['object'])]
        self.watchers.append(watcher)
        self.watch_starts[kind.key] = self.watch_starts.get(kind.key, 0) + 1
        response = aiohttp.web.StreamResponse(headers={'Content-Type': 'application/json'})
        raw = request._raw_request
        await response.prepare(raw)
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None
        deadline = time.monotonic() + timeout if timeout else None
        bookmarks = params.get('allowWatchBookmarks') in ('true', '1')
        as_table = 'as=Table' in request.headers.get('Accept', '')

        def encode(event: dict[str, Any]) -> bytes:
            if as_table and event['type'] in ('ADDED', 'MODIFIED', 'DELETED'):
                event = {'type': event['type'], 'object': self._table(kind, [event['object']], params)}
            return json.dumps(event).encode() + b'\n'

        try:
            for event in initial:
                await response.write(encode(event))
            while not self.closing:
                wait = BOOKMARK_INTERVAL
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        break
                    if bookmarks:
                        bookmark = {
                            'type': 'BOOKMARK',
                            'object': {
                                'apiVersion': kind.api_version,
                                'kind': kind.kind,
                                'metadata': {'resourceVersion': str(self.last_rv)},
                            },
                        }
                        await response.write(json.dumps(bookmark).encode() + b'\n')
                    continue
                if event is DROP:  # the connection breaks: no end of stream, the client must reconnect
                    if raw.transport is not None:
                        raw.transport.close()
                    return response
                await response.write(encode(event))
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.watchers.remove(watcher)
        return response

    async def _log(self, request: Any, ns: str | None, name: str, params: dict[str, str]) -> aiohttp.web.StreamResponse:
        pod = self._get(self.kinds['v1/pods'], ns, name)
        source = self.log_source
        text = (source(ns or '', name) if source else None) or ''
        if params.get('follow') not in ('true', '1'):
            if params.get('tailLines'):
                text = ''.join(text.splitlines(keepends=True)[-int(params['tailLines']) :])
            return aiohttp.web.Response(text=text, content_type='text/plain')
        response = aiohttp.web.StreamResponse(headers={'Content-Type': 'text/plain'})
        await response.prepare(request._raw_request)
        sent = 0
        try:
            while not self.closing:
                text = (source(ns or '', name) if source else None) or ''
                if len(text) > sent:
                    await response.write(text[sent:].encode())
                    sent = len(text)
                current = self.store['v1/pods'].get((ns, name))
                phase = ((current or pod).get('status') or {}).get('phase')
                if current is None or phase in ('Succeeded', 'Failed'):
                    text = (source(ns or '', name) if source else None) or ''
                    if len(text) > sent:
                        await response.write(text[sent:].encode())
                    break
                await asyncio.sleep(0.1)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response
