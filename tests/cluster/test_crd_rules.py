"""The project's CRDs on the test cluster: which mistakes of the bad-input catalogue the API server refuses.

Each ``contract`` row of tests/reliability/test_bad_inputs.py is sent as kubectl sends it
(``fieldValidation=Strict``): a row the CRD's schema judges (``crd=True``) or one of its CEL rules judges is
refused with the field named; the rest are stored, and the operator refuses them (InvalidSpec).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import ApiServer
from tests.cluster.test_apiserver import Http
from tests.reliability.test_bad_inputs import BASE_SPEC, ROWS, Row

RUNS = '/apis/finetuner.dev/v1alpha1/namespaces/default/finetuneruns'
CEL_ROWS = {  # row id -> the field the CEL rule names
    'clip-loss-without-multimodal': 'spec.multiModal',
    'multimodal-without-clip-loss': 'spec.loss',
    'eval-data-and-val-split': 'spec.valSplit',
    'miner-options-without-miner': 'spec.minerOptions',
    'synthesis-without-options': 'spec.synthesis',
    'synthesis-options-without-task': 'spec.task',
    'synthesis-on-several-gpus': 'spec.resources',
    'hard-negatives-in-synthesis': 'spec.hardNegatives',
    'hard-negatives-window': 'spec.hardNegatives.numNegatives',
    'synthesis-num-relations-range': 'spec.synthesis.numRelations',  # schema minimum, not CEL: the nested field
}
STRICT_ROWS = {'unknown-field': 'strict decoding error: unknown field "spec.epoch"'}


@pytest.fixture
def http(api_server: tuple[ApiServer, Path]) -> Http:
    return Http(api_server[0].url)


def _field(value: Any, path: str = 'spec') -> str:
    """The path of the first leaf of a row's input: the field the API server should name."""
    if isinstance(value, dict) and value:
        key, inner = next(iter(value.items()))
        return _field(inner, f'{path}.{key}')
    if isinstance(value, list) and value:
        return _field(value[0], f'{path}[0]')
    return path


def _run(row: Row) -> dict[str, Any]:
    spec = {k: v for k, v in {**BASE_SPEC, **row.input}.items() if v is not None}
    return {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': row.id}, 'spec': spec}


@pytest.mark.parametrize('row', [pytest.param(r, id=r.id) for r in ROWS if r.layer == 'contract'])
def test_the_api_server_refuses_what_the_crd_can_judge(http: Http, row: Row) -> None:
    status, _, body = http('POST', RUNS + '?fieldValidation=Strict', _run(row))
    if row.id in STRICT_ROWS:
        assert (status, body['message'].split(': ', 1)[1]) == (400, STRICT_ROWS[row.id])
    elif row.crd or row.id in CEL_ROWS:
        assert status == 422, f'{row.id} was stored'
        fields = [c['field'] for c in body['details']['causes']]
        assert CEL_ROWS.get(row.id, _field(row.input)) in fields
    else:
        assert status == 201, f'{row.id}: {json.dumps(body)[:300]}'
