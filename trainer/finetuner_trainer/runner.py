"""One trainer run end to end: configuration in, artifact and metrics out, the right exit code.

``main(argv)`` is the program (``python -m finetuner_trainer --config FILE``); ``train(config)``
does the work in-process. Order of a run: write config.json, read and check the data, build the
model and check that model, loss, miner and data fit together, train, then publish the artifact
(files first, ``artifact/manifest.json`` last) and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader

from finetuner.api import layout
from finetuner.api.mining import Task
from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, FinetuneRunSpec, Sampler, SchedulerStep, TrainerConfig
from finetuner.catalog import find_backbone
from finetuner.storage import LocalStore, S3Store, StorageError, open_store
from finetuner_trainer.callbacks import TrainingCheckpoint, build_callbacks, checkpoint_retention
from finetuner_trainer.checkpointing import Checkpointer, CheckpointPolicy
from finetuner_trainer.context import TrainContext
from finetuner_trainer.data import (
    LARGEST_CLASS,
    ONE_PASS,
    ClassBalancedBatches,
    Dataset,
    Example,
    Item,
    RandomBatches,
    Shape,
    content_keys,
    load_records,
    pairs_as_classes,
    split,
    text_lengths,
    to_dataset,
)
from finetuner_trainer.distributed import shutdown
from finetuner_trainer.embedder import Embedder, to_device
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.loop import forward_loss, run_metrics, run_training, write_examples
from finetuner_trainer.losses import build_objective, check_loss_fits, loss_entry, mini_batch_size, score_tensor
from finetuner_trainer.mining import check_minable, mine_dataset
from finetuner_trainer.model_card import CardFacts, base_model_of, data_name_of_reference, write_card
from finetuner_trainer.models import build_embedder, resolve_model
from finetuner_trainer.onnx_export import export_for_artifact
from finetuner_trainer.optim import LLRD_OPTION, build_optimizer, build_scheduler, layer_wise_groups
from finetuner_trainer.plots import PLOT_FILE, plot_training_curves
from finetuner_trainer.progress import CLOCK, ProgressReporter, phase, quiet_libraries, setup_logging
from finetuner_trainer.quantization import quantize_for_artifact
from finetuner_trainer.recipes import apply_recipe, default_learning_rate, warmup_steps
from finetuner_trainer.rng import reseed
from finetuner_trainer.synthesis import synthesize

EXIT_OK = 0
EXIT_INFRA_ERROR = 1
RunStore = LocalStore | S3Store


@dataclass
class TrainResult:
    artifact_uri: str
    metrics: dict[str, Any]
    output_dim: int
    epochs_done: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Data + model + loss: building and checking that they fit
# ---------------------------------------------------------------------------------------------


def load_data(config: TrainerConfig, log: logging.Logger) -> tuple[Dataset, Dataset | None]:
    """(train, eval or None) datasets; eval from evalData or valSplit."""
    spec = config.spec
    records, base = load_records(spec.train_data, config.data_uri, spec.csv_options, 'trainData')
    train = to_dataset(records, spec, 'trainData', base)
    log.info('training data: %d examples (%s) from %s', len(train), train.shape.value, spec.train_data)
    evaluation = None
    if spec.eval_data:
        eval_records, eval_base = load_records(spec.eval_data, config.data_uri, spec.csv_options, 'evalData')
        evaluation = to_dataset(eval_records, spec, 'evalData', eval_base, classes=train.classes)
        if evaluation.shape != train.shape:
            raise ConfigError(
                'evalData',
                f'holds {evaluation.shape.value} but trainData holds {train.shape.value}; give both the same shape',
            )
        log.info('evaluation data: %d examples from %s', len(evaluation), spec.eval_data)
    elif spec.val_split:
        train, evaluation = split(train, spec.val_split, spec.seed)
        log.info('valSplit %.2f: %d training, %d validation examples', spec.val_split, len(train), len(evaluation))
    return train, evaluation


def check_fit(spec: FinetuneRunSpec, model: Embedder, train: Dataset, original_shape: Shape) -> None:
    """ConfigError when model, loss, miner and data do not fit together."""
    check_loss_fits(spec.loss, original_shape, spec.miner)
    loss = loss_entry(spec.loss)
    wrong = sorted(train.kinds - set(model.kinds))
    if wrong:
        raise ConfigError(
            'model',
            f'{spec.model} ({model.family}) embeds {" and ".join(model.kinds)}, but the data holds {wrong[0]} content; '
            'pick a backbone for this data (see `finetuner models`)',
        )
    if loss.families and model.family not in loss.families:
        raise ConfigError(
            'model', f'{spec.loss} trains a {" or ".join(loss.families)} model; {spec.model} is a {model.family} model'
        )
    if train.shape == Shape.LABELLED:
        counts = Counter(example.label for example in train.examples)
        if len(counts) < 2:
            raise ConfigError(
                'trainData', f'all items have the same label {train.classes[0]!r}; {spec.loss} needs at least 2 classes'
            )
        if not loss.classifies and max(counts.values()) < 2:
            raise ConfigError(
                'trainData',
                f'every class has a single item, so {spec.loss} finds no positive pairs; give at least 2 items per '
                'class or use a classification loss such as ArcFaceLoss',
            )
    elif len(train) < 2:
        raise ConfigError('trainData', f'{spec.loss} needs at least 2 pairs (the other pairs are the negatives)')


def mined_shape(spec: FinetuneRunSpec, train: Dataset) -> Shape:
    """The shape the run trains on: tuples when hardNegatives mines negatives for the pairs of trainData."""
    if spec.hard_negatives is None:
        return train.shape
    check_minable(train)  # before the model loads
    return Shape.SCORED_TUPLES if spec.hard_negatives.output_scores else Shape.TUPLES


def check_tuples_in_one_process(spec: FinetuneRunSpec, train: Dataset, label_loss: bool) -> None:
    """A label loss takes each tuple's own triplets, whose positions hold within one process's batch only."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if label_loss and world > 1 and train.shape in (Shape.TUPLES, Shape.SCORED_TUPLES):
        raise ConfigError(
            'loss',
            f'{spec.loss} on tuples trains in one process; use MultipleNegativesRankingLoss for a run on '
            f'{world} processes, or resources.gpus 1 and nodes 1',
        )


