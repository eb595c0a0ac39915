"""FINETUNER_MAX_CONCURRENT_RUNS in action: who may take a slot now, and giving freed slots away.

The rules (which runs hold a slot, which wait, in what order) are the pure functions of
:mod:`admission`; :class:`Admitter` applies them to what the seam's cache shows. Every Job create
(and every resume) that takes a slot happens inside :meth:`Admitter.slot_for`, under one lock, so
that no two passes take the last slot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_operator import admission, builders
from finetuner_operator.background import Wakeups
from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube

log = logging.getLogger('finetuner_operator')


class Admitter:
    def __init__(
        self, kube: Kube, config: OperatorConfig, sync_run: Callable[[str, str], object], background: bool = False
    ) -> None:
        """``sync_run(namespace, name)``: a pass over a run, which takes its slot if it may.

        ``background``: a freed slot is given to the oldest waiting run by a background thread (the
        pass that freed it, or an async watch handler, does not wait for that run's pass); False does
        it at once, in the caller's thread."""
        self.kube = kube
        self.config = config
        self.sync_run = sync_run
        self._lock = threading.Lock()  # held around "count the slots, then create (or resume) the Job"
        self.wakeups = Wakeups(self.admit_waiting, 'run-admission') if background else None

    @property
    def enabled(self) -> bool:
        return self.config.max_concurrent_runs > 0

    def limited(self, spec: FinetuneRunSpec) -> bool:
        """Whether this run's Job takes a slot: a limit is set, the run is not suspended, and it has no
        Kueue queue (Kueue admits those; they neither count nor wait)."""
        return self.enabled and not spec.suspend and builders.queue_of(spec, self.config) is None

    def _slots(self) -> tuple[int, dict[admission.Key, dict[str, Any]], list[dict[str, Any]]]:
        """(free slots, runs by key, trainer Jobs), from the seam's cache (which has every Job this
        operator created from the create's answer on)."""
        runs = {admission.run_key(r): r for r in self.kube.list_all_runs(self.config.namespaces)}
        jobs = self.kube.list_trainer_jobs(self.config.namespaces)
        return self.config.max_concurrent_runs - admission.active_count(jobs, runs), runs, jobs

    @contextmanager
    def slot_for(self, body: dict[str, Any]) -> Iterator[bool]:
        """Whether the run may take a slot now: one is free and no older waiting run is owed it. The
        lock is held until the block ends: create (or resume) the Job inside it, so that the next
        count sees that Job."""
        with self._lock:
            free, runs, jobs = self._slots()
            yield free > 0 and admission.ahead_of(body, admission.waiting_line(runs, jobs, self.config.queue)) < free

    def request(self) -> None:
        """A slot may have been freed (a run ended, was suspended or deleted): give the free slots to
        the oldest waiting runs, at once or through the background thread (never blocks then)."""
        if not self.enabled:
            return
        if self.wakeups is None:
            self.admit_waiting()
        else:
            self.wakeups.wake()

    def admit_waiting(self) -> None:
        """One pass of each of the oldest waiting runs that fit in the free slots; each pass decides for
        itself, in :meth:`slot_for`, whether it gets its Job (this count is only a hint)."""
        if not self.enabled:
            return
        free, runs, jobs = self._slots()
        if free <= 0:
            return
        for run in admission.waiting_line(runs, jobs, self.config.queue)[:free]:
            namespace, name = admission.run_key(run)
            try:
                self.sync_run(namespace, name)
            except Exception as e:  # the periodic re-observation tries it again
                log.warning('admitting FinetuneRun %s/%s failed: %s', namespace, name, e)

    def close(self) -> None:
        if self.wakeups is not None:
            self.wakeups.close()
