"""login(bucket=..., endpoint=...): data goes to an S3-compatible store (moto over loopback), runs read it."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator

import pytest

import finetuner
import finetuner.backends
from finetuner.backends.local import LocalBackend
from tests.sdk.conftest import SCRIPTED_TRAINER


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    boto3 = pytest.importorskip('boto3')
    moto_server = pytest.importorskip('moto.server')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address='127.0.0.1', port=port)
    server.start()
    endpoint = f'http://127.0.0.1:{port}'
    for key, value in {
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': 'us-east-1',
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('FINETUNER_S3_ENDPOINT', raising=False)
    boto3.client('s3', endpoint_url=endpoint).create_bucket(Bucket='team-data')
    yield endpoint
    server.stop()


def test_login_with_a_bucket_uploads_there_and_the_run_reads_it(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv('FINETUNER_S3_ENDPOINT', '')  # restored after the test; login sets it
    backend = finetuner.login('local', bucket='team-data', prefix='finetuner', endpoint=s3_endpoint)
    assert isinstance(backend, LocalBackend)
    backend.command = [sys.executable, str(SCRIPTED_TRAINER)]
    try:
        finetuner.push_data('questions', ['what is red', 'what is blue'])
        assert [r.text for r in finetuner.pull_data('questions')] == ['what is red', 'what is blue']
        run = finetuner.fit(model='scripted:ok', train_data=['a red cat', 'a blue dog', 'a fish'], run_name='s3-run')
        uid = json.loads((backend.run_dir('s3-run') / 'run.json').read_text())['uid']
        assert run.config.train_data == f's3://team-data/finetuner/datasets/s3-run-{uid}-train/data.jsonl'
        assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED', run.logs()
        assert 'read 3 records' in run.logs()  # the trainer process read it back from the bucket
        with pytest.raises(finetuner.ArgumentError, match="train_data: no dataset named 'absent' in s3://team-data"):
            finetuner.fit(model='scripted:ok', train_data='absent')
    finally:
        finetuner.backends.use(None)
