"""Where things live in a run's output location, and the record format of datasets.

The trainer writes these keys under the run's ``outputUri``; the operator and the SDK read them.
An artifact *exists* only once ``artifact/manifest.json`` is there: the trainer writes it last,
so a run that dies while uploading leaves no artifact that looks complete. Checkpoints follow the
same rule with ``checkpoints/latest.json``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetuner.api.tensors import check_encoded

CONFIG = 'config.json'  # the TrainerConfig the run was started with
PROGRESS = 'progress.json'  # finetuner.api.v1alpha1.Progress, rewritten while training
PROGRESS_HISTORY = 'progress_history.json'  # {"points": [{"step", "epoch", "loss", "time"}]}: the loss curve
METRICS = 'metrics.json'  # {"before": {...}, "after": {...}, "epochs": [...]} (RunMetrics + history)
EXAMPLES = 'examples.json'  # {"before": [...], "after": [...]}: top matches of a few evaluation queries
FAILURE = 'failure.json'  # {"reason": ..., "message": ..., "exitCode": ...} when the trainer failed
TRAIN_LOG = 'logs/train.log'  # the trainer's log, copied at the end of each attempt
ARTIFACT = 'artifact'  # the fine-tuned model (loadable without this project)
ARTIFACT_MANIFEST = 'artifact/manifest.json'  # written last: {"files": {...}, "format": ..., ...}
CHECKPOINTS = 'checkpoints'
CHECKPOINT_LATEST = 'checkpoints/latest.json'  # {"path": "checkpoints/epoch-0003", "epoch": 3, "step": ...}

DATASETS = 'datasets'  # under the data prefix: datasets/<name>/data.jsonl
DATASET_FILE = 'data.jsonl'


def dataset_key(name: str) -> str:
    return f'{DATASETS}/{name}/{DATASET_FILE}'


class Record(BaseModel):
    """One line of a JSONL dataset: an item, or a parent whose chunks form a pair.

    - labelled items (image-to-image, text-to-text): content + ``label``;
    - query-document pairs: a parent with two ``chunks`` (query first);
    - pairs with a similarity score: the same, plus ``score`` on the parent;
    - text-image pairs (CLIP): a parent with a text chunk and an image chunk, each with ``modality``.

    Content is one of ``text``, ``uri`` (a path or URL of an image), ``blob`` (base64 image
    bytes) or ``tensor``: an image's pixels, as nested lists of numbers or as the SDK stores them,
    a ``data:application/x-npy;base64,...`` URI of numpy ``.npy`` bytes (see
    :mod:`finetuner.api.tensors` for the layouts and scales read as images).
    """

    model_config = ConfigDict(extra='forbid')

    text: str | None = None
    uri: str | None = None
    blob: str | None = Field(default=None, description='base64-encoded bytes (an encoded image)')
    tensor: list[Any] | str | None = Field(
        default=None, description='pixels: nested lists, or a data:application/x-npy;base64 URI of .npy bytes'
    )
    label: str | int | None = None
    score: float | None = None
    modality: str | None = None
    chunks: list[Record] = Field(default_factory=list)
    tags: dict[str, Any] = Field(default_factory=dict)

    @field_validator('tensor')
    @classmethod
    def _encoded_tensor(cls, value: list[Any] | str | None) -> list[Any] | str | None:
        return check_encoded(value) if isinstance(value, str) else value

    @model_validator(mode='after')
    def _content_or_chunks(self) -> Record:
        contents = [k for k in ('text', 'uri', 'blob', 'tensor') if getattr(self, k) is not None]
        if self.chunks and contents:
            raise ValueError(f'a record has either content or chunks, not both (got chunks and {contents[0]})')
        if not self.chunks and not contents:
            raise ValueError('a record needs content: one of text, uri, blob, tensor (or chunks)')
        return self

    @property
    def content_kind(self) -> str:
        """'text', 'image' or 'tensor' (a uri or blob is an image)."""
        if self.text is not None:
            return 'text'
        if self.tensor is not None:
            return 'tensor'
        return 'image'


def resolve_data(reference: str, data_prefix: str | None) -> tuple[str, str | None]:
    """Split a data reference into (store location, key).

    A URI (``s3://``, ``file://``) or an absolute path is used as is (key None); anything else is
    the name of a dataset pushed earlier: ``<data_prefix>/datasets/<name>/data.jsonl``.
    """
    if reference.startswith(('s3://', 'file://', '/')):
        return reference, None
    if not data_prefix:
        raise ValueError(f'data {reference!r} is a dataset name but no data location is configured')
    from finetuner.api.v1alpha1 import check_dns1123_name

    check_dns1123_name(reference, 'dataset name', max_len=63)
    return data_prefix, dataset_key(reference)
