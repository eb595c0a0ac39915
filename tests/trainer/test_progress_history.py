"""progress_history.json: the loss of every step, written with progress.json, bounded, and continued on resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetuner.api import layout
from finetuner.storage import LocalStore
from finetuner_trainer import progress
from finetuner_trainer.hooks import TrainState
from finetuner_trainer.progress import ProgressReporter


def _reporter(store: LocalStore, interval: float = 3600.0) -> ProgressReporter:
    return ProgressReporter(store, logging.getLogger('test-progress'), interval=interval)


def test_every_step_is_kept_and_written_with_the_next_progress_report(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    reporter = _reporter(store)  # a long interval: only begin() and forced reports write
    state = TrainState(epoch=1, epochs=1, total_steps=10)
    reporter.begin(state)
    assert not store.exists(layout.PROGRESS_HISTORY)  # no loss yet, no curve
    for step in range(1, 6):
        state.step = step
        reporter.report(state, 1.0 / step)
    assert not store.exists(layout.PROGRESS_HISTORY)  # kept in memory until the next write
    reporter.report(state, 0.2, force=True)  # the same step again adds no point
    points = store.read_json(layout.PROGRESS_HISTORY)['points']
    assert [p['step'] for p in points] == [1, 2, 3, 4, 5]
    assert [p['loss'] for p in points] == [1.0, 0.5, 1.0 / 3, 0.25, 0.2]
    assert all(p['epoch'] == 1 and p['time'].endswith('+00:00') for p in points)


def test_a_long_run_keeps_a_bounded_curve_with_its_first_and_last_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, 'MAX_HISTORY_POINTS', 100)
    store = LocalStore(tmp_path)
    reporter = _reporter(store)
    state = TrainState(epoch=1, epochs=1, total_steps=1000)
    reporter.begin(state)
    for step in range(1, 1001):
        state.step = step
        reporter.report(state, 1000.0 - step)
    reporter.report(state, 0.0, force=True)
    steps = [p['step'] for p in store.read_json(layout.PROGRESS_HISTORY)['points']]
    assert len(steps) <= 100 and steps[0] == 1 and steps[-1] == 1000 and steps == sorted(steps)


def test_a_resumed_attempt_continues_the_curve_of_the_checkpoint(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    first = _reporter(store, interval=0.0)
    state = TrainState(epoch=1, epochs=2, total_steps=8)
    first.begin(state)
    for step in range(1, 7):  # the pod dies after step 6; the checkpoint was taken at step 4
        state.step = step
        first.report(state, float(step))
    second = _reporter(store, interval=0.0)
    resumed = TrainState(epoch=1, epochs=2, step=4, total_steps=8)
    second.begin(resumed)
    for step in range(5, 9):
        resumed.step = step
        second.report(resumed, 10.0 * step)
    points = store.read_json(layout.PROGRESS_HISTORY)['points']
    assert [(p['step'], p['loss']) for p in points] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
        (6, 60.0),
        (7, 70.0),
        (8, 80.0),
    ]
