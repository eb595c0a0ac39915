"""The callbacks a run can name (``spec.callbacks``), on the hooks of the one training loop.

Each callback is registered by name with :func:`register_callback` and its options model from the
contract (``finetuner.api.callback_options``, the same model the SDK's callback classes are made
of): an unknown option or a wrong type is refused before training with a message naming the
callback and the option. Callbacks only read the state and flip
:class:`~finetuner_trainer.hooks.Control` flags, or change the weights at the end of training
(:class:`BestModelCheckpoint` restores the best epoch's weights, :class:`WiSEFTCallback` mixes in the
pretrained ones) so that what is published is what they promise. Rank 0 alone logs to external
trackers; every rank sees the same metrics (computed on rank 0 and broadcast by the loop), so
decisions such as early stopping agree.
"""

from __future__ import annotations

import importlib
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from pydantic import ValidationError

from finetuner.api.callback_options import (
    BestModelOptions,
    CallbackOptions,
    EarlyStoppingOptions,
    EvaluationOptions,
    MLFlowOptions,
    TensorBoardOptions,
    TrainingCheckpointOptions,
    WandBOptions,
    WiSEFTOptions,
)
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import CallbackSpec
from finetuner.catalog import EVALUATION_METRICS
from finetuner_trainer.data import Dataset, ImageBase, load_records, to_item
from finetuner_trainer.distributed import broadcast, unwrap
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.evaluation import (
    DISTANCES,
    METRIC_ALIASES,
    EmbedFn,
    EvalSet,
    EvaluationError,
    Evaluator,
    build_eval_set,
    pair_eval_set,
)
from finetuner_trainer.hooks import Callback, Control, TrainState

if TYPE_CHECKING:
    from finetuner_trainer.context import TrainContext

log = logging.getLogger('finetuner_trainer')

LOSS_MONITORS = ('train_loss', 'val_loss')
HIGHER_IS_BETTER = (*EVALUATION_METRICS, *METRIC_ALIASES)


CALLBACKS: dict[str, type[Callback]] = {}
CallbackT = TypeVar('CallbackT', bound=type[Callback])


def register_callback(options: type[CallbackOptions]) -> Callable[[CallbackT], CallbackT]:
    """Class decorator: the callback a spec names by the class's name, with its options model
    (``cls(**options)`` gets options the model accepted; ``cls.Options`` is the model)."""

    def register(cls: CallbackT) -> CallbackT:
        registered = CALLBACKS.get(cls.__name__)
        if registered is not None and registered is not cls:
            raise ValueError(f'callback {cls.__name__!r} is already registered')
        cls.Options = options
        CALLBACKS[cls.__name__] = cls
        return cls

    return register


def monitored_value(state: TrainState, monitor: str) -> float | None:
    """The current value of ``monitor``: train_loss, val_loss or an evaluation metric."""
    if monitor == 'train_loss':
        return state.train_loss
    if monitor == 'val_loss':
        return state.val_loss if state.val_loss is not None else state.metrics.get('val_loss')
    value = state.metrics.get(monitor)
    return None if value is None else float(value)


def resolve_mode(monitor: str, mode: str) -> str:
    if mode != 'auto':
        return mode
    # An EvaluationCallback's caption prefixes its metrics: 'test_mrr' is an mrr.
    higher = any(monitor == name or monitor.endswith(f'_{name}') for name in HIGHER_IS_BETTER)
    return 'max' if higher else 'min'


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return True
    return value < best - min_delta if mode == 'min' else value > best + min_delta


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to('cpu', copy=True) for k, v in unwrap(model).state_dict().items()}


