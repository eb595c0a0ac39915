"""The callbacks a run can be given: ``finetuner.fit(..., callbacks=[BestModelCheckpoint()])``.

These are light descriptions (no torch): each one turns into a ``CallbackSpec(name, options)`` of
the run's spec, and the trainer builds the real callback from it. Field names follow Finetuner's.
Data given to ``EvaluationCallback`` as documents is uploaded with the run's data by ``fit``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetuner.api.v1alpha1 import CallbackSpec

Mode = Literal['auto', 'min', 'max']


class _Callback(BaseModel):
    model_config = ConfigDict(extra='forbid', arbitrary_types_allowed=True)

    # Options whose value may be documents that fit() uploads before submitting the run.
    data_fields: ClassVar[tuple[str, ...]] = ()

    def to_spec(self, **replaced: Any) -> CallbackSpec:
        """The contract's form: the options the user set (the trainer applies the same defaults);
        ``replaced`` overrides options (e.g. data uploaded by fit)."""
        options = self.model_dump(exclude_unset=True)
        options.update(replaced)
        return CallbackSpec(name=type(self).__name__, options=options)


class EvaluationCallback(_Callback):
    """Retrieval metrics (mrr, map, ndcg, precision/recall@k, hit@k) on held-out data after each epoch."""

    data_fields: ClassVar[tuple[str, ...]] = ('query_data', 'index_data')

    query_data: Any = Field(
        default=None, description='Queries: documents, a dataset name or a URI (default: the run evaluation data).'
    )
    index_data: Any | None = Field(default=None, description='Index to search (default: the queries).')
    limit: int = Field(default=20, ge=1, le=10000, description='Depth of the ranking (the k of the @k metrics).')
    distance: Literal['cosine', 'euclidean', 'sqeuclidean'] = 'cosine'
    exclude_self: bool = Field(default=True, description='Ignore a query matching itself when index = queries.')
    batch_size: int = Field(default=32, ge=1, le=65536)
    multi_modal: bool | None = Field(default=None, description='Text queries, image index (CLIP); default: the run.')
    gather_examples: bool = Field(default=False, description='Keep the top matches of a few queries in metrics.json.')
    num_example_queries: int = Field(default=5, ge=1, le=1000)


class BestModelCheckpoint(_Callback):
    """Keep the weights of the best epoch by ``monitor`` as the run's artifact."""

    monitor: str = 'val_loss'
    mode: Mode = 'auto'


class TrainingCheckpoint(_Callback):
    """Keep the last ``last_k_epochs`` full checkpoints (a retried run resumes from the newest)."""

    last_k_epochs: int = Field(default=1, ge=1, le=1000)


class EarlyStopping(_Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = 'val_loss'
    mode: Mode = 'auto'
    patience: int = Field(default=2, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    baseline: float | None = None


class WiSEFTCallback(_Callback):
    """Robust fine-tuning: average the fine-tuned and pretrained weights with factor ``alpha``."""

    alpha: float = Field(default=0.4, ge=0, le=1)

    @model_validator(mode='after')
    def _alpha_meaningful(self) -> WiSEFTCallback:
        if self.alpha == 0:
            raise ValueError('alpha=0 keeps only the pretrained weights; use a value in (0, 1]')
        return self


class TensorBoardLogger(_Callback):
    """Write losses and metrics as TensorBoard events under the run's output (``logs/tensorboard``)."""

    log_dir: str | None = None


class MLFlowLogger(_Callback):
    """Log parameters and metrics to an MLflow tracking server."""

    tracking_uri: str | None = None
    experiment_name: str | None = None
    run_name: str | None = Field(default=None, description='Default: the run name.')


class WandBLogger(_Callback):
    """Log losses and metrics to Weights & Biases (the options go to ``wandb.init``)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = Field(default=None, description='Default: the run name.')
    mode: Literal['online', 'offline', 'disabled'] = 'online'
    dir: str | None = None


CALLBACK_CLASSES: dict[str, type[_Callback]] = {
    cls.__name__: cls
    for cls in (
        EvaluationCallback,
        BestModelCheckpoint,
        TrainingCheckpoint,
        EarlyStopping,
        WiSEFTCallback,
        TensorBoardLogger,
        MLFlowLogger,
        WandBLogger,
    )
}

__all__ = ['CALLBACK_CLASSES', *CALLBACK_CLASSES]
