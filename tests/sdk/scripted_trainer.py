"""A stand-in for ``python -m finetuner_trainer`` that follows the output contract without torch.

The local backend's phases, logs, failure reasons and cancellation are tested against it in
milliseconds; tests with the real trainer cover training itself. What it does is chosen by the
spec's ``model``: ``scripted:ok`` trains "instantly", ``scripted:fail`` exits with the config-error
code and a reason, ``scripted:crash`` dies without one, ``scripted:hub-offline`` cannot fetch weights,
``scripted:slow`` runs until stopped (``model_options.seconds``: that long, then like ``ok``),
``scripted:no-artifact`` exits 0 without writing an artifact.

``model_options`` steer it further: ``wait_for`` (a file): hold before the first progress until it exists;
``hold_after_progress`` (a file): hold after the first progress until it exists; ``stop_supervisor_until``
(a file): unless it exists already, stop the run's supervisor (SIGSTOP) once it has recorded this trainer,
then show no life (no output, no progress) until the file exists: a supervisor lagging behind its
trainer, as under load, made deterministic (the test sends SIGCONT).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from finetuner.api import layout
from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, TrainerConfig
from finetuner.storage import open_store


def _mrr(config: TrainerConfig) -> float:
    """0.75; with a learning rate, the closer it is to 1e-3 the higher (sweeps have a best run to find)."""
    rate = config.spec.learning_rate
    return 0.75 if rate is None else round(1.0 - abs(math.log10(rate) + 3.0) / 10.0, 4)


def _wait_for_file(path: str | Path) -> None:
    while not Path(path).exists():
        time.sleep(0.02)


def _stop_supervisor(config_file: Path) -> None:
    """SIGSTOP the supervisor (this process's parent) once state.json names this trainer, taking the
    queue's lock first so that the supervisor is frozen outside it (every backend call needs the lock)."""
    run_dir = config_file.parent
    while True:
        try:
            state = json.loads((run_dir / 'state.json').read_text())
        except (OSError, ValueError):
            state = {}
        if state.get('trainer_pid') == os.getpid():
            break
        time.sleep(0.02)
    with (run_dir.parent.parent / 'queue' / 'lock').open('a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.kill(os.getppid(), signal.SIGSTOP)
        fcntl.flock(lock, fcntl.LOCK_UN)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--config', required=True)
    args = parser.parse_args()
    config = TrainerConfig.model_validate_json(Path(args.config).read_text())
    out = open_store(config.output_uri)
    behaviour = config.spec.model.removeprefix('scripted:')
    lag_until = config.spec.model_options.get('stop_supervisor_until')
    if lag_until and not Path(lag_until).exists():
        _stop_supervisor(Path(args.config))
        _wait_for_file(lag_until)
    print(f'scripted trainer: run {config.run_name}, behaviour {behaviour}', flush=True)
    print(f'CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES")!r}', flush=True)
    wait_file = config.spec.model_options.get('wait_for')
    if wait_file:  # hold before reporting progress until the test says go
        while not Path(wait_file).exists():
            time.sleep(0.05)
    out.write_json(layout.PROGRESS, {'epoch': 1, 'epochs': 1, 'step': 1, 'totalSteps': 2, 'percent': 50.0})
    if config.spec.model_options.get('hold_after_progress'):
        _wait_for_file(config.spec.model_options['hold_after_progress'])
    seconds = config.spec.model_options.get('seconds')
    if behaviour == 'slow' and seconds is not None:
        time.sleep(float(seconds))
        behaviour = 'ok'
    if behaviour == 'ok':
        location, key = layout.resolve_data(config.spec.train_data, config.data_uri)
        if key is None:  # a URI of the file itself
            location, key = location.rsplit('/', 1)
        data = open_store(location).read_bytes(key)
        lines = data.splitlines()
        print(f'read {len(lines)} records', flush=True)
        print(f'first record: {lines[0].decode() if lines else None}', flush=True)
        out.write_json(layout.METRICS, {'before': {'mrr': 0.25}, 'after': {'mrr': _mrr(config)}, 'epochs': []})
        out.write_json(f'{layout.ARTIFACT}/weights.json', {'dim': 3})
        out.write_json(layout.ARTIFACT_MANIFEST, {'files': {'weights.json': {}}, 'format': 'scripted'})
        out.write_json(layout.PROGRESS, {'epoch': 1, 'epochs': 1, 'step': 2, 'totalSteps': 2, 'percent': 100.0})
        print('done', flush=True)
        return 0
    if behaviour == 'fail':
        message = 'train_data: 3 records have no label; labelled training needs tags["finetuner_label"]'
        out.write_json(layout.FAILURE, {'reason': 'DataError', 'message': message, 'exitCode': EXIT_CONFIG_ERROR})
        Path(config.termination_log).write_text(message)
        print(f'error: {message}', file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    if behaviour == 'hub-offline':
        message = (
            'LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub and we cannot '
            'find the requested files in the local cache.'
        )
        out.write_json(layout.FAILURE, {'reason': 'LocalEntryNotFoundError', 'message': message, 'exitCode': 1})
        return 1
    if behaviour == 'crash':
        print('Traceback (most recent call last):\nRuntimeError: CUDA out of memory', file=sys.stderr, flush=True)
        return 1
    if behaviour == 'no-artifact':
        return 0
    if behaviour == 'slow':  # reports progress as the real trainer does (which re-creates a deleted output folder)
        step = 0
        while True:
            step += 1
            print('still training', flush=True)
            out.write_json(layout.PROGRESS, {'epoch': 1, 'epochs': 1, 'step': step, 'totalSteps': 10**6})
            time.sleep(0.2)
    print(f'unknown behaviour {behaviour}', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
