"""One lock per object, so that two passes over the same run (or Experiment) never interleave.

A pass triggered by a Job or pod event may *coalesce*: when another pass of the same run already
waits for the lock, that one reads everything after the event, so this one is dropped at once
(a burst of events otherwise parked every worker thread on one run's lock).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

Key = tuple[str, ...]


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[Key, threading.Lock] = {}
        self._guard = threading.Lock()
        self.waiting: dict[Key, int] = {}  # passes waiting for each key's lock

    def lock(self, *key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, *key: str) -> None:
        """Drop the lock of an object that is gone."""
        with self._guard:
            self._locks.pop(key, None)

    @contextmanager
    def hold(self, *key: str, coalesce: bool = False) -> Iterator[bool]:
        """Hold the key's lock (yields True), or, with ``coalesce``, yield False at once when another
        pass already waits for it."""
        with self._guard:
            dropped = coalesce and key in self.waiting
            if not dropped:
                self.waiting[key] = self.waiting.get(key, 0) + 1
        if dropped:
            yield False
            return
        lock = self.lock(*key)
        lock.acquire()
        with self._guard:
            self.waiting[key] -= 1
            if not self.waiting[key]:
                del self.waiting[key]
        try:
            yield True
        finally:
            lock.release()
