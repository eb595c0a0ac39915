"""Losses and miners by name, and which data shape each loss trains on.

Every loss is wrapped as an *objective* with one of two call forms:

- ``LabelObjective(embeddings, labels)``: pytorch-metric-learning losses (with an optional miner);
- ``PairObjective(queries, documents, scores)``: CLIPLoss, MultipleNegativesRankingLoss,
  CosineSimilarityLoss, MarginMSELoss.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from finetuner.catalog import MINER_NAMES, PAIR_LOSS_NAMES, PML_LOSS_NAMES
from finetuner_trainer.data import Shape
from finetuner_trainer.errors import ConfigError

# Losses holding one weight vector per class: they need the class count and embedding size.
CLASS_PROXY_LOSSES = frozenset(
    {
        'ArcFaceLoss',
        'CosFaceLoss',
        'LargeMarginSoftmaxLoss',
        'NormalizedSoftmaxLoss',
        'ProxyAnchorLoss',
        'ProxyNCALoss',
        'SoftTripleLoss',
        'SphereFaceLoss',
        'SubCenterArcFaceLoss',
    }
)
# Losses that classify rather than compare items: one item per class is enough for them.
SINGLE_ITEM_OK = CLASS_PROXY_LOSSES | {'P2SGradLoss'}
# Arguments some losses require, with the defaults this project picks (the user may override).
REQUIRED_DEFAULTS: dict[str, dict[str, Any]] = {
    'RankedListLoss': {'margin': 0.4, 'Tn': 1.0},
    'HistogramLoss': {'n_bins': 100},
}

LOSS_SHAPES: dict[str, tuple[Shape, ...]] = {
    **{name: (Shape.LABELLED, Shape.PAIRS) for name in PML_LOSS_NAMES},
    'CLIPLoss': (Shape.TEXT_IMAGE,),
    'MultipleNegativesRankingLoss': (Shape.PAIRS, Shape.SCORED_PAIRS),
    'CosineSimilarityLoss': (Shape.SCORED_PAIRS,),
    'MarginMSELoss': (Shape.SCORED_PAIRS,),
}
SHAPE_WORDS = {
    Shape.LABELLED: 'labelled items',
    Shape.PAIRS: 'query-document pairs',
    Shape.SCORED_PAIRS: 'pairs with a score',
    Shape.TEXT_IMAGE: 'text-image pairs',
}


def loss_registry() -> dict[str, Any]:
    """Name -> constructor of every loss the trainer can build."""
    from pytorch_metric_learning import losses

    registry: dict[str, Any] = {name: getattr(losses, name) for name in PML_LOSS_NAMES}
    registry.update(
        {
            'CLIPLoss': CLIPLoss,
            'MultipleNegativesRankingLoss': MultipleNegativesRankingLoss,
            'CosineSimilarityLoss': CosineSimilarityLoss,
            'MarginMSELoss': MarginMSELoss,
        }
    )
    return registry


def miner_registry() -> dict[str, Any]:
    from pytorch_metric_learning import miners

    return {name: getattr(miners, name) for name in MINER_NAMES}


def check_loss_fits(loss: str, shape: Shape, miner: str | None) -> None:
    """ConfigError unless ``loss`` trains on data of this shape (and a miner makes sense with it)."""
    allowed = LOSS_SHAPES[loss]
    if shape not in allowed:
        wanted = ' or '.join(SHAPE_WORDS[s] for s in allowed)
        fits = [name for name in PAIR_LOSS_NAMES if shape in LOSS_SHAPES[name]]
        if shape == Shape.LABELLED:
            fits = ['TripletMarginLoss', 'ArcFaceLoss', '...']
        raise ConfigError(
            'loss',
            f'{loss} trains on {wanted}, but the data holds {SHAPE_WORDS[shape]}; '
            f'use {", ".join(fits)} or change the data',
        )
    if miner is not None and loss in PAIR_LOSS_NAMES:
        raise ConfigError('miner', f'{miner} mines tuples for pytorch-metric-learning losses; {loss} takes no miner')


def _construct(name: str, cls: Any, options: dict[str, Any], field: str, **given: Any) -> Any:
    parameters: set[str] = set()
    for klass in getattr(cls, '__mro__', (cls,)):  # CosFaceLoss & co. take (*args, **kwargs)
        try:
            parameters.update(inspect.signature(klass.__init__).parameters)
        except (TypeError, ValueError):
            continue
    kwargs = {**REQUIRED_DEFAULTS.get(name, {}), **options}
    for key, value in given.items():
        if key in parameters and key not in kwargs:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(field, f'{name} does not accept {options}: {e}') from e


def build_objective(
    name: str,
    options: dict[str, Any],
    miner: str | None,
    miner_options: dict[str, Any],
    embedding_size: int,
    num_classes: int,
    logit_scale: float | None = None,
) -> nn.Module:
    """The loss ``name`` ready to call, as a LabelObjective or a PairObjective."""
    registry = loss_registry()
    if name not in registry:
        raise ConfigError('loss', f'unknown loss {name!r}')
    if name in PAIR_LOSS_NAMES:
        extra = {'logit_scale': logit_scale} if name == 'CLIPLoss' and logit_scale is not None else {}
        return _construct(name, registry[name], {**extra, **options}, 'lossOptions')
    loss = _construct(
        name,
        registry[name],
        options,
        'lossOptions',
        num_classes=max(num_classes, 1),
        embedding_size=embedding_size,
        descriptors_dim=embedding_size,
        l=embedding_size,  # ManifoldLoss: the embedding size
    )
    mined = None
    if miner is not None:
        miners = miner_registry()
        mined = _construct(miner, miners[miner], miner_options, 'minerOptions')
    return LabelObjective(loss, mined)


class LabelObjective(nn.Module):
    """A pytorch-metric-learning loss (and miner) over a batch of labelled embeddings."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings = embeddings.float()
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)


