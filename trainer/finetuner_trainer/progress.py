"""Progress a person can read in the log and the operator can read from ``progress.json``."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetuner.api.layout import PROGRESS, PROGRESS_HISTORY
from finetuner.api.v1alpha1 import Progress
from finetuner.storage import StorageError
from finetuner_trainer.hooks import TrainState

LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'


def setup_logging(log_file: Path) -> logging.Logger:
    """Log to stdout and to ``log_file`` (copied to the run's logs/train.log); quiet noisy libraries."""
    logger = logging.getLogger('finetuner_trainer')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT, datefmt='%Y-%m-%dT%H:%M:%S')
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    quiet_libraries()
    return logger


def quiet_libraries() -> None:
    """No download/load progress bars or load reports from Hugging Face libraries in the run's log."""
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    try:
        import transformers  # heavy: quieted only where it is installed (and loaded by the model anyway)
    except ImportError:
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger('sentence_transformers').setLevel(logging.WARNING)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return '?'
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes:02d}:{secs:02d}'


MAX_HISTORY_POINTS = 2000  # beyond this the loss curve keeps every other point (the shape stays)


class ProgressReporter:
    """Writes progress.json at most every ``interval`` seconds (and when forced) and logs a line
    about twenty times per run, or at least every ``log_every_seconds``. The loss of every step goes into
    progress_history.json with each write: the curve the run console draws (progress.json holds only the
    latest report)."""

    def __init__(
        self,
        store: Any,
        logger: logging.Logger,
        interval: float = 2.0,
        log_every_seconds: float = 30.0,
        enabled: bool = True,
    ):
        self.store = store
        self.logger = logger
        self.interval = interval
        self.log_every_seconds = log_every_seconds
        self.enabled = enabled
        self.started = time.monotonic()
        self.start_step = 0
        self.last_write = 0.0
        self.last_log = self.started
        self.last_logged_step = -1
        self.history: list[dict[str, Any]] = []
        self.history_changed = False

    def begin(self, state: TrainState) -> None:
        self.started = time.monotonic()
        self.start_step = state.step
        if state.step and self.enabled:  # resumed: the curve goes on from the checkpoint's step
            self.history = [p for p in self._stored_history() if p.get('step', 0) <= state.step]
        self.report(state, force=True)

    def _stored_history(self) -> list[dict[str, Any]]:
        try:
            stored = self.store.read_json_or_none(PROGRESS_HISTORY)
        except (StorageError, ValueError):
            return []
        points = stored.get('points') if isinstance(stored, dict) else None
        return [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []

    def _record(self, state: TrainState, loss: float | None) -> None:
        """Append the loss of this step to the history (written with the next progress.json)."""
        if loss is None or (self.history and self.history[-1]['step'] >= state.step):
            return
        now = datetime.now(timezone.utc).isoformat(timespec='seconds')
        self.history.append({'step': state.step, 'epoch': state.epoch, 'loss': loss, 'time': now})
        self.history_changed = True
        if len(self.history) > MAX_HISTORY_POINTS:
            self.history = [*self.history[:-1:2], self.history[-1]]

    def eta(self, state: TrainState) -> float | None:
        done = state.step - self.start_step
        if done <= 0 or not state.total_steps:
            return None
        return max(0.0, (time.monotonic() - self.started) / done * (state.total_steps - state.step))

    def progress(self, state: TrainState, loss: float | None) -> Progress:
        percent = 100.0 * state.step / state.total_steps if state.total_steps else 0.0
        return Progress(
            epoch=state.epoch,
            epochs=state.epochs,
            step=state.step,
            total_steps=state.total_steps,
            percent=round(min(percent, 100.0), 2),
            eta_seconds=None if (eta := self.eta(state)) is None else round(eta, 1),
            loss=loss,
            metrics=dict(state.metrics),
            updated_at=datetime.now(timezone.utc).isoformat(timespec='seconds'),
        )

    def report(self, state: TrainState, loss: float | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        every = max(1, state.total_steps // 20)
        if force or state.step % every == 0 or now - self.last_log >= self.log_every_seconds:
            if state.step != self.last_logged_step and state.step:
                self.logger.info(
                    'epoch %d/%d step %d/%d (%.0f%%) loss %s eta %s',
                    state.epoch,
                    state.epochs,
                    state.step,
                    state.total_steps,
                    100.0 * state.step / max(1, state.total_steps),
                    'n/a' if loss is None else f'{loss:.4f}',
                    format_seconds(self.eta(state)),
                )
                self.last_logged_step = state.step
                self.last_log = now
        self._record(state, loss)
        if force or now - self.last_write >= self.interval:
            try:
                self.store.write_json(PROGRESS, self.progress(state, loss).to_k8s())
                if self.history_changed:
                    self.store.write_json(PROGRESS_HISTORY, {'points': self.history})
                    self.history_changed = False
            except StorageError as e:  # progress is best effort: training goes on
                self.logger.warning('could not write progress: %s', e)
            self.last_write = now
