"""The test cluster's API server against the Kubernetes API documentation, with a CRD of its own.

The CRD is the documentation's ``CronTab`` example (stable.example.com), so nothing here depends on what the
operator needs. Each test names the page it was written from.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import apiextensions, tables
from tests.cluster.harness import ApiServer

CRONTABS = '/apis/stable.example.com/v1/namespaces/default/crontabs'
SCHEMA: dict[str, Any] = {
    'type': 'object',
    'properties': {
        'spec': {
            'type': 'object',
            'x-kubernetes-validations': [
                {
                    'rule': 'self.minReplicas <= self.replicas',
                    'message': 'replicas should be greater than or equal to minReplicas.',
                },
                {
                    'rule': 'self.replicas <= self.maxReplicas',
                    'messageExpression': "'replicas ' + string(self.replicas) + ' is over maxReplicas'",
                    'fieldPath': '.replicas',
                },
                {
                    'rule': "!has(self.image) || !self.image.endsWith(':latest')",
                    'reason': 'FieldValueForbidden',
                    'message': 'pin a tag',
                },
            ],
            'properties': {
                'cronSpec': {'type': 'string', 'pattern': '^(\\d+|\\*)(/\\d+)?(\\s+(\\d+|\\*)(/\\d+)?){4}$'},
                'image': {'type': 'string', 'maxLength': 40},
                'replicas': {'type': 'integer', 'minimum': 1, 'maximum': 10, 'default': 1},
                'minReplicas': {'type': 'integer', 'default': 0},
                'maxReplicas': {'type': 'integer', 'default': 10},
                'ratio': {'type': 'number', 'exclusiveMaximum': True, 'maximum': 1},
                'mode': {'type': 'string', 'enum': ['Allow', 'Forbid']},
                'note': {'type': 'string', 'nullable': True},
                'port': {'x-kubernetes-int-or-string': True},
                'tags': {'type': 'array', 'maxItems': 2, 'items': {'type': 'string'}},
                'extra': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
                'owner': {
                    'type': 'string',
                    'x-kubernetes-validations': [{'rule': 'self == oldSelf', 'message': 'owner is immutable'}],
                },
            },
            'required': ['cronSpec'],
        },
        'status': {'type': 'object', 'properties': {'phase': {'type': 'string'}}},
    },
}
CRD: dict[str, Any] = {
    'apiVersion': 'apiextensions.k8s.io/v1',
    'kind': 'CustomResourceDefinition',
    'metadata': {'name': 'crontabs.stable.example.com'},
    'spec': {
        'group': 'stable.example.com',
        'scope': 'Namespaced',
        'names': {
            'plural': 'crontabs',
            'singular': 'crontab',
            'kind': 'CronTab',
            'shortNames': ['ct'],
            'categories': ['all'],
        },
        'versions': [
            {
                'name': 'v1',
                'served': True,
                'storage': True,
                'subresources': {'status': {}},
                'schema': {'openAPIV3Schema': SCHEMA},
                'additionalPrinterColumns': [
                    {'name': 'Spec', 'type': 'string', 'jsonPath': '.spec.cronSpec'},
                    {'name': 'Replicas', 'type': 'integer', 'jsonPath': '.spec.replicas'},
                    {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'},
                    {'name': 'Image', 'type': 'string', 'jsonPath': '.spec.image', 'priority': 1},
                ],
            }
        ],
    },
}


class Http:
    """Raw HTTP to the test cluster: status, headers and the decoded body, errors included."""

    def __init__(self, url: str):
        self.url = url

    def __call__(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        data = json.dumps(body).encode() if body is not None else None
        content = 'application/merge-patch+json' if method == 'PATCH' else 'application/json'
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={'Content-Type': content, **(headers or {})}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, _decode(response.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, _decode(e.read())


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode()


@pytest.fixture
def http(api_server: tuple[ApiServer, Path]) -> Http:
    server, _ = api_server
    client = Http(server.url)
    status, _, body = client('POST', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions', CRD)
    assert status == 201, body
    return client


def crontab(name: str = 'my-new-cron-object', **spec: Any) -> dict[str, Any]:
    return {
        'apiVersion': 'stable.example.com/v1',
        'kind': 'CronTab',
        'metadata': {'name': name},
        'spec': {'cronSpec': '* * * * */5', 'image': 'my-awesome-cron-image:1', **spec},
    }


def causes(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c['reason'], c['field'], c['message']) for c in body['details']['causes']]


def test_a_created_crd_is_established_and_served(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#create-a-customresourcedefinition"""
    _, _, crd = http('GET', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions/crontabs.stable.example.com')
    conditions = {c['type']: c['status'] for c in crd['status']['conditions']}
    assert conditions == {'NamesAccepted': 'True', 'Established': 'True'}
    assert crd['status']['acceptedNames']['kind'] == 'CronTab' and crd['status']['storedVersions'] == ['v1']
    status, _, created = http('POST', CRONTABS, crontab())
    assert status == 201 and created['spec']['replicas'] == 1

    status, _, _ = http('DELETE', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions/crontabs.stable.example.com')
    assert status == 200
    status, _, _ = http('GET', '/apis/stable.example.com/v1')
    assert status == 404, 'deleting the CRD stops serving its group-version'


def test_a_crd_is_named_after_its_plural_and_group_and_its_rules_must_compile(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules"""
    wrong = json.loads(json.dumps(CRD))
    wrong['metadata']['name'] = 'crontabs'
    wrong['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']['x-kubernetes-validations'] = [
        {'rule': 'self.replicas >'}
    ]
    status, _, body = http('POST', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions', wrong)
    assert status == 422 and body['reason'] == 'Invalid'
    fields = [c['field'] for c in body['details']['causes']]
    assert fields == [
        'metadata.name',
        'spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule',
    ]
    assert 'compilation failed' in body['details']['causes'][1]['message']


def test_schema_errors_are_422_invalid_with_a_cause_per_field(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation
    and the Status shape of https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/"""
    bad = crontab(cronSpec='* * * *', image='x' * 41, replicas=15, ratio=1, mode='Maybe', tags=['a', 'b', 'c'])
    status, _, body = http('POST', CRONTABS, bad)
    assert status == 422
    assert (body['kind'], body['status'], body['reason'], body['code']) == ('Status', 'Failure', 'Invalid', 422)
    assert body['details']['name'] == 'my-new-cron-object' and body['details']['group'] == 'stable.example.com'
    assert body['details']['kind'] == 'CronTab'
    assert causes(body)[:6] == [
        (
            'FieldValueInvalid',
            'spec.cronSpec',
            'Invalid value: "* * * *": spec.cronSpec in body should match '
            "'^(\\d+|\\*)(/\\d+)?(\\s+(\\d+|\\*)(/\\d+)?){4}$'",
        ),
        ('FieldValueTooLong', 'spec.image', 'Too long: may not be longer than 40'),
        (
            'FieldValueInvalid',
            'spec.replicas',
            'Invalid value: 15: spec.replicas in body should be less than or equal to 10',
        ),
        ('FieldValueInvalid', 'spec.ratio', 'Invalid value: 1: spec.ratio in body should be less than 1'),
        ('FieldValueNotSupported', 'spec.mode', 'Unsupported value: "Maybe": supported values: "Allow", "Forbid"'),
        ('FieldValueTooMany', 'spec.tags', 'Too many: 3: must have at most 2 items'),
    ]
    assert body['message'].startswith('CronTab.stable.example.com "my-new-cron-object" is invalid: [spec.cronSpec: ')


def test_types_nullable_and_int_or_string(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema"""
    status, _, body = http('POST', CRONTABS, crontab(replicas='3', port=[80], note=None))
    assert status == 422
    assert causes(body)[:2] == [
        (
            'FieldValueTypeInvalid',
            'spec.replicas',
            'Invalid value: "string": spec.replicas in body must be of type integer: "string"',
        ),
        (
            'FieldValueTypeInvalid',
            'spec.port',
            'Invalid value: "array": spec.port in body must be of type integer,string: "array"',
        ),
    ]
    for port in (80, 'http'):
        assert http('POST', CRONTABS, crontab(f'port-{port}', port=port, note=None, replicas=2.0))[0] == 201


def test_missing_required_fields_block_the_cel_rules(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules
    (rules run once the object is otherwise valid)"""
    bad = crontab(replicas=1)
    del bad['spec']['cronSpec']
    status, _, body = http('POST', CRONTABS, bad)
    assert status == 422
    assert causes(body) == [
        ('FieldValueRequired', 'spec.cronSpec', 'Required value'),
        ('FieldValueInvalid', '<nil>', 'Invalid value: "null": ' + apiextensions.RULES_NOT_CHECKED),
    ]


def test_unknown_fields_are_pruned_and_field_validation_decides_what_the_client_hears(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#field-pruning
    and fieldValidation in https://kubernetes.io/docs/reference/using-api/api-concepts/#field-validation"""
    obj = crontab('strict', someRandomField=42, extra={'anything': {'goes': 1}})
    status, _, body = http('POST', CRONTABS + '?fieldValidation=Strict', obj)
    assert (status, body['reason']) == (400, 'BadRequest')
    assert body['message'] == (
        'CronTab in version "v1" cannot be handled as a CronTab: strict decoding error: '
        'unknown field "spec.someRandomField"'
    )
    status, headers, created = http('POST', CRONTABS + '?fieldValidation=Warn', {**obj, 'metadata': {'name': 'warn'}})
    assert status == 201 and headers.get_all('Warning') == ['299 - "unknown field \\"spec.someRandomField\\""']
    assert 'someRandomField' not in created['spec'] and created['spec']['extra'] == {'anything': {'goes': 1}}
    status, headers, created = http(
        'POST', CRONTABS + '?fieldValidation=Ignore', {**obj, 'metadata': {'name': 'quiet'}}
    )
    assert status == 201 and headers.get_all('Warning') is None and 'someRandomField' not in created['spec']
    status, headers, _ = http('POST', CRONTABS, {**obj, 'metadata': {'name': 'default'}})
    assert status == 201 and headers.get_all('Warning'), 'Warn is the default'


def test_defaults_fill_absent_fields_on_create_and_update(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#defaulting"""
    _, _, created = http('POST', CRONTABS, crontab())
    assert (created['spec']['replicas'], created['spec']['minReplicas'], created['spec']['maxReplicas']) == (1, 0, 10)
    _, _, patched = http('PATCH', CRONTABS + '/my-new-cron-object', {'spec': {'replicas': None, 'maxReplicas': 5}})
    assert patched['spec']['replicas'] == 1 and patched['spec']['maxReplicas'] == 5


def test_cel_rules_with_message_expression_field_path_and_reason(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules
    (message, messageExpression, fieldPath, reason)"""
    status, _, body = http('POST', CRONTABS, crontab(replicas=3, minReplicas=5, maxReplicas=2, image='cron:latest'))
    assert status == 422
    assert causes(body) == [
        (
            'FieldValueInvalid',
            'spec',
            'Invalid value: "object": replicas should be greater than or equal to minReplicas.',
        ),
        ('FieldValueInvalid', 'spec.replicas', 'Invalid value: "object": replicas 3 is over maxReplicas'),
        ('FieldValueForbidden', 'spec', 'Forbidden: pin a tag'),
    ]


def test_transition_rules_run_on_updates_only(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#transition-rules"""
    assert http('POST', CRONTABS, crontab(owner='team-a'))[0] == 201, 'no oldSelf on create: the rule is skipped'
    status, _, body = http('PATCH', CRONTABS + '/my-new-cron-object', {'spec': {'owner': 'team-b'}})
    assert status == 422
    assert causes(body) == [('FieldValueInvalid', 'spec.owner', 'Invalid value: "string": owner is immutable')]
    assert http('PATCH', CRONTABS + '/my-new-cron-object', {'spec': {'replicas': 2}})[0] == 200


def test_status_writes_are_validated_and_pruned_too(http: Http) -> None:
    """https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#status-subresource"""
    http('POST', CRONTABS, crontab())
    status, _, body = http(
        'PATCH', CRONTABS + '/my-new-cron-object/status', {'status': {'phase': 'Running', 'junk': 1}}
    )
    assert status == 200 and body['status'] == {'phase': 'Running'}
    status, _, body = http('PATCH', CRONTABS + '/my-new-cron-object/status', {'status': {'phase': 3}})
    assert status == 422 and causes(body)[0][1] == 'status.phase'


def test_legacy_discovery_lists_subresources_apart_with_their_verbs(http: Http) -> None:
    """https://kubernetes.io/docs/concepts/overview/kubernetes-api/#discovery-api (unaggregated discovery)"""
    _, _, resources = http('GET', '/apis/stable.example.com/v1')
    entries = {r['name']: r for r in resources['resources']}
    assert set(entries) == {'crontabs', 'crontabs/status'}
    assert entries['crontabs']['shortNames'] == ['ct'] and entries['crontabs']['categories'] == ['all']
    assert entries['crontabs/status']['verbs'] == ['get', 'patch', 'update']
    assert 'shortNames' not in entries['crontabs/status'] and 'categories' not in entries['crontabs/status']
    _, _, core = http('GET', '/api/v1')
    assert {'pods', 'pods/status', 'pods/log'} <= {r['name'] for r in core['resources']}
    _, _, groups = http('GET', '/apis')
    assert 'stable.example.com' in [g['name'] for g in groups['groups']]


def test_aggregated_discovery_when_the_client_asks_for_it(http: Http) -> None:
    """https://kubernetes.io/docs/concepts/overview/kubernetes-api/#aggregated-discovery"""
    accept = 'application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json'
    status, headers, body = http('GET', '/apis', headers={'Accept': accept})
    assert status == 200 and 'as=APIGroupDiscoveryList' in headers['Content-Type']
    group = next(i for i in body['items'] if i['metadata']['name'] == 'stable.example.com')
    resource = group['versions'][0]['resources'][0]
    assert resource['resource'] == 'crontabs' and resource['scope'] == 'Namespaced'
    assert resource['responseKind'] == {'group': 'stable.example.com', 'version': 'v1', 'kind': 'CronTab'}
    assert resource['subresources'][0]['subresource'] == 'status'


def test_openapi_v3_publishes_the_crd_schema_with_its_gvk_and_field_validation(http: Http) -> None:
    """https://kubernetes.io/docs/concepts/overview/kubernetes-api/#openapi-v3 and
    https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#publish-validation-schema-in-openapi"""
    _, _, index = http('GET', '/openapi/v3')
    url = index['paths']['apis/stable.example.com/v1']['serverRelativeURL']
    assert url.startswith('/openapi/v3/apis/stable.example.com/v1?hash=')
    _, _, document = http('GET', url)
    schema = document['components']['schemas']['com.example.stable.v1.CronTab']
    assert schema['x-kubernetes-group-version-kind'] == [
        {'group': 'stable.example.com', 'kind': 'CronTab', 'version': 'v1'}
    ]
    assert schema['properties']['spec']['properties']['cronSpec']['pattern']
    assert schema['properties']['metadata']['allOf'] == [
        {'$ref': '#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta'}
    ]
    assert 'io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta' in document['components']['schemas']
    patch = document['paths']['/apis/stable.example.com/v1/namespaces/{namespace}/crontabs/{name}']['patch']
    assert 'fieldValidation' in [p['name'] for p in patch['parameters'] if p['in'] == 'query']
    _, _, core = http('GET', index['paths']['api/v1']['serverRelativeURL'])
    assert 'io.k8s.api.core.v1.Pod' in core['components']['schemas']


def test_openapi_v2_is_served_as_json(http: Http) -> None:
    """https://kubernetes.io/docs/concepts/overview/kubernetes-api/#openapi-v2"""
    status, _, document = http('GET', '/openapi/v2', headers={'Accept': 'application/json'})
    assert status == 200 and document['swagger'] == '2.0'
    assert 'com.example.stable.v1.CronTab' in document['definitions']
    status, _, _ = http(
        'GET', '/openapi/v2', headers={'Accept': 'application/com.github.proto-openapi.spec.v2@v1.0+protobuf'}
    )
    assert status == 406


def test_tables_render_printer_columns_ages_and_priorities(http: Http) -> None:
    """https://kubernetes.io/docs/reference/using-api/api-concepts/#receiving-resources-as-tables and
    https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#additional-printer-columns"""
    http('POST', CRONTABS, crontab())
    accept = {'Accept': 'application/json;as=Table;v=v1;g=meta.k8s.io'}
    _, _, table = http('GET', CRONTABS, headers=accept)
    assert [(c['name'], c['type'], c['priority']) for c in table['columnDefinitions']] == [
        ('Name', 'string', 0),
        ('Spec', 'string', 0),
        ('Replicas', 'integer', 0),
        ('Age', 'date', 0),
        ('Image', 'string', 1),
    ]
    row = table['rows'][0]
    assert row['cells'][:3] == ['my-new-cron-object', '* * * * */5', 1] and row['cells'][3].endswith('s')
    assert row['object']['kind'] == 'PartialObjectMetadata'
    _, _, full = http('GET', CRONTABS + '?includeObject=Object', headers=accept)
    assert full['rows'][0]['object']['spec']['cronSpec'] == '* * * * */5'
    _, _, plain = http('GET', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions', headers=accept)
    assert [c['name'] for c in plain['columnDefinitions']] == ['Name', 'Created At']


@pytest.mark.parametrize(
    ('seconds', 'shown'),
    [
        (-5, '<invalid>'),
        (0, '0s'),
        (119, '119s'),
        (125, '2m5s'),
        (600, '10m'),
        (3 * 3600 + 60, '3h1m'),
        (30 * 3600, '30h'),
        (50 * 3600, '2d2h'),
        (40 * 86400, '40d'),
        (800 * 86400, '2y70d'),
    ],
)
def test_ages_read_as_kubectl_prints_them(seconds: int, shown: str) -> None:
    """HumanDuration of k8s.io/apimachinery/pkg/util/duration, which Table date cells use
    (https://kubernetes.io/docs/reference/using-api/api-concepts/#receiving-resources-as-tables)."""
    assert tables.human_duration(seconds) == shown


def test_go_formatting_of_bad_values() -> None:
    """Field error values as https://kubernetes.io/docs/reference/using-api/api-concepts/ shows them (Go's %v / %q)."""
    assert [apiextensions.go_float(v) for v in (1.0, 0.5, 1e-05, 1e6, 123456.0)] == [
        '1',
        '0.5',
        '1e-05',
        '1e+06',
        '123456',
    ]
    assert apiextensions.go_value('a"b') == '"a\\"b"' and apiextensions.go_value(True) == 'true'


@pytest.mark.parametrize(
    ('rule', 'self_value'),
    [
        ("self.name.matches('^[a-z]+$') && self.name.startsWith('a')", {'name': 'abc'}),
        ("'abc 123'.find('[0-9]+') == '123' && 'a1b2'.findAll('[0-9]') == ['1', '2']", {}),
        ('[1, 2, 3].isSorted() && [1, 2, 3].sum() == 6 && [3, 1].min() == 1 && [3, 1].max() == 3', {}),
        ("isURL('https://example.com/x') && !isURL('not a url') && isQuantity('16Gi') && !isQuantity('16 gigs')", {}),
        ("'TacoCat'.lowerAscii() == 'tacocat' && 'a,b'.split(',') == ['a', 'b'] && ['a', 'b'].join('-') == 'a-b'", {}),
        ("self.?missing.orValue('fallback') == 'fallback' && !has(self.missing)", {}),
        (
            'self.items.all(i, i > 0) && self.items.exists_one(i, i == 2) && self.items.map(i, i * 2) == [2, 4]',
            {'items': [1, 2]},
        ),
        (
            "duration('1h') > duration('30m') && timestamp('2024-01-01T00:00:00Z') < timestamp('2025-01-01T00:00:00Z')",
            {},
        ),
    ],
)
def test_cel_libraries_of_the_kubernetes_docs(rule: str, self_value: dict[str, Any]) -> None:
    """The language and libraries listed in https://kubernetes.io/docs/reference/using-api/cel/ (the ones
    tests/cluster/cel.py offers)."""
    from tests.cluster import cel

    assert cel.compile_rule(rule).evaluate(self_value) is True


def test_cel_values_follow_the_schema_types() -> None:
    """https://kubernetes.io/docs/reference/using-api/cel/#type-system-integration: an OpenAPI ``number`` is a
    CEL double even when the JSON holds an integer; a null property of an object counts as absent."""
    from tests.cluster import cel

    schema = {
        'type': 'object',
        'properties': {'ratio': {'type': 'number'}, 'note': {'type': 'string', 'nullable': True}},
    }
    value = cel.to_cel({'ratio': 1, 'note': None}, schema)
    assert value == {'ratio': 1.0} and isinstance(value['ratio'], float)
    with pytest.raises(cel.CelError, match=r'Key not found in map : "note"'):
        cel.compile_rule('self.note == "x"').evaluate(value)


def test_watches_answer_in_tables_when_asked(http: Http) -> None:
    """https://kubernetes.io/docs/reference/using-api/api-concepts/#receiving-resources-as-tables (watch), which
    ``kubectl get -w`` uses."""
    http('POST', CRONTABS, crontab())
    accept = {'Accept': 'application/json;as=Table;v=v1;g=meta.k8s.io'}
    status, _, body = http('GET', CRONTABS + '?watch=true&timeoutSeconds=1', headers=accept)
    events = [json.loads(line) for line in body.splitlines() if line.strip()] if isinstance(body, str) else [body]
    assert status == 200 and events[0]['type'] == 'ADDED'
    assert events[0]['object']['kind'] == 'Table' and events[0]['object']['rows'][0]['cells'][0] == 'my-new-cron-object'
