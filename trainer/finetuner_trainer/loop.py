"""The one training loop.

Everything a run needs is in :class:`~finetuner_trainer.context.TrainContext`; :func:`run_training`
trains it, calling the callbacks' hooks (``finetuner_trainer.hooks``) and honouring
``Control.should_stop``. The
functions ``_before_training``, ``_after_epoch``, ``_evaluate`` and ``_publish`` are the seams
where checkpoint/resume, retrieval evaluation and export plug in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from finetuner.api.layout import EXAMPLES, METRICS
from finetuner.api.v1alpha1 import SchedulerStep
from finetuner_trainer.callbacks import changes_weights_at_end
from finetuner_trainer.checkpointing import resume_from_latest, resume_rng, save_loop_checkpoint
from finetuner_trainer.context import TrainContext
from finetuner_trainer.distributed import agree, setup_loop
from finetuner_trainer.evalcache import load_before, store_before
from finetuner_trainer.evaluation import EmbeddingMemo, EmbedFn
from finetuner_trainer.hooks import TrainState
from finetuner_trainer.losses import call_objective, forward_objective, score_tensor
from finetuner_trainer.models import to_device
from finetuner_trainer.progress import phase

__all__ = ['TrainContext', 'compute_loss', 'forward_loss', 'run_metrics', 'run_training', 'validation_loss']


def forward_loss(model: nn.Module, loss: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Forward the batch through ``model`` and the objective ``loss`` (in mini-batches when the loss has a
    ``mini_batch_size``: see :func:`finetuner_trainer.losses.forward_objective`)."""
    return forward_objective(model, loss, batch)


def compute_loss(ctx: TrainContext, batch: dict[str, Any]) -> Tensor:
    """Forward the batch through the run's model (or its DDP wrapper) and objective."""
    return forward_loss(ctx.runner, ctx.loss, batch)


def _call(ctx: TrainContext, hook: str, *args: Any) -> None:
    for callback in ctx.callbacks:
        getattr(callback, hook)(ctx, ctx.state, ctx.control, *args)


def _train_step(ctx: TrainContext, batch: dict[str, Any]) -> float:
    batch = to_device(batch, ctx.device, non_blocking=True)

    def closure() -> Tensor:  # LBFGS calls it several times; the others once
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.loss_optimizer is not None:
            ctx.loss_optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            value = compute_loss(ctx, batch)
        value.backward()
        return value

    value = ctx.optimizer.step(closure)
    if ctx.loss_optimizer is not None:
        ctx.loss_optimizer.step()
    if ctx.scheduler is not None and ctx.spec.scheduler_options.scheduler_step == SchedulerStep.BATCH:
        ctx.scheduler.step()
    loss = float(value.detach())
    if not math.isfinite(loss):
        raise FloatingPointError(
            f'the training loss became {loss} at step {ctx.state.step + 1}; lower learningRate or change lossOptions'
        )
    return loss


def evaluation_batch_size(ctx: TrainContext) -> int:
    """Items per forward pass when embedding for evaluation (no activations are kept for a backward)."""
    return max(1, min(ctx.batch_size, 256))


@torch.inference_mode()
def validation_loss(ctx: TrainContext, embed: EmbedFn | None = None) -> float | None:
    """Mean loss over the evaluation batches (None without evaluation data, or when the loss cannot score
    it), computed on embeddings of the evaluation items made once each (``embed``: an
    :class:`~finetuner_trainer.evaluation.EmbeddingMemo` the retrieval evaluation then reuses) in eval
    mode, length-planned batches and inference mode: the same numbers as forwarding every batch
    through the model, for one encoding of the data."""
    if ctx.eval_loader is None or ctx.eval_records is None:
        return None
    embed = embed or ctx.model.embed
    examples = ctx.eval_records.examples
    size = evaluation_batch_size(ctx)
    groups = [embed([e.items[g] for e in examples], size) for g in range(len(examples[0].items))] if examples else []
    labels = torch.tensor([e.label if e.label is not None else -1 for e in examples], dtype=torch.long)
    scores = score_tensor(examples, ctx.eval_records.shape) if examples else None
    losses = []
    for positions in ctx.eval_loader.batch_sampler:
        rows = torch.as_tensor(list(positions), dtype=torch.long)
        parts = [to_device(group[rows], ctx.device) for group in groups]
        batch = {'labels': to_device(labels[rows], ctx.device)}
        if scores is not None:
            batch['scores'] = to_device(scores[rows], ctx.device)
        value = call_objective(ctx.loss, parts, batch)
        losses.append(float(value))
    return sum(losses) / len(losses) if losses else None


