"""Fixtures of the trainer tests: tiny models (built once per session) and run configurations."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, make_tiny_bert, make_tiny_clip, write_jsonl


@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp('models') / 'bert')


@pytest.fixture(scope='session')
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp('models') / 'clip')


TIMM_SPEC: dict[str, Any] = {'model': TINY_TIMM, 'model_options': TINY_TIMM_OPTIONS}


ConfigFactory = Callable[..., TrainerConfig]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """A TrainerConfig training on ``records`` (written as JSONL) with the given spec fields."""

    def factory(records: list[Record], eval_records: list[Record] | None = None, **spec: Any) -> TrainerConfig:
        train_file = write_jsonl(records, tmp_path / 'data' / 'train.jsonl')
        if eval_records is not None:
            spec['eval_data'] = str(write_jsonl(eval_records, tmp_path / 'data' / 'eval.jsonl'))
        spec.setdefault('epochs', 1)
        spec.setdefault('num_workers', 0)
        spec.setdefault('device', 'cpu')
        return TrainerConfig(
            run_name='test-run',
            spec=FinetuneRunSpec(train_data=str(train_file), **spec),
            output_uri=(tmp_path / 'output').as_uri(),
            termination_log=str(tmp_path / 'termination-log'),
        )

    return factory


@pytest.fixture(scope='session')
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback (real HTTP, path-style addressing)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port)
    server.start()
    yield f'http://127.0.0.1:{port}'
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket on the moto server, with the S3 environment the trainer reads set."""
    for key, value in {
        'FINETUNER_S3_ENDPOINT': s3_endpoint,
        'AWS_ACCESS_KEY_ID': 'test',
        'AWS_SECRET_ACCESS_KEY': 'test',
        'AWS_DEFAULT_REGION': 'us-east-1',
    }.items():
        monkeypatch.setenv(key, value)
    from finetuner.storage import s3_client

    bucket = f'trainer-{abs(hash(tmp_path)) % 10**8}'
    s3_client().create_bucket(Bucket=bucket)
    return bucket
