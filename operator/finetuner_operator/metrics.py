"""Prometheus metrics of the operator (served on FINETUNER_METRICS_PORT; 0 turns the server off)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RUNS_BY_PHASE = Gauge('finetuner_runs', 'FinetuneRuns seen by this operator, by phase', ['phase'])
RECONCILE_SECONDS = Histogram(
    'finetuner_reconcile_seconds',
    'Time spent in one reconcile pass',
    ['kind'],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter('finetuner_reconcile_errors_total', 'Reconcile passes that raised', ['kind'])
TRANSITIONS = Counter('finetuner_run_transitions_total', 'Phase transitions of runs', ['phase'])

for _phase in ('CREATED', 'STARTED', 'FINISHED', 'FAILED'):
    RUNS_BY_PHASE.labels(phase=_phase)  # every phase shows, at 0 until a run reaches it

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_server_port: int | None = None


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a run's phase (None: the run is gone) and move the per-phase gauge accordingly."""
    with _lock:
        before = _phases.pop((namespace, name), None) if phase is None else _phases.get((namespace, name))
        if phase is not None:
            _phases[(namespace, name)] = phase
        if before == phase:
            return
        if before is not None:
            RUNS_BY_PHASE.labels(phase=before).dec()
        if phase is not None:
            RUNS_BY_PHASE.labels(phase=phase).inc()


def tracked_runs() -> int:
    with _lock:
        return len(_phases)


@contextmanager
def timed(kind: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(kind=kind).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind=kind).observe(time.perf_counter() - start)


def serve(port: int) -> None:
    """Start the metrics HTTP server once per process (a restarted operator reuses it)."""
    global _server_port
    with _lock:
        if port and _server_port is None:
            start_http_server(port)
            _server_port = port