def _batches(ctx: TrainContext, epoch: int) -> Iterator[dict[str, Any]]:
    sampler = ctx.train_loader.batch_sampler
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    yield from ctx.train_loader


# --- seams ------------------------------------------------------------------------------------


def _before_training(ctx: TrainContext) -> None:
    """Before the first epoch: resume from the latest checkpoint (sets state.epoch/step), go
    distributed under torchrun, and measure the metrics before fine-tuning (first attempt only; taken
    from the evaluation cache when an earlier run measured the same base model on the same data)."""
    resumed = resume_from_latest(ctx)
    setup_loop(ctx)
    if resumed is None:
        key, cached = load_before(ctx)
        if cached is not None:
            ctx.metrics.before = dict(cached['before'])
            ctx.metrics.examples_before = list(cached.get('examples_before') or [])
            ctx.metrics.examples = list(ctx.metrics.examples_before)
            ctx.logger.info('metrics before fine-tuning: from the evaluation cache (run %s)', cached.get('run'))
        else:
            ctx.metrics.before = _evaluate(ctx)
            ctx.metrics.examples_before = list(ctx.metrics.examples)
            if key is not None:
                store_before(ctx, key)
        write_examples(ctx)


def _evaluate(ctx: TrainContext) -> dict[str, float]:
    """Metrics after an epoch: validation loss here; retrieval metrics plug in beside it."""
    with phase('evaluation'):
        return _measure(ctx)


def _measure(ctx: TrainContext) -> dict[str, float]:
    embed = EmbeddingMemo(ctx.model.embed)  # the current weights: each evaluation item is encoded once
    metrics: dict[str, float] = {}
    val_loss = validation_loss(ctx, embed)
    if val_loss is not None:
        metrics['val_loss'] = val_loss
    metrics.update(ctx.evaluation(ctx, embed))
    return metrics


def _after_step(ctx: TrainContext, batch_in_epoch: int) -> None:
    """After an optimizer step: a step checkpoint every spec.checkpointEverySteps steps."""
    every = ctx.spec.checkpoint_every_steps
    if every and ctx.state.step % every == 0 and batch_in_epoch < len(ctx.train_loader):
        save_loop_checkpoint(ctx, batch_in_epoch=batch_in_epoch)


def _after_epoch(ctx: TrainContext) -> None:
    """After an epoch's bookkeeping: live metrics.json, one stop decision for all ranks, and a checkpoint
    (after the last epoch only when the policy asks for one: checkpointing.CheckpointPolicy)."""
    ctx.reporter.report(ctx.state, ctx.state.train_loss, force=True)
    if ctx.is_main:
        ctx.store.write_json(METRICS, run_metrics(ctx, dict(ctx.state.metrics)))
    write_examples(ctx)
    ctx.control.should_stop = agree(ctx.control.should_stop)
    last = ctx.control.should_stop or ctx.state.epoch >= ctx.spec.epochs
    if not last or ctx.checkpointer.policy.after_last_epoch:
        save_loop_checkpoint(ctx)


def _publish(ctx: TrainContext) -> None:
    """After training, before the artifact is written: when a callback replaced the weights (best
    epoch, WiSE-FT), measure the final metrics again on what is published. ONNX export and the
    training-curves plot go into the artifact folder in runner.publish_artifact."""
    if changes_weights_at_end(ctx.callbacks):
        ctx.metrics.after = _evaluate(ctx)


