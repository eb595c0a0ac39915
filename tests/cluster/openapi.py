"""Discovery and OpenAPI documents of the test cluster, built from what it serves.

Written from the Kubernetes API documentation: "The Kubernetes API" / "Discovery API" and "OpenAPI
interface definition" (https://kubernetes.io/docs/concepts/overview/kubernetes-api/) and "Publish
Validation Schema in OpenAPI" (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
custom-resource-definitions/#publish-validation-schema-in-openapi):

- legacy discovery (``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``) lists
  each resource once, its subresources as ``<resource>/<subresource>`` with their own verbs, short names and
  categories on the main resource only; aggregated discovery (``apidiscovery.k8s.io/v2``) is served when the
  client asks for it in ``Accept``, as kubectl 1.30+ does;
- ``/openapi/v3`` indexes one document per group-version (``serverRelativeURL`` with a content hash), and
  ``/openapi/v2`` is the whole Swagger 2.0 document (served as JSON only: client-go asks for protobuf,
  which is answered 406 Not Acceptable). Each CRD's served version publishes its ``openAPIV3Schema`` with
  ``metadata`` referring to ObjectMeta and ``x-kubernetes-group-version-kind``, and every PATCH operation
  lists the ``fieldValidation`` query parameter: that is how kubectl decides to validate on the server.

Schemas of built-in kinds come from the official definitions that ``kubernetes-validate`` ships (Kubernetes
1.32), turned back into OpenAPI form.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

KUBERNETES_VERSION = '1.32.0'
AGGREGATED = 'application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList'
META = 'io.k8s.apimachinery.pkg.apis.meta.v1'
QUERY_PARAMETERS = {
    'fieldValidation': 'fieldValidation instructs the server on how to handle objects in the request '
    '(POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn (the default) '
    '- Strict.',
    'fieldManager': 'fieldManager is a name associated with the actor or entity that is making these changes.',
    'dryRun': 'When present, indicates that modifications should not be persisted.',
}


# --- the definitions of built-in kinds -------------------------------------------------------------------


@lru_cache(maxsize=1)
def builtin_definitions() -> dict[str, Any]:
    """Kubernetes 1.32's definitions (``$defs``) as kubernetes-validate ships them."""
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / 'kubernetes-json-schema' / f'v{KUBERNETES_VERSION}-local'
    return json.loads((root / '_definitions.json').read_text())['$defs']


