"""sentence-transformers modules of this project, for saved text models that sentence-transformers'
own modules cannot express: :class:`GeMPooling` (``modelOptions.pooler: GeM``).

A saved folder names the class in its ``modules.json`` (``finetuner_trainer.st_modules.GeMPooling``), so
``SentenceTransformer(folder)`` loads it wherever this package is installed. Imported only when such a
model is saved or loaded by sentence-transformers (it imports sentence-transformers).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from sentence_transformers.base.modules.module import Module
from torch import Tensor

from finetuner_trainer.families.hf_text import masked_gem


class GeMPooling(Module):
    """Generalized-mean pooling of token embeddings over the attention mask, with the exponent ``p``
    learned in fine-tuning (saved in the module's config)."""

    config_keys: ClassVar[list[str]] = ['embedding_dimension', 'p', 'eps']

    def __init__(self, embedding_dimension: int, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.embedding_dimension = embedding_dimension
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, features: dict[str, Tensor | Any], **kwargs: Any) -> dict[str, Tensor | Any]:
        hidden = features['token_embeddings']
        mask = features['attention_mask']
        features['sentence_embedding'] = masked_gem(hidden, mask, torch.tensor(self.p, dtype=hidden.dtype), self.eps)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def get_sentence_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        self.save_config(output_path)