def pick_device(spec: FinetuneRunSpec) -> torch.device:
    if spec.device == 'cuda' and not torch.cuda.is_available():
        raise ConfigError('device', 'device cuda was asked for but no GPU is visible; use auto or cpu')
    use_cuda = spec.device != 'cpu' and torch.cuda.is_available()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest power-of-two multiple of ``start`` up to ``limit`` for which ``fits(size)`` holds."""
    best = 0
    size = start
    while size <= limit and fits(size):
        best = size
        size *= 2
    if best == 0:
        raise ConfigError('batchSize', f'not even a batch of {start} fits in memory; set a smaller batchSize')
    return best


@dataclass
class BatchProbe:
    """What :func:`auto_batch_size` tries batches with: the model on its device, the objective, the data."""

    model: Embedder
    device: torch.device
    train: Dataset
    loss: torch.nn.Module
    collator: Collator


def probe_fits(probe: BatchProbe, size: int) -> bool:
    """Whether a training step (forward and backward, under bf16 autocast as training runs on a GPU) on a
    batch of ``size`` examples fits in the device's memory, probed with the longest examples while room
    for the optimizer's state is held. The gradients it made are dropped."""
    train = probe.train
    order = probe_order(train)
    examples = [train.examples[order[i % len(order)]] for i in range(size)]
    reserve: list[torch.Tensor] = []
    try:
        # What the first optimizer step will add: two state tensors per parameter (Adam's moments).
        reserve = [torch.empty_like(p) for p in probe.model.parameters() if p.requires_grad for _ in range(2)]
        batch = to_device(probe.collator(examples), probe.device)
        with torch.autocast(probe.device.type, dtype=torch.bfloat16):
            value = forward_loss(probe.model, probe.loss, batch)
        value.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del reserve
        probe.model.zero_grad(set_to_none=True)
        if probe.device.type == 'cuda':
            torch.cuda.empty_cache()


