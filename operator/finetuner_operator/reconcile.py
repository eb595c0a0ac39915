"""What the handlers call, without Kopf: one :class:`Reconciler` that wires the parts together.

Built once at start-up with the two seams (``kube.Kube`` for the API server, ``reports.StoreReports``
for the object store) and the config. Each responsibility lives in its own module:

- :mod:`runs`: a run's children, suspend and cancel, its status (:class:`~finetuner_operator.runs.RunReconciler`);
- :mod:`experiment_sync`: Experiments and sweeps (:class:`~finetuner_operator.experiment_sync.ExperimentSync`);
- :mod:`admitter`: FINETUNER_MAX_CONCURRENT_RUNS (:class:`~finetuner_operator.admitter.Admitter`);
- :mod:`background`: the threads (re-observation of active runs, Experiment recounts, admission);
- :mod:`locks`: one lock per run or Experiment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from finetuner.api.v1alpha1 import FinetuneRunStatus
from finetuner_operator import cache
from finetuner_operator.admitter import Admitter
from finetuner_operator.background import Recounts, Resync, RunTracker
from finetuner_operator.config import OperatorConfig
from finetuner_operator.experiment_sync import ExperimentSync
from finetuner_operator.kube import Kube
from finetuner_operator.locks import KeyedLocks
from finetuner_operator.reports import ReportReader, StoreReports
from finetuner_operator.runs import RunReconciler

CACHED_KINDS = (cache.RUNS, cache.EXPERIMENTS, cache.JOBS, cache.PODS)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        now: Callable[[], datetime] = utcnow,
        reports: ReportReader | None = None,
        experiment_delay: float | None = None,
        background_admission: bool = False,
    ):
        """``reports``: the object-store seam (default: :class:`~finetuner_operator.reports.StoreReports`).

        ``experiment_delay``: None recounts an Experiment at once whenever one of its runs changes
        phase; seconds coalesce those recounts into one per Experiment per delay, done by a background
        thread (:meth:`close` stops it).

        ``background_admission``: with FINETUNER_MAX_CONCURRENT_RUNS, a freed slot is given to the oldest
        waiting run by a background thread; False does it at once, in the caller's thread."""
        self.kube = kube
        self.config = config
        self.locks = KeyedLocks()
        self.tracker = RunTracker()
        self.experiments = ExperimentSync(kube, self.locks)
        self.recounts = (
            Recounts(self.experiments.sync_experiment, experiment_delay) if experiment_delay is not None else None
        )
        self.admitter = Admitter(kube, config, self._admission_pass, background=background_admission)
        self.runs = RunReconciler(
            kube, config, now, reports or StoreReports(), self.admitter, self.locks, self.request_experiment_sync
        )
        self.resync = Resync(self.tracker, self._resync_pass, self._relist, self._relist_due)

    def close(self) -> None:
        """Stop the background threads (pending recounts are dropped: the next start-up's resume
        handlers recount every Experiment)."""
        if self.recounts is not None:
            self.recounts.close()
        self.resync.close()
        self.admitter.close()

    # --- runs ----------------------------------------------------------------------------------------
    def reconcile_run(self, body: dict[str, Any], metadata_patch: dict[str, Any] | None = None) -> None:
        self.runs.reconcile_run(body, metadata_patch)

    def sync_run(self, namespace: str, name: str, coalesce: bool = False) -> FinetuneRunStatus | None:
        """A pass over the run (see :meth:`RunReconciler.sync_run`); its new status, or None."""
        return self.runs.sync_run(namespace, name, coalesce=coalesce)

    def run_deleted(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.runs.run_deleted(namespace, name, body)

    def _admission_pass(self, namespace: str, name: str) -> None:
        self.runs.sync_run(namespace, name)

    # --- experiments ---------------------------------------------------------------------------------
    def sync_experiment(self, namespace: str, name: str) -> None:
        self.experiments.sync_experiment(namespace, name)

    def request_experiment_sync(self, namespace: str, name: str) -> None:
        """Recount the Experiment now, or within ``experiment_delay`` seconds (coalesced)."""
        if self.recounts is None:
            self.sync_experiment(namespace, name)
        else:
            self.recounts.request(namespace, name)

    # --- FINETUNER_MAX_CONCURRENT_RUNS -----------------------------------------------------------------
    def request_admission(self) -> None:
        self.admitter.request()

    def admit_waiting(self) -> None:
        self.admitter.admit_waiting()

    # --- what the watches saw --------------------------------------------------------------------------
    def observe(self, kind: str, event_type: str | None, body: Any) -> None:
        """A watch event (``None``: an initial listing, or a body a handler was given) into the seam's
        cache, if it has one."""
        cache = getattr(self.kube, 'cache', None)
        if cache is not None:
            cache.observe(kind, event_type, body if type(body) is dict else _shallow(body))

    def track(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a run seen by the watch (with its phase); ``forget`` it when it is deleted."""
        self.tracker.track(namespace, name, phase)

    def forget(self, namespace: str, name: str) -> None:
        self.tracker.forget(namespace, name)
        self.locks.forget(namespace, name)

    def active_runs(self) -> list[tuple[str, str]]:
        """Runs not in a terminal phase, a run without any status included."""
        return self.tracker.active()

    # --- periodic re-observation of active runs ---------------------------------------------------------
    def start_resync(self, interval: float, relist_interval: float | None = None) -> None:
        """Every ``interval`` seconds, re-observe every active run from one background thread; every
        ``relist_interval`` seconds (and at the next round while the cache is not synced) list runs,
        experiments, Jobs and pods into the seam's cache, which catches what no watch reported (an
        object deleted while the watches were reconnecting)."""
        self.resync.start(interval, relist_interval)

    def _resync_pass(self, namespace: str, name: str) -> None:
        self.runs.sync_run(namespace, name, coalesce=True)

    def _relist(self) -> None:
        self.kube.relist(self.config.namespaces)

    def _relist_due(self, last: float, relist_interval: float | None) -> bool:
        cache = getattr(self.kube, 'cache', None)
        if cache is None or relist_interval is None:
            return False
        unsynced = not all(cache.synced(kind) for kind in CACHED_KINDS)
        return unsynced or time.monotonic() - last >= relist_interval


def _shallow(body: Any) -> dict[str, Any]:
    """A Kopf body as a plain dict of its raw fields. Not a deep copy: the fields are the watch event's own
    decoded JSON, which neither Kopf nor the operator changes (a new event brings new objects), and a
    deep copy of every event of every run was a fifth of the operator's start-up time with 10,000 runs."""
    return dict(body)
