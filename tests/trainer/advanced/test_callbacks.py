"""Callbacks on a fake loop: best model, early stopping, WiSE-FT, loggers, building by name, the plot."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from finetuner.api.v1alpha1 import CallbackSpec, FinetuneRunSpec
from finetuner.storage import LocalStore
from finetuner_trainer.callbacks import (
    BestModelCheckpoint,
    EarlyStopping,
    EvaluationCallback,
    TensorBoardLogger,
    TrainingCheckpoint,
    WiSEFTCallback,
    build_callbacks,
    checkpoint_retention,
)
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.hooks import Control, TrainState
from finetuner_trainer.plots import plot_training_curves


def ctx_for(model: torch.nn.Module, store: Any = None) -> SimpleNamespace:
    spec = FinetuneRunSpec(model='m', train_data='x')
    return SimpleNamespace(model=model, store=store, spec=spec, config=SimpleNamespace(run_name='r', data_uri=None))


def run_epochs(
    callbacks: list[Any], ctx: Any, values: list[float], monitor: str = 'val_loss'
) -> tuple[TrainState, Control]:
    """Drive the hooks as the loop does; the model's weight is set to the epoch number."""
    state, control = TrainState(epochs=len(values)), Control()
    for cb in callbacks:
        cb.on_train_begin(ctx, state, control)
    for epoch, value in enumerate(values, start=1):
        state.epoch = epoch
        with torch.no_grad():
            ctx.model.weight.fill_(float(epoch))
        state.train_loss = 1.0
        if monitor == 'val_loss':
            state.val_loss = value
        else:
            state.metrics = {monitor: value}
        for cb in callbacks:
            cb.on_epoch_end(ctx, state, control)
        if control.should_stop:
            break
    for cb in callbacks:
        cb.on_train_end(ctx, state, control)
    return state, control


def test_best_model_checkpoint_restores_the_best_epoch() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    best = BestModelCheckpoint(monitor='val_loss')
    run_epochs([best], ctx_for(model), [0.9, 0.4, 0.6, 0.5])
    assert best.best_epoch == 2 and best.best_score == 0.4
    assert model.weight.item() == 2.0  # the weights of epoch 2 are what gets published


def test_best_model_checkpoint_max_mode_for_metrics_and_resume() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    best = BestModelCheckpoint(monitor='mrr')
    assert best.mode == 'max'
    run_epochs([best], ctx_for(model), [0.2, 0.3, 0.25], monitor='mrr')
    assert best.best_epoch == 2 and model.weight.item() == 2.0
    again = BestModelCheckpoint(monitor='mrr')
    again.load_state_dict(best.state_dict())
    assert again.best_epoch == 2 and torch.equal(again.best_weights['weight'], torch.tensor([[2.0]]))


def test_early_stopping_patience_min_delta_and_baseline() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    stop = EarlyStopping(monitor='val_loss', patience=1, min_delta=0.05)
    state, control = run_epochs([stop], ctx_for(model), [1.0, 0.7, 0.68, 0.69, 0.1, 0.05])
    # 0.68 and 0.69 are not better than 0.7 by 0.05: two epochs without improvement > patience 1.
    assert control.should_stop and state.epoch == 4 and stop.stopped_epoch == 4
    high = EarlyStopping(monitor='ndcg_at_k', patience=0, baseline=0.5)
    state, control = run_epochs([high], ctx_for(model), [0.4, 0.9], monitor='ndcg_at_k')
    assert control.should_stop and state.epoch == 1  # never beat the baseline
    keep = EarlyStopping(monitor='val_loss', patience=0)
    state, control = run_epochs([keep], ctx_for(model), [0.5, 0.4, 0.3])
    assert not control.should_stop and state.epoch == 3


def test_early_stopping_state_survives_a_restart() -> None:
    stop = EarlyStopping(patience=3)
    stop.best, stop.wait = 0.25, 2
    again = EarlyStopping(patience=3)
    again.load_state_dict(stop.state_dict())
    assert (again.best, again.wait) == (0.25, 2)


