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
    Backbone('efficientnet_b0', 'image-to-image', 1280, 'CNN', 'Pretrained on ImageNet', 'timm', 'efficientnet_b0'),
    # Finetuner's names: efficientnet-base is EfficientNet-B4, efficientnet-large EfficientNet-B7.
    Backbone(
        'efficientnet_b4',
        'image-to-image',
        1792,
        'CNN',
        'Pretrained on ImageNet',
        'timm',
        'efficientnet_b4',
        ('efficientnet-base',),
    ),
    Backbone(
        'efficientnet_b7',
        'image-to-image',
        2560,
        'CNN',
        'Pretrained on ImageNet (large)',
        'timm',
        'efficientnet_b7',
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


# --- model options (fit(model_options=...), build_model(model_options=...)) --------------------------


@dataclass(frozen=True)
class ModelOption:
    """One option a model family takes in ``model_options``; the trainer refuses the others."""

    name: str
    type: type
    default: Any
    description: str
    choices: tuple[str, ...] = ()


_PRETRAINED = ModelOption(
    'pretrained', bool, True, 'Start from the pretrained weights (False: random weights of the same architecture).'
)
MODEL_OPTIONS: dict[str, tuple[ModelOption, ...]] = {
    'timm': (
        _PRETRAINED,
        ModelOption('pooler', str, 'mean', 'Pooling of the feature map.', ('mean', 'max', 'gem')),
        ModelOption('pooler_options', dict, None, 'GeM pooling: {"p": 3.0, "eps": 1e-6} (p learned when trained).'),
        ModelOption('image_size', int, None, "Side of the square input image (default: the model's own)."),
        ModelOption(
            'batch_norm',
            str,
            'frozen',
            'BatchNorm while training: frozen (pretrained running statistics kept, affine weights trained) '
            'or train (statistics updated from every batch).',
            ('frozen', 'train'),
        ),
    ),
    'text': (
        _PRETRAINED,
        ModelOption('pooler', str, 'mean', 'Pooling of the token embeddings.', ('mean', 'cls', 'gem')),
        ModelOption('pooler_options', dict, None, 'GeM pooling: {"p": 3.0, "eps": 1e-6} (p learned when trained).'),
        ModelOption('max_length', int, None, "Tokens per text (default: the folder's, else 256, within the model's)."),
    ),
    'clip': (
        _PRETRAINED,
        ModelOption('max_length', int, None, "Tokens per text (default: the text tower's maximum, 77 for OpenAI's)."),
    ),
}


def model_options_of(family: str) -> tuple[ModelOption, ...]:
    return MODEL_OPTIONS.get(family, ())


# --- model names --------------------------------------------------------------------------------

# Family prefixes a model name may start with ('timm:resnet18'), and URI schemes the trainer reads.
MODEL_PREFIXES: tuple[str, ...] = ('timm:', 's3://', 'file://')


def catalog_names() -> list[str]:
    return [name for b in BACKBONES for name in (b.name, *b.aliases)]


def close_backbones(name: str) -> list[str]:
    """Catalog names and aliases that ``name`` is a likely misspelling of, closest first."""
    import difflib

    names = catalog_names()
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.8)
    return [lowered[n] for n in close]


def misspelt_backbone(name: str) -> tuple[str, ...] | None:
    """The close catalog names when ``name`` can only be a misspelt catalog name, else None.

    A name outside the catalog is taken as a Hugging Face model id (or a folder). Ids of the hub's top
    level (``bert-base-uncased``, ``gpt2``, ``roberta-base``) are lower case with hyphens; any other id
    has an organisation (``org/name``). So a bare name with an underscore or a capital letter
    (``efficentnet_b0``, ``ResNet50``) is no hub id: it is refused, with the closest catalog names."""
    if find_backbone(name) is not None or not is_bare_name(name):
        return None
    if '_' not in name and name == name.lower():
        return None
    return tuple(close_backbones(name))


def is_bare_name(name: str) -> bool:
    """A name without a family prefix, URI scheme, organisation or path: a catalog name or a top-level hub id."""
    return not (name.startswith((*MODEL_PREFIXES, '.', '~')) or '/' in name or '\\' in name or ':' in name)
