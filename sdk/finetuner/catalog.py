"""Names the whole system agrees on: backbones, losses, miners, model families, optimizers, schedulers.

Pure data, no heavy imports: the SDK shows it (``describe_models``), the contract validates
against it (and the CRD's enums are generated from it). Losses, miners and model families are the
trainer's registries, copied into ``finetuner/registered.py`` by ``python -m finetuner.api.crdgen``
(its ``--check`` fails when the copy is out of date); the callbacks' names and options are the
contract's (``finetuner.api.callback_options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from finetuner.registered import FAMILIES, LOSSES, MINERS

Task = Literal['image-to-image', 'text-to-text', 'text-to-image']


@dataclass(frozen=True)
class Backbone:
    name: str
    task: Task
    output_dim: int
    architecture: str
    description: str
    family: str  # a model family of the trainer (FAMILY_NAMES)
    source: str  # timm model name or Hugging Face id the weights come from
    aliases: tuple[str, ...] = field(default=())
    default_learning_rate: float = 1e-4


BACKBONES: tuple[Backbone, ...] = (
    Backbone('resnet50', 'image-to-image', 2048, 'CNN', 'Pretrained on ImageNet', 'timm', 'resnet50', ('resnet-base',)),
    Backbone(
        'resnet152', 'image-to-image', 2048, 'CNN', 'Pretrained on ImageNet', 'timm', 'resnet152', ('resnet-large',)
    ),
    Backbone(
        'efficientnet_b0',
        'image-to-image',
        1280,
        'CNN',
        'Pretrained on ImageNet',
        'timm',
        'efficientnet_b0',
        ('efficientnet-base',),
    ),
    Backbone(
        'efficientnet_b4',
        'image-to-image',
        1792,
        'CNN',
        'Pretrained on ImageNet',
        'timm',
        'efficientnet_b4',
        ('efficientnet-large',),
    ),
    Backbone(
        'efficientnet_lite0',
        'image-to-image',
        1280,
        'CNN',
        'Pretrained on ImageNet (small, mobile-friendly)',
        'timm',
        'efficientnet_lite0',
    ),
    Backbone(
        'openai/clip-vit-base-patch32',
        'text-to-image',
        512,
        'transformer',
        'Pretrained on millions of text image pairs by OpenAI',
        'clip',
        'openai/clip-vit-base-patch32',
        ('clip-base-en',),
        1e-5,
    ),
    Backbone(
        'openai/clip-vit-large-patch14',
        'text-to-image',
        768,
        'transformer',
        'Pretrained on millions of text image pairs by OpenAI (large)',
        'clip',
        'openai/clip-vit-large-patch14',
        ('clip-large-en',),
        1e-5,
    ),
    Backbone(
        'bert-base-cased',
        'text-to-text',
        768,
        'transformer',
        'Pretrained on BookCorpus and English Wikipedia',
        'text',
        'bert-base-cased',
        ('bert-base-en',),
        2e-5,
    ),
    Backbone(
        'sentence-transformers/msmarco-distilbert-base-v3',
        'text-to-text',
        768,
        'transformer',
        'Pretrained on Bert, fine-tuned on MS Marco',
        'text',
        'sentence-transformers/msmarco-distilbert-base-v3',
        ('sbert-base-en',),
        2e-5,
    ),
    Backbone(
        'sentence-transformers/all-MiniLM-L6-v2',
        'text-to-text',
        384,
        'transformer',
        'MiniLM sentence embedder trained on 1B sentence pairs',
        'text',
        'sentence-transformers/all-MiniLM-L6-v2',
        ('minilm-en',),
        2e-5,
    ),
)


@dataclass(frozen=True)
class CrossEncoder:
    """A cross-encoder for synthesis runs and hard-negative mining (a transformers sequence classifier)."""

    name: str
    description: str
    aliases: tuple[str, ...] = field(default=())


# Any sequence-classification model id or folder works; these are the usual ones (Finetuner's alias kept).
CROSS_ENCODERS: tuple[CrossEncoder, ...] = (
    CrossEncoder(
        'cross-encoder/ms-marco-MiniLM-L6-v2',
        'MiniLM cross-encoder trained on MS MARCO passage ranking (English)',
        ('crossencoder-base-en',),
    ),
    CrossEncoder(
        'cross-encoder/mmarco-mMiniLMv2-L12-H384-v1',
        'multilingual MiniLM cross-encoder trained on mMARCO (machine-translated MS MARCO)',
        ('crossencoder-base-ml',),
    ),
)


def find_cross_encoder(name: str) -> CrossEncoder | None:
    """The catalog entry of a cross-encoder name or alias, or None (any other id or folder also works)."""
    return next((c for c in CROSS_ENCODERS if name == c.name or name in c.aliases), None)


def find_backbone(name: str) -> Backbone | None:
    """The catalog entry for a name or alias, or None (the trainer also takes other ids)."""
    for backbone in BACKBONES:
        if name == backbone.name or name in backbone.aliases:
            return backbone
    return None


# Losses in the trainer's registry order: label losses (pytorch-metric-learning's, and any other
# registered (embeddings, labels) loss; they take a miner), then pair losses.
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
PML_LOSS_NAMES: tuple[str, ...] = tuple(name for name, loss in LOSSES.items() if loss['objective'] == 'label')
PAIR_LOSS_NAMES: tuple[str, ...] = tuple(name for name, loss in LOSSES.items() if loss['objective'] == 'pair')
MINER_NAMES: tuple[str, ...] = MINERS
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def loss_shapes(name: str) -> tuple[str, ...]:
    """The data shapes (labelled, pairs, scored-pairs, text-image) the loss ``name`` trains on."""
    return tuple(LOSSES[name]['shapes'])


def family_info(name: str) -> dict[str, Any]:
    """A model family's metadata: ``kinds`` (content it embeds), ``select_models`` (get_model names)."""
    return dict(FAMILIES[name])


OPTIMIZER_NAMES: tuple[str, ...] = (
    'Adadelta',
    'Adagrad',
    'Adam',
    'AdamW',
    'SparseAdam',
    'Adamax',
    'ASGD',
    'LBFGS',
    'NAdam',
    'RAdam',
    'RMSprop',
    'Rprop',
    'SGD',
)

SCHEDULER_NAMES: tuple[str, ...] = (
    'linear',
    'cosine',
    'cosine_with_restarts',
    'polynomial',
    'constant',
    'constant_with_warmup',
)

EVALUATION_METRICS: tuple[str, ...] = (
    'average_precision',
    'dcg_at_k',
    'f1_score_at_k',
    'hit_at_k',
    'ndcg_at_k',
    'precision_at_k',
    'r_precision',
    'recall_at_k',
    'reciprocal_rank',
)