class _MonitorMixin:
    monitor: str
    _warned: bool = False

    def _value(self, state: TrainState) -> tuple[str, float | None]:
        """The monitored value; val_loss falls back to train_loss without validation data (logged once)."""
        value = monitored_value(state, self.monitor)
        if value is None and self.monitor == 'val_loss' and state.train_loss is not None:
            if not self._warned:
                log.warning('%s: no val_loss (no evalData or valSplit); monitoring train_loss', type(self).__name__)
                self._warned = True
            return 'train_loss', state.train_loss
        if value is None and not self._warned:
            log.warning(
                '%s: %r is not among the metrics of this run (%s); nothing to monitor',
                type(self).__name__,
                self.monitor,
                ', '.join(['train_loss', *sorted(state.metrics)]),
            )
            self._warned = True
        return self.monitor, value


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@register_callback(EvaluationOptions)
class EvaluationCallback(Callback):
    """Retrieval metrics (see :mod:`finetuner_trainer.evaluation`) before training, after every
    epoch and after training. The loop calls :meth:`evaluate`; metrics land in the state, the
    progress report (live, in the CR status) and ``metrics.json``."""

    def __init__(self, **options: Any):
        self.options = EvaluationOptions(**options)
        self.evaluator: Evaluator | None = None
        self.intervals: list[dict[str, Any]] = []  # the evaluations every steps_per_interval batches

    def setup(self, ctx: TrainContext) -> Evaluator:
        if self.evaluator is not None:
            return self.evaluator
        o = self.options
        spec = ctx.spec
        multi_modal = spec.multi_modal if o.multi_modal is None else o.multi_modal
        if o.query_data is None:
            if ctx.eval_records is None:
                raise ConfigError(
                    'callbacks.EvaluationCallback.query_data',
                    'no query_data and the run has no evalData or valSplit; give query_data (a dataset name or URI)',
                )
            eval_set = eval_set_from_dataset(ctx.eval_records, multi_modal)
        else:
            queries = _load_records(ctx, o.query_data, 'query_data')
            index = _load_records(ctx, o.index_data, 'index_data') if o.index_data else None
            try:
                eval_set = build_eval_set(
                    [r for r, _ in queries],
                    [r for r, _ in index] if index else None,
                    multi_modal=multi_modal,
                    text_modality=spec.text_modality,
                    image_modality=spec.image_modality,
                )
            except ValueError as e:
                raise ConfigError('callbacks.EvaluationCallback.query_data', str(e)) from e
            eval_set = _records_to_items(eval_set, queries, index)
        if o.query_sample_size is not None:
            eval_set = eval_set.sample_queries(o.query_sample_size, spec.seed)
        self.evaluator = Evaluator(
            eval_set,
            limit=o.limit,
            distance=o.distance,
            exclude_self=o.exclude_self,
            batch_size=o.batch_size,
            gather_examples=o.gather_examples,
            num_example_queries=o.num_example_queries,
            num_workers=o.num_workers,
        )
        return self.evaluator

    def evaluate(self, ctx: TrainContext, embed: EmbedFn | None = None) -> dict[str, float]:
        """``embed``: how items are embedded (the loop passes an EmbeddingMemo); the model's own ``embed``
        by default."""
        # The embedder splits a batch by content kind itself: CLIP embeds text queries with its text
        # tower and image index items with its vision tower through the same call. ``model`` and
        # ``index_model`` name the tower that must embed each side (a mismatch is a configuration error).
        evaluator = self.setup(ctx)
        if self.options.model is None and self.options.index_model is None:
            return self.captioned(evaluator.evaluate(embed or ctx.model.embed))
        embed_query = tower(ctx, self.options.model, 'model')
        embed_index = tower(ctx, self.options.index_model, 'index_model') if self.options.index_model else None
        return self.captioned(evaluator.evaluate(embed_query, embed_index))

    def captioned(self, metrics: dict[str, float]) -> dict[str, float]:
        caption = self.options.caption
        return {f'{caption}_{k}': v for k, v in metrics.items()} if caption else metrics

    def on_batch_end(self, ctx: TrainContext, state: TrainState, control: Control, loss: float) -> None:
        """Every ``steps_per_interval`` batches (rank 0, not at the end of an epoch, which evaluates anyway)."""
        every = self.options.steps_per_interval
        per_epoch = len(ctx.train_loader) if getattr(ctx, 'train_loader', None) is not None else 0
        if not every or state.step % every or not ctx.is_main or (per_epoch and state.step % per_epoch == 0):
            return
        metrics = self.evaluate(ctx)
        state.metrics = {**state.metrics, **metrics}
        self.intervals.append({'epoch': state.epoch, 'step': state.step, **metrics})
        log.info('step %d: %s', state.step, ' '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items())))

    @property
    def examples(self) -> list[dict[str, Any]]:
        return self.evaluator.examples if self.evaluator is not None else []


