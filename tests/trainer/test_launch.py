"""The torchrun launcher keeps the trainer's configuration-error exit code (real processes, gloo).

Two workers join a gloo process group; one leaves with an exit code while the other waits in a
collective for it, as a rank does when its peer dies. torchrun then stops the waiting worker and
exits 1 (torch re-raises ``ChildFailedError``), which the trainer Job's pod failure policy would
retry; ``python -m finetuner_trainer.launch`` exits 3 when a worker exited 3.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR
from finetuner_trainer.launch import exit_code

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKER = """
import os, sys, datetime
import torch.distributed as dist

dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=120))
rank = int(os.environ['RANK'])
failing, code = int(sys.argv[1]), int(sys.argv[2])
if rank == failing:
    sys.exit(code)  # before the collective: its peer waits for it there
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def _launch(launcher: list[str], tmp_path: Path, failing: int, code: int) -> subprocess.CompletedProcess[str]:
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for key in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    command = [*launcher, '--nproc-per-node=2', '--master-addr=127.0.0.1', f'--master-port={_free_port()}']
    command += [str(worker), str(failing), str(code)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']
LAUNCH = [sys.executable, '-m', 'finetuner_trainer.launch']


def test_plain_torchrun_turns_a_configuration_error_into_exit_1(tmp_path: Path) -> None:
    """The defect the launcher exists for (torch's behaviour: if this ever passes through 3, the
    launcher is no longer needed)."""
    result = _launch(TORCHRUN, tmp_path, failing=1, code=EXIT_CONFIG_ERROR)
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'exitcode  : 3' in result.stderr


def test_launcher_exits_3_when_a_worker_exits_3_while_its_peer_waits_in_a_collective(tmp_path: Path) -> None:
    result = _launch(LAUNCH, tmp_path, failing=1, code=EXIT_CONFIG_ERROR)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
    assert 'finetuner launch: workers failed (' in result.stderr
    assert 'rank 1 exit code 3' in result.stderr
    assert 'exiting 3' in result.stderr


def test_launcher_exits_0_when_every_worker_succeeds(tmp_path: Path) -> None:
    result = _launch(LAUNCH, tmp_path, failing=-1, code=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'finetuner launch' not in result.stderr


def test_exit_code_of_failures() -> None:
    """Any other failure is 1, as torchrun's own: retried by the Job (a killed worker included)."""

    def failure(code: int) -> SimpleNamespace:
        return SimpleNamespace(exitcode=code)

    assert exit_code({0: failure(-15), 1: failure(EXIT_CONFIG_ERROR)}) == EXIT_CONFIG_ERROR
    assert exit_code({0: failure(1), 1: failure(-15)}) == 1
    assert exit_code({3: failure(-9)}) == 1
