"""Generate the CustomResourceDefinitions from the contract models, and the SDK's copy of what the
trainer registers.

    python -m finetuner.api.crdgen           # (re)write crds/*.yaml, the Helm chart's copy, registered.py
    python -m finetuner.api.crdgen --check   # exit 1 when the files on disk drifted

``sdk/finetuner/registered.py`` lists the trainer's losses (with the data shapes each trains on),
miners and model families as plain data: the SDK reads them without torch, and the CRD's enums
come from them. Generating it imports the trainer (``finetuner_trainer``), so this command needs the
trainer stack installed.

Pydantic's JSON schema is turned into the *structural* OpenAPI v3 schema the API server
demands: ``$ref`` inlined, ``anyOf [X, null]`` turned into ``nullable: true``,
``additionalProperties: false``/``title``/``default`` dropped, numeric exclusive bounds in the
OpenAPI 3.0 form, and free-form option maps marked ``x-kubernetes-preserve-unknown-fields``.
What the models declare for the API server in ``json_schema_extra`` (enums, patterns, bounds and
``x-kubernetes-validations`` CEL rules) is kept, and a FinetuneRun's root gets the transition rule that
freezes its training spec once it has started (:func:`immutability_rule`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from finetuner.api.pod import PodSettings
from finetuner.api.v1alpha1 import CATEGORY, CRD_KINDS, GROUP, VERSION

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_DIRS = (REPO_ROOT / 'crds', REPO_ROOT / 'helm' / 'finetuner' / 'crds')
VALUES_SCHEMA = REPO_ROOT / 'helm' / 'finetuner' / 'values.schema.json'
RUNTIME_DESCRIPTION = (
    "Runtime template: pod settings every trainer pod gets (FINETUNER_RUNTIME_TEMPLATE); a run's own "
    'spec settings win. Generated from finetuner.api.pod.PodSettings.'
)
REGISTERED = Path('sdk') / 'finetuner' / 'registered.py'  # under REPO_ROOT
REGENERATE = 'python -m finetuner.api.crdgen'
HEADER = f'# Generated from sdk/finetuner/api/v1alpha1.py by `{REGENERATE}`. Do not edit.\n'

_DROP = {'title', 'default', 'examples'}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a contract model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode='validation')
    defs = raw.pop('$defs', {})
    return _convert(raw, defs)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a ``$ref`` (or pydantic's ``allOf: [{$ref}]`` wrapper), keeping sibling keys."""
    node = dict(node)
    if 'allOf' in node and len(node['allOf']) == 1:
        node.update(node.pop('allOf')[0])
    if '$ref' in node:
        target = copy.deepcopy(defs[node.pop('$ref').split('/')[-1]])
        target.update(node)  # a field's description wins over the model's docstring
        node = target
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, defs)
    nullable = False
    if 'anyOf' in node:
        options = [o for o in node['anyOf'] if o.get('type') != 'null']
        nullable = len(options) < len(node['anyOf'])
        if len(options) != 1:
            raise ValueError(f'cannot express anyOf with {len(options)} non-null options: {node}')
        rest = {k: v for k, v in node.items() if k != 'anyOf'}
        node = {**_resolve(options[0], defs), **rest}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == 'description' and isinstance(value, str):
            out[key] = ' '.join(value.split())
        elif key == 'properties':
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == 'items':
            out[key] = _convert(value, defs) if value else {'x-kubernetes-preserve-unknown-fields': True}
        elif key == 'additionalProperties':
            if isinstance(value, dict) and value:
                out[key] = _convert(value, defs)
            # `true`, `{}` (free-form) and `false` (extra=forbid) have no structural form
        elif key in ('exclusiveMinimum', 'exclusiveMaximum') and not isinstance(value, bool):
            bound = 'minimum' if key == 'exclusiveMinimum' else 'maximum'
            out[bound] = value
            out[key] = True
        elif key == 'const':
            out['enum'] = [value]
        else:
            out[key] = value
    if out.get('type') == 'object' and 'properties' not in out and 'additionalProperties' not in out:
        out['x-kubernetes-preserve-unknown-fields'] = True
    if 'type' not in out and not out.get('x-kubernetes-preserve-unknown-fields'):
        out['x-kubernetes-preserve-unknown-fields'] = True  # Any
    if nullable:
        out['nullable'] = True
    return out


