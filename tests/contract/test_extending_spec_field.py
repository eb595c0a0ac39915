"""docs/EXTENDING.md, "Add a spec field", followed step by step on a copy of the three packages.

Step 1 declares a field in ``FinetuneRunSpec`` (the copy's ``v1alpha1.py``); the drift check then
fails; step 3 regenerates the CRDs with ``python -m finetuner.api.crdgen``. What the recipe says
follows without an edit is then checked in a fresh interpreter that imports the copy: the CRD schema,
fit()'s signature, docstring and validation, the CLI's flag, the operator's ConfigMap, the trainer's
config and a sweep over the field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / 'docs' / 'EXTENDING.md'
FIELD = """
    toy_knob: int = Field(
        default=3, ge=0, le=10, description='A toy knob added by the test of docs/EXTENDING.md; see trainData.'
    )
"""
ANCHOR = (  # the last field of FinetuneRunSpec: the new one goes after it
    "    suspend: bool = Field(default=False, description='True stops the run (its pods are removed) until false.')\n"
)

CHECKS = r"""
import contextlib, inspect, io, json
import finetuner
from finetuner import cli, fitting
from finetuner.api.v1alpha1 import FinetuneRunSpec, Sweep
from finetuner.errors import ArgumentError
from finetuner_operator.builders import build_config_map, build_job
from finetuner_operator.config import OperatorConfig
from finetuner_trainer.runner import parse_config

result = {}
parameter = inspect.signature(finetuner.fit).parameters['toy_knob']
result['kind'] = parameter.kind.name
entry = finetuner.fit.__doc__.split('toy_knob: ', 1)[1].split('\n\n')[0].split('\n    ')[0]
result['doc'] = ' '.join(entry.split())
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    cli.main(['fit', '--help'])
result['flag'] = '--toy-knob TOY_KNOB' in help_text.getvalue()
try:
    finetuner.fit(model='m', train_data=['a', 'b'], toy_knob=11)
except ArgumentError as e:
    result['error'] = str(e)
spec = fitting.build_spec(fitting.bind((), {'model': 'm', 'train_data': 'd', 'toy_knob': 7}), 'r', 'default', [])
job = build_job('r', 'ns', spec, OperatorConfig(output='s3://b/runs'), {
    'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': {'name': 'r', 'uid': 'u'}})
job['metadata']['uid'] = 'j'
config_map = build_config_map('r', 'ns', spec, OperatorConfig(output='s3://b/runs'), job)
config = config_map['data']['config.json']
result['config_map'] = json.loads(config)['spec']['toyKnob']
result['trainer'] = parse_config(config).spec.toy_knob
result['sweep'] = Sweep(parameters={'toyKnob': [1, 2]}).parameters
result['default'] = FinetuneRunSpec(model='m', train_data='d').toy_knob
print(json.dumps(result))
"""


def _copy_packages(to: Path) -> None:
    for folder, package in (('sdk', 'finetuner'), ('operator', 'finetuner_operator'), ('trainer', 'finetuner_trainer')):
        shutil.copytree(ROOT / folder / package, to / folder / package, ignore=shutil.ignore_patterns('__pycache__'))
    for crds in ('crds', 'helm/finetuner/crds'):
        shutil.copytree(ROOT / crds, to / crds)


def _python(copy: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(str(copy / folder) for folder in ('sdk', 'operator', 'trainer'))
    env = {**os.environ, 'PYTHONPATH': path, 'FINETUNER_HOME': str(home), 'PYTHONDONTWRITEBYTECODE': '1'}
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300)


def test_the_recipe_names_the_steps_this_test_follows() -> None:
    section = DOC.read_text().split('## Add a spec field', 1)[1].split('\n## ', 1)[0]
    assert 'sdk/finetuner/api/v1alpha1.py' in section and 'FinetuneRunSpec' in section
    assert 'python -m finetuner.api.crdgen' in section
    assert 'tests/contract/test_extending_spec_field.py' in section


def test_a_new_spec_field_reaches_crd_fit_cli_operator_and_trainer(tmp_path: Path) -> None:
    copy = tmp_path / 'repo'
    _copy_packages(copy)
    contract = copy / 'sdk' / 'finetuner' / 'api' / 'v1alpha1.py'
    text = contract.read_text()
    assert text.count(ANCHOR) == 1, 'the last field of FinetuneRunSpec moved: update ANCHOR'
    contract.write_text(text.replace(ANCHOR, ANCHOR + FIELD))  # step 1: declare it

    stale = _python(copy, '-m', 'finetuner.api.crdgen', '--check', home=tmp_path)
    assert stale.returncode == 1 and 'stale: crds/finetuneruns.finetuner.dev.yaml' in stale.stderr, stale.stderr
    wrote = _python(copy, '-m', 'finetuner.api.crdgen', home=tmp_path)  # step 3: regenerate
    assert wrote.returncode == 0, wrote.stderr
    assert _python(copy, '-m', 'finetuner.api.crdgen', '--check', home=tmp_path).returncode == 0

    for crds in ('crds', 'helm/finetuner/crds'):
        crd = yaml.safe_load((copy / crds / 'finetuneruns.finetuner.dev.yaml').read_text())
        schema = crd['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']['properties']
        assert schema['toyKnob'] == {
            'type': 'integer',
            'minimum': 0,
            'maximum': 10,
            'description': 'A toy knob added by the test of docs/EXTENDING.md; see trainData.',
        }

    checks = _python(copy, '-c', CHECKS, home=tmp_path)
    assert checks.returncode == 0, checks.stderr
    seen = json.loads(checks.stdout.strip().splitlines()[-1])
    assert seen == {
        'kind': 'KEYWORD_ONLY',
        'doc': 'A toy knob added by the test of docs/EXTENDING.md; see train_data. Default: 3.',
        'flag': True,
        'error': 'toy_knob: must be less than or equal to 10 (got 11)',
        'config_map': 7,
        'trainer': 7,
        'sweep': {'toyKnob': [1, 2]},
        'default': 3,
    }
