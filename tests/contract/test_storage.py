"""The object-store seam: file:// and s3:// (a moto server on loopback) behave the same."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetuner.api.layout import Record, dataset_key, resolve_data
from finetuner.storage import LocalStore, S3Store, StorageError, file_uri_path, normalize_key, open_store, to_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port)
    server.start()
    yield f'http://127.0.0.1:{port}'
    server.stop()


@pytest.fixture(params=['file', 's3'])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStore | S3Store:
    if request.param == 'file':
        return open_store(str(tmp_path / 'root'))
    endpoint = request.getfixturevalue('s3_endpoint')
    for key, value in {
        'FINETUNER_S3_ENDPOINT': endpoint,
        'AWS_ACCESS_KEY_ID': 'test',
        'AWS_SECRET_ACCESS_KEY': 'test',
        'AWS_DEFAULT_REGION': 'us-east-1',
    }.items():
        monkeypatch.setenv(key, value)
    from finetuner.storage import s3_client

    bucket = f'b{abs(hash(tmp_path)) % 10**8}'
    s3_client().create_bucket(Bucket=bucket)
    return open_store(f's3://{bucket}/runs/r1')


def test_write_read_list_delete(store: LocalStore | S3Store, tmp_path: Path) -> None:
    store.write_json('progress.json', {'step': 3})
    store.write_text('logs/train.log', 'hello\n')
    assert store.read_json('progress.json') == {'step': 3}
    assert store.exists('logs/train.log') and not store.exists('missing.json')
    assert store.list() == ['logs/train.log', 'progress.json']
    assert store.list('logs') == ['logs/train.log']
    with pytest.raises(StorageError, match='no object'):
        store.read_bytes('missing.json')
    assert store.read_json_or_none('missing.json') is None
    store.delete('logs')
    assert store.list() == ['progress.json']


def test_directories_round_trip(store: LocalStore | S3Store, tmp_path: Path) -> None:
    source = tmp_path / 'artifact'
    (source / 'sub').mkdir(parents=True)
    (source / 'model.bin').write_bytes(b'\x00' * 1000)
    (source / 'sub' / 'config.json').write_text('{}')
    assert store.upload_dir(source, 'artifact') == ['model.bin', 'sub/config.json']
    target = tmp_path / 'download'
    assert sorted(store.child('artifact').download_dir('', target)) == ['model.bin', 'sub/config.json']
    assert (target / 'model.bin').read_bytes() == b'\x00' * 1000
    with pytest.raises(StorageError, match='nothing stored'):
        store.download_dir('nothing-here', tmp_path / 'x')


@pytest.mark.parametrize('key', ['../other-run/artifact', '/etc/passwd', 'a/../../b', 'a\\b'])
def test_keys_cannot_leave_the_prefix(store: LocalStore | S3Store, key: str) -> None:
    with pytest.raises(StorageError, match=r'run.s prefix|relative'):
        store.write_bytes(key, b'x')


def test_normalize_and_uris(tmp_path: Path) -> None:
    assert normalize_key('a/./b') == 'a/b'
    assert to_uri(str(tmp_path)) == tmp_path.resolve().as_uri()
    assert to_uri('s3://bucket/p/') == 's3://bucket/p'
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs'"):
        to_uri('gs://bucket/x')
    with pytest.raises(StorageError, match='names no bucket'):
        open_store('s3:///x')


@pytest.mark.parametrize('name', ['My Data', 'a+b', '100%', 'naïve'])
def test_file_uris_of_folders_with_escaped_characters_open_the_folder(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / 'train.jsonl').write_text('{}')
    for location in (str(folder), to_uri(str(folder)), folder.as_uri()):
        store = open_store(location)
        assert store.read_bytes('train.jsonl') == b'{}', location
    assert open_store(str(folder / 'train.jsonl')).root == folder / 'train.jsonl'
    assert file_uri_path(folder.as_uri()) == folder


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes('a.json', b'1')
    store.write_bytes('a.json', b'2')
    assert [p.name for p in tmp_path.iterdir()] == ['a.json']  # no temporary files left behind


def test_data_references() -> None:
    assert resolve_data('s3://b/train.jsonl', 's3://b') == ('s3://b/train.jsonl', None)
    assert resolve_data('my-set', 's3://b') == ('s3://b', dataset_key('my-set'))
    with pytest.raises(ValueError, match='no data location'):
        resolve_data('my-set', None)
    with pytest.raises(ValueError, match='dataset name'):
        resolve_data('../../etc', 's3://b')


@pytest.mark.parametrize(
    ('record', 'message'),
    [
        ({}, 'a record needs content'),
        ({'text': 'x', 'chunks': [{'text': 'y'}]}, 'either content or chunks'),
        ({'text': 'x', 'labl': 1}, 'Extra inputs are not permitted'),
    ],
)
def test_bad_records(record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Record.model_validate(record)