def tower(ctx: TrainContext, name: str | None, option: str) -> Any:
    """The embed function of the model ``name`` of a run's model (a CLIP tower: clip-text, clip-vision);
    the run's whole model for None. It refuses content the tower does not embed."""
    if name is None:
        return ctx.model.embed
    towers = dict(getattr(ctx.model, 'select_models', {}) or {})
    where = f'callbacks.EvaluationCallback.{option}'
    if name not in towers:
        if not towers:
            raise ConfigError(where, f'{ctx.spec.model} is a single model; leave {option} out (CLIP only)')
        raise ConfigError(where, f'unknown model {name!r}; {ctx.spec.model} has {" and ".join(map(repr, towers))}')
    kind = towers[name]

    def embed(items: list[Any], batch_size: int) -> Any:
        for position, item in enumerate(items):
            found = getattr(item, 'kind', None) or getattr(item, 'content_kind', None)
            if found != kind:
                data = 'index_data' if option == 'index_model' else 'query_data'
                raise ConfigError(where, f'{name} embeds {kind}, but {data}[{position}] is {found}')
        return ctx.model.embed(items, batch_size)

    return embed


def eval_set_from_dataset(dataset: Dataset, multi_modal: bool = False) -> EvalSet:
    """An EvalSet from the trainer's own evaluation Dataset (labelled items, or pairs)."""
    examples = dataset.examples
    if all(len(e.items) == 1 for e in examples):
        # The class names, not their indexes: the same matches, and examples.json reads as the user's data.
        names = dataset.classes
        labels = [names[e.label] if e.label is not None and e.label < len(names) else e.label for e in examples]
        items = [e.items[0] for e in examples]
        return EvalSet(items, items, labels, labels, same_items=True)
    queries = [e.items[0] for e in examples]
    docs = [e.items[1] for e in examples]
    return pair_eval_set(queries, docs, len(docs), multi_modal)


def _load_records(ctx: TrainContext, reference: str, field: str) -> list[tuple[Record, ImageBase]]:
    where = f'callbacks.EvaluationCallback.{field}'
    try:
        records, base = load_records(reference, ctx.config.data_uri, ctx.spec.csv_options, where)
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(where, f'cannot read {reference!r}: {e}') from e
    return [(record, base) for record in records]


def _records_to_items(
    eval_set: EvalSet, queries: list[tuple[Record, ImageBase]], index: list[tuple[Record, ImageBase]] | None
) -> EvalSet:
    base = queries[0][1] if queries else None
    eval_set.queries = [
        to_item(r, f'[{j}]', 'callbacks.EvaluationCallback.query_data', base) for j, r in enumerate(eval_set.queries)
    ]
    if eval_set.same_items:
        eval_set.index = eval_set.queries
    else:
        index_base = index[0][1] if index else base
        eval_set.index = [
            to_item(r, f'[{j}]', 'callbacks.EvaluationCallback.index_data', index_base)
            for j, r in enumerate(eval_set.index)
        ]
    return eval_set


# ---------------------------------------------------------------------------------------------
# Checkpoints and stopping
# ---------------------------------------------------------------------------------------------


