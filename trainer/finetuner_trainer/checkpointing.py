"""Checkpoints in the run's object store, so that a retried pod resumes where the last one stopped.

Layout under the run's output prefix::

    checkpoints/epoch-0003/state.pt     model, optimizer, scheduler, loss, sampler, every rank's RNG, callbacks, history
    checkpoints/step-00000120/state.pt  the same, taken every ``checkpoint_every_steps`` steps
    checkpoints/latest.json             {"path": "checkpoints/epoch-0003", "epoch": 3, "step": 120, ...}

``latest.json`` is written only after the state it names is completely stored, so a reader never
sees a half-written checkpoint: a trainer killed while uploading leaves the previous ``latest.json``
in place. Old checkpoints are pruned after the new ``latest.json`` is written.

The state is loaded with ``torch.load(weights_only=True)``: only tensors and plain containers, no
pickled code (RNG states are converted to tensors for that reason).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from finetuner.api.layout import CHECKPOINT_LATEST, CHECKPOINTS
from finetuner.storage import LocalStore, S3Store, StorageError
from finetuner_trainer.distributed import env_info, gather_to_main, unwrap
from finetuner_trainer.hooks import Callback, TrainState
from finetuner_trainer.rng import capture_rng, rank_seed, restore_rng, seeded_rng_state

if TYPE_CHECKING:
    from finetuner_trainer.context import TrainContext

log = logging.getLogger(__name__)

STATE_FILE = 'state.pt'
FORMAT_VERSION = 1


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run (different model or config)."""


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``epoch`` counts finished epochs; ``batch_in_epoch`` > 0 means it was
    taken in the middle of epoch ``epoch + 1`` after that many batches."""

    path: str
    epoch: int
    step: int
    batch_in_epoch: int = 0
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rng_per_rank: list[dict[str, Any]] = field(default_factory=list)

    def rng_for(self, rank: int, world_size: int) -> dict[str, Any] | None:
        """The RNG state rank ``rank`` of a world of ``world_size`` saved, or None when the checkpoint
        was written by a different number of processes (then no saved stream continues this rank's)."""
        if len(self.rng_per_rank) == world_size:
            return self.rng_per_rank[rank]
        if world_size == 1 and not self.rng_per_rank:  # written before per-rank states were saved
            return self.rng
        return None

    def restore(
        self, components: dict[str, Stateful | None], callbacks: list[Callback] | None = None, rng: bool = True
    ) -> None:
        """Load every saved component into the live objects of the same name, then the RNGs.

        A live component without saved state (or the other way round) is a configuration change
        between attempts and is refused: continuing would silently train something else."""
        live = {name: obj for name, obj in components.items() if obj is not None}
        missing = sorted(set(live) - set(self.components))
        if missing:
            raise CheckpointError(
                f'{self.path} has no state for {", ".join(missing)}; the run configuration changed since it '
                f'was written. Delete {CHECKPOINTS}/ in the output location to start over.'
            )
        for name, obj in live.items():
            target = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
            try:
                target.load_state_dict(self.components[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f'cannot restore {name} from {self.path}: {e}. The model or optimizer differs from the one '
                    f'that wrote the checkpoint; delete {CHECKPOINTS}/ in the output location to start over.'
                ) from e
        for position, callback in enumerate(callbacks or []):
            saved = self.callbacks.get(callback_key(callback, position))
            if saved is not None:
                callback.load_state_dict(saved)
        if rng and self.rng is not None:
            restore_rng(self.rng)


def callback_key(callback: Callback, position: int) -> str:
    return f'{position}:{type(callback).__name__}'


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as Python numbers and lists (weights_only loading refuses NumPy types)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def checkpoint_name(epoch: int, step: int, batch_in_epoch: int) -> str:
    if batch_in_epoch:
        return f'{CHECKPOINTS}/step-{step:08d}'
    return f'{CHECKPOINTS}/epoch-{epoch:04d}'


class Checkpointer:
    """Writes checkpoints to a store, keeps the newest ``keep_last`` epoch checkpoints (and only the
    newest step checkpoint), and finds the latest complete one."""

    def __init__(self, store: LocalStore | S3Store, keep_last: int = 1):
        if keep_last < 1:
            raise ValueError(f'keep_last must be at least 1, got {keep_last}')
        self.store = store
        self.keep_last = keep_last

    def save(
        self,
        *,
        epoch: int,
        step: int,
        components: dict[str, Stateful | None],
        batch_in_epoch: int = 0,
        callbacks: list[Callback] | None = None,
        history: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        rng_per_rank: list[dict[str, Any]] | None = None,
    ) -> str:
        """Store a checkpoint and point ``latest.json`` at it. Returns its path (e.g. checkpoints/epoch-0003).

        ``rng_per_rank``: every rank's :func:`capture_rng` in rank order (distributed runs); this
        process's alone when not given."""
        path = checkpoint_name(epoch, step, batch_in_epoch)
        rng = capture_rng()
        payload = {
            'format': FORMAT_VERSION,
            'epoch': epoch,
            'step': step,
            'batch_in_epoch': batch_in_epoch,
            'components': {
                name: (unwrap(obj) if isinstance(obj, torch.nn.Module) else obj).state_dict()
                for name, obj in components.items()
                if obj is not None
            },
            'callbacks': {callback_key(cb, i): cb.state_dict() for i, cb in enumerate(callbacks or [])},
            'history': _plain(list(history or [])),
            'rng': rng,
            'rng_per_rank': list(rng_per_rank) if rng_per_rank else [rng],
            'extra': _plain(dict(extra or {})),
        }
        # A temporary file and upload_file: S3 uploads large states in parts, a folder renames atomically.
        with tempfile.TemporaryDirectory(prefix='finetuner-ckpt-') as tmp:
            local = Path(tmp) / STATE_FILE
            torch.save(payload, local)
            self.store.upload_file(local, f'{path}/{STATE_FILE}')
            size = os.path.getsize(local)
        self.store.write_json(
            CHECKPOINT_LATEST,
            {'path': path, 'epoch': epoch, 'step': step, 'batchInEpoch': batch_in_epoch, 'bytes': size},
        )
        self._prune(keep=path)
        log.info('checkpoint %s saved (epoch %d, step %d, %.1f MB)', path, epoch, step, size / 1e6)
        return path

    def latest_pointer(self) -> dict[str, Any] | None:
        try:
            pointer = self.store.read_json(CHECKPOINT_LATEST)
        except StorageError:
            return None
        return pointer if isinstance(pointer, dict) and 'path' in pointer else None

    def load_latest(self, map_location: str | torch.device = 'cpu') -> Checkpoint | None:
        """The checkpoint ``latest.json`` names, or None when this run has none yet."""
        pointer = self.latest_pointer()
        if pointer is None:
            return None
        path = pointer['path']
        try:
            data = self.store.read_bytes(f'{path}/{STATE_FILE}')
        except StorageError as e:
            raise CheckpointError(
                f'{CHECKPOINT_LATEST} names {path} but its {STATE_FILE} is missing: the checkpoint store was '
                f'changed by hand. Delete {CHECKPOINTS}/ in the output location to start over.'
            ) from e
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        if payload.get('format') != FORMAT_VERSION:
            raise CheckpointError(f'{path} has checkpoint format {payload.get("format")}, expected {FORMAT_VERSION}')
        return Checkpoint(
            path=path,
            epoch=int(payload['epoch']),
            step=int(payload['step']),
            batch_in_epoch=int(payload['batch_in_epoch']),
            components=payload['components'],
            callbacks=payload['callbacks'],
            history=payload['history'],
            rng=payload['rng'],
            extra=payload['extra'],
            rng_per_rank=list(payload.get('rng_per_rank') or []),
        )

    def saved(self) -> list[str]:
        """Checkpoint folders present in the store: epoch checkpoints oldest first, then step checkpoints."""
        names = {key.split('/')[1] for key in self.store.list(CHECKPOINTS) if key.count('/') >= 2}
        return [f'{CHECKPOINTS}/{name}' for name in sorted(names, key=_order)]

    def _prune(self, keep: str) -> None:
        saved = self.saved()
        epochs = [p for p in saved if p.split('/')[-1].startswith('epoch-')]
        steps = [p for p in saved if p.split('/')[-1].startswith('step-')]
        stale = epochs[: max(len(epochs) - self.keep_last, 0)] + [p for p in steps if p != keep]
        for path in stale:
            if path != keep:
                self.store.delete(path)


def _order(name: str) -> tuple[int, int]:
    kind, _, number = name.partition('-')
    return (0 if kind == 'epoch' else 1, int(number))


# ---------------------------------------------------------------------------------------------
# The training loop's use of checkpoints
# ---------------------------------------------------------------------------------------------


def loop_components(ctx: TrainContext) -> dict[str, Stateful | None]:
    """What a checkpoint of the loop holds: model, optimizers, scheduler and the objective's own
    parameters (ArcFace weights, CLIP temperature). A distributed wrapper is looked through."""
    objective = getattr(ctx.loss, 'objective', ctx.loss)
    return {
        'model': ctx.model,
        'optimizer': ctx.optimizer,
        'scheduler': ctx.scheduler,
        'loss': objective if any(True for _ in objective.state_dict()) else None,
        'loss_optimizer': ctx.loss_optimizer,
    }


def resume_from_latest(ctx: TrainContext) -> Checkpoint | None:
    """Load the run's latest checkpoint into the loop (model, optimizers, callbacks, state, RNGs).

    Every rank (torchrun sets RANK and WORLD_SIZE; the process group is joined later) continues
    its own random stream from the checkpoint. When the number of processes changed since it was
    written, each rank starts a fresh stream seeded from (seed, rank, step) instead.

    Sets ``state.epoch``/``state.step``/``state.history``/``state.resumed_from``, ``ctx.resume``
    (batches of the current epoch already trained, for a step checkpoint, and the RNG state to
    restore after them) and ``ctx.metrics.before`` / ``ctx.metrics.examples_before`` (the metrics and examples before
    fine-tuning of the first attempt)."""
    checkpoint = ctx.checkpointer.load_latest(map_location='cpu')
    if checkpoint is None:
        return None
    checkpoint.restore(loop_components(ctx), ctx.callbacks, rng=False)
    rng_state = _rank_rng(ctx, checkpoint)
    # Inside an epoch, the data loader draws a seed from torch's RNG when the epoch starts: the RNGs
    # are restored only after the already-trained batches are skipped (resume_rng), so the
    # resumed attempt draws exactly what the first one drew.
    if checkpoint.batch_in_epoch > 0:
        ctx.resume.rng = rng_state
    else:
        restore_rng(rng_state)
    _restore_state(ctx.state, checkpoint)
    ctx.resume.skip_batches = checkpoint.batch_in_epoch
    ctx.metrics.before = dict(checkpoint.extra.get('before') or {})
    ctx.metrics.examples_before = list(checkpoint.extra.get('examples_before') or [])
    ctx.logger.info(
        'resumed from %s (epoch %d, step %d%s)',
        checkpoint.path,
        checkpoint.epoch,
        checkpoint.step,
        f', {checkpoint.batch_in_epoch} batches into epoch {checkpoint.epoch + 1}' if checkpoint.batch_in_epoch else '',
    )
    return checkpoint


def _rank_rng(ctx: TrainContext, checkpoint: Checkpoint) -> dict[str, Any]:
    """The random state this rank continues from: its saved one, or a fresh stream when the number of
    processes changed."""
    info = env_info()
    rng_state = checkpoint.rng_for(info.rank, info.world_size)
    if rng_state is not None:
        return rng_state
    ctx.logger.info(
        'checkpoint %s holds the random state of %d processes, this run has %d: rank %d draws a fresh stream',
        checkpoint.path,
        len(checkpoint.rng_per_rank),
        info.world_size,
        info.rank,
    )
    return seeded_rng_state(rank_seed(ctx.spec.seed + checkpoint.step, info.rank))


def _restore_state(state: TrainState, checkpoint: Checkpoint) -> None:
    state.epoch = checkpoint.epoch
    state.step = checkpoint.step
    state.history = list(checkpoint.history)
    state.resumed_from = checkpoint.path
    if state.history:
        last = state.history[-1]
        state.train_loss = last.get('train_loss')
        state.val_loss = last.get('val_loss')
        state.metrics = {k: v for k, v in last.items() if k not in ('epoch', 'train_loss')}


def save_loop_checkpoint(ctx: TrainContext, batch_in_epoch: int = 0) -> str | None:
    """Checkpoint the loop (rank 0 writes; the others return None). ``batch_in_epoch`` > 0 for a
    checkpoint taken inside epoch ``state.epoch``, which then counts as not yet finished.

    Every rank must call it (at the same step): the ranks' RNG states are gathered on rank 0."""
    rng_per_rank = gather_to_main(capture_rng())
    if not ctx.is_main:
        return None
    state = ctx.state
    finished_epochs = state.epoch - 1 if batch_in_epoch else state.epoch
    return ctx.checkpointer.save(
        epoch=finished_epochs,
        step=state.step,
        batch_in_epoch=batch_in_epoch,
        components=loop_components(ctx),
        callbacks=ctx.callbacks,
        history=state.history,
        extra={'before': ctx.metrics.before, 'examples_before': ctx.metrics.examples_before},
        rng_per_rank=rng_per_rank,
    )


def resume_rng(ctx: TrainContext) -> None:
    """Restore the RNG state of a mid-epoch checkpoint once its trained batches are skipped."""
    state, ctx.resume.rng = ctx.resume.rng, None
    if state is not None:
        restore_rng(state)
