"""One object-store seam for all three programs: ``s3://bucket/prefix`` and ``file:///path``.

A :class:`Store` is rooted at a prefix and only reads and writes keys below it: a key that is
absolute or climbs out with ``..`` is refused, so a run cannot touch another run's objects.

S3 settings come from the usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` — boto3 reads them itself) or
``FINETUNER_S3_ENDPOINT`` for S3-compatible stores (MinIO, Ceph, GCS interop), with path-style
addressing. boto3 is imported only when an ``s3://`` store is opened.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse


class StorageError(RuntimeError):
    """An object-store operation failed (missing object, refused key, unreachable store)."""


def normalize_key(key: str) -> str:
    """A relative key below the store's root, or StorageError for one that escapes it."""
    if key in ('', '.'):
        return ''
    if key.startswith('/') or '\\' in key:
        raise StorageError(f"object key {key!r} must be relative to the run's prefix")
    parts = key.split('/')
    if any(part == '..' for part in parts):
        raise StorageError(f'object key {key!r} climbs out of the run\'s prefix with ".."')
    return posixpath.normpath(key).lstrip('/')


def to_uri(location: str) -> str:
    """Turn a plain path into a file:// URI; leave s3:// and file:// URIs as they are."""
    if location.startswith(('s3://', 'file://')):
        return location.rstrip('/')
    if '://' in location:
        scheme = location.split('://', 1)[0]
        raise StorageError(f'unsupported storage scheme {scheme!r} in {location!r}: use s3:// or file://')
    return Path(location).expanduser().resolve().as_uri()


def file_uri_path(uri: str) -> Path:
    """The local path of a file:// URI, unescaped (``Path.as_uri`` writes a space as %20, '+' as %2B)."""
    return Path(unquote(urlparse(uri).path))


class Store(Protocol):
    uri: str

    def child(self, key: str) -> Store: ...
    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def list(self, key: str = '') -> list[str]: ...
    def delete(self, key: str = '') -> None: ...
    def upload_file(self, path: Path, key: str) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...


class _Base:
    uri: str

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode('utf-8')  # type: ignore[attr-defined]

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode('utf-8'))  # type: ignore[attr-defined]

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))  # type: ignore[attr-defined]

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode())  # type: ignore[attr-defined]

    def read_json_or_none(self, key: str) -> Any:
        try:
            return self.read_json(key)
        except StorageError:
            return None

    def upload_dir(self, directory: Path, key: str) -> list[str]:
        """Upload every file below ``directory`` under ``key``; return the relative names."""
        names = []
        for path in sorted(Path(directory).rglob('*')):
            if path.is_file():
                name = path.relative_to(directory).as_posix()
                self.upload_file(path, posixpath.join(key, name))  # type: ignore[attr-defined]
                names.append(name)
        return names

    def download_dir(self, key: str, directory: Path) -> list[str]:
        """Download every object below ``key`` into ``directory``; return the relative names."""
        prefix = normalize_key(key)
        names = []
        for full in self.list(prefix):  # type: ignore[attr-defined]
            name = full[len(prefix) :].lstrip('/') if prefix else full
            self.download_file(full, Path(directory) / name)  # type: ignore[attr-defined]
            names.append(name)
        if not names:
            raise StorageError(f'nothing stored under {self.uri}/{prefix}')
        return names


class LocalStore(_Base):
    """A folder on this machine. Writes are atomic (temporary file, then rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key)

    def child(self, key: str) -> LocalStore:
        return LocalStore(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise StorageError(f'no object {self.uri}/{normalize_key(key)}') from e

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list(self, key: str = '') -> list[str]:
        base = self._path(key)
        if base.is_file():
            return [normalize_key(key)]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob('*') if p.is_file() and not p.name.startswith('.')
        )

    def delete(self, key: str = '') -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def upload_file(self, path: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f'.{target.name}.part')
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f'no object {self.uri}/{normalize_key(key)}')
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (path-style for custom endpoints)."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get('FINETUNER_S3_ENDPOINT') or os.environ.get('AWS_ENDPOINT_URL') or None
    config = Config(
        s3={'addressing_style': 'path' if endpoint else 'auto'},
        retries={'max_attempts': 8, 'mode': 'standard'},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client('s3', endpoint_url=endpoint, config=config)


class S3Store(_Base):
    def __init__(self, bucket: str, prefix: str = '', client: Any = None):
        self.bucket = bucket
        self.prefix = normalize_key(prefix.strip('/')) if prefix else ''
        self.uri = f's3://{bucket}/{self.prefix}'.rstrip('/')
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, key: str) -> str:
        rel = normalize_key(key)
        # An empty key is the prefix itself (an object URI like s3://b/datasets/x/data.jsonl), not 'prefix/'.
        return posixpath.join(self.prefix, rel) if self.prefix and rel else (self.prefix or rel)

    def child(self, key: str) -> S3Store:
        return S3Store(self.bucket, self._key(key), self._client)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            code = e.response.get('Error', {}).get('Code', '')
            if code in ('NoSuchKey', '404', 'NotFound'):
                raise StorageError(f'no object s3://{self.bucket}/{kwargs.get("Key", "")}') from e
            if code == 'NoSuchBucket':
                raise StorageError(f'bucket {self.bucket!r} does not exist; create it or fix the bucket name') from e
            raise StorageError(f'{what} s3://{self.bucket}/{kwargs.get("Key", kwargs.get("Prefix", ""))}: {e}') from e
        except BotoCoreError as e:
            raise StorageError(f'{what} s3://{self.bucket}: {e}') from e

    def exists(self, key: str) -> bool:
        try:
            self._call('head', self.client.head_object, Key=self._key(key))
            return True
        except StorageError:
            return False

    def read_bytes(self, key: str) -> bytes:
        response = self._call('read', self.client.get_object, Key=self._key(key))
        return response['Body'].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call('write', self.client.put_object, Key=self._key(key), Body=data)

    def list(self, key: str = '') -> list[str]:
        base = self._key(key)
        prefix = base.rstrip('/') + '/' if base else ''
        names: list[str] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {'Prefix': prefix}
            if token:
                kwargs['ContinuationToken'] = token
            page = self._call('list', self.client.list_objects_v2, **kwargs)
            for obj in page.get('Contents', []):
                full = obj['Key']
                names.append(full[len(self.prefix) :].lstrip('/') if self.prefix else full)
            if not page.get('IsTruncated'):
                break
            token = page.get('NextContinuationToken')
        if not names and base and self.exists(key):
            return [normalize_key(key)]
        return sorted(names)

    def delete(self, key: str = '') -> None:
        for name in self.list(key):
            self._call('delete', self.client.delete_object, Key=self._key(name))

    def upload_file(self, path: Path, key: str) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(str(path), self.bucket, self._key(key))
        except S3UploadFailedError as e:
            raise StorageError(f'upload to s3://{self.bucket}/{self._key(key)} failed: {e}') from e

    def download_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        data = self.read_bytes(key)
        Path(path).write_bytes(data)


def open_store(location: str) -> LocalStore | S3Store:
    """The store rooted at ``location`` (an s3:// or file:// URI, or a local path)."""
    uri = to_uri(location)
    parsed = urlparse(uri)
    if parsed.scheme == 's3':
        if not parsed.netloc:
            raise StorageError(f'{location!r} names no bucket: write s3://BUCKET/PREFIX')
        return S3Store(parsed.netloc, parsed.path.lstrip('/'))
    return LocalStore(file_uri_path(uri))
