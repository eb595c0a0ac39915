"""The options of every callback a run can name, declared once for the SDK and the trainer.

A run's ``spec.callbacks`` holds ``{name, options}`` pairs (``CallbackSpec``). The option model of
each name is here: the SDK's callback classes (``finetuner.callbacks``) are these models plus
``to_spec()``, and the trainer checks a spec's options with the same model before training, so both
sides accept, refuse and default alike (and say so in the same words).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Mode = Literal['auto', 'min', 'max']


class CallbackOptions(BaseModel):
    """Base of the option models: an unknown option is refused."""

    model_config = ConfigDict(extra='forbid')


class EvaluationOptions(CallbackOptions):
    """Retrieval metrics (mrr, map, ndcg, precision/recall@k, hit@k) on held-out data after each epoch."""

    query_data: str | None = Field(
        default=None, description='Queries: a dataset name or a URI (default: the run evaluation data).'
    )
    index_data: str | None = Field(default=None, description='Index to search (default: the queries).')
    limit: int = Field(default=20, ge=1, le=10000, description='Depth of the ranking (the k of the @k metrics).')
    distance: Literal['cosine', 'euclidean', 'sqeuclidean'] = 'cosine'
    exclude_self: bool = Field(default=True, description='Ignore a query matching itself when index = queries.')
    batch_size: int = Field(default=32, ge=1, le=65536)
    multi_modal: bool | None = Field(default=None, description='Text queries, image index (CLIP); default: the run.')
    gather_examples: bool = Field(
        default=False, description='Keep the top matches of a few queries (before and after) in examples.json.'
    )
    num_example_queries: int = Field(default=5, ge=1, le=1000)
    model: str | None = Field(
        default=None,
        description="The model that embeds query_data (and index_data, without index_model): 'clip-text' or "
        "'clip-vision' of a CLIP model; default: the run's model, each kind of content by its own tower.",
    )
    index_model: str | None = Field(default=None, description='The model that embeds index_data (CLIP).')
    steps_per_interval: int | None = Field(
        default=None,
        ge=1,
        description='Also evaluate every this many batches (large datasets); default: at the end of each epoch only.',
    )
    num_workers: int = Field(
        default=8, ge=1, le=1024, description='Threads that match queries and index (at most the CPUs there are).'
    )
    caption: str | None = Field(
        default=None,
        pattern=r'^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$',
        description='Name of this evaluation, prefixed to its metrics (caption_mrr); each of several '
        'EvaluationCallbacks needs its own.',
    )
    query_sample_size: int | None = Field(
        default=None, ge=1, description='Evaluate this many queries drawn at random (seeded) instead of all.'
    )


class BestModelOptions(CallbackOptions):
    """Keep the weights of the best epoch by ``monitor`` as the run's artifact."""

    monitor: str = Field(default='val_loss', description='val_loss, train_loss or an evaluation metric.')
    mode: Mode = 'auto'


class TrainingCheckpointOptions(CallbackOptions):
    """Keep the last ``last_k_epochs`` full checkpoints (a retried run resumes from the newest)."""

    last_k_epochs: int = Field(default=1, ge=1, le=1000, description='Epoch checkpoints kept in the store.')


class EarlyStoppingOptions(CallbackOptions):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = Field(default='val_loss', description='val_loss, train_loss or an evaluation metric.')
    mode: Mode = 'auto'
    patience: int = Field(default=2, ge=0, le=10000, description='Epochs without improvement before stopping.')
    min_delta: float = Field(default=0.0, ge=0, description='Smallest change that counts as an improvement.')
    baseline: float | None = Field(default=None, description='A value the monitor must beat to count as improving.')


class WiSEFTOptions(CallbackOptions):
    """Robust fine-tuning: average the fine-tuned and pretrained weights with factor ``alpha``."""

    alpha: float = Field(default=0.4, ge=0, le=1, description='Weight of the fine-tuned model, in (0, 1].')

    @field_validator('alpha')
    @classmethod
    def _alpha_meaningful(cls, alpha: float) -> float:
        if alpha == 0:
            raise ValueError('alpha=0 keeps only the pretrained weights; use a value in (0, 1]')
        return alpha


class TensorBoardOptions(CallbackOptions):
    """Write losses and metrics as TensorBoard events under the run's output (``logs/tensorboard``)."""

    log_dir: str | None = Field(default=None, description='Local folder (default: a temporary one, uploaded).')


class MLFlowOptions(CallbackOptions):
    """Log parameters and metrics to an MLflow tracking server."""

    tracking_uri: str | None = Field(
        default=None, description='MLflow server or folder (default: MLFLOW_TRACKING_URI).'
    )
    experiment_name: str | None = None
    run_name: str | None = Field(default=None, description='Default: the run name.')


class WandBOptions(CallbackOptions):
    """Log losses and metrics to Weights & Biases (the options go to ``wandb.init``)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = Field(default=None, description='Default: the run name.')
    mode: Literal['online', 'offline', 'disabled'] = 'online'
    dir: str | None = None
    wandb_args: dict[str, Any] | None = Field(
        default=None, description='More keyword arguments of wandb.init (they override the options above).'
    )
    metrics_logger_step: Literal['batch', 'epoch'] = Field(
        default='epoch', description="Log the training loss after every batch ('batch') or once per epoch."
    )
    log_zero_shot: bool = Field(
        default=True, description='Also log the metrics before fine-tuning (step 0), when the run evaluates.'
    )


# Callback name (as in spec.callbacks[].name) -> its options. The trainer and the SDK each have a
# class of this name; tests fail when one is missing.
CALLBACK_OPTIONS: dict[str, type[CallbackOptions]] = {
    'EvaluationCallback': EvaluationOptions,
    'BestModelCheckpoint': BestModelOptions,
    'TrainingCheckpoint': TrainingCheckpointOptions,
    'EarlyStopping': EarlyStoppingOptions,
    'WiSEFTCallback': WiSEFTOptions,
    'TensorBoardLogger': TensorBoardOptions,
    'MLFlowLogger': MLFlowOptions,
    'WandBLogger': WandBOptions,
}
CALLBACK_NAMES: tuple[str, ...] = tuple(CALLBACK_OPTIONS)