def auto_batch_size(probe: BatchProbe, log: logging.Logger) -> int:
    """batchSize empty: on CUDA the largest power of two that trains without running out of memory
    (as Finetuner 0.7.3 did); on CPU a sane default per family."""
    model, limit = probe.model, max(2, len(probe.train))
    if probe.device.type != 'cuda':
        size = min(model.cpu_batch_size, limit)
        log.info('batchSize not set: %d (the CPU default for %s models)', size, model.family)
        return size
    size = largest_fitting(lambda size: probe_fits(probe, size), 8, min(1024, limit))
    log.info('batchSize not set: %d (the largest power of two that fits on the GPU)', size)
    return size


def probe_order(train: Dataset) -> list[int]:
    """Examples in the order the batch-size probe takes them: most text first. A batch pads to its
    longest text, so a batch of the longest examples needs the most memory the epoch will ask for."""
    lengths = text_lengths(train)
    if lengths is None:
        return list(range(len(train)))
    return sorted(range(len(train)), key=lambda i: -lengths[i])


class Collator:
    """Examples -> a model-ready batch: {'groups': [inputs...], 'labels': ..., 'scores': ...}.

    ``mini_batch_size``: each group is a list of collated mini-batches of that many examples (each padded
    to its own longest text), which the loss embeds one at a time (GradCache or gradient accumulation)."""

    def __init__(self, model: Embedder, shape: Shape, plan_lengths: bool = False, mini_batch_size: int | None = None):
        self.model = model
        self.shape = shape
        self.plan_lengths = plan_lengths
        self.mini_batch_size = mini_batch_size

    def collate(self, items: list[Item]) -> dict[str, Any] | list[dict[str, Any]]:
        size = self.mini_batch_size
        if size is None:
            return self.model.collate(items, plan_lengths=self.plan_lengths)
        return [
            self.model.collate(items[start : start + size], plan_lengths=self.plan_lengths)
            for start in range(0, len(items), size)
        ]

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        if self.shape == Shape.LABELLED:
            return {
                'groups': [self.collate([e.items[0] for e in examples])],
                'labels': torch.tensor([e.label for e in examples], dtype=torch.long),
            }
        width = len(examples[0].items)
        batch: dict[str, Any] = {'groups': [self.collate([e.items[j] for e in examples]) for j in range(width)]}
        scores = score_tensor(examples, self.shape)
        if scores is not None:
            batch['scores'] = scores
        return batch


