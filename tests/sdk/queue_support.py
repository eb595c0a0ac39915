"""Helpers of the local queue's tests: the process table watched over a whole test, waiting for a condition."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.sdk.conftest import SCRIPTED_TRAINER


class TrainerCensus:
    """Samples the process table every few milliseconds for the whole ``with`` block: which trainers of
    one backend home are alive (scripted trainers whose ``--config`` lies in that home)."""

    def __init__(self, home: Path, every: float = 0.02) -> None:
        self.home = str(home)
        self.every = every
        self.max_alive = 0
        self.first_seen: dict[str, int] = {}  # run name -> index of the sample it was first alive in
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name='trainer-census', daemon=True)

    def alive(self) -> set[str]:
        names = set()
        for process in psutil.process_iter(['cmdline', 'status']):
            try:
                cmdline = process.info['cmdline'] or []
                if process.info['status'] == psutil.STATUS_ZOMBIE or str(SCRIPTED_TRAINER) not in cmdline:
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if '--config' in cmdline:
                config = Path(cmdline[cmdline.index('--config') + 1])
                if str(config).startswith(self.home):
                    names.add(config.parent.name)
        return names

    def _watch(self) -> None:
        while not self._stop.is_set():
            alive = self.alive()
            self.max_alive = max(self.max_alive, len(alive))
            for name in alive:
                self.first_seen.setdefault(name, self.samples)
            self.samples += 1
            time.sleep(self.every)

    def __enter__(self) -> TrainerCensus:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, what: str = 'the condition') -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')