def test_val_loss_falls_back_to_train_loss(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    best = BestModelCheckpoint()
    state, control = TrainState(), Control()
    for epoch, loss in enumerate([0.5, 0.3, 0.4], start=1):
        state.epoch, state.train_loss = epoch, loss
        best.on_epoch_end(ctx_for(model), state, control)
    assert best.best_epoch == 2
    assert 'no val_loss' in caplog.text


def test_wiseft_mixes_pretrained_and_fine_tuned() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    wise = WiSEFTCallback(alpha=0.25)
    state, control, ctx = TrainState(), Control(), ctx_for(model)
    wise.on_train_begin(ctx, state, control)
    with torch.no_grad():
        model[0].weight.fill_(5.0)
        model[1].num_batches_tracked.fill_(7)
    wise.on_train_end(ctx, state, control)
    assert torch.allclose(model[0].weight, torch.full((2, 2), 0.75 * 1.0 + 0.25 * 5.0))
    assert model[1].num_batches_tracked.item() == 7  # integer buffers keep the fine-tuned value


def test_build_callbacks_by_name_and_option_errors() -> None:
    built = build_callbacks(
        [
            CallbackSpec(name='EvaluationCallback', options={'limit': 5, 'distance': 'euclidean'}),
            CallbackSpec(name='BestModelCheckpoint', options={'monitor': 'mrr'}),
            CallbackSpec(name='TrainingCheckpoint', options={'last_k_epochs': 3}),
        ]
    )
    assert [type(cb).__name__ for cb in built] == ['EvaluationCallback', 'BestModelCheckpoint', 'TrainingCheckpoint']
    assert checkpoint_retention(built) == 3 and checkpoint_retention([]) == 1
    with pytest.raises(
        ConfigError, match="EarlyStopping has no option 'patiense'; its options are monitor, mode, patience"
    ):
        build_callbacks([CallbackSpec(name='EarlyStopping', options={'patiense': 3})])
    with pytest.raises(ConfigError, match=r"callbacks\[1\]\.options\.distance: EvaluationCallback option 'distance'"):
        build_callbacks(
            [
                CallbackSpec(name='TrainingCheckpoint'),
                CallbackSpec(name='EvaluationCallback', options={'distance': 'dot'}),
            ]
        )
    with pytest.raises(ConfigError, match="WiSEFTCallback option 'alpha'"):
        build_callbacks([CallbackSpec(name='WiSEFTCallback', options={'alpha': 2})])


@pytest.mark.parametrize(('name', 'package'), [('MLFlowLogger', 'mlflow'), ('WandBLogger', 'wandb')])
def test_missing_logger_library_is_a_config_error(name: str, package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # importing it raises ImportError, installed or not
    with pytest.raises(ConfigError, match=f'{name} needs the {package} package, which is not installed'):
        build_callbacks([CallbackSpec(name=name)])


def test_tensorboard_logger_writes_events_and_uploads(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = LocalStore(tmp_path / 'run')
    logger = TensorBoardLogger(log_dir=str(tmp_path / 'tb'))
    ctx = ctx_for(torch.nn.Linear(1, 1), store)
    state, control = TrainState(epochs=1, epoch=1), Control()
    logger.on_train_begin(ctx, state, control)
    for step, loss in enumerate([0.9, 0.7], start=1):
        state.step = step
        logger.on_batch_end(ctx, state, control, loss)
    state.train_loss, state.metrics = 0.8, {'mrr': 0.5}
    logger.on_epoch_end(ctx, state, control)
    logger.on_train_end(ctx, state, control)
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert [e.value for e in events.Scalars('train/loss')] == pytest.approx([0.9, 0.7])
    assert events.Scalars('eval/mrr')[0].value == pytest.approx(0.5)
    assert any(key.startswith('logs/tensorboard/events.out.tfevents') for key in store.list('logs/tensorboard'))


def test_evaluation_callback_needs_query_data_or_eval_data() -> None:
    callback = EvaluationCallback()
    ctx = ctx_for(torch.nn.Linear(1, 1))
    ctx.eval_records = None
    with pytest.raises(ConfigError, match='no query_data and the run has no evalData or valSplit'):
        callback.setup(ctx)


def test_training_checkpoint_option() -> None:
    assert TrainingCheckpoint(last_k_epochs=4).last_k_epochs == 4


def test_training_curves_plot(tmp_path: Path) -> None:
    history = [
        {'epoch': 0, 'mrr': 0.2, 'ndcg_at_k': 0.3},
        {'epoch': 1, 'train_loss': 0.9, 'val_loss': 1.0, 'mrr': 0.4, 'ndcg_at_k': 0.5},
        {'epoch': 2, 'train_loss': 0.5, 'val_loss': 0.8, 'mrr': 0.6, 'ndcg_at_k': 0.7},
    ]
    path = plot_training_curves(history, tmp_path / 'curves.png', title='run')
    assert path is not None and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (1200, 400)  # two panels: losses and metrics
    assert plot_training_curves([], tmp_path / 'none.png') is None