def _batch_sampler(
    dataset: Dataset, spec: FinetuneRunSpec, batch_size: int, train: bool
) -> ClassBalancedBatches | RandomBatches:
    """Class-balanced batches for labelled data (unless sampler: random), shuffled ones otherwise."""
    use_classes = dataset.shape == Shape.LABELLED and spec.sampler != Sampler.RANDOM
    lengths = text_lengths(dataset) if train and spec.group_by_length else None
    if use_classes:
        per_class = spec.num_items_per_class if train else max(1, min(spec.num_items_per_class, batch_size // 2))
        if dataset.from_pairs:  # a query and its document: a class of two
            per_class = 2
        check_class_batch(dataset, spec, batch_size, per_class)
        labels = [e.label for e in dataset.examples]
        epoch = LARGEST_CLASS if spec.sampler == Sampler.CLASS_OVERSAMPLE else ONE_PASS
        return ClassBalancedBatches(labels, batch_size, per_class, spec.seed, lengths=lengths, epoch=epoch)
    if batch_size < 2 and len(dataset) >= 2:
        unit = 'item' if dataset.shape == Shape.LABELLED else 'pair'
        raise ConfigError(
            'batchSize',
            f'a batch of 1 {unit} has nothing to compare it with: {spec.loss} needs at least 2 {unit}s in a batch '
            '(the others are its negatives); set batchSize to 2 or more',
        )
    keys = content_keys(dataset) if train else None
    world = int(os.environ.get('WORLD_SIZE', '1'))
    sampler = RandomBatches(len(dataset), batch_size, spec.seed, lengths=lengths, keys=keys, multiple=world)
    if keys is not None and len(dataset) >= 2 and not any(len(batch) >= 2 for batch in sampler):
        raise ConfigError(
            'trainData',
            'every pair shares its query or document with every other pair, so no batch can hold two '
            '(in-batch negatives need pairs with different contents); add pairs with other queries',
        )
    return sampler


def check_class_batch(dataset: Dataset, spec: FinetuneRunSpec, batch_size: int, per_class: int) -> None:
    """ConfigError when a class-balanced batch cannot hold two classes, in the words of the data's shape."""
    if batch_size >= 2 * per_class:
        return
    if dataset.from_pairs:
        raise ConfigError(
            'batchSize',
            f'a batch of {batch_size} holds {"no whole pair" if batch_size < 2 else "one pair"}: {spec.loss} sees '
            'each query and its document as a class of two and needs another pair in the batch as its negative; '
            'set batchSize to 4 or more (2 pairs)',
        )
    raise ConfigError(
        'batchSize',
        f'a batch of {batch_size} holds fewer than 2 classes of numItemsPerClass {per_class}; '
        'raise batchSize or lower numItemsPerClass',
    )


def make_loader(
    dataset: Dataset, collator: Collator, spec: FinetuneRunSpec, batch_size: int, device: torch.device, train: bool
) -> DataLoader[Any]:
    sampler = _batch_sampler(dataset, spec, batch_size, train)
    if not train:
        sampler.set_epoch(0)
    workers = min(4 if spec.num_workers is None else spec.num_workers, os.cpu_count() or 1)
    if spec.num_workers is None and device.type == 'cpu' and dataset.kinds <= {'text'}:
        workers = 0  # text on the CPU: worker processes would take cores from the training step
    if len(dataset) <= 4 * batch_size:  # a tiny set: worker start-up costs more than it saves
        workers = 0
    return DataLoader(
        dataset.examples,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=device.type == 'cuda',
        persistent_workers=workers > 0,
    )


@dataclass
class Optimization:
    """The optimizers and schedule of a run."""

    learning_rate: float
    optimizer: torch.optim.Optimizer
    loss_optimizer: torch.optim.Optimizer | None


def build_optimizers(
    spec: FinetuneRunSpec,
    model: Embedder,
    objective: torch.nn.Module,
    shape: Shape = Shape.LABELLED,
    kinds: Iterable[str] = ('text',),
) -> Optimization:
    """The optimizer of the model (and of the loss's parameters, unless lossOptimizer gives them their own).
    Without a learningRate: the backbone's default scaled by the recipe of the data's ``shape`` and ``kinds``."""
    backbone = find_backbone(spec.model)
    default = backbone.default_learning_rate if backbone else 1e-4
    lr = spec.learning_rate or default_learning_rate(shape, default, kinds)
    loss_params = [p for p in objective.parameters() if p.requires_grad]
    params: Any = [p for p in model.parameters() if p.requires_grad]
    loss_optimizer = None
    if spec.loss_optimizer is not None:
        if not loss_params:
            raise ConfigError('lossOptimizer', f'{spec.loss} has no parameters to optimize; remove lossOptimizer')
        loss_lr = spec.loss_optimizer_options.get('lr', lr)
        options = {k: v for k, v in spec.loss_optimizer_options.items() if k != 'lr'}
        loss_optimizer = build_optimizer(spec.loss_optimizer, loss_params, loss_lr, options, 'lossOptimizer')
    options = dict(spec.optimizer_options)
    if LLRD_OPTION in options:
        params = layer_wise_groups(list(model.named_parameters()), lr, options.pop(LLRD_OPTION))
        if loss_optimizer is None and loss_params:
            params.append({'params': loss_params, 'lr': lr})
    elif loss_optimizer is None and loss_params:
        params = [{'params': params}, {'params': loss_params}]
    optimizer = build_optimizer(spec.optimizer, params, lr, options)
    return Optimization(lr, optimizer, loss_optimizer)


def _prepare_model(spec: FinetuneRunSpec, train: Dataset, shape: Shape, log: logging.Logger) -> Embedder:
    model = build_embedder(spec)
    check_fit(spec, model, train, shape)
    log.info(
        'model %s (%s): %d-dim embeddings, %.1fM parameters (%.1fM trainable)',
        spec.model,
        model.family,
        model.output_dim,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    return model


def build_context(config: TrainerConfig, store: RunStore, log: logging.Logger) -> TrainContext:
    """Everything the loop needs, checked: data, model, loss, optimizers, schedule, loaders."""
    reseed(config.spec.seed)
    with phase('data'):
        train, evaluation = load_data(config, log)
    with phase('model'):
        return _build_context(config, store, log, train, evaluation)


def _build_context(
    config: TrainerConfig, store: RunStore, log: logging.Logger, train: Dataset, evaluation: Dataset | None
) -> TrainContext:
    shape = mined_shape(config.spec, train)
    spec, warmup_share = apply_recipe(config.spec, shape, log, train.kinds)  # the empty loss, miner, schedule filled
    assert spec.loss is not None
    check_loss_fits(spec.loss, shape, spec.miner)  # before the (slow) model load
    label_loss = loss_entry(spec.loss).objective == 'label'
    if train.shape == Shape.PAIRS and label_loss and spec.hard_negatives is None:
        # Finetuner semantics: a query and its document form a class of two.
        train = pairs_as_classes(train)
    if evaluation is not None and evaluation.shape == Shape.PAIRS and label_loss:
        evaluation = pairs_as_classes(evaluation)
    model = _prepare_model(spec, train, shape, log)
    device = pick_device(spec)
    model.to(device)
    if spec.hard_negatives is not None:  # mined with the pretrained model, before the first step
        train = mine_dataset(model, train, spec.hard_negatives, device, log)
    check_tuples_in_one_process(spec, train, label_loss)
    objective = build_objective(
        spec.loss, spec.loss_options, spec.miner, spec.miner_options, model.output_dim, len(train.classes), model
    ).to(device)
    optimization = build_optimizers(spec, model, objective, shape, train.kinds)
    collator = Collator(
        model, train.shape, plan_lengths=device.type == 'cpu', mini_batch_size=mini_batch_size(objective)
    )
    batch_size = spec.batch_size or auto_batch_size(BatchProbe(model, device, train, objective, collator), log)
    batch_size = min(batch_size, len(train)) if train.shape != Shape.LABELLED else batch_size
    train_loader = make_loader(train, collator, spec, batch_size, device, train=True)
    eval_loader = None
    if evaluation is not None and _can_score(spec, evaluation, len(train.classes)):
        eval_collator = (
            collator if evaluation.shape == train.shape else Collator(model, evaluation.shape, collator.plan_lengths)
        )
        eval_loader = make_loader(evaluation, eval_collator, spec, batch_size, device, train=False)
    per_epoch = spec.scheduler_options.scheduler_step == SchedulerStep.EPOCH
    steps = spec.epochs if per_epoch else spec.epochs * len(train_loader)
    if warmup_share and not per_epoch:
        warmup = warmup_steps(warmup_share, steps)
        spec = spec.model_copy(
            update={'scheduler_options': spec.scheduler_options.model_copy(update={'num_warmup_steps': warmup})}
        )
    lr = optimization.learning_rate
    scheduler = build_scheduler(spec.scheduler, optimization.optimizer, spec.scheduler_options, steps, lr)
    autocast = torch.bfloat16 if device.type == 'cuda' else None
    _log_plan(log, spec, lr, batch_size, len(train_loader), device)
    callbacks = build_callbacks(spec.callbacks)
    rank = int(os.environ.get('RANK', '0'))
    return TrainContext(
        config=config,
        spec=spec,
        model=model,
        optimizer=optimization.optimizer,
        scheduler=scheduler,
        loss=objective,
        loss_optimizer=optimization.loss_optimizer,
        device=device,
        store=store,
        train_records=train,
        eval_records=evaluation,
        logger=log,
        train_loader=train_loader,
        eval_loader=eval_loader,
        batch_size=batch_size,
        reporter=ProgressReporter(store, log, enabled=rank == 0),
        checkpointer=Checkpointer(
            store,
            keep_last=checkpoint_retention(callbacks),
            policy=CheckpointPolicy.for_output(store, asked_to_keep=keeps_checkpoints(callbacks)),
        ),
        callbacks=callbacks,
        rank=rank,
        world_size=int(os.environ.get('WORLD_SIZE', '1')),
        local_rank=int(os.environ.get('LOCAL_RANK', '0')),
        autocast_dtype=autocast,
    )


def keeps_checkpoints(callbacks: list[Any]) -> bool:
    """A TrainingCheckpoint callback asks for every epoch's checkpoint, kept (the cluster's policy)."""
    return any(isinstance(cb, TrainingCheckpoint) for cb in callbacks)


def _log_plan(
    log: logging.Logger, spec: FinetuneRunSpec, lr: float, batch_size: int, steps: int, device: torch.device
) -> None:
    log.info(
        'loss %s%s, optimizer %s (lr %g), batch size %d, %d steps per epoch, %d epochs, device %s%s',
        spec.loss,
        f' with {spec.miner}' if spec.miner else '',
        spec.optimizer,
        lr,
        batch_size,
        steps,
        spec.epochs,
        device,
        ' (bf16 autocast, TF32)' if device.type == 'cuda' else '',
    )


def _can_score(spec: FinetuneRunSpec, evaluation: Dataset, num_classes: int) -> bool:
    """Proxy losses (ArcFace, ...) cannot score classes they never saw: no val_loss for those."""
    if loss_entry(spec.loss).classifies:
        return all((e.label or 0) < num_classes for e in evaluation.examples)
    return True


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {}
    for package in (
        'torch',
        'timm',
        'transformers',
        'sentence-transformers',
        'pytorch-metric-learning',
        'kube-finetuner',
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def card_facts(ctx: TrainContext, after: dict[str, Any]) -> CardFacts:
    """What the artifact's model card says: base model, task, data, loss, hyper-parameters, metrics."""
    spec, train, evaluation = ctx.spec, ctx.train_records, ctx.eval_records
    family = ctx.model.family
    source = resolve_model(spec)[1]
    task = 'text-to-image' if family == 'clip' else 'text-to-text' if family == 'text' else 'image-to-image'
    given = spec.model_dump(exclude_defaults=True, by_alias=False)
    hyperparameters = {
        'epochs': spec.epochs,
        'batch_size': ctx.batch_size,
        'learning_rate': ctx.optimizer.param_groups[0].get('initial_lr', ctx.optimizer.param_groups[0]['lr']),
        'optimizer': spec.optimizer,
        'scheduler': spec.scheduler or 'none',
        'total_steps': ctx.state.total_steps,
        'sampler': str(spec.sampler.value if hasattr(spec.sampler, 'value') else spec.sampler),
        'output_dim': spec.output_dim,
        'freeze': spec.freeze,
        'seed': spec.seed,
    }
    evaluation_callbacks = [cb for cb in ctx.callbacks if type(cb).__name__ == 'EvaluationCallback']
    return CardFacts(
        run_name=ctx.config.run_name,
        model=spec.model,
        base_model_id=None
        if spec.model_options.get('pretrained') is False
        else base_model_of(spec.model, source, family, ctx.model),
        family=family,
        task=task,
        output_dim=ctx.model.output_dim,
        pretrained=spec.model_options.get('pretrained') is not False,
        data_shape=train.shape.value,
        train_size=len(train),
        train_source=data_name_of_reference(spec.train_data),
        eval_size=len(evaluation) if evaluation is not None else None,
        eval_source=eval_name(spec, evaluation is not None),
        classes=len(train.classes) if train.shape == Shape.LABELLED else None,
        loss=spec.loss,
        miner=spec.miner,
        hyperparameters=hyperparameters,
        non_default={k: v for k, v in given.items() if k in hyperparameters},
        before=dict(ctx.metrics.before),
        after=dict(after),
        history=list(ctx.state.history),
        limit=evaluation_callbacks[0].options.limit if evaluation_callbacks else 20,
    )


def eval_name(spec: FinetuneRunSpec, evaluated: bool) -> str | None:
    if spec.eval_data:
        return data_name_of_reference(spec.eval_data)
    return f'{data_name_of_reference(spec.train_data)}, val_split {spec.val_split}' if evaluated else None


def final_metrics(ctx: TrainContext) -> dict[str, float]:
    """The metrics of the published weights: re-measured when a callback replaced them, else the last epoch's."""
    return dict(ctx.metrics.after if ctx.metrics.after is not None else ctx.state.metrics)


def evaluate_quantized(ctx: TrainContext, folder: Path, after: dict[str, float]) -> dict[str, Any] | None:
    """The int8 ONNX graphs in ``folder`` evaluated like the float model (every evaluation of the run), and
    each metric's change against ``after`` in percent; None when the run has no evaluation."""
    from finetuner_trainer.inference_onnx import OnnxEmbedder  # ONNX Runtime: loaded only for onnxQuantize

    evaluators = [replace(cb.setup(ctx), gather_examples=False) for cb in ctx.evaluation.evaluators(ctx)]
    if not evaluators:
        return None
    int8 = OnnxEmbedder.from_manifest(folder, ctx.model, quantized=True)

    def embed(values: list[Any], batch_size: int) -> torch.Tensor:
        return torch.from_numpy(int8.encode(values, batch_size=batch_size))

    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        metrics.update(evaluator.evaluate(embed))
    change = {name: 100.0 * (value / after[name] - 1.0) for name, value in metrics.items() if after.get(name)}
    ctx.logger.info(
        'int8 ONNX model: %s',
        ', '.join(f'{name} {metrics[name]:.4f} ({change[name]:+.2f}%)' for name in sorted(change)) or 'evaluated',
    )
    return {'methods': int8.quantization, 'metrics': metrics, 'relative_change': change}


def publish_artifact(ctx: TrainContext, workdir: Path, after: dict[str, Any] | None = None) -> str:
    """Save the model and its card, upload every file under artifact/, then write artifact/manifest.json last.

    A manifest left by an earlier attempt is removed first, so an upload that dies half-way never
    looks complete."""
    store = ctx.store
    store.delete(layout.ARTIFACT_MANIFEST)
    folder = workdir / 'artifact'
    facts = card_facts(ctx, after if after is not None else ctx.state.metrics)
    ctx.model.card_facts = facts  # a text model's card is written by sentence-transformers from these
    try:
        description = ctx.model.save(folder)
    finally:
        ctx.model.card_facts = None
    write_card(folder, facts, description.get('load'))
    if ctx.spec.to_onnx:
        description['onnx'] = export_for_artifact(ctx.model, folder)
    if ctx.spec.to_onnx and ctx.spec.onnx_quantize:
        description['onnx'] = quantize_for_artifact(ctx.model, folder, ctx.spec.onnx_quantize, ctx.train_records)
        ctx.metrics.quantized = evaluate_quantized(ctx, folder, after if after is not None else final_metrics(ctx))
    plot_training_curves(
        [{'epoch': 0, **ctx.metrics.before}, *ctx.state.history], folder / PLOT_FILE, title=ctx.config.run_name
    )
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob('*')) if path.is_file()
    }
    store.upload_dir(folder, layout.ARTIFACT)
    manifest = {
        'format': description.get('format'),
        'family': ctx.model.family,
        'model': ctx.spec.model,
        'output_dim': ctx.model.output_dim,
        'preprocessing': description.get('preprocessing'),
        'load': description.get('load'),
        'projection': description.get('projection'),
        'description': description,
        'files': files,
        'spec': ctx.spec.to_k8s(),
        'run_name': ctx.config.run_name,
        'library_versions': library_versions(),
        'created_at': datetime.now(timezone.utc).isoformat(timespec='seconds'),
    }
    store.write_json(layout.ARTIFACT_MANIFEST, manifest)
    return f'{store.uri}/{layout.ARTIFACT}'


def write_failure(
    store: RunStore | None, reason: str, message: str, exit_code: int, log: logging.Logger | None
) -> None:
    if store is None:
        return
    try:
        store.write_json(layout.FAILURE, {'reason': reason, 'message': message, 'exitCode': exit_code})
    except Exception as e:  # best effort: the store itself may be what failed
        if log is not None:
            log.warning('could not write failure.json: %s', e)


def write_termination_log(path: str, message: str) -> None:
    target = Path(path)
    if not target.parent.is_dir():
        return
    try:
        target.write_text(message[:4000] + '\n')
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def train(config: TrainerConfig, log: logging.Logger | None = None, count_process_start: bool = False) -> TrainResult:
    """Run the whole fine-tuning in this process; raises ConfigError on a user mistake.

    ``count_process_start``: this process was started for this run (the program): the time since it
    started counts as the run's ``start-up`` in ``metrics.json``'s ``timings``."""
    log = log or logging.getLogger('finetuner_trainer')
    CLOCK.start_run(include_process_start=count_process_start)
    quiet_libraries()
    try:
        store = open_store(config.output_uri)
    except StorageError as e:
        raise ConfigError('output', str(e)) from e
    store.write_json(layout.CONFIG, config.model_dump(by_alias=True, mode='json'))
    store.delete(layout.FAILURE)
    if config.spec.task == Task.SYNTHESIS.value:
        done = synthesize(config, store, pick_device(config.spec), log)
        log.info('synthesized %d records at %s', done.records, done.artifact_uri)
        return TrainResult(done.artifact_uri, {'before': {}, 'after': done.metrics}, 0, 1, done.records)
    ctx = build_context(config, store, log)
    try:
        state = run_training(ctx)  # resumes from a checkpoint, measures the metrics before and per epoch
    finally:
        with phase('checkpoints'):
            ctx.checkpointer.wait()  # the last checkpoint is stored before anything else happens
    shutdown()  # under torchrun: no collective follows (rank 0 publishes alone); NCCL warns of a group left open
    after = final_metrics(ctx)
    with phase('artifact'), tempfile.TemporaryDirectory(prefix='finetuner-artifact-') as tmp:
        artifact_uri = publish_artifact(ctx, Path(tmp), after) if ctx.is_main else ''
    metrics = run_metrics(ctx, after)
    write_examples(ctx)
    if ctx.is_main:
        metrics['timings'] = CLOCK.summary()
        store.write_json(layout.METRICS, metrics)
        ctx.reporter.report(state, state.train_loss, force=True)
        log.info('artifact published at %s', artifact_uri)
        if not ctx.checkpointer.policy.keep_when_done:
            ctx.checkpointer.clear()  # the local backend: a finished run resumes nothing
        log.info(CLOCK.sentence())
    return TrainResult(artifact_uri, metrics, ctx.model.output_dim, state.epoch, state.step, state.history)


def parse_config(text: str) -> TrainerConfig:
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = '.'.join(str(part) for part in first['loc']) or 'config'
        raise ConfigError(where, first['msg']) from e


def main(argv: list[str] | None = None) -> int:
    """The program: exit 0 on success, EXIT_CONFIG_ERROR on a user mistake, 1 on anything else."""
    parser = argparse.ArgumentParser(prog='python -m finetuner_trainer', description='Fine-tune an embedding model.')
    parser.add_argument('--config', required=True, help='a TrainerConfig as JSON (camelCase)')
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix='finetuner-trainer-'))
    log = setup_logging(workdir / 'train.log')
    termination_log = '/dev/termination-log'
    store = None
    code = EXIT_OK
    try:
        text = Path(args.config).read_text()
        try:
            termination_log = json.loads(text).get('terminationLog', termination_log)
        except (ValueError, AttributeError):
            pass
        config = parse_config(text)
        termination_log = config.termination_log
        loss = config.spec.loss or 'chosen by the recipe for the data'
        log.info('run %s/%s: model %s, loss %s', config.namespace, config.run_name, config.spec.model, loss)
        try:
            store = open_store(config.output_uri)
        except StorageError as e:
            raise ConfigError('outputUri', str(e)) from e
        train(config, log, count_process_start=True)
        log.info('run %s finished', config.run_name)
    except ConfigError as e:
        code = EXIT_CONFIG_ERROR
        message = e.one_line()
        log.error('configuration error: %s', message)
        write_termination_log(termination_log, message)
        write_failure(store, 'ConfigError', message, code, log)
    except Exception as e:  # anything else is an infrastructure failure: retried, resumed
        code = EXIT_INFRA_ERROR
        message = ' '.join(f'{type(e).__name__}: {e}'.split())
        log.error('training failed: %s\n%s', message, traceback.format_exc())
        write_termination_log(termination_log, message)
        write_failure(store, type(e).__name__, message, code, log)
    finally:
        for handler in log.handlers:
            handler.flush()
        if store is not None:
            # Under torchrun every rank gets here: rank 0's log is the run's log; the others keep
            # theirs beside it instead of overwriting it.
            rank = int(os.environ.get('RANK', '0'))
            log_key = layout.TRAIN_LOG if rank == 0 else layout.TRAIN_LOG.replace('.log', f'.rank-{rank}.log')
            try:
                store.upload_file(workdir / 'train.log', log_key)
            except Exception as e:  # the log copy is best effort
                log.warning('could not copy the training log: %s', e)
        for handler in list(log.handlers):
            if isinstance(handler, logging.FileHandler):
                log.removeHandler(handler)
                handler.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
