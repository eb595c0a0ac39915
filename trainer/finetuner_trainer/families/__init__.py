"""The model families, one module each; importing this package registers them all.

A new family is one new module here whose :class:`~finetuner_trainer.embedder.Embedder` subclass is
decorated with :func:`~finetuner_trainer.embedder.register_family`, and its import below
(docs/EXTENDING.md, "Add a model family").
"""

from finetuner_trainer.families.clip import ClipEmbedder
from finetuner_trainer.families.hf_text import TextEmbedder
from finetuner_trainer.families.timm_cnn import TimmEmbedder

__all__ = ['ClipEmbedder', 'TextEmbedder', 'TimmEmbedder']