class PairObjective(nn.Module):
    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class CLIPLoss(PairObjective):
    """Symmetric InfoNCE over a batch of (text, image) pairs with a learnable temperature.

    The same objective as ``CLIPModel(return_loss=True)``: cross-entropy of the scaled cosine
    similarity matrix, text->image and image->text, averaged. ``logit_scale`` starts at CLIP's
    own value when the backbone is CLIP, else at log(1/0.07), and is clamped to at most 100.
    """

    def __init__(self, logit_scale: float = math.log(1 / 0.07), learnable: bool = True):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learnable)

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        text = F.normalize(queries.float(), dim=-1)
        image = F.normalize(documents.float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * text @ image.T
        targets = torch.arange(len(text), device=text.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class MultipleNegativesRankingLoss(PairObjective):
    """In-batch negatives: each query's document is the positive, the others' documents negatives."""

    def __init__(self, scale: float = 20.0, symmetric: bool = False):
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        logits = self.scale * F.normalize(queries.float(), dim=-1) @ F.normalize(documents.float(), dim=-1).T
        targets = torch.arange(len(queries), device=queries.device)
        loss = F.cross_entropy(logits, targets)
        return (loss + F.cross_entropy(logits.T, targets)) / 2 if self.symmetric else loss


class CosineSimilarityLoss(PairObjective):
    """Mean squared error between cos(query, document) and the pair's score."""

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        assert scores is not None
        similarity = F.cosine_similarity(queries.float(), documents.float(), dim=-1)
        return F.mse_loss(similarity, scores.float())


class MarginMSELoss(PairObjective):
    """MarginMSE across the pairs of a batch: the difference of two pairs' similarities should
    equal the difference of their scores (Hofstätter et al.'s margin distillation, in-batch)."""

    def __init__(self, similarity: str = 'dot'):
        super().__init__()
        if similarity not in ('dot', 'cosine'):
            raise ValueError(f'similarity must be dot or cosine, not {similarity!r}')
        self.similarity = similarity

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        assert scores is not None
        q, d = queries.float(), documents.float()
        if self.similarity == 'cosine':
            q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        predicted = (q * d).sum(-1)
        predicted_margins = predicted.unsqueeze(1) - predicted.unsqueeze(0)
        target_margins = scores.float().unsqueeze(1) - scores.float().unsqueeze(0)
        return F.mse_loss(predicted_margins, target_margins)