def run_metrics(ctx: TrainContext, after: dict[str, float]) -> dict[str, Any]:
    """metrics.json: before and after fine-tuning, one entry per epoch (and per interval of an
    EvaluationCallback's steps_per_interval, and the int8 ONNX model's, once measured)."""
    report: dict[str, Any] = {'before': ctx.metrics.before, 'after': after, 'epochs': ctx.state.history}
    intervals = [entry for cb in ctx.callbacks for entry in getattr(cb, 'intervals', [])]
    if intervals:
        report['intervals'] = sorted(intervals, key=lambda entry: entry['step'])
    if ctx.metrics.quantized is not None:
        report['quantized'] = ctx.metrics.quantized
    return report


def write_examples(ctx: TrainContext) -> None:
    """examples.json (rank 0, when an evaluation gathers examples): the top matches of a few queries
    before fine-tuning and with the latest weights (after training: the published ones). Kept out of
    metrics.json, which the operator reads on every progress poll, because examples carry pictures."""
    before, after = ctx.metrics.examples_before, ctx.metrics.examples
    if ctx.is_main and (before or after):
        ctx.store.write_json(EXAMPLES, {'before': before, 'after': after if ctx.state.epoch else []})


# --- the loop ---------------------------------------------------------------------------------


def _train_epoch(ctx: TrainContext, epoch: int) -> None:
    """One epoch of optimizer steps (the batches a resumed step checkpoint already trained skipped);
    sets ``state.train_loss`` to their mean loss."""
    state = ctx.state
    total, count = 0.0, 0
    skip, ctx.resume.skip_batches = ctx.resume.skip_batches, 0  # resumed from a step checkpoint inside this epoch
    for position, batch in enumerate(_batches(ctx, epoch), start=1):
        if position <= skip:
            continue
        if skip and position == skip + 1:
            resume_rng(ctx)
        loss = _train_step(ctx, batch)
        state.step += 1
        total, count = total + loss, count + 1
        ctx.reporter.report(state, total / count)
        _call(ctx, 'on_batch_end', loss)
        _after_step(ctx, position)
        if ctx.control.should_stop:
            break
    state.train_loss = total / count if count else None


def _end_epoch(ctx: TrainContext, epoch: int) -> None:
    """After an epoch's steps: the epoch-wise scheduler, evaluation, history, the callbacks' hooks."""
    state = ctx.state
    if ctx.scheduler is not None and ctx.spec.scheduler_options.scheduler_step == SchedulerStep.EPOCH:
        ctx.scheduler.step()
    metrics = _evaluate(ctx)
    state.val_loss = metrics.get('val_loss')
    state.metrics = {**state.metrics, **metrics}
    _call(ctx, 'on_evaluate', metrics)
    state.history.append({'epoch': epoch, 'train_loss': state.train_loss, **state.metrics})
    ctx.logger.info(
        'epoch %d/%d done: train_loss %.4f%s',
        epoch,
        ctx.spec.epochs,
        state.train_loss if state.train_loss is not None else float('nan'),
        ''.join(f' {k} {v:.4f}' for k, v in metrics.items()),
    )
    _call(ctx, 'on_epoch_end')
    _after_epoch(ctx)


def run_training(ctx: TrainContext) -> TrainState:
    state = ctx.state
    state.epochs = ctx.spec.epochs
    state.total_steps = ctx.spec.epochs * len(ctx.train_loader)
    state.is_world_process_zero = ctx.is_main
    with phase('training'):
        _before_training(ctx)
        ctx.reporter.begin(state)
        ctx.runner.train()
        _call(ctx, 'on_train_begin')
        for epoch in range(state.epoch + 1, ctx.spec.epochs + 1):
            state.epoch = epoch
            _call(ctx, 'on_epoch_begin')
            _train_epoch(ctx, epoch)
            _end_epoch(ctx, epoch)
            if ctx.control.should_stop:
                ctx.logger.info('stopping early after epoch %d (a callback asked to stop)', epoch)
                break
        _call(ctx, 'on_train_end')
        _publish(ctx)
    return state
