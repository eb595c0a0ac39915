"""Cross-encoders: a transformers sequence-classification model that reads a (query, document) pair
together and scores how well the document answers the query.

Synthesis runs score every mined (query, document) relation with one; hard-negative mining may rescore
its candidates with one. A cross-encoder comes from a Hugging Face id, a local folder, or an
``s3://``/``file://`` prefix holding one; a model that is not a sequence-classification model (an
embedding model, a language model) is refused with a :class:`ConfigError` naming the field.

Scores follow sentence-transformers' ``CrossEncoder.predict``: one label -> the sigmoid of its logit
(unless the model's ``config.json`` names another activation for sentence-transformers), two labels
-> the softmax probability of the second ("relevant").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from finetuner.catalog import find_cross_encoder
from finetuner.storage import file_uri_path
from finetuner_trainer.errors import ConfigError

IDENTITY_ACTIVATIONS = ('torch.nn.modules.linear.Identity', 'torch.nn.Identity')
SIGMOID_ACTIVATIONS = ('torch.nn.modules.activation.Sigmoid', 'torch.nn.Sigmoid')
EXAMPLE = 'cross-encoder/ms-marco-MiniLM-L6-v2'


def locate(name: str, field: str) -> str:
    """A local folder for ``name`` (downloaded from s3:// when needed), or a Hugging Face id (a catalog
    alias such as ``crossencoder-base-en`` replaced by its id)."""
    entry = find_cross_encoder(name)
    if entry is not None:
        return entry.name
    if name.startswith('s3://'):
        from finetuner_trainer.models import download_model

        return str(download_model(name))
    path = file_uri_path(name) if name.startswith('file://') else Path(name).expanduser()
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise ConfigError(field, f'{name!r} holds no config.json: not a Hugging Face model folder')
        return str(path)
    if name.startswith(('file://', '/', '.')):
        raise ConfigError(field, f'{name!r} is not a directory')
    return name


def read_config(source: str, name: str, field: str) -> dict[str, Any]:
    """The model's configuration as transformers reads it (defaults filled in, e.g. two labels)."""
    from transformers import AutoConfig  # heavy: loaded when a cross-encoder is

    try:
        return dict(AutoConfig.from_pretrained(source).to_dict())
    except Exception as e:  # OSError, RepositoryNotFoundError, ValueError from transformers
        raise ConfigError(
            field,
            f'cannot load cross-encoder {name!r}: not a local model folder and not a loadable Hugging Face model id '
            f'({type(e).__name__}); give a folder or an id such as {EXAMPLE}',
        ) from e


def check_is_cross_encoder(config: dict[str, Any], name: str, field: str) -> int:
    """The model's number of labels, after checking that ``config`` is a sequence classifier with 1 or 2."""
    architectures = list(config.get('architectures') or [])
    if not any(a.endswith('ForSequenceClassification') for a in architectures):
        what = ', '.join(architectures) or f'a {config.get("model_type", "model")} without a classification head'
        raise ConfigError(
            field,
            f'{name!r} is not a cross-encoder: its config.json declares {what}, not a *ForSequenceClassification '
            f'model; give a cross-encoder (a sequence-classification model such as {EXAMPLE})',
        )
    labels = len(config.get('id2label') or {}) or 2  # transformers' default: two labels
    if labels not in (1, 2):
        raise ConfigError(
            field,
            f'{name!r} classifies into {labels} labels; a cross-encoder that scores relevance has one label (a '
            'score) or two (irrelevant, relevant)',
        )
    return labels


def _activation(config: dict[str, Any], labels: int) -> str:
    chosen = (config.get('sentence_transformers') or {}).get('activation_fn')
    if chosen in IDENTITY_ACTIVATIONS:
        return 'identity'
    if chosen in SIGMOID_ACTIVATIONS or labels == 1:
        return 'sigmoid'
    return 'softmax'


class CrossEncoderScorer:
    """A loaded cross-encoder; :meth:`score` scores (query, document) pairs."""

    def __init__(self, name: str, model: Any, tokenizer: Any, max_length: int, activation: str) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.activation = activation

    @classmethod
    def load(
        cls, name: str, field: str, device: torch.device | str = 'cpu', max_length: int | None = None
    ) -> CrossEncoderScorer:
        """The cross-encoder ``name``; a ConfigError naming ``field`` when it cannot be one."""
        source = locate(name, field)
        config = read_config(source, name, field)
        labels = check_is_cross_encoder(config, name, field)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: loaded when used

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForSequenceClassification.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ConfigError(field, f'cannot load cross-encoder {name!r}: {type(e).__name__}: {e}') from e
        limit = min(int(tokenizer.model_max_length or 512), int(config.get('max_position_embeddings') or 512))
        model.to(device).eval()
        return cls(name, model, tokenizer, min(max_length or limit, limit), _activation(config, labels))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One float32 score per (query, document) pair, in order (batches of similar length)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores = torch.empty(len(pairs), dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            encoded = self.tokenizer(
                [pairs[i][0] for i in chosen],
                [pairs[i][1] for i in chosen],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors='pt',
            ).to(self.device)
            logits = self.model(**encoded).logits.float()
            if self.activation == 'softmax':
                values = torch.softmax(logits, dim=-1)[:, 1]
            else:
                values = logits[:, 0]
                values = torch.sigmoid(values) if self.activation == 'sigmoid' else values
            scores[torch.as_tensor(chosen)] = values.cpu()
            if progress is not None:
                progress(len(chosen))
        return scores
