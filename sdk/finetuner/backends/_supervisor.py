"""``python -m finetuner.backends._supervisor RUN_DIR``: runs one local trainer and records its end.

Started by the local backend in a session of its own, it outlives the Python process that
submitted the run. It starts the trainer (stdout and stderr to ``trainer.log``), marks the run
STARTED once the trainer shows life (output or ``progress.json``), and when the trainer exits
writes the terminal phase with the trainer's own reason. SIGTERM (``cancel()``) is passed to the
trainer and the run ends FAILED with the reason ``Cancelled``.
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

from finetuner.api import layout, reasons
from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import Phase
from finetuner.backends.local import (
    CANCEL_MARKER,
    COMMAND_FILE,
    CONFIG_FILE,
    OUTPUT_DIR,
    TRAINER_LOG,
    final_state,
    now,
    read_state,
    write_state,
)

POLL_SECONDS = 0.25
GRACE_SECONDS = 10.0


def _shows_life(run_dir: Path) -> bool:
    log = run_dir / TRAINER_LOG
    return (log.exists() and log.stat().st_size > 0) or (run_dir / OUTPUT_DIR / layout.PROGRESS).exists()


def supervise(run_dir: Path) -> int:
    command = [*json.loads((run_dir / COMMAND_FILE).read_text()), '--config', str(run_dir / CONFIG_FILE)]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    stopping = False

    with (run_dir / TRAINER_LOG).open('ab') as log:
        try:
            trainer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            log.write(f'could not start the trainer {command[0]!r}: {e}\n'.encode())
            log.flush()
            write_state(run_dir, final_state(run_dir, 127, read_state(run_dir)))
            return 127

        def on_term(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True
            (run_dir / CANCEL_MARKER).touch()
            if trainer.poll() is None:
                trainer.terminate()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        write_state(run_dir, read_state(run_dir).model_copy(update={'trainer_pid': trainer.pid}))

        stop_sent_at: float | None = None
        while True:
            exit_code = trainer.poll()
            if exit_code is not None:
                break
            state = read_state(run_dir)
            if state.phase == Phase.CREATED and _shows_life(run_dir):
                write_state(
                    run_dir,
                    state.model_copy(
                        update={
                            'phase': Phase.STARTED,
                            'reason': Reason.RUNNING.value,
                            'details': reasons.RUNNING,
                            'start_time': now(),
                        }
                    ),
                )
            if stopping:
                stop_sent_at = stop_sent_at or time.monotonic()
                if time.monotonic() - stop_sent_at > GRACE_SECONDS:
                    trainer.kill()
            time.sleep(POLL_SECONDS)

    state = read_state(run_dir)
    if state.start_time is None and _shows_life(run_dir):
        state = state.model_copy(update={'start_time': now()})
    write_state(run_dir, final_state(run_dir, exit_code, state))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print('usage: python -m finetuner.backends._supervisor RUN_DIR', file=sys.stderr)
        return 2
    return supervise(Path(args[0]))


if __name__ == '__main__':
    sys.exit(main())
