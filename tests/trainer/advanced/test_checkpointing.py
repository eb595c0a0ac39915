"""Checkpoints: round trip, latest.json written last, pruning, refusal of a changed configuration."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetuner.api.layout import CHECKPOINT_LATEST
from finetuner.storage import LocalStore
from finetuner_trainer.checkpointing import Checkpointer, CheckpointError
from finetuner_trainer.distributed import unwrap
from finetuner_trainer.hooks import Callback


class Counter(Callback):
    def __init__(self) -> None:
        self.best = float('inf')

    def state_dict(self) -> dict[str, Any]:
        return {'best': self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state['best']


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_round_trip_resumes_the_same_trajectory(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model, optimizer, scheduler = make()
    train_step(model, optimizer)
    scheduler.step()
    callback = Counter()
    callback.best = 0.25
    checkpointer = Checkpointer(store)
    path = checkpointer.save(
        epoch=1,
        step=1,
        components={'model': model, 'optimizer': optimizer, 'scheduler': scheduler, 'sampler': None},
        callbacks=[callback],
        history=[{'epoch': 1, 'train_loss': 0.5}],
    )
    assert path == 'checkpoints/epoch-0001'
    assert store.read_json(CHECKPOINT_LATEST)['path'] == path
    # Continue the original for one more step, drawing from the RNGs as training would.
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    train_step(model, optimizer)

    fresh_model, fresh_opt, fresh_sched = make(seed=1)
    fresh_callback = Counter()
    checkpoint = Checkpointer(store).load_latest()
    assert checkpoint is not None and (checkpoint.epoch, checkpoint.step) == (1, 1)
    checkpoint.restore({'model': fresh_model, 'optimizer': fresh_opt, 'scheduler': fresh_sched}, [fresh_callback])
    assert fresh_callback.best == 0.25
    assert checkpoint.history == [{'epoch': 1, 'train_loss': 0.5}]
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected_draws
    train_step(fresh_model, fresh_opt)
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_no_checkpoint_and_half_written_state(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    checkpointer = Checkpointer(store)
    assert checkpointer.load_latest() is None
    model, _, _ = make()
    checkpointer.save(epoch=1, step=3, components={'model': model})
    # A later attempt died while uploading epoch 2: its state exists (partly) but latest.json does not name it.
    store.write_bytes('checkpoints/epoch-0002/state.pt', b'\x80truncated')
    checkpoint = checkpointer.load_latest()
    assert checkpoint is not None and checkpoint.path == 'checkpoints/epoch-0001'


def test_pruning_keeps_last_k_and_drops_step_checkpoints(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model, _, _ = make()
    checkpointer = Checkpointer(store, keep_last=2)
    checkpointer.save(epoch=1, step=10, components={'model': model})
    checkpointer.save(epoch=1, step=15, batch_in_epoch=5, components={'model': model})
    checkpointer.save(epoch=1, step=18, batch_in_epoch=8, components={'model': model})
    assert checkpointer.saved() == ['checkpoints/epoch-0001', 'checkpoints/step-00000018']
    latest = checkpointer.load_latest()
    assert latest is not None and latest.batch_in_epoch == 8 and latest.epoch == 1
    checkpointer.save(epoch=2, step=20, components={'model': model})
    checkpointer.save(epoch=3, step=30, components={'model': model})
    assert checkpointer.saved() == ['checkpoints/epoch-0002', 'checkpoints/epoch-0003']


def test_changed_configuration_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model, optimizer, _ = make()
    Checkpointer(store).save(epoch=1, step=1, components={'model': model})
    checkpoint = Checkpointer(store).load_latest()
    assert checkpoint is not None
    with pytest.raises(CheckpointError, match='has no state for optimizer'):
        checkpoint.restore({'model': model, 'optimizer': optimizer})
    with pytest.raises(CheckpointError, match='cannot restore model from checkpoints/epoch-0001'):
        checkpoint.restore({'model': torch.nn.Linear(4, 2)})


def test_missing_state_named_by_latest_is_an_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_json(CHECKPOINT_LATEST, {'path': 'checkpoints/epoch-0004', 'epoch': 4, 'step': 8})
    with pytest.raises(CheckpointError, match=r'names checkpoints/epoch-0004 but its state\.pt is missing'):
        Checkpointer(store).load_latest()


def test_unwrap() -> None:
    inner = torch.nn.Sequential()
    wrapper = torch.nn.Module()
    wrapper.module = inner
    assert unwrap(wrapper) is inner
    assert unwrap(inner) is inner


def test_numpy_values_in_history_load_with_weights_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model, _, _ = make()
    Checkpointer(store).save(
        epoch=1, step=1, components={'model': model}, history=[{'mrr': np.float64(0.5)}], extra={'a': np.arange(2)}
    )
    checkpoint = Checkpointer(store).load_latest()
    assert checkpoint is not None and checkpoint.history == [{'mrr': 0.5}] and checkpoint.extra == {'a': [0, 1]}


def _stream(seed: int) -> dict[str, Any]:
    from finetuner_trainer.rng import seeded_rng_state

    return seeded_rng_state(seed)


def _resume_as(rank: int, world: int, store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """resume_from_latest as rank ``rank`` of ``world`` processes; the next draws of torch's generator."""
    import logging
    from types import SimpleNamespace

    from finetuner_trainer.checkpointing import resume_from_latest
    from finetuner_trainer.context import ResumePoint, RunMetrics
    from finetuner_trainer.hooks import TrainState

    monkeypatch.setenv('RANK', str(rank))
    monkeypatch.setenv('WORLD_SIZE', str(world))
    model, optimizer, scheduler = make()
    ctx = SimpleNamespace(
        store=store,
        checkpointer=Checkpointer(store),
        resume=ResumePoint(),
        metrics=RunMetrics(),
        callbacks=[],
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss=torch.nn.Identity(),
        loss_optimizer=None,
        state=TrainState(),
        logger=logging.getLogger('test'),
        spec=SimpleNamespace(seed=5),
    )
    assert resume_from_latest(ctx) is not None
    return torch.rand(3).tolist()