def immutability_rule(spec: type[BaseModel], mutable: tuple[str, ...]) -> dict[str, str]:
    """A transition rule at the root: once the run has a Job or has left CREATED, only ``mutable`` may change.

    The rule sits at the root because it reads the old status; it compares the spec field by field
    (``has`` on both sides, then ``==``), so that a field left out and a field given stay distinct."""
    fields = [f.alias or name for name, f in spec.model_fields.items() if (f.alias or name) not in mutable]
    same = ' && '.join(
        f'has(self.spec.{f}) == has(oldSelf.spec.{f}) && (!has(self.spec.{f}) || self.spec.{f} == oldSelf.spec.{f})'
        for f in fields
    )
    not_started = (
        '!has(oldSelf.status) || (!has(oldSelf.status.jobName) && (!has(oldSelf.status.phase) || '
        "oldSelf.status.phase == 'CREATED'))"
    )
    allowed = ' and '.join(f'spec.{m}' for m in mutable)
    return {
        'rule': f'{not_started} || ({same})',
        'message': f'the training spec cannot change once the run has a trainer Job or has started: only {allowed} '
        'may change; create a new run for other settings',
        'fieldPath': '.spec',
    }


def build_crd(kind: str) -> dict[str, Any]:
    info = CRD_KINDS[kind]
    spec_schema = structural_schema(info['spec'])
    status_schema = structural_schema(info['status'])
    root_rules = []
    if info.get('mutable_once_started') is not None:
        root_rules.append(immutability_rule(info['spec'], info['mutable_once_started']))
    return {
        'apiVersion': 'apiextensions.k8s.io/v1',
        'kind': 'CustomResourceDefinition',
        'metadata': {
            'name': f'{info["plural"]}.{GROUP}',
            'labels': {'app.kubernetes.io/part-of': 'finetuner'},
        },
        'spec': {
            'group': GROUP,
            'scope': 'Namespaced',
            'names': {
                'kind': kind,
                'listKind': f'{kind}List',
                'plural': info['plural'],
                'singular': info['singular'],
                'shortNames': info['short_names'],
                'categories': [CATEGORY],
            },
            'versions': [
                {
                    'name': VERSION,
                    'served': True,
                    'storage': True,
                    'subresources': {'status': {}},
                    'additionalPrinterColumns': info['printer_columns'],
                    'schema': {
                        'openAPIV3Schema': {
                            'type': 'object',
                            'description': (info['spec'].__doc__ or kind).strip().split('\n')[0],
                            'required': ['spec'],
                            'properties': {
                                'apiVersion': {'type': 'string'},
                                'kind': {'type': 'string'},
                                'metadata': {'type': 'object'},
                                'spec': spec_schema,
                                'status': status_schema,
                            },
                            **({'x-kubernetes-validations': root_rules} if root_rules else {}),
                        }
                    },
                }
            ],
        },
    }


def helm_runtime_schema() -> dict[str, Any]:
    """The JSON Schema of the chart's ``runtime`` values: PodSettings, where "" and {} also mean unset."""
    raw = PodSettings.model_json_schema(by_alias=True, mode='validation')
    defs = raw.pop('$defs', {})
    schema = _json_schema(raw, defs)
    for node in schema['properties'].values():
        if node.get('type') == 'string' and 'pattern' in node:
            node['pattern'] = '^$|' + node['pattern']
            node.pop('minLength', None)
    schema['description'] = RUNTIME_DESCRIPTION
    return schema


