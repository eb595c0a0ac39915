"""The operator's three background threads, each a small object with ``close()``.

- :class:`Resync`: every ``interval`` seconds re-observes every active run (progress and metrics
  reach the status, time-based verdicts such as the unschedulable timeout are reached without any
  Kubernetes event, a run whose event Kopf gave up on is still reconciled), and every
  ``relist_interval`` seconds refills the seam's cache;
- :class:`Recounts`: coalesces Experiment recounts into one per Experiment per delay;
- :class:`Wakeups`: runs a job (giving freed slots to waiting runs) whenever woken, never blocking
  the one who wakes it.

They hold no Kubernetes logic of their own: each is handed the functions it calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from finetuner.api.v1alpha1 import Phase
from finetuner_operator import metrics

log = logging.getLogger('finetuner_operator')

TERMINAL = (Phase.FINISHED.value, Phase.FAILED.value)
JOIN_TIMEOUT = 10.0


class RunTracker:
    """Every run the watch has seen, with its phase (``track``), until it is deleted (``forget``)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], str | None] = {}
        self._guard = threading.Lock()

    def track(self, namespace: str, name: str, phase: str | None) -> None:
        with self._guard:
            self._runs[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._runs.pop((namespace, name), None)

    def active(self) -> list[tuple[str, str]]:
        """Runs not in a terminal phase, a run without any status included."""
        with self._guard:
            return [key for key, phase in self._runs.items() if phase not in TERMINAL]


class Resync:
    """One thread that re-observes every active run (instead of a Kopf daemon per run: no per-run
    task, and no progress annotations written for them)."""

    def __init__(
        self,
        tracker: RunTracker,
        sync_run: Callable[[str, str], object],
        relist: Callable[[], None],
        relist_due: Callable[[float, float | None], bool],
    ) -> None:
        self.tracker = tracker
        self.sync_run = sync_run
        self.relist = relist
        self.relist_due = relist_due
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, interval: float, relist_interval: float | None = None) -> None:
        if self.thread is None and not self._stop.is_set():
            self.thread = threading.Thread(
                target=self._loop, args=(interval, relist_interval), name='run-resync', daemon=True
            )
            self.thread.start()

    def close(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(JOIN_TIMEOUT)

    def _loop(self, interval: float, relist_interval: float | None) -> None:
        listed = time.monotonic()
        while not self._stop.wait(interval):
            if self.relist_due(listed, relist_interval):
                try:
                    self.relist()
                    listed = time.monotonic()
                except Exception as e:
                    log.warning('listing runs, Jobs and pods into the cache failed: %s', e)
            self._round()

    def _round(self) -> None:
        for namespace, name in self.tracker.active():
            if self._stop.is_set():
                return
            try:
                with metrics.timed('progress'):
                    self.sync_run(namespace, name)
            except Exception as e:  # the API server or store failing for a while: the next round retries
                log.warning('re-observing FinetuneRun %s/%s failed: %s', namespace, name, e)


class Recounts:
    """Experiment recounts, each done ``delay`` seconds after it was first asked for (a recount lists
    every run of the Experiment: one per run transition made a burst of n runs cost n^2)."""

    def __init__(self, recount: Callable[[str, str], None], delay: float) -> None:
        self.recount = recount
        self.delay = delay
        self.thread: threading.Thread | None = None
        self._due: dict[tuple[str, str], float] = {}  # (namespace, name) -> when
        self._changed = threading.Condition()
        self._closed = False

    def request(self, namespace: str, name: str) -> None:
        with self._changed:
            if self._closed or (namespace, name) in self._due:
                return
            self._due[(namespace, name)] = time.monotonic() + self.delay
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name='experiment-recount', daemon=True)
                self.thread.start()
            self._changed.notify_all()

    def close(self) -> None:
        """Stop; pending recounts are dropped (the next start-up's resume handlers recount every Experiment)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self.thread is not None:
            self.thread.join(JOIN_TIMEOUT)

    def _next(self) -> list[tuple[str, str]] | None:
        """The recounts that are due, waiting for one; None once closed."""
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                ready = [key for key, when in self._due.items() if when <= now]
                if ready:
                    for key in ready:
                        del self._due[key]
                    return ready
                self._changed.wait(min(self._due.values(), default=now + 60.0) - now)
            return None

    def _loop(self) -> None:
        while (ready := self._next()) is not None:
            for namespace, name in ready:
                try:
                    self.recount(namespace, name)
                except Exception as e:  # the API failing for a while: try again after the delay
                    log.warning('recounting Experiment %s/%s failed: %s', namespace, name, e)
                    self.request(namespace, name)


class Wakeups:
    """Runs ``job`` in its own thread each time it is woken (wakes while it runs make one more run)."""

    def __init__(self, job: Callable[[], None], name: str) -> None:
        self.job = job
        self.name = name
        self.thread: threading.Thread | None = None
        self._wanted = threading.Event()
        self._guard = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        if self.thread is None:
            with self._guard:
                if self.thread is None and not self._closed:
                    self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                    self.thread.start()
        self._wanted.set()

    def close(self) -> None:
        with self._guard:
            self._closed = True
        self._wanted.set()
        if self.thread is not None:
            self.thread.join(JOIN_TIMEOUT)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed:
                return
            self._wanted.clear()
            try:
                self.job()
            except Exception as e:  # the API failing for a while: the periodic re-observation catches up
                log.warning('%s failed: %s', self.name, e)
