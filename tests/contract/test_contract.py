"""The one typed contract: generated CRDs, their structural schema, examples and invalid manifests."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from finetuner import catalog
from finetuner.api import crdgen
from finetuner.api.v1alpha1 import (
    CRD_KINDS,
    Experiment,
    FinetuneRun,
    FinetuneRunSpec,
    Phase,
    TrainerConfig,
    check_dns1123_name,
    format_validation_error,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / 'examples'
MODELS = {'FinetuneRun': FinetuneRun, 'Experiment': Experiment}
FREE_FORM = ('modelOptions', 'lossOptions', 'minerOptions', 'optimizerOptions', 'lossOptimizerOptions')


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / 'crds' / f'{CRD_KINDS[kind]["plural"]}.finetuner.dev.yaml').read_text())
    return crd['spec']['versions'][0]['schema']['openAPIV3Schema']


def walk(node: dict[str, Any], path: str = '') -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get('properties', {}).items():
        found += walk(sub, f'{path}.{name}')
    if isinstance(node.get('items'), dict):
        found += walk(node['items'], f'{path}[]')
    if isinstance(node.get('additionalProperties'), dict):
        found += walk(node['additionalProperties'], f'{path}{{}}')
    return found


def test_generated_crds_match_the_models() -> None:
    stale = crdgen.drifted()
    assert not stale, f'CRDs drifted from the models: {stale}; run `{crdgen.REGENERATE}`'


def test_crdgen_check_command_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / 'crds'
    monkeypatch.setattr(crdgen, 'CRD_DIRS', (target,))
    monkeypatch.setattr(crdgen, 'REPO_ROOT', tmp_path)
    assert crdgen.main(['--check']) == 1
    assert crdgen.main([]) == 0
    assert crdgen.main(['--check']) == 0
    first = sorted(target.iterdir())[0]
    first.write_text(first.read_text() + '# edited by hand\n')
    assert crdgen.main(['--check']) == 1


@pytest.mark.parametrize('kind', sorted(CRD_KINDS))
def test_schema_is_structural(kind: str) -> None:
    for path, node in walk(crd_schema(kind)):
        assert '$ref' not in node, path
        assert 'anyOf' not in node and 'oneOf' not in node and 'allOf' not in node, path
        assert node.get('additionalProperties') is not False, path
        assert 'title' not in node and 'default' not in node, path
        assert 'type' in node or node.get('x-kubernetes-preserve-unknown-fields'), f'{path} has no type'
        if 'properties' in node:
            assert 'additionalProperties' not in node, path
        for bound in ('exclusiveMinimum', 'exclusiveMaximum'):
            assert node.get(bound, True) is True, f'{path}: {bound} must be boolean in OpenAPI v3.0'


@pytest.mark.parametrize('kind', sorted(CRD_KINDS))
def test_every_field_is_described(kind: str) -> None:
    schema = crd_schema(kind)
    for part in ('spec', 'status'):
        for path, node in walk(schema['properties'][part], part):
            if path.endswith(('[]', '{}')) or path == part:
                continue
            assert node.get('description'), f'{kind}.{path} has no description (kubectl explain shows it)'


def test_finetunerun_crd_names_columns_and_subresource() -> None:
    crd = yaml.safe_load((ROOT / 'crds' / 'finetuneruns.finetuner.dev.yaml').read_text())
    names = crd['spec']['names']
    assert crd['spec']['group'] == 'finetuner.dev'
    assert names['plural'] == 'finetuneruns' and names['shortNames'] == ['ftr', 'ftrun']
    assert names['categories'] == ['finetuner']
    version = crd['spec']['versions'][0]
    assert version['name'] == 'v1alpha1' and version['subresources'] == {'status': {}}
    columns = [c['name'] for c in version['additionalPrinterColumns'] if not c.get('priority')]
    assert columns == ['Phase', 'Model', 'Loss', 'Progress', 'Age']
    wide = [c['name'] for c in version['additionalPrinterColumns'] if c.get('priority')]
    assert wide == ['Reason', 'Experiment', 'GPUs', 'Job', 'Task'], 'kubectl get ftr -o wide adds these'
    exp = yaml.safe_load((ROOT / 'crds' / 'experiments.finetuner.dev.yaml').read_text())
    assert exp['spec']['names']['shortNames'] == ['ftexp'] and exp['spec']['names']['categories'] == ['finetuner']


def test_free_form_option_maps_preserve_unknown_fields() -> None:
    spec = crd_schema('FinetuneRun')['properties']['spec']['properties']
    for name in FREE_FORM:
        assert spec[name].get('x-kubernetes-preserve-unknown-fields') is True, name
    assert spec['callbacks']['items']['properties']['options']['x-kubernetes-preserve-unknown-fields'] is True
    template = crd_schema('Experiment')['properties']['spec']['properties']['runTemplate']
    assert template['x-kubernetes-preserve-unknown-fields'] is True


def test_crd_enums_equal_the_catalog() -> None:
    spec = crd_schema('FinetuneRun')['properties']['spec']['properties']
    assert spec['loss']['enum'] == list(catalog.LOSS_NAMES)
    assert spec['miner']['enum'] == list(catalog.MINER_NAMES)
    assert spec['optimizer']['enum'] == list(catalog.OPTIMIZER_NAMES)
    assert spec['lossOptimizer']['enum'] == list(catalog.OPTIMIZER_NAMES)
    assert spec['scheduler']['enum'] == list(catalog.SCHEDULER_NAMES)
    assert len(catalog.OPTIMIZER_NAMES) == 13
    status = crd_schema('FinetuneRun')['properties']['status']['properties']
    assert status['phase']['enum'] == [p.value for p in Phase]


def test_spec_covers_every_fit_parameter_of_the_seeds() -> None:
    wire = {f.alias for f in FinetuneRunSpec.model_fields.values()}
    seed_parameters = (
        'model train_data eval_data description experiment model_options loss miner miner_options optimizer '
        'optimizer_options learning_rate epochs batch_size freeze output_dim num_workers to_onnx callbacks '
        'multi_modal image_modality text_modality val_split model_artifact loss_options scheduler '
        'scheduler_options csv_options num_items_per_class sampler loss_optimizer loss_optimizer_options device '
        'resources image node_selector tolerations queue_name active_deadline_seconds backoff_limit output suspend'
    ).split()
    missing = [p for p in seed_parameters if p not in FinetuneRunSpec.model_fields]
    assert not missing
    assert 'trainData' in wire and 'learningRate' in wire


# --- jsonschema check of manifests against the generated CRD, as `kubectl --validate=strict` would ----


def _strict_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema draft 4, refusing unknown fields like server-side strict validation."""
    if isinstance(node, list):
        return [_strict_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_jsonschema(v) for k, v in node.items() if not k.startswith('x-kubernetes')}
    if node.get('nullable'):
        out['type'] = [out['type'], 'null']
        if 'enum' in out:
            out['enum'] = [*out['enum'], None]
    if 'properties' in node and not node.get('x-kubernetes-preserve-unknown-fields'):
        out['additionalProperties'] = False
    return out


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    schema = _strict_jsonschema(copy.deepcopy(crd_schema(manifest['kind'])))
    validator = jsonschema.Draft4Validator(schema)
    return [
        f'{".".join(str(p) for p in error.absolute_path)}: {error.message}' for error in validator.iter_errors(manifest)
    ]


