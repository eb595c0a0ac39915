"""End to end over HTTP: SDK -> FinetuneRun -> operator -> Job -> trainer pod -> S3 -> status -> SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finetuner
from tests.e2e.targets import Target, unique
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, write_jsonl

FIT = {
    'model': TINY_TIMM,
    'model_options': TINY_TIMM_OPTIONS,
    'epochs': 1,
    'batch_size': 12,
    'device': 'cpu',
    'num_workers': 0,
    'backoff_limit': 2,
}


def images(tmp_path: Path) -> Path:
    return write_jsonl(labelled_images(n_classes=3, per_class=4), tmp_path / 'train.jsonl')


def test_fit_finishes_and_the_model_downloads(target: Target, tmp_path: Path) -> None:
    target.login()
    name = unique('e2e-fit')
    run = finetuner.fit(train_data=str(images(tmp_path)), run_name=name, gpus=target.gpus, **FIT)
    assert run.name == name
    assert run.status()['status'] in ('CREATED', 'STARTED', 'FINISHED')

    final = run.wait(timeout=target.timeout, poll=0.2)

    assert final['status'] == 'FINISHED', final
    status = run.full_status()
    assert status.artifact_uri == f'{status.output_uri}/artifact'
    assert status.output_uri.startswith(f's3://{target.bucket}/')
    assert status.attempts == 1
    assert {c.type for c in status.conditions if c.status == 'True'} >= {'Created', 'Started', 'Succeeded'}
    assert status.start_time and status.completion_time
    assert status.progress is not None and status.progress.epochs == 1, 'progress.json mirrored into the status'
    assert status.metrics is not None
    assert len(target.jobs(name)) == 1
    assert len(target.pods(name)) == 1
    prefix = status.output_uri.split('/', 3)[3]
    keys = target.s3_keys(prefix)
    assert f'{prefix}/artifact/manifest.json' in keys
    assert f'{prefix}/metrics.json' in keys

    saved = Path(run.save_model(tmp_path / 'model'))
    manifest = json.loads((saved / 'manifest.json').read_text())
    assert manifest['files']
    assert all((saved / file).exists() for file in manifest['files'])
    assert 'run default/' in run.logs() or name in run.logs()
    reasons = [e.reason for e in target.events(name)]
    assert 'JobCreated' in reasons and 'Finished' in reasons


def test_bad_data_fails_once_with_the_trainers_reason(target: Target, tmp_path: Path) -> None:
    target.login()
    name = unique('e2e-bad')
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "only one item and no label"}\n')
    run = finetuner.fit(train_data=str(bad), run_name=name, gpus=target.gpus, **FIT)

    final = run.wait(timeout=target.timeout, poll=0.2)

    assert final['status'] == 'FAILED', final
    status = run.full_status()
    assert status.reason == 'ConfigurationError'
    assert 'trainData' in (status.details or '') or 'train' in (status.details or '').lower()
    assert status.attempts == 1
    assert len(target.pods(name)) == 1, 'a configuration error must not be retried'
    assert len(target.jobs(name)) == 1
    with pytest.raises(finetuner.errors.RunFailedError, match=name):
        run.save_model(tmp_path / 'nothing')
    assert any(e.reason == 'Failed' for e in target.events(name))
