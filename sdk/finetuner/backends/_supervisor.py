"""``python -m finetuner.backends._supervisor RUN_DIR``: runs one attempt of a local run and records its end.

The local queue (:mod:`finetuner.backends._scheduler`) starts it in a session of its own once the
run may have its GPU or CPU slot, so it outlives the Python process that submitted the run. It starts
the trainer (stdout and stderr appended to ``trainer.log``; ``CUDA_VISIBLE_DEVICES`` as the queue
gave it), marks the run STARTED once the trainer shows life (output or ``progress.json``), and when
the trainer exits writes the end with the trainer's own reason, then makes a pass of the queue so the
next run in line starts at once.

- ``cancel()`` (a marker, then SIGTERM): the trainer is stopped; FAILED, reason ``Cancelled``.
- ``suspend()`` (a marker, then SIGTERM): the trainer is stopped; CREATED, reason ``Suspended``, back in
  line without holding anything; ``resume()`` lets it train again from its last checkpoint.
- SIGTERM without a marker (the machine shutting down): the trainer is stopped and nothing is
  recorded, so the next pass after a restart resumes the run (see the queue's docstring).
- The run's folder deleted by hand: the trainer is stopped at once (it would re-create the folder) and
  what is left of the run (the re-created folder, its uploaded datasets, its claim on the name) is
  deleted: the name is free again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from finetuner.api import reasons
from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import Phase
from finetuner.backends import _rundir as rd
from finetuner.backends._scheduler import LocalQueue

POLL_SECONDS = 0.25
GRACE_SECONDS = 10.0


def _suspended(state: rd.RunState) -> rd.RunState:
    return state.model_copy(
        update={
            'phase': Phase.CREATED,
            'reason': Reason.SUSPENDED.value,
            'details': reasons.SUSPENDED,
            'admitted': False,
            'trainer_pid': None,
            'gpu_ids': [],
        }
    )


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.queue = LocalQueue(run_dir.parent.parent)
        stored = rd.read_stored(run_dir)
        self.name = run_dir.name
        self.uid = stored.uid if stored is not None else None
        self.stopping = False  # a SIGTERM arrived: cancel, suspend, or the machine going down
        self.trainer: subprocess.Popen[bytes] | None = None

    def vanished(self) -> bool:
        """The run's folder was deleted by hand (or replaced by another run of the same name)."""
        stored = rd.read_stored(self.run_dir)
        return stored is None or stored.uid != self.uid

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.trainer is not None and self.trainer.poll() is None:
            self.trainer.terminate()

    def start(self) -> int | None:
        """Start the trainer; None when it started, else the exit code to record."""
        command = [*json.loads((self.run_dir / rd.COMMAND_FILE).read_text()), '--config']
        command.append(str(self.run_dir / rd.CONFIG_FILE))
        with (self.run_dir / rd.TRAINER_LOG).open('ab') as log:
            try:
                self.trainer = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, 'PYTHONUNBUFFERED': '1'},
                )
            except OSError as e:
                log.write(f'could not start the trainer {command[0]!r}: {e}\n'.encode())
                return 127
        with self.queue.locked():
            state = rd.read_state(self.run_dir)
            update = {'trainer_pid': self.trainer.pid, 'trainer_started_at': rd.now()}
            rd.write_state(self.run_dir, state.model_copy(update=update))
        return None

    def record_start(self) -> None:
        """Record STARTED once the trainer shows life (readers see it from the files even before)."""
        if rd.observed(self.run_dir, rd.read_state(self.run_dir)).phase != Phase.STARTED:
            return  # not yet, or recorded already; the lock only to write
        with self.queue.locked():
            state = rd.read_state(self.run_dir)
            seen = rd.observed(self.run_dir, state)
            if seen.phase != state.phase:
                rd.write_state(self.run_dir, seen)

    def watch(self) -> int | None:
        """Until the trainer exits: its exit code, or None when the run's folder vanished."""
        assert self.trainer is not None
        stop_sent_at: float | None = None
        while (exit_code := self.trainer.poll()) is None:
            if self.vanished():
                self._stop_trainer()
                return None
            self.record_start()
            if self.stopping and stop_sent_at is None:  # also a SIGTERM that came before the trainer existed
                stop_sent_at = time.monotonic()
                self.trainer.terminate()
            elif stop_sent_at is not None and time.monotonic() - stop_sent_at > GRACE_SECONDS:
                self.trainer.kill()
            time.sleep(POLL_SECONDS)
        return exit_code

    def _stop_trainer(self) -> None:
        assert self.trainer is not None
        self.trainer.terminate()
        try:
            self.trainer.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.trainer.kill()
            self.trainer.wait()

    def record_end(self, exit_code: int) -> bool:
        """Write how the attempt ended; False when nothing may be recorded (the machine going down)."""
        cancelled = (self.run_dir / rd.CANCEL_MARKER).exists()
        suspend = (self.run_dir / rd.SUSPEND_MARKER).exists()
        with self.queue.locked():
            state = rd.observed(self.run_dir, rd.read_state(self.run_dir))  # its start, if it showed life
            if suspend and not cancelled and exit_code != 0:
                (self.run_dir / rd.SUSPEND_MARKER).unlink(missing_ok=True)
                rd.write_state(self.run_dir, _suspended(state))
                return True
            if self.stopping and not cancelled and not suspend:
                return False
            (self.run_dir / rd.SUSPEND_MARKER).unlink(missing_ok=True)
            rd.write_state(self.run_dir, rd.final_state(self.run_dir, exit_code, state))
            return True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        if (self.run_dir / rd.CANCEL_MARKER).exists():  # cancelled between its admission and now
            with self.queue.locked():
                rd.write_state(self.run_dir, rd.cancelled_state(rd.read_state(self.run_dir)))
        else:
            exit_code = self.start()
            if exit_code is None:
                exit_code = self.watch()
            if exit_code is None:  # the run's folder was deleted: free the name and everything it held
                with self.queue.locked():
                    self.queue.forget(self.name, self.uid)
            elif not self.record_end(exit_code):
                return 0
        self.queue.tick()  # give the freed slot to the next run in line
        return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print('usage: python -m finetuner.backends._supervisor RUN_DIR', file=sys.stderr)
        return 2
    return Supervisor(Path(args[0])).run()


if __name__ == '__main__':
    sys.exit(main())
