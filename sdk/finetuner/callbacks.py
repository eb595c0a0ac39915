"""The callbacks a run can be given: ``finetuner.fit(..., callbacks=[BestModelCheckpoint()])``.

These are light descriptions (no torch): each one turns into a ``CallbackSpec(name, options)`` of
the run's spec, and the trainer builds the real callback from it. Their options are the contract's
(``finetuner.api.callback_options``), which the trainer checks with the same models: field names
follow Finetuner's, defaults and limits are the trainer's. Data given to ``EvaluationCallback`` as
documents is uploaded with the run's data by ``fit``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from finetuner.api.callback_options import (
    BestModelOptions,
    EarlyStoppingOptions,
    EvaluationOptions,
    MLFlowOptions,
    TensorBoardOptions,
    TrainingCheckpointOptions,
    WandBOptions,
    WiSEFTOptions,
)
from finetuner.api.v1alpha1 import CallbackSpec


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


class EvaluationCallback(_Callback, EvaluationOptions):
    """Retrieval metrics (mrr, map, ndcg, precision/recall@k, hit@k) on held-out data after each epoch."""

    data_fields: ClassVar[tuple[str, ...]] = ('query_data', 'index_data')

    # Documents are accepted here too: fit() uploads them and puts the dataset's URI in the spec.
    query_data: Any = Field(
        default=None, description='Queries: documents, a dataset name or a URI (default: the run evaluation data).'
    )
    index_data: Any | None = Field(default=None, description='Index to search (default: the queries).')


class BestModelCheckpoint(_Callback, BestModelOptions):
    """Keep the weights of the best epoch by ``monitor`` as the run's artifact."""


class TrainingCheckpoint(_Callback, TrainingCheckpointOptions):
    """Keep the last ``last_k_epochs`` full checkpoints (a retried run resumes from the newest)."""


class EarlyStopping(_Callback, EarlyStoppingOptions):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""


class WiSEFTCallback(_Callback, WiSEFTOptions):
    """Robust fine-tuning: average the fine-tuned and pretrained weights with factor ``alpha``."""


class TensorBoardLogger(_Callback, TensorBoardOptions):
    """Write losses and metrics as TensorBoard events under the run's output (``logs/tensorboard``)."""


class MLFlowLogger(_Callback, MLFlowOptions):
    """Log parameters and metrics to an MLflow tracking server."""


class WandBLogger(_Callback, WandBOptions):
    """Log losses and metrics to Weights & Biases (the options go to ``wandb.init``)."""


# One class per name of the contract's CALLBACK_OPTIONS (tests/sdk checks that none is missing).
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