def _json_schema(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's JSON Schema with references inlined and ``X | None`` as plain ``X`` (Helm values)."""
    node = _resolve(node, defs)
    if 'anyOf' in node:
        options = [o for o in node['anyOf'] if o.get('type') != 'null']
        node = {**_resolve(options[0], defs), **{k: v for k, v in node.items() if k != 'anyOf'}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == 'description' and isinstance(value, str):
            out[key] = ' '.join(value.split())
        elif key == 'properties':
            out[key] = {name: _json_schema(sub, defs) for name, sub in value.items()}
        elif key in ('items', 'additionalProperties') and isinstance(value, dict):
            out[key] = _json_schema(value, defs)
        elif key != 'x-kubernetes-validations':
            out[key] = value
    return out


def render_values_schema() -> str:
    """values.schema.json with its ``runtime`` entry generated from the contract."""
    schema = json.loads(VALUES_SCHEMA.read_text())
    schema['properties']['runtime'] = helm_runtime_schema()
    return json.dumps(schema, indent=2) + '\n'


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    files = {}
    for kind, info in CRD_KINDS.items():
        text = yaml.safe_dump(build_crd(kind), sort_keys=False, width=100)
        files[f'{info["plural"]}.{GROUP}.yaml'] = HEADER + text
    return files


# ---------------------------------------------------------------------------------------------
# sdk/finetuner/registered.py: the trainer's registries as plain data
# ---------------------------------------------------------------------------------------------

REGISTERED_DOC = f'''"""What the trainer registers, as plain data for the light SDK: losses (with the data shapes each
trains on and its call form), miners, and model families (the content kinds each embeds, and the
names ``get_model(select_model=...)`` takes).

Generated from trainer/finetuner_trainer (losses.py, families/) by `{REGENERATE}`;
`--check` fails when it differs from the trainer's registries. Do not edit.
"""
'''


def _literal(value: Any, indent: int) -> str:
    """``value`` as Python source in ruff's format: dicts one key a line with a trailing comma (ruff
    keeps them so), tuples on one line when short, one item a line otherwise."""
    pad = ' ' * indent
    if isinstance(value, dict):
        if not value:
            return '{}'
        lines = [f'{pad}    {key!r}: {_literal(item, indent + 4)},' for key, item in value.items()]
        return '{\n' + '\n'.join(lines) + f'\n{pad}}}'
    if isinstance(value, (list, tuple)):
        items = [_literal(item, indent + 4) for item in value]
        inline = f'({items[0]},)' if len(items) == 1 else f'({", ".join(items)})'
        if len(inline) + indent <= 80:
            return inline
        return '(\n' + ''.join(f'{pad}    {item},\n' for item in items) + f'{pad})'
    return repr(value)


def registered_tables() -> dict[str, Any]:
    """The trainer's live registries, as the tables of registered.py."""
    # The trainer is imported only here: the CRDs need just the contract, registered.py needs the trainer.
    losses = importlib.import_module('finetuner_trainer.losses')
    models = importlib.import_module('finetuner_trainer.models')
    return {
        'LOSSES': {
            name: {'shapes': tuple(shape.value for shape in entry.shapes), 'objective': entry.objective}
            for name, entry in losses.LOSSES.items()
        },
        'MINERS': tuple(losses.MINERS),
        'FAMILIES': {
            name: {'kinds': tuple(meta['kinds']), 'select_models': meta['select_models']}
            for name, meta in models.family_metadata().items()
        },
    }


def registered_source(tables: dict[str, Any]) -> str:
    """The text of registered.py holding ``tables``."""
    types = {
        'LOSSES': 'dict[str, dict[str, Any]]',
        'MINERS': 'tuple[str, ...]',
        'FAMILIES': 'dict[str, dict[str, Any]]',
    }
    body = '\n\n'.join(f'{name}: {types[name]} = {_literal(table, 0)}' for name, table in tables.items())
    return f'{REGISTERED_DOC}\nfrom __future__ import annotations\n\nfrom typing import Any\n\n{body}\n'


def _stale_registered() -> list[Path]:
    path = REPO_ROOT / REGISTERED
    return [] if path.exists() and path.read_text() == registered_source(registered_tables()) else [path]


def drifted() -> list[Path]:
    """Files on disk that differ from what the models and the trainer's registries generate (missing
    ones included)."""
    stale = _stale_registered()
    for directory in CRD_DIRS:
        for name, text in render_all().items():
            path = directory / name
            if not path.exists() or path.read_text() != text:
                stale.append(path)
    if VALUES_SCHEMA.exists() and VALUES_SCHEMA.read_text() != render_values_schema():
        stale.append(VALUES_SCHEMA)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='only check for drift')
    args = parser.parse_args(argv)
    if args.check:
        stale = drifted()
        for path in stale:
            print(f'stale: {path.relative_to(REPO_ROOT)} (run `{REGENERATE}`)', file=sys.stderr)
        return 1 if stale else 0
    tables = registered_tables()
    registered = REPO_ROOT / REGISTERED
    registered.parent.mkdir(parents=True, exist_ok=True)
    registered.write_text(registered_source(tables))
    print(f'wrote {REGISTERED}')
    loaded = importlib.import_module('finetuner.registered')  # what the catalog of this process was built from
    if any(getattr(loaded, name, None) != table for name, table in tables.items()):
        # The CRDs' enums come from the catalog: generate them in a process that imports the new one.
        return subprocess.call([sys.executable, '-m', 'finetuner.api.crdgen'])
    for directory in CRD_DIRS:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in render_all().items():
            (directory / name).write_text(text)
            print(f'wrote {(directory / name).relative_to(REPO_ROOT)}')
    if VALUES_SCHEMA.exists():
        VALUES_SCHEMA.write_text(render_values_schema())
        print(f'wrote {VALUES_SCHEMA} (its runtime entry)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
