"""Distributed helpers: sharding keeps classes balanced; torchrun with gloo follows the one-process trajectory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetuner_trainer.distributed import (
    DistInfo,
    ShardedBatches,
    agree,
    env_info,
    gather_for_loss,
    gather_to_main,
    global_batch_order,
    shard,
    sync_batch_norm,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


class Fixed:
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_sharding_keeps_every_class_on_every_rank() -> None:
    # A class-balanced batch: 4 items of class 0, then 4 of class 1, then 4 of class 2.
    labels = {i: i // 4 for i in range(12)}
    base = Fixed([list(range(12)), [0, 1, 2]])
    shares = [list(ShardedBatches(base, r, 2)) for r in range(2)]
    for share in shares:
        first = share[0]
        assert len(first) == 6
        assert sorted(labels[i] for i in first) == [0, 0, 1, 1, 2, 2]
        assert len(share[1]) == 1  # 3 items cut to 2, one per rank
    assert sorted(shares[0][0] + shares[1][0]) == list(range(12))
    assert global_batch_order(list(range(12)), 2) == shares[0][0] + shares[1][0]
    ShardedBatches(base, 0, 2).set_epoch(3)
    assert base.epochs == [3]
    with pytest.raises(ValueError, match='rank 2 is outside a world of 2'):
        ShardedBatches(base, 2, 2)


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    info = env_info()
    assert not info.enabled and info.is_main
    base = Fixed([[1, 2]])
    assert shard(base, info) is base
    assert agree(True) is True and agree(False) is False
    import torch

    t = torch.ones(2, requires_grad=True)
    assert gather_for_loss(t) is t
    assert gather_to_main({'a': 1}) == [{'a': 1}]


def test_batch_norm_is_synchronised_on_nccl_and_reported_on_gloo(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())

    single = model()
    assert sync_batch_norm(single, DistInfo()) is single and isinstance(single[1], torch.nn.BatchNorm2d)
    gpus = model()
    weight, keys = gpus[1].weight, set(gpus.state_dict())
    converted = sync_batch_norm(gpus, DistInfo(rank=0, world_size=2, backend='nccl'))
    assert converted is gpus and isinstance(gpus[1], torch.nn.SyncBatchNorm)
    assert gpus[1].weight is weight  # the optimizer keeps training the same parameters
    assert set(gpus.state_dict()) == keys  # checkpoints and the saved model keep their names
    cpus = model()
    with caplog.at_level('WARNING', logger='finetuner_trainer.distributed'):
        assert sync_batch_norm(cpus, DistInfo(rank=0, world_size=2, backend='gloo')) is cpus
    assert isinstance(cpus[1], torch.nn.BatchNorm2d)
    assert 'on gloo each of the 2 processes normalises its own share of the batch' in caplog.text
    plain = torch.nn.Linear(2, 2)
    caplog.clear()
    assert sync_batch_norm(plain, DistInfo(rank=0, world_size=2, backend='gloo')) is plain
    assert caplog.text == ''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def _run(args: list[str], out: Path) -> dict:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    for key in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_torchrun_two_processes_match_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.trainer.advanced import ddp_worker

    for key in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(key, raising=False)
    ddp_worker.main(str(tmp_path / 'one.json'))  # the one-process reference runs here: no second interpreter
    single = json.loads((tmp_path / 'one.json').read_text())
    worker = str(HERE / 'ddp_worker.py')
    port = str(_free_port())
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-addr', '127.0.0.1']
    torchrun += ['--master-port', port]
    double = _run([*torchrun, worker, str(tmp_path / 'two.json')], tmp_path / 'two.json')
    assert double['world'] == 2 and single['world'] == 1
    assert double['agree'] is True  # rank 1 voted to stop: rank 0 stops too
    assert len(single['metric']) == len(double['metric']) == 8
    assert double['metric'] == pytest.approx(single['metric'], rel=1e-4, abs=1e-5)
    assert len(set(single['metric'])) == len(single['metric'])  # every step differs: matching is not trivial
    assert double['weights'] == pytest.approx(single['weights'], rel=1e-4)  # the same model at the end
    assert double['arc'] == pytest.approx(single['arc'], rel=1e-4, abs=1e-5)
    assert double['clip'] == pytest.approx(single['clip'], rel=1e-4, abs=1e-5)
    assert single['clip'][-1] < single['clip'][0]