def test_every_rank_resumes_its_own_random_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetuner_trainer.rng import rank_seed, restore_rng

    store = LocalStore(tmp_path)
    model, optimizer, scheduler = make()
    streams = [_stream(10), _stream(11)]
    Checkpointer(store).save(
        epoch=1,
        step=4,
        components={'model': model, 'optimizer': optimizer, 'scheduler': scheduler},
        rng_per_rank=streams,
    )
    checkpoint = Checkpointer(store).load_latest()
    assert checkpoint is not None and len(checkpoint.rng_per_rank) == 2
    assert checkpoint.rng_for(3, 4) is None  # written by 2 processes: no saved stream for a world of 4

    expected = []
    for state in streams:
        restore_rng(state)
        expected.append(torch.rand(3).tolist())
    assert expected[0] != expected[1]
    assert _resume_as(0, 2, store, monkeypatch) == expected[0]
    assert _resume_as(1, 2, store, monkeypatch) == expected[1]
    # Another world size: each rank draws a fresh stream of its own, from (seed, rank, step).
    restore_rng(_stream(rank_seed(5 + 4, 1)))
    fresh = torch.rand(3).tolist()
    assert _resume_as(1, 4, store, monkeypatch) == fresh
    assert _resume_as(2, 4, store, monkeypatch) != fresh


def test_a_single_process_checkpoint_holds_its_own_stream(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model, _, _ = make()
    torch.manual_seed(3)
    Checkpointer(store).save(epoch=1, step=1, components={'model': model})
    expected = torch.rand(2)
    checkpoint = Checkpointer(store).load_latest()
    assert checkpoint is not None and checkpoint.rng_for(0, 1) is not None
    from finetuner_trainer.rng import restore_rng

    restore_rng(checkpoint.rng_for(0, 1))
    assert torch.equal(torch.rand(2), expected)