def _openapi_node(node: Any, ref_prefix: str) -> Any:
    """JSON-Schema form (``type: [x, null]``, ``#/$defs/``) back to OpenAPI (``type: x``, components refs)."""
    if isinstance(node, list):
        return [_openapi_node(n, ref_prefix) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == '$ref':
            continue
        if key == 'type' and isinstance(value, list):
            types = [t for t in value if t != 'null']
            out['type'] = types[0] if types else 'object'
        elif key == 'oneOf':
            out['type'] = 'string'
            out['format'] = 'int-or-string' if any('integer' in str(o) for o in value) else 'quantity'
        elif key in ('properties', 'patternProperties'):
            out[key] = {name: _openapi_node(sub, ref_prefix) for name, sub in value.items()}
        else:
            out[key] = _openapi_node(value, ref_prefix)
    if '$ref' in node:
        target = ref_prefix + node['$ref'].split('/')[-1]
        if len(node) == 1:
            return {'$ref': target}
        out['allOf'] = [{'$ref': target}]
    return out


def _references(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get('$ref'), str):
            found.add(node['$ref'].split('/')[-1])
        for value in node.values():
            found |= _references(value)
    elif isinstance(node, list):
        for value in node:
            found |= _references(value)
    return found


def _closure(names: set[str]) -> set[str]:
    definitions = builtin_definitions()
    seen: set[str] = set()
    todo = [n for n in names if n in definitions]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [n for n in _references(definitions[name]) if n not in seen and n in definitions]
    return seen


def _builtin_name(group: str, version: str, kind: str) -> str | None:
    for name, schema in builtin_definitions().items():
        for gvk in schema.get('x-kubernetes-group-version-kind') or []:
            if (gvk.get('group'), gvk.get('version'), gvk.get('kind')) == (group, version, kind):
                return name
    return None


# --- CRD schemas --------------------------------------------------------------------------------------


def crd_definition_name(group: str, version: str, kind: str) -> str:
    """``finetuner.dev`` ``v1alpha1`` ``FinetuneRun`` -> ``dev.finetuner.v1alpha1.FinetuneRun`` (reversed group)."""
    return '.'.join([*reversed(group.split('.')), version, kind])


def crd_schema(schema: dict[str, Any], group: str, version: str, kind: str, ref_prefix: str) -> dict[str, Any]:
    published = copy.deepcopy(schema)
    properties = published.setdefault('properties', {})
    definitions = builtin_definitions()
    meta_fields = definitions[f'{META}.ObjectMeta']
    type_meta = definitions[f'{META}.Status']['properties']
    properties['apiVersion'] = {'type': 'string', 'description': type_meta['apiVersion']['description']}
    properties['kind'] = {'type': 'string', 'description': type_meta['kind']['description']}
    properties['metadata'] = {
        'description': "Standard object's metadata. More info: "
        'https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata',
        'allOf': [{'$ref': f'{ref_prefix}{META}.ObjectMeta'}],
    }
    del meta_fields  # only its name is referred to; the definition itself joins the document's components
    published['x-kubernetes-group-version-kind'] = [{'group': group, 'kind': kind, 'version': version}]
    return published


def _list_schema(item_ref: str, group: str, version: str, kind: str, ref_prefix: str) -> dict[str, Any]:
    return {
        'description': f'{kind}List is a list of {kind}',
        'type': 'object',
        'required': ['items'],
        'properties': {
            'apiVersion': {'type': 'string'},
            'items': {'type': 'array', 'items': {'$ref': item_ref}},
            'kind': {'type': 'string'},
            'metadata': {'allOf': [{'$ref': f'{ref_prefix}{META}.ListMeta'}]},
        },
        'x-kubernetes-group-version-kind': [{'group': group, 'kind': f'{kind}List', 'version': version}],
    }


# --- paths ----------------------------------------------------------------------------------------------


def _parameter(name: str, v3: bool) -> dict[str, Any]:
    parameter = {'name': name, 'in': 'query', 'description': QUERY_PARAMETERS[name], 'uniqueItems': True}
    if v3:
        parameter['schema'] = {'type': 'string', 'uniqueItems': True}
        del parameter['uniqueItems']
    else:
        parameter['type'] = 'string'
    return parameter


def _operation(action: str, verb: str, kind_info: Any, ref: str, v3: bool, status: bool = False) -> dict[str, Any]:
    gvk = {'group': kind_info.group, 'version': kind_info.version, 'kind': kind_info.kind}
    noun = f'{kind_info.kind}{" status" if status else ""}'
    operation: dict[str, Any] = {
        'description': f'{verb} the specified {noun}',
        'operationId': f'{action}{kind_info.kind}{"Status" if status else ""}',
        'x-kubernetes-action': action,
        'x-kubernetes-group-version-kind': gvk,
        'parameters': [],
    }
    if action in ('patch', 'put', 'post'):
        operation['parameters'] = [_parameter(p, v3) for p in ('dryRun', 'fieldManager', 'fieldValidation')]
    if v3:
        operation['responses'] = {'200': {'content': {'application/json': {'schema': {'$ref': ref}}}}}
        if action in ('patch', 'put', 'post'):
            operation['requestBody'] = {'content': {'application/json': {'schema': {'$ref': ref}}}}
    else:
        operation['responses'] = {'200': {'schema': {'$ref': ref}}}
    return operation


def _paths(kind_info: Any, ref: str, v3: bool) -> dict[str, Any]:
    base = f'/api/{kind_info.version}' if not kind_info.group else f'/apis/{kind_info.group}/{kind_info.version}'
    collection = (
        f'{base}/namespaces/{{namespace}}/{kind_info.plural}' if kind_info.namespaced else f'{base}/{kind_info.plural}'
    )
    item = f'{collection}/{{name}}'
    paths = {
        collection: {
            'get': _operation('list', 'list or watch objects of kind', kind_info, ref, v3),
            'post': _operation('post', 'create a', kind_info, ref, v3),
        },
        item: {
            'get': _operation('get', 'read', kind_info, ref, v3),
            'put': _operation('put', 'replace', kind_info, ref, v3),
            'patch': _operation('patch', 'partially update', kind_info, ref, v3),
            'delete': _operation('delete', 'delete a', kind_info, ref, v3),
        },
    }
    if kind_info.status_subresource:
        paths[f'{item}/status'] = {
            'get': _operation('get', 'read status of', kind_info, ref, v3, status=True),
            'patch': _operation('patch', 'partially update status of', kind_info, ref, v3, status=True),
            'put': _operation('put', 'replace status of', kind_info, ref, v3, status=True),
        }
    return paths


# --- documents ----------------------------------------------------------------------------------------------


def _schemas_for(kinds: list[Any], ref_prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Component schemas of ``kinds`` (CRD schemas and built-in definitions) and each kind's reference."""
    schemas: dict[str, Any] = {}
    refs: dict[str, str] = {}
    needed = {f'{META}.ObjectMeta', f'{META}.ListMeta', f'{META}.Status', f'{META}.DeleteOptions', f'{META}.Patch'}
    for info in kinds:
        if info.schema is not None:
            name = crd_definition_name(info.group, info.version, info.kind)
            schemas[name] = crd_schema(info.schema, info.group, info.version, info.kind, ref_prefix)
            list_name = f'{name}List'
            schemas[list_name] = _list_schema(ref_prefix + name, info.group, info.version, info.kind, ref_prefix)
            refs[info.key] = ref_prefix + name
            continue
        name = _builtin_name(info.group, info.version, info.kind)
        if name is not None:
            needed.add(name)
            needed.add(f'{name}List')
            refs[info.key] = ref_prefix + name
    definitions = builtin_definitions()
    for name in sorted(_closure(needed)):
        schemas[name] = _openapi_node(definitions[name], ref_prefix)
    return schemas, refs


def openapi_v3(kinds: list[Any], group: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of one group-version."""
    prefix = '#/components/schemas/'
    served = [k for k in kinds if (k.group, k.version) == (group, version)]
    schemas, refs = _schemas_for(served, prefix)
    paths: dict[str, Any] = {}
    for info in served:
        if info.key in refs:
            paths.update(_paths(info, refs[info.key], v3=True))
    title = 'Kubernetes CRD Swagger' if any(k.schema is not None for k in served) else 'Kubernetes'
    return {
        'openapi': '3.0.0',
        'info': {'title': title, 'version': f'v{KUBERNETES_VERSION}'},
        'paths': paths,
        'components': {'schemas': schemas},
    }


def openapi_v2(kinds: list[Any]) -> dict[str, Any]:
    """The Swagger 2.0 document of everything served."""
    prefix = '#/definitions/'
    schemas, refs = _schemas_for(kinds, prefix)
    paths: dict[str, Any] = {}
    for info in kinds:
        if info.key in refs:
            paths.update(_paths(info, refs[info.key], v3=False))
    return {
        'swagger': '2.0',
        'info': {'title': 'Kubernetes', 'version': f'v{KUBERNETES_VERSION}'},
        'paths': paths,
        'definitions': schemas,
    }


def group_versions(kinds: list[Any]) -> list[tuple[str, str]]:
    return sorted({(k.group, k.version) for k in kinds})


def v3_path(group: str, version: str) -> str:
    return f'api/{version}' if not group else f'apis/{group}/{version}'


def document_hash(document: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(document, sort_keys=True).encode()).hexdigest().upper()


# --- discovery ----------------------------------------------------------------------------------------------


SUBRESOURCE_VERBS = {'status': ['get', 'patch', 'update'], 'log': ['get']}


def api_resource(info: Any) -> list[dict[str, Any]]:
    """The APIResourceList entries of one kind: the resource, then each subresource."""
    main = {
        'name': info.plural,
        'singularName': info.singular,
        'namespaced': info.namespaced,
        'kind': info.kind,
        'verbs': list(info.verbs),
    }
    if info.shortnames:
        main['shortNames'] = list(info.shortnames)
    if info.categories:
        main['categories'] = list(info.categories)
    entries = [main]
    for sub in info.subresources:
        entries.append(
            {
                'name': f'{info.plural}/{sub}',
                'singularName': '',
                'namespaced': info.namespaced,
                'kind': 'Pod' if sub == 'log' else info.kind,
                'verbs': SUBRESOURCE_VERBS.get(sub, ['get']),
            }
        )
    return entries


def resource_list(kinds: list[Any], group: str, version: str) -> dict[str, Any]:
    gv = f'{group}/{version}' if group else version
    resources = [e for k in kinds if (k.group, k.version) == (group, version) for e in api_resource(k)]
    return {'kind': 'APIResourceList', 'apiVersion': 'v1', 'groupVersion': gv, 'resources': resources}


def api_group(kinds: list[Any], group: str) -> dict[str, Any]:
    versions = sorted({k.version for k in kinds if k.group == group}, key=_version_priority)
    entries = [{'groupVersion': f'{group}/{v}', 'version': v} for v in versions]
    return {'kind': 'APIGroup', 'apiVersion': 'v1', 'name': group, 'versions': entries, 'preferredVersion': entries[0]}


def api_group_list(kinds: list[Any]) -> dict[str, Any]:
    groups = sorted({k.group for k in kinds if k.group})
    return {'kind': 'APIGroupList', 'apiVersion': 'v1', 'groups': [_strip_kind(api_group(kinds, g)) for g in groups]}


def _strip_kind(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ('kind', 'apiVersion')}


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes' version order: GA before beta before alpha, higher numbers first."""
    match = re.fullmatch(r'v(\d+)(?:(alpha|beta)(\d+))?', version)
    if not match:
        return (3, 0, 0)
    level = {None: 0, 'beta': 1, 'alpha': 2}[match.group(2)]
    return (level, -int(match.group(1)), -int(match.group(3) or 0))


def aggregated(kinds: list[Any], core: bool) -> dict[str, Any]:
    """``APIGroupDiscoveryList`` (apidiscovery.k8s.io/v2) of the core group or of the named groups."""
    groups = [''] if core else sorted({k.group for k in kinds if k.group})
    items = []
    for group in groups:
        versions = sorted({k.version for k in kinds if k.group == group}, key=_version_priority)
        items.append(
            {
                'metadata': {'name': group, 'creationTimestamp': None},
                'versions': [
                    {
                        'version': version,
                        'resources': [
                            _aggregated_resource(k) for k in kinds if (k.group, k.version) == (group, version)
                        ],
                        'freshness': 'Current',
                    }
                    for version in versions
                ],
            }
        )
    return {'kind': 'APIGroupDiscoveryList', 'apiVersion': 'apidiscovery.k8s.io/v2', 'metadata': {}, 'items': items}


def _aggregated_resource(info: Any) -> dict[str, Any]:
    kind = {'group': info.group, 'version': info.version, 'kind': info.kind}
    resource: dict[str, Any] = {
        'resource': info.plural,
        'responseKind': kind,
        'scope': 'Namespaced' if info.namespaced else 'Cluster',
        'singularResource': info.singular,
        'verbs': list(info.verbs),
    }
    if info.shortnames:
        resource['shortNames'] = list(info.shortnames)
    if info.categories:
        resource['categories'] = list(info.categories)
    if info.subresources:
        resource['subresources'] = [
            {
                'subresource': sub,
                'responseKind': {'group': '', 'version': 'v1', 'kind': 'Pod'} if sub == 'log' else kind,
                'verbs': SUBRESOURCE_VERBS.get(sub, ['get']),
            }
            for sub in info.subresources
        ]
    return resource


def wants_aggregated(accept: str) -> bool:
    """Whether ``Accept`` asks for aggregated discovery v2 (``g=apidiscovery.k8s.io;v=v2;as=...``)."""
    for option in accept.split(','):
        params = {p.split('=', 1)[0].strip(): p.split('=', 1)[1].strip() for p in option.split(';')[1:] if '=' in p}
        if (
            params.get('g') == 'apidiscovery.k8s.io'
            and params.get('v') == 'v2'
            and params.get('as') == 'APIGroupDiscoveryList'
        ):
            return True
    return False
