"""A run's artifact files read in pieces, one by one or as one zip built while it is sent: a model of
gigabytes never sits whole in the console's memory or disk."""

from __future__ import annotations

import posixpath
import zipfile
from collections.abc import Iterator
from typing import Any

from finetuner.storage import LocalStore, StorageError, normalize_key

CHUNK = 1 << 20


def chunks(store: Any, key: str, size: int = CHUNK) -> Iterator[bytes]:
    """The object ``key`` of a LocalStore or an S3Store, ``size`` bytes at a time."""
    relative = normalize_key(key)
    if isinstance(store, LocalStore):
        try:
            with (store.root / relative).open('rb') as f:
                while data := f.read(size):
                    yield data
        except OSError as e:
            raise StorageError(f'cannot read {store.uri}/{relative}: {e}') from e
        return
    full = posixpath.join(store.prefix, relative) if store.prefix else relative
    body = store._call('read', store.client.get_object, Key=full)['Body']
    try:
        yield from body.iter_chunks(size)
    finally:
        body.close()


class _Pipe:
    """A write-only file object whose bytes are taken out after each write (zipfile needs no seek)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b''.join(self.parts), []
        return data


def zip_stream(store: Any, files: list[str]) -> Iterator[bytes]:
    """The files of ``store`` (keys relative to it) as a zip archive, in pieces. Entries are stored,
    not deflated: weights are dense already, and the download goes as fast as the store."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as archive:  # type: ignore[arg-type]
        for name in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, mode='w', force_zip64=True) as entry:  # sizes are known only at the end
                for data in chunks(store, name):
                    entry.write(data)
                    yield pipe.take()
            yield pipe.take()
    yield pipe.take()
