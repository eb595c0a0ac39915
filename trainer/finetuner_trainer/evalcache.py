"""The metrics before fine-tuning, cached per (base model, evaluation data, evaluation settings).

Every run measures its starting model on the evaluation data before it trains (``metrics.json``'s
``before``). The same base model on the same evaluation data with the same settings gives the same
numbers every time: the runs of a sweep, a rerun with other epochs or another learning rate. The first
run stores them, with the examples before fine-tuning, as ``cache/evaluations/<key>.json`` under the
run's data location (``TrainerConfig.dataUri``: the local backend's home folder, the cluster's
``FINETUNER_DATA`` prefix); a later run finds them there and does not encode the evaluation data before
training. A run without a data location caches nothing; ``FINETUNER_EVALUATION_CACHE=off`` turns the
cache off.

The key is a SHA-256 of everything the numbers depend on:

- the starting weights of the model and of the loss (ArcFace's class weights): per tensor its name,
  shape, dtype, sum and sum of squares, computed where the tensor lives (one transfer);
- the evaluation items (text, image bytes, tensors) with their labels, class names and scores;
- the loss, the miner and their options, batch size, sampler, items per class and seed (they make the
  validation batches), the evaluation callbacks' options and the device type;
- :data:`EVALUATION_FORMAT` (raised whenever the evaluation code changes its numbers) and the versions
  of torch, transformers and timm.

Evaluation callbacks that read their own ``query_data`` / ``index_data`` name their data instead of
holding it, so a run with one is not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetuner.storage import StorageError, open_store
from finetuner_trainer.callbacks import evaluation_callbacks
from finetuner_trainer.checkpointing import loop_components
from finetuner_trainer.distributed import broadcast, unwrap

if TYPE_CHECKING:
    from finetuner.storage import LocalStore, S3Store
    from finetuner_trainer.context import TrainContext

log = logging.getLogger(__name__)

EVALUATION_FORMAT = 1
CACHE_PREFIX = 'cache/evaluations'
SWITCH = 'FINETUNER_EVALUATION_CACHE'


def tensor_fingerprint(named: dict[str, torch.Tensor]) -> list[Any]:
    """Per tensor: name, shape, dtype, sum and sum of squares (float64), computed on the tensors' device
    and brought back in one transfer."""
    names = sorted(named)
    if not names:
        return []
    sums = []
    for name in names:
        tensor = named[name].detach()
        values = tensor.double() if (tensor.is_floating_point() or tensor.is_complex()) else tensor.long().double()
        sums.append(torch.stack([values.sum(), values.square().sum()]))
    moments = torch.stack(sums).cpu().tolist()
    return [
        [name, list(named[name].shape), str(named[name].dtype), *[float(m).hex() for m in moments[i]]]
        for i, name in enumerate(names)
    ]


def _hash_item(digest: Any, item: Any) -> None:
    for field_name in ('text', 'image', 'tensor'):
        value = getattr(item, field_name, None)
        if value is None:
            continue
        digest.update(field_name.encode())
        if isinstance(value, str):
            digest.update(value.encode('utf-8'))
        elif isinstance(value, bytes):
            digest.update(value)
        else:
            array = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
            digest.update(f'{array.dtype}{array.shape}'.encode())
            digest.update(array.tobytes())
        digest.update(b'\0')


def data_fingerprint(ctx: TrainContext) -> str:
    """SHA-256 of the evaluation examples: items, labels (index and class name) and scores."""
    digest = hashlib.sha256()
    dataset = ctx.eval_records
    if dataset is None:
        return ''
    digest.update(json.dumps([dataset.shape.value, list(dataset.classes)]).encode())
    for example in dataset.examples:
        digest.update(json.dumps([example.label, example.score, len(example.items)]).encode())
        for item in example.items:
            _hash_item(digest, item)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    found = {}
    for package in ('torch', 'transformers', 'timm', 'pytorch-metric-learning'):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def cache_key(ctx: TrainContext) -> str | None:
    """The key of this run's metrics before fine-tuning, or None when they cannot be cached."""
    callbacks = evaluation_callbacks(ctx.callbacks)
    if any(cb.options.query_data is not None for cb in callbacks):
        return None
    spec = ctx.spec
    components = loop_components(ctx)
    weights = {f'model.{k}': v for k, v in unwrap(ctx.model).state_dict().items()}
    objective = components.get('loss')
    if objective is not None:
        weights |= {f'loss.{k}': v for k, v in objective.state_dict().items()}
    what = {
        'format': EVALUATION_FORMAT,
        'versions': _versions(),
        'weights': tensor_fingerprint(weights),
        'data': data_fingerprint(ctx),
        'settings': spec.model_dump(
            mode='json',
            include={'loss', 'loss_options', 'miner', 'miner_options', 'sampler', 'num_items_per_class', 'seed'},
        ),
        'batch_size': ctx.batch_size,
        'evaluations': [cb.options.model_dump(mode='json') for cb in callbacks],
        'device': ctx.device.type,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def cache_store(ctx: TrainContext) -> LocalStore | S3Store | None:
    if ctx.config.data_uri is None or os.environ.get(SWITCH, '').lower() in ('0', 'off', 'false', 'no'):
        return None
    try:
        return open_store(ctx.config.data_uri).child(CACHE_PREFIX)
    except StorageError:
        return None


def load_before(ctx: TrainContext) -> tuple[str | None, dict[str, Any] | None]:
    """(key, cached entry or None). Rank 0 reads and every rank gets its answer, so all ranks either
    take the cached metrics or evaluate together."""
    key = entry = None
    if ctx.is_main:
        store = cache_store(ctx)
        key = cache_key(ctx) if store is not None and ctx.eval_records is not None else None
        if store is not None and key is not None:
            try:
                found = store.read_json_or_none(f'{key}.json')
            except (StorageError, ValueError) as e:
                log.warning('evaluation cache not read: %s', e)
                found = None
            entry = found if isinstance(found, dict) and isinstance(found.get('before'), dict) else None
    return broadcast((key, entry))


def store_before(ctx: TrainContext, key: str) -> None:
    """Keep this run's metrics and examples before fine-tuning for the next run (rank 0, best effort)."""
    store = cache_store(ctx)
    if store is None or not ctx.is_main:
        return
    entry = {
        'before': ctx.metrics.before,
        'examples_before': ctx.metrics.examples_before,
        'model': ctx.spec.model,
        'run': ctx.config.run_name,
        'created_at': datetime.now(timezone.utc).isoformat(timespec='seconds'),
    }
    try:
        store.write_json(f'{key}.json', entry)
    except (StorageError, OSError, TypeError, ValueError) as e:  # a cache: the run goes on without it
        log.warning('evaluation cache not written: %s', e)