@register_callback(BestModelOptions)
class BestModelCheckpoint(_MonitorMixin, Callback):
    """Keeps the weights of the best epoch by ``monitor`` and restores them when training ends, so
    the published artifact (and its ONNX export) is the best model, not the last one."""

    changes_weights_at_end: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.options = BestModelOptions(**options)
        self.monitor = self.options.monitor
        self.mode = resolve_mode(self.monitor, self.options.mode)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        name, value = self._value(state)
        if value is None or math.isnan(value):
            return
        if improved(value, self.best_score, self.mode):
            self.best_score, self.best_epoch = value, state.epoch
            self.best_weights = _cpu_state(ctx.model)
            control.should_save = True
            log.info('BestModelCheckpoint: epoch %d is the best so far (%s %.4f)', state.epoch, name, value)

    def on_train_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if self.best_weights is None:
            return
        unwrap(ctx.model).load_state_dict(self.best_weights)
        log.info(
            'BestModelCheckpoint: publishing the model of epoch %d (%s %.4f)',
            self.best_epoch,
            self.monitor,
            self.best_score,
        )

    def state_dict(self) -> dict[str, Any]:
        return {'best_score': self.best_score, 'best_epoch': self.best_epoch, 'best_weights': self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = state.get('best_score')
        self.best_epoch = state.get('best_epoch')
        self.best_weights = state.get('best_weights')


@register_callback(TrainingCheckpointOptions)
class TrainingCheckpoint(Callback):
    """How many epoch checkpoints the store keeps (checkpoints are always taken: a retried pod resumes
    from the latest). The loop's checkpointer reads ``last_k_epochs``."""

    def __init__(self, **options: Any):
        self.options = TrainingCheckpointOptions(**options)
        self.last_k_epochs = self.options.last_k_epochs


@register_callback(EarlyStoppingOptions)
class EarlyStopping(_MonitorMixin, Callback):
    """Stops training when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, **options: Any):
        self.options = EarlyStoppingOptions(**options)
        self.monitor = self.options.monitor
        self.mode = resolve_mode(self.monitor, self.options.mode)
        self.best: float | None = self.options.baseline
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        name, value = self._value(state)
        if value is None or math.isnan(value):
            return
        if improved(value, self.best, self.mode, self.options.min_delta):
            self.best = value
            self.wait = 0
            return
        self.wait += 1
        if self.wait > self.options.patience:
            control.should_stop = True
            self.stopped_epoch = state.epoch
            log.info(
                'EarlyStopping: %s has not improved on %.4f for %d epochs; stopping after epoch %d',
                name,
                self.best if self.best is not None else float('nan'),
                self.wait,
                state.epoch,
            )

    def state_dict(self) -> dict[str, Any]:
        return {'best': self.best, 'wait': self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get('best', self.best)
        self.wait = int(state.get('wait', 0))


@register_callback(WiSEFTOptions)
class WiSEFTCallback(Callback):
    """Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): at the end of training the weights
    become ``(1 - alpha) * pretrained + alpha * fine-tuned``, which keeps much of the pretrained
    model's robustness. Integer buffers (BatchNorm counters) keep their fine-tuned values."""

    changes_weights_at_end: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.options = WiSEFTOptions(**options)
        self.alpha = self.options.alpha
        self.pretrained: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if self.pretrained is None:  # a resumed run restored the original snapshot already
            self.pretrained = _cpu_state(ctx.model)

    def on_train_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if self.pretrained is None:
            return
        model = unwrap(ctx.model)
        merged = {}
        for key, tuned in model.state_dict().items():
            start = self.pretrained.get(key)
            if start is None or not tuned.is_floating_point() or start.shape != tuned.shape:
                merged[key] = tuned
            else:
                merged[key] = (1 - self.alpha) * start.to(tuned.device, tuned.dtype) + self.alpha * tuned
        model.load_state_dict(merged)
        log.info('WiSEFTCallback: weights = %.2f x pretrained + %.2f x fine-tuned', 1 - self.alpha, self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {'pretrained': self.pretrained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pretrained = state.get('pretrained')


# ---------------------------------------------------------------------------------------------
# Loggers (rank 0 only); their libraries are optional extras, imported when the callback is built
# ---------------------------------------------------------------------------------------------


def _require(module: str, callback: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f'callbacks.{callback}',
            f'{callback} needs the {package} package, which is not installed in the trainer image; '
            f'install it (pip install {package}, or the kube-finetuner[loggers] extra) or remove the callback',
        ) from e


class _Logger(Callback):
    def log_metrics(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def on_batch_end(self, ctx: TrainContext, state: TrainState, control: Control, loss: float) -> None:
        if state.is_world_process_zero:
            self.log_metrics({'train/loss': loss}, state.step)

    def on_epoch_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if not state.is_world_process_zero:
            return
        values = {f'eval/{k}': float(v) for k, v in state.metrics.items() if isinstance(v, (int, float))}
        if state.train_loss is not None:
            values['epoch/train_loss'] = state.train_loss
        values['epoch'] = float(state.epoch)
        self.log_metrics(values, state.step)


@register_callback(TensorBoardOptions)
class TensorBoardLogger(_Logger):
    """TensorBoard event files; uploaded to ``logs/tensorboard/`` in the run's output after every epoch."""

    STORE_KEY = 'logs/tensorboard'

    def __init__(self, **options: Any):
        self.options = TensorBoardOptions(**options)
        _require('tensorboard', 'TensorBoardLogger', 'tensorboard')
        self.log_dir = Path(self.options.log_dir or tempfile.mkdtemp(prefix='finetuner-tb-'))
        self.writer: Any = None

    def _writer(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # optional (the loggers extra)

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        return self.writer

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        writer = self._writer()
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def on_epoch_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        super().on_epoch_end(ctx, state, control)
        if state.is_world_process_zero:
            self._writer().flush()
            self._upload(ctx)

    def on_train_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self._upload(ctx)

    def _upload(self, ctx: TrainContext) -> None:
        store = getattr(ctx, 'store', None)
        if store is not None:
            store.upload_dir(self.log_dir, self.STORE_KEY)


@register_callback(MLFlowOptions)
class MLFlowLogger(_Logger):
    def __init__(self, **options: Any):
        self.options = MLFlowOptions(**options)
        self.mlflow = _require('mlflow', 'MLFlowLogger', 'mlflow')
        self.active = False

    def on_train_begin(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if not state.is_world_process_zero:
            return
        if self.options.tracking_uri:
            self.mlflow.set_tracking_uri(self.options.tracking_uri)
        if self.options.experiment_name:
            self.mlflow.set_experiment(self.options.experiment_name)
        self.mlflow.start_run(run_name=self.options.run_name or ctx.config.run_name)
        self.mlflow.log_params({k: str(v) for k, v in ctx.spec.to_k8s().items() if not isinstance(v, (dict, list))})
        self.active = True

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.active:
            self.mlflow.log_metrics({k.replace('/', '.'): v for k, v in values.items()}, step=step)

    def on_train_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if self.active:
            self.mlflow.end_run()
            self.active = False


@register_callback(WandBOptions)
class WandBLogger(_Logger):
    """Weights & Biases: ``wandb_args`` go to ``wandb.init`` too; the training loss per batch or per epoch
    (``metrics_logger_step``); the metrics before fine-tuning at step 0 (``log_zero_shot``)."""

    def __init__(self, **options: Any):
        self.options = WandBOptions(**options)
        self.wandb = _require('wandb', 'WandBLogger', 'wandb')
        self.run: Any = None

    def on_train_begin(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if not state.is_world_process_zero:
            return
        o = self.options
        arguments = {
            'project': o.project,
            'entity': o.entity,
            'name': o.name or ctx.config.run_name,
            'mode': o.mode,
            'dir': o.dir,
            'config': ctx.spec.to_k8s(),
            **(o.wandb_args or {}),
        }
        self.run = self.wandb.init(**arguments)
        before = getattr(getattr(ctx, 'metrics', None), 'before', None) or {}
        if o.log_zero_shot and before and not state.step:
            self.log_metrics({f'eval/{k}': float(v) for k, v in before.items()}, 0)

    def on_batch_end(self, ctx: TrainContext, state: TrainState, control: Control, loss: float) -> None:
        if self.options.metrics_logger_step == 'batch':
            super().on_batch_end(ctx, state, control, loss)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def on_train_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---------------------------------------------------------------------------------------------
# By name
# ---------------------------------------------------------------------------------------------


def build_callbacks(specs: list[CallbackSpec]) -> list[Callback]:
    """The callbacks of a run spec, options checked; ConfigError naming the callback and option."""
    callbacks: list[Callback] = []
    for position, spec in enumerate(specs):
        cls = CALLBACKS.get(spec.name)
        if cls is None:
            raise ConfigError(
                f'callbacks[{position}].name',
                f'unknown callback {spec.name!r}; choose one of {", ".join(CALLBACKS)}',
            )
        options_model = cls.Options
        try:
            options_model(**spec.options)
        except ValidationError as e:
            error = e.errors()[0]
            option = '.'.join(str(p) for p in error['loc'])
            known = ', '.join(options_model.model_fields)
            if error['type'] == 'extra_forbidden':
                problem = f'{spec.name} has no option {option!r}; its options are {known}'
            else:
                problem = f'{spec.name} option {option!r}: {error["msg"]}'
            raise ConfigError(f'callbacks[{position}].options.{option}', problem) from e
        callbacks.append(cls(**spec.options))
    check_captions(specs)
    return callbacks


def check_captions(specs: list[CallbackSpec]) -> None:
    """Several EvaluationCallbacks write the same metric names unless each has its own caption."""
    seen: dict[str | None, int] = {}
    for position, spec in enumerate(specs):
        if spec.name != 'EvaluationCallback':
            continue
        caption = spec.options.get('caption')
        if caption in seen:
            raise ConfigError(
                f'callbacks[{position}].options.caption',
                f'EvaluationCallback {position} has the caption {caption!r} of EvaluationCallback {seen[caption]}: '
                'their metrics would overwrite each other; give each EvaluationCallback its own caption',
            )
        seen[caption] = position


def evaluation_callbacks(callbacks: list[Callback]) -> list[EvaluationCallback]:
    return [cb for cb in callbacks if isinstance(cb, EvaluationCallback)]


def checkpoint_retention(callbacks: list[Callback]) -> int:
    """Epoch checkpoints to keep: TrainingCheckpoint's last_k_epochs, else 1."""
    kept = [cb.last_k_epochs for cb in callbacks if isinstance(cb, TrainingCheckpoint)]
    return max(kept) if kept else 1


class RetrievalEvaluation:
    """Retrieval metrics of the current weights for the loop: every EvaluationCallback's, or, when
    the run names none, the evaluation data's (evalData or valSplit) with the default options.

    Rank 0 evaluates and broadcasts, so every rank sees the same metrics (and takes the same
    early-stopping decision). An explicit EvaluationCallback whose data cannot be scored is a
    configuration error; the implicit evaluation is skipped with a warning instead (and not tried again)."""

    def __init__(self) -> None:
        self.implicit: EvaluationCallback | None = None
        self.implicit_failed = False

    def evaluators(self, ctx: TrainContext) -> list[EvaluationCallback]:
        explicit = evaluation_callbacks(ctx.callbacks)
        if explicit:
            return explicit
        if ctx.eval_records is None or self.implicit_failed:
            return []
        if self.implicit is None:
            self.implicit = EvaluationCallback(batch_size=max(1, min(ctx.batch_size, 256)), gather_examples=True)
        return [self.implicit]

    def __call__(self, ctx: TrainContext, embed: EmbedFn | None = None) -> dict[str, float]:
        evaluators = self.evaluators(ctx)
        if not evaluators and ctx.eval_records is None:
            return {}  # nothing to evaluate on any rank: no collective
        metrics: dict[str, float] = {}
        if ctx.is_main:
            for callback in evaluators:
                try:
                    metrics.update(callback.evaluate(ctx, embed))
                except EvaluationError as e:
                    if callback is not self.implicit:
                        raise ConfigError('callbacks.EvaluationCallback', str(e)) from e
                    ctx.logger.warning('retrieval evaluation skipped: %s', e)
                    self.implicit_failed = True
                if callback.examples:
                    ctx.metrics.examples = callback.examples
        return broadcast(metrics)


def changes_weights_at_end(callbacks: list[Callback]) -> bool:
    """Whether a callback replaces the trained weights in on_train_end (then the final metrics are
    measured again on what is published)."""
    # getattr: a callback may implement the hooks without subclassing Callback (bench.ours.StepClock does)
    return any(getattr(cb, 'changes_weights_at_end', False) for cb in callbacks)


__all__ = [
    'CALLBACKS',
    'DISTANCES',
    'BestModelCheckpoint',
    'EarlyStopping',
    'EvaluationCallback',
    'MLFlowLogger',
    'RetrievalEvaluation',
    'TensorBoardLogger',
    'TrainingCheckpoint',
    'WandBLogger',
    'WiSEFTCallback',
    'build_callbacks',
    'changes_weights_at_end',
    'checkpoint_retention',
    'evaluation_callbacks',
    'register_callback',
]