def model_errors(manifest: dict[str, Any]) -> str:
    try:
        MODELS[manifest['kind']].model_validate(manifest)
    except ValidationError as e:
        return format_validation_error(e)
    return ''


VALID = sorted(p for p in EXAMPLES.glob('*.yaml') if yaml.safe_load(p.read_text()).get('kind') in MODELS)
INVALID = sorted((EXAMPLES / 'invalid').glob('*.yaml'))


def test_there_are_examples() -> None:
    names = {p.name for p in VALID}
    assert {'run.yaml', 'clip-run.yaml'} <= names
    assert len(INVALID) >= 12


@pytest.mark.parametrize('path', VALID, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    assert schema_errors(manifest) == []
    assert model_errors(manifest) == ''


@pytest.mark.parametrize('path', INVALID, ids=lambda p: p.name)
def test_invalid_manifests_fail_naming_the_field(path: Path) -> None:
    text = path.read_text()
    expected = text.splitlines()[0].removeprefix('# expect: ')
    manifest = yaml.safe_load(text)
    message = model_errors(manifest)
    assert message, f'{path.name} was accepted by the contract models'
    assert expected in message, f'{path.name}: {message!r} does not name {expected!r}'


@pytest.mark.parametrize(
    ('path', 'field'),
    [
        ('unknown-loss.yaml', 'spec.loss'),
        ('negative-epochs.yaml', 'spec.epochs'),
        ('missing-train-data.yaml', 'spec'),
        ('string-learning-rate.yaml', 'spec.learningRate'),
        ('unknown-field.yaml', 'spec'),
        ('bad-device.yaml', 'spec.device'),
        ('negative-gpus.yaml', 'spec.resources.gpus'),
        ('unknown-optimizer.yaml', 'spec.optimizer'),
        ('val-split-too-big.yaml', 'spec.valSplit'),
    ],
)
def test_the_crd_schema_refuses_what_it_can_express(path: str, field: str) -> None:
    errors = schema_errors(yaml.safe_load((EXAMPLES / 'invalid' / path).read_text()))
    assert errors, f'{path} passed the CRD schema'
    assert any(e.startswith(field) for e in errors), errors


def test_names_must_be_dns_labels() -> None:
    assert check_dns1123_name('run-1') == 'run-1'
    with pytest.raises(ValueError, match=r"name 'Run_1' is not a valid name.*'run-1'"):
        check_dns1123_name('Run_1')
    with pytest.raises(ValueError, match='use at most 52'):
        check_dns1123_name('a' * 60)


def test_wire_format_round_trips_through_camel_case() -> None:
    spec = FinetuneRunSpec(model='bert-base-cased', train_data='s3://b/t.csv', learning_rate=1e-5, output_dim=128)
    wire = spec.to_k8s()
    assert wire['learningRate'] == 1e-5 and wire['outputDim'] == 128 and 'learning_rate' not in wire
    assert FinetuneRunSpec.model_validate(wire) == spec
    config = TrainerConfig(run_name='r', spec=spec, output_uri='file:///tmp/out')
    assert TrainerConfig.model_validate_json(config.model_dump_json(by_alias=True)) == config


def test_suggests_the_right_spelling_of_a_name() -> None:
    with pytest.raises(ValidationError, match="did you mean 'TripletMarginLoss'"):
        FinetuneRunSpec(model='m', train_data='d', loss='tripletmarginloss')


def test_sdk_import_stays_light() -> None:
    code = (
        'import sys, finetuner, finetuner.api, finetuner.api.crdgen, finetuner.storage; '
        "heavy = {'torch', 'timm', 'transformers', 'kopf', 'boto3'} & set(sys.modules); "
        'assert not heavy, heavy'
    )
    subprocess.run([sys.executable, '-c', code], check=True)
