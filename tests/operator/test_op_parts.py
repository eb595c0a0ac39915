"""The reconciler's parts on their own: per-object locks, the background threads, the reports seam."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from finetuner_operator.background import Recounts, RunTracker, Wakeups
from finetuner_operator.locks import KeyedLocks
from finetuner_operator.reports import StoreReports


def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'condition never met'
        time.sleep(0.01)


def test_a_coalescing_pass_is_dropped_only_while_another_waits() -> None:
    locks = KeyedLocks()
    inside, release = threading.Event(), threading.Event()
    turns: list[str] = []

    def hold(name: str, coalesce: bool) -> None:
        with locks.hold('ns', 'r', coalesce=coalesce) as turn:
            turns.append(f'{name}:{turn}')
            if name == 'first':
                inside.set()
                release.wait(10)

    first = threading.Thread(target=hold, args=('first', False))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=hold, args=('second', True))  # nobody waits yet: it queues
    second.start()
    wait_until(lambda: locks.waiting.get(('ns', 'r')) == 1)
    with locks.hold('ns', 'r', coalesce=True) as turn:
        assert turn is False
    with locks.hold('ns', 'other', coalesce=True) as turn:
        assert turn is True, 'another object has its own lock'
    release.set()
    first.join(10)
    second.join(10)
    assert turns == ['first:True', 'second:True']
    assert locks.waiting == {}


def test_recounts_are_coalesced_per_experiment_and_dropped_after_close() -> None:
    done: list[tuple[str, str]] = []
    recounts = Recounts(lambda namespace, name: done.append((namespace, name)), delay=0.1)
    for _ in range(3):
        recounts.request('ns', 'a')
    recounts.request('ns', 'b')
    wait_until(lambda: len(done) == 2)
    assert sorted(done) == [('ns', 'a'), ('ns', 'b')]
    recounts.close()
    assert recounts.thread is not None and not recounts.thread.is_alive()
    recounts.request('ns', 'a')
    time.sleep(0.2)
    assert len(done) == 2


def test_a_failed_recount_is_tried_again_after_the_delay() -> None:
    calls: list[str] = []

    def flaky(namespace: str, name: str) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise ConnectionError('API server away')

    recounts = Recounts(flaky, delay=0.05)
    try:
        recounts.request('ns', 'a')
        wait_until(lambda: len(calls) == 2)
    finally:
        recounts.close()


def test_wakeups_run_the_job_in_their_own_thread_and_stop_on_close() -> None:
    ran = threading.Event()
    caller = threading.current_thread()
    threads: list[threading.Thread] = []

    def job() -> None:
        threads.append(threading.current_thread())
        ran.set()

    wakeups = Wakeups(job, 'test-wakeups')
    assert wakeups.thread is None, 'no thread before the first wake'
    wakeups.wake()
    assert ran.wait(10)
    wakeups.close()
    assert threads and threads[0] is not caller and threads[0].name == 'test-wakeups'
    assert wakeups.thread is not None and not wakeups.thread.is_alive()
    wakeups.wake()  # after close: no new thread
    assert not wakeups.thread.is_alive()


def test_the_tracker_lists_runs_that_are_not_terminal() -> None:
    tracker = RunTracker()
    for name, phase in (('new', None), ('running', 'STARTED'), ('done', 'FINISHED'), ('failed', 'FAILED')):
        tracker.track('ns', name, phase)
    tracker.forget('ns', 'running')
    assert tracker.active() == [('ns', 'new')]


def test_the_reports_seam_leaves_out_what_is_malformed(tmp_path: Path) -> None:
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'progress.json').write_text('{"epoch": -1}')  # not a Progress
    (out / 'metrics.json').write_text('[1, 2]')  # not a dict
    (out / 'failure.json').write_text('{torn')
    reports = StoreReports().read(out.as_uri(), ('progress', 'metrics', 'failure', 'artifact'))
    assert (reports.progress, reports.metrics, reports.failure, reports.artifact) == (None, None, None, False)
    assert reports.store_error is None
    assert reports.model_fields_set == {'progress', 'metrics', 'failure', 'artifact'}
