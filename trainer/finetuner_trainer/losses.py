"""Losses and miners by name, each registered once with the data shapes it trains on.

Every loss is wrapped as an *objective* with one of two call forms:

- ``LabelObjective(embeddings, labels)``: pytorch-metric-learning losses (with an optional miner);
  they train on labelled items, and on query-document pairs taken as classes of two;
- ``PairObjective(queries, documents, scores)``: CLIPLoss, MultipleNegativesRankingLoss,
  CosineSimilarityLoss, MarginMSELoss; on (query, document, negative_1, ..., negative_n) tuples also
  ``negatives`` (batch x n x dim): the explicit negatives of MultipleNegativesRankingLoss and the
  per-query margins of MarginMSELoss.

A label loss trains on tuples too (:data:`TUPLE_PML_LOSSES`): the tuple's own (query, document,
negative) triplets are handed to it as pytorch-metric-learning's ``indices_tuple`` (see
:func:`tuple_triplets`), so TripletMarginLoss trains on exactly the given triplets.

A pytorch-metric-learning loss is one entry of :data:`PML_LOSSES`; a loss of this project is a
class decorated with :func:`register_loss` (a :class:`PairObjective`, or a label loss). :data:`LOSSES` is the registry
the trainer builds from; the SDK's catalog and the CRD's enums are generated from it
(``python -m finetuner.api.crdgen`` writes ``sdk/finetuner/registered.py``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from finetuner_trainer.data import Shape
from finetuner_trainer.embedder import Embedder
from finetuner_trainer.errors import ConfigError

SHAPE_WORDS = {
    Shape.LABELLED: 'labelled items',
    Shape.PAIRS: 'query-document pairs',
    Shape.SCORED_PAIRS: 'pairs with a score',
    Shape.TEXT_IMAGE: 'text-image pairs',
    Shape.TUPLES: 'tuples with negatives (query, document, negative...)',
    Shape.SCORED_TUPLES: 'tuples with a score per document',
}


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: what it trains on and how it is built."""

    name: str
    shapes: tuple[Shape, ...]  # the data shapes it trains on
    objective: Literal['label', 'pair']  # LabelObjective (takes a miner) or PairObjective
    resolve: Callable[[], Any]  # -> the loss class (pytorch-metric-learning's are imported when needed)
    classifies: bool = False  # one weight vector per class: one item per class is enough, unseen classes unscored
    defaults: dict[str, Any] = field(default_factory=dict)  # required arguments, with this project's values
    families: tuple[str, ...] = ()  # the model families it trains (empty: any)
    from_model: Callable[[Embedder], dict[str, Any]] | None = None  # arguments it takes from the model


LOSSES: dict[str, LossEntry] = {}
LABEL_SHAPES = (Shape.LABELLED, Shape.PAIRS)  # what a label loss trains on (a pair is a class of two)
MINERS: tuple[str, ...] = (
    'AngularMiner',
    'BatchEasyHardMiner',
    'BatchHardMiner',
    'DistanceWeightedMiner',
    'HDCMiner',
    'MultiSimilarityMiner',
    'PairMarginMiner',
    'TripletMarginMiner',
    'UniformHistogramMiner',
)


def _add(entry: LossEntry) -> None:
    if entry.name in LOSSES and LOSSES[entry.name] != entry:
        raise ValueError(f'loss {entry.name!r} is already registered')
    LOSSES[entry.name] = entry


def _pml(module: str, name: str) -> Callable[[], Any]:
    # heavy: pytorch-metric-learning is imported only when one of its losses or miners is built
    return lambda: getattr(importlib.import_module(f'pytorch_metric_learning.{module}'), name)


# Every loss of pytorch-metric-learning 2.x that trains from (embeddings, labels) (ManifoldLoss
# refuses labels, so it is not here), with what sets it apart: ``classifies`` (class weights),
# ``defaults`` (arguments it requires, with the values this project picks; the user may override).
PML_LOSSES: dict[str, dict[str, Any]] = {
    'AngularLoss': {},
    'ArcFaceLoss': {'classifies': True},
    'CircleLoss': {},
    'ContrastiveLoss': {},
    'CosFaceLoss': {'classifies': True},
    'DynamicSoftMarginLoss': {},
    'FastAPLoss': {},
    'GeneralizedLiftedStructureLoss': {},
    'HistogramLoss': {'defaults': {'n_bins': 100}},
    'InstanceLoss': {},
    'IntraPairVarianceLoss': {},
    'LargeMarginSoftmaxLoss': {'classifies': True},
    'LiftedStructureLoss': {},
    'MarginLoss': {},
    'MultiSimilarityLoss': {},
    'NCALoss': {},
    'NPairsLoss': {},
    'NTXentLoss': {},
    'NormalizedSoftmaxLoss': {'classifies': True},
    'P2SGradLoss': {'classifies': True},
    'PNPLoss': {},
    'ProxyAnchorLoss': {'classifies': True},
    'ProxyNCALoss': {'classifies': True},
    'RankedListLoss': {'defaults': {'margin': 0.4, 'Tn': 1.0}},
    'SignalToNoiseRatioContrastiveLoss': {},
    'SmoothAPLoss': {},
    'SoftTripleLoss': {'classifies': True},
    'SphereFaceLoss': {'classifies': True},
    'SubCenterArcFaceLoss': {'classifies': True},
    'SupConLoss': {},
    'ThresholdConsistentMarginLoss': {},
    'TripletMarginLoss': {},
    'TupletMarginLoss': {},
}
# Label losses that also train on the given (query, document, negative) triplets of tuple data.
TUPLE_PML_LOSSES = (
    'CircleLoss',
    'ContrastiveLoss',
    'MarginLoss',
    'MultiSimilarityLoss',
    'NTXentLoss',
    'TripletMarginLoss',
)
for _name, _traits in PML_LOSSES.items():
    _shapes = (*LABEL_SHAPES, Shape.TUPLES) if _name in TUPLE_PML_LOSSES else LABEL_SHAPES
    _add(LossEntry(_name, _shapes, 'label', _pml('losses', _name), **_traits))

LossT = TypeVar('LossT', bound=type[nn.Module])


def register_loss(
    *shapes: Shape,
    families: tuple[str, ...] = (),
    from_model: Callable[[Embedder], dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    classifies: bool = False,
) -> Callable[[LossT], LossT]:
    """Class decorator: the loss a spec names by the class's name, training on data of ``shapes``.

    A :class:`PairObjective` subclass is called ``(queries, documents, scores)``; any other module is a
    label loss called like pytorch-metric-learning's, ``(embeddings, labels, indices_tuple)`` (it may
    take a miner, and trains on labelled items or on pairs as classes of two)."""
    if not shapes:
        raise TypeError('register_loss needs the data shapes the loss trains on')

    def register(cls: LossT) -> LossT:
        objective: Literal['label', 'pair'] = 'pair' if issubclass(cls, PairObjective) else 'label'
        if objective == 'label' and not set(shapes) <= set(LABEL_SHAPES):
            raise TypeError(f'{cls.__name__} is a label loss: it trains on labelled items or pairs, not {shapes}')
        _add(
            LossEntry(
                cls.__name__,
                tuple(shapes),
                objective,
                lambda: cls,
                classifies,
                dict(defaults or {}),
                families,
                from_model,
            )
        )
        return cls

    return register


def loss_entry(name: str) -> LossEntry:
    entry = LOSSES.get(name)
    if entry is None:
        raise ConfigError('loss', f'unknown loss {name!r}; choose one of {", ".join(LOSSES)}')
    return entry


def loss_registry() -> dict[str, Any]:
    """Name -> constructor of every loss the trainer can build."""
    return {name: entry.resolve() for name, entry in LOSSES.items()}


def miner_registry() -> dict[str, Any]:
    return {name: _pml('miners', name)() for name in MINERS}


def check_loss_fits(loss: str, shape: Shape, miner: str | None) -> None:
    """ConfigError unless ``loss`` trains on data of this shape (and a miner makes sense with it)."""
    entry = loss_entry(loss)
    if shape not in entry.shapes:
        wanted = ' or '.join(SHAPE_WORDS[s] for s in entry.shapes)
        fits = [e.name for e in LOSSES.values() if e.objective == 'pair' and shape in e.shapes]
        if shape == Shape.LABELLED:
            fits = ['TripletMarginLoss', 'ArcFaceLoss', '...']
        raise ConfigError(
            'loss',
            f'{loss} trains on {wanted}, but the data holds {SHAPE_WORDS[shape]}; '
            f'use {", ".join(fits)} or change the data',
        )
    if miner is not None and entry.objective == 'pair':
        raise ConfigError('miner', f'{miner} mines tuples for pytorch-metric-learning losses; {loss} takes no miner')
    if miner is not None and shape in (Shape.TUPLES, Shape.SCORED_TUPLES):
        raise ConfigError(
            'miner', f'the data gives every query its negatives, so there is nothing for {miner} to mine; remove miner'
        )


def _construct(
    name: str, cls: Any, options: dict[str, Any], field: str, defaults: dict[str, Any] | None = None, **given: Any
) -> Any:
    """``cls(**defaults, **options)``, plus the ``given`` arguments its signature takes; a ConfigError
    naming ``field`` when it refuses them."""
    parameters: set[str] = set()
    for klass in getattr(cls, '__mro__', (cls,)):  # CosFaceLoss & co. take (*args, **kwargs)
        try:
            parameters.update(inspect.signature(klass.__init__).parameters)
        except (TypeError, ValueError):
            continue
    kwargs = {**(defaults or {}), **options}
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
    model: Embedder | None = None,
) -> nn.Module:
    """The loss ``name`` ready to call, as a LabelObjective or a PairObjective. ``model``: the run's
    embedder, for losses that start from the model's own values (CLIP's temperature)."""
    entry = loss_entry(name)
    from_model = entry.from_model(model) if entry.from_model is not None and model is not None else {}
    defaults = {**entry.defaults, **from_model}
    cls = entry.resolve()
    options, mini_batch_size = _mini_batch_option(name, cls, options)
    options, matryoshka = _matryoshka_options(options, embedding_size)
    if entry.objective == 'pair':
        objective = _construct(name, cls, options, 'lossOptions', defaults)
        if mini_batch_size is not None:
            objective.mini_batch_size = mini_batch_size
        return MatryoshkaObjective(objective, *matryoshka) if matryoshka else objective
    loss = _construct(
        name,
        entry.resolve(),
        options,
        'lossOptions',
        defaults,
        num_classes=max(num_classes, 1),
        embedding_size=embedding_size,
        descriptors_dim=embedding_size,
        l=embedding_size,  # ManifoldLoss: the embedding size
    )
    mined = None
    if miner is not None:
        if miner not in MINERS:
            raise ConfigError('miner', f'unknown miner {miner!r}; choose one of {", ".join(MINERS)}')
        mined = _construct(miner, _pml('miners', miner)(), miner_options, 'minerOptions')
    objective = LabelObjective(loss, mined)
    objective.mini_batch_size = mini_batch_size
    return MatryoshkaObjective(objective, *matryoshka) if matryoshka else objective


def _matryoshka_options(
    options: dict[str, Any], embedding_size: int
) -> tuple[dict[str, Any], tuple[list[int], list[float]] | None]:
    """``lossOptions.matryoshka_dims`` (and ``matryoshka_weights``) taken out of the loss's own options:
    the prefix lengths the loss is also taken on, and the weight of each."""
    dims = options.get('matryoshka_dims')
    weights = options.get('matryoshka_weights')
    rest = {k: v for k, v in options.items() if k not in ('matryoshka_dims', 'matryoshka_weights')}
    if dims is None:
        if weights is not None:
            raise ConfigError('lossOptions.matryoshka_weights', 'given without matryoshka_dims; set both or neither')
        return options, None
    field_name = 'lossOptions.matryoshka_dims'
    if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ConfigError(
            field_name, f'must be a list of embedding sizes such as [{embedding_size}, 128, 64], got {dims!r}'
        )
    wrong = [d for d in dims if not 1 <= d <= embedding_size]
    if wrong or len(set(dims)) != len(dims):
        problem = f'{wrong[0]} is not between 1 and the embedding size {embedding_size}' if wrong else 'repeats a size'
        raise ConfigError(field_name, f'{problem}; give distinct sizes up to {embedding_size}')
    weights = [1.0] * len(dims) if weights is None else weights
    if (
        not isinstance(weights, list)
        or len(weights) != len(dims)
        or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
    ):
        raise ConfigError(
            'lossOptions.matryoshka_weights',
            f'must be {len(dims)} non-negative numbers (one per dimension), got {weights!r}',
        )
    return rest, (list(dims), [float(w) for w in weights])


def unwrap_objective(loss: nn.Module) -> nn.Module:
    """The LabelObjective or PairObjective inside a DistributedObjective and a MatryoshkaObjective."""
    while hasattr(loss, 'objective'):
        loss = loss.objective
    return loss


def _mini_batch_option(name: str, cls: Any, options: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """``lossOptions.mini_batch_size`` taken out of the loss's own options (the cached losses take it
    themselves): how many examples one forward pass holds. Checked here so every loss refuses a bad one."""
    if 'mini_batch_size' not in options:
        return options, None
    size = options['mini_batch_size']
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            'lossOptions.mini_batch_size', f'must be a whole number of examples, at least 1 (got {size!r})'
        )
    if 'mini_batch_size' in inspect.signature(cls.__init__).parameters:
        return options, None  # a cached loss: the option is its own
    return {k: v for k, v in options.items() if k != 'mini_batch_size'}, size


class LabelObjective(nn.Module):
    """A pytorch-metric-learning loss (and miner) over a batch of labelled embeddings."""

    in_batch_negatives: ClassVar[bool] = False  # GradCache applies (see forward_objective)
    mini_batch_size: int | None = None  # lossOptions.mini_batch_size: gradient accumulation over mini-batches

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: Tensor, labels: Tensor, indices: tuple[Tensor, ...] | None = None) -> Tensor:
        """``indices``: the tuples to train on (tuple data gives them); else the miner's, else all."""
        embeddings = embeddings.float()
        if indices is None and self.miner is not None:
            indices = self.miner(embeddings, labels)
        return self.loss(embeddings, labels, indices)


def tuple_triplets(embedded: list[Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """A batch of tuples as a label loss sees it: (embeddings, labels, (anchors, positives, negatives)).

    ``embedded`` holds the queries, the documents and each negative column (batch x dim each). The
    embeddings are stacked column after column; query i and document i share label i, every negative
    has a label of its own; the triplets are exactly (query i, document i, negative j of tuple i)."""
    size, negatives = len(embedded[0]), len(embedded) - 2
    device = embedded[0].device
    rows = torch.arange(size, device=device)
    labels = torch.cat([rows, rows, size + torch.arange(size * negatives, device=device)])
    anchors = rows.repeat_interleave(negatives)
    negative_positions = 2 * size + torch.arange(negatives, device=device).repeat(size) * size + anchors
    return torch.cat(embedded), labels, (anchors, anchors + size, negative_positions)


class PairObjective(nn.Module):
    """A loss over a batch of (query, document) embeddings, with the pairs' scores when the data has them.

    ``in_batch_negatives``: every pair's loss depends on the whole batch (the other pairs are its
    negatives), so mini-batches (``mini_batch_size``) are embedded apart and the loss is taken over the
    whole batch with GradCache; for the other losses mini-batches accumulate gradients."""

    in_batch_negatives: ClassVar[bool] = False
    mini_batch_size: int | None = None

    def forward(
        self, queries: Tensor, documents: Tensor, scores: Tensor | None = None, negatives: Tensor | None = None
    ) -> Tensor:
        """``negatives``: tuple data's explicit negatives (batch x n x dim), for losses registered for tuples."""
        raise NotImplementedError


class MatryoshkaObjective(nn.Module):
    """Matryoshka representation learning (Kusupati et al., 2022): the objective taken on the first ``d``
    dimensions of the embeddings for every ``d`` of ``dims``, weighted and summed, so that a prefix of the
    embedding is an embedding on its own (``truncate_dim`` when encoding). Wraps any objective; built from
    ``lossOptions.matryoshka_dims`` / ``matryoshka_weights``."""

    def __init__(self, objective: nn.Module, dims: list[int], weights: list[float]):
        super().__init__()
        self.objective = objective
        self.dims = dims
        self.weights = weights

    def forward(self, first: Tensor, second: Tensor, scores: Tensor | None = None) -> Tensor:
        pair = second.is_floating_point() and second.ndim == 2  # (queries, documents[, scores]) or (embeddings, labels)
        total = first.new_zeros((), dtype=torch.float32)
        for dim, weight in zip(self.dims, self.weights, strict=True):
            if pair:
                total = total + weight * self.objective(first[:, :dim], second[:, :dim], scores)
            else:
                total = total + weight * self.objective(first[:, :dim], second)
        return total


def _clip_logit_scale(model: Embedder) -> dict[str, Any]:
    """CLIP's own temperature as the loss's starting value (a model without one keeps log(1/0.07))."""
    scale = getattr(model, 'logit_scale', None)
    return {'logit_scale': float(scale.detach())} if scale is not None else {}


@register_loss(Shape.TEXT_IMAGE, families=('clip',), from_model=_clip_logit_scale)
class CLIPLoss(PairObjective):
    """Symmetric InfoNCE over a batch of (text, image) pairs with a learnable temperature.

    The same objective as ``CLIPModel(return_loss=True)``: cross-entropy of the scaled cosine
    similarity matrix, text->image and image->text, averaged. ``logit_scale`` starts at CLIP's
    own value when the backbone is CLIP, else at log(1/0.07), and is clamped to at most 100.
    """

    in_batch_negatives: ClassVar[bool] = True

    def __init__(self, logit_scale: float = math.log(1 / 0.07), learnable: bool = True):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learnable)

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        text = F.normalize(queries.float(), dim=-1)
        image = F.normalize(documents.float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * text @ image.T
        targets = torch.arange(len(text), device=text.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@register_loss(Shape.PAIRS, Shape.SCORED_PAIRS, Shape.TUPLES)
class MultipleNegativesRankingLoss(PairObjective):
    """In-batch negatives: each query's document is the positive, the others' documents negatives; on
    tuples every tuple's explicit negatives are candidates for every query too (sentence-transformers'
    MultipleNegativesRankingLoss with hard negatives). ``symmetric`` adds document -> query."""

    in_batch_negatives: ClassVar[bool] = True

    def __init__(self, scale: float = 20.0, symmetric: bool = False):
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric

    def forward(
        self, queries: Tensor, documents: Tensor, scores: Tensor | None = None, negatives: Tensor | None = None
    ) -> Tensor:
        candidates = documents.float()
        if negatives is not None:
            candidates = torch.cat([candidates, negatives.float().reshape(-1, negatives.shape[-1])])
        logits = self.scale * F.normalize(queries.float(), dim=-1) @ F.normalize(candidates, dim=-1).T
        targets = torch.arange(len(queries), device=queries.device)
        loss = F.cross_entropy(logits, targets)
        return (loss + F.cross_entropy(logits[:, : len(queries)].T, targets)) / 2 if self.symmetric else loss


@register_loss(Shape.SCORED_PAIRS)
class CosineSimilarityLoss(PairObjective):
    """Mean squared error between cos(query, document) and the pair's score."""

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        assert scores is not None
        similarity = F.cosine_similarity(queries.float(), documents.float(), dim=-1)
        return F.mse_loss(similarity, scores.float())


@register_loss(Shape.SCORED_PAIRS, Shape.SCORED_TUPLES)
class MarginMSELoss(PairObjective):
    """Margin distillation (Hofstätter et al.). On scored tuples (query, document_1, ..., document_n,
    a score each, e.g. a cross-encoder's): sim(q, d_1) - sim(q, d_j) should equal s_1 - s_j for every
    other document of the same query, as sentence-transformers' MarginMSELoss with several negatives.
    On scored pairs: across the pairs of a batch, the difference of two pairs' similarities should
    equal the difference of their scores (in-batch)."""

    def __init__(self, similarity: str = 'dot'):
        super().__init__()
        if similarity not in ('dot', 'cosine'):
            raise ValueError(f'similarity must be dot or cosine, not {similarity!r}')
        self.similarity = similarity

    def forward(
        self, queries: Tensor, documents: Tensor, scores: Tensor | None = None, negatives: Tensor | None = None
    ) -> Tensor:
        assert scores is not None
        q, d = queries.float(), documents.float()
        others = negatives.float() if negatives is not None else None
        if self.similarity == 'cosine':
            q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
            others = F.normalize(others, dim=-1) if others is not None else None
        if others is not None:
            first = (q * d).sum(-1, keepdim=True)
            predicted_margins = first - (q.unsqueeze(1) * others).sum(-1)
            target_margins = scores.float()[:, :1] - scores.float()[:, 1:]
            return F.mse_loss(predicted_margins, target_margins)
        predicted = (q * d).sum(-1)
        predicted_margins = predicted.unsqueeze(1) - predicted.unsqueeze(0)
        target_margins = scores.float().unsqueeze(1) - scores.float().unsqueeze(0)
        return F.mse_loss(predicted_margins, target_margins)


@register_loss(Shape.PAIRS, Shape.SCORED_PAIRS)
class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss with GradCache (Gao et al., 2021; sentence-transformers' name): the
    batch is embedded in mini-batches of ``mini_batch_size`` and the loss taken over the whole batch, so
    a batch of 256 pairs has 255 negatives per query while memory holds the activations of one mini-batch.
    The same loss value and gradients as the uncached loss on the same batch."""

    def __init__(self, scale: float = 20.0, symmetric: bool = False, mini_batch_size: int = 32):
        super().__init__(scale, symmetric)
        self.mini_batch_size = mini_batch_size


@register_loss(Shape.TEXT_IMAGE, families=('clip',), from_model=_clip_logit_scale)
class CachedCLIPLoss(CLIPLoss):
    """CLIPLoss with GradCache: the text and image towers embed mini-batches of ``mini_batch_size``, the
    symmetric InfoNCE is taken over the whole batch. The same loss value and gradients as CLIPLoss."""

    def __init__(self, logit_scale: float = math.log(1 / 0.07), learnable: bool = True, mini_batch_size: int = 32):
        super().__init__(logit_scale, learnable)
        self.mini_batch_size = mini_batch_size


# ---------------------------------------------------------------------------------------------
# The forward pass of a batch through model and objective: whole, cached (GradCache) or accumulated
# ---------------------------------------------------------------------------------------------

Group = dict[str, Any] | list[dict[str, Any]]  # a collated batch, or its mini-batches (Collator)


def mini_batch_size(loss: nn.Module) -> int | None:
    """The objective's ``mini_batch_size`` (looking through its wrappers), None for whole batches."""
    return getattr(unwrap_objective(loss), 'mini_batch_size', None)


def embed_group(model: nn.Module, group: Group) -> Tensor:
    """Embeddings of one group of a batch (its queries, or its documents), mini-batch by mini-batch."""
    if isinstance(group, list):
        return torch.cat([model(chunk) for chunk in group])
    return model(group)


def score_tensor(examples: list[Any], shape: Shape) -> Tensor | None:
    """The scores a scored shape's objective takes: one per scored pair, one per document of a scored
    tuple; None for the other shapes."""
    if shape == Shape.SCORED_PAIRS:
        return torch.tensor([e.score for e in examples], dtype=torch.float32)
    if shape == Shape.SCORED_TUPLES:
        return torch.tensor([e.scores for e in examples], dtype=torch.float32)
    return None


def call_objective(
    loss: nn.Module, embeddings: list[Tensor], batch: dict[str, Any], rows: slice | None = None
) -> Tensor:
    """The objective on the embeddings of a batch's groups (``rows``: the part of the batch they are)."""
    rows = rows or slice(None)
    if isinstance(unwrap_objective(loss), LabelObjective):
        if len(embeddings) == 1:
            return loss(embeddings[0], batch['labels'][rows])
        return loss(*tuple_triplets(embeddings))  # tuples: their own triplets
    scores = batch.get('scores')
    scores = scores[rows] if scores is not None else None
    queries, documents, *negatives = embeddings
    if negatives:  # tuples: (batch, n, dim) explicit negatives
        return loss(queries, documents, scores, torch.stack(negatives, dim=1))
    return loss(queries, documents, scores)


def forward_objective(model: nn.Module, loss: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The batch through ``model`` and the objective ``loss``; its loss value.

    With a ``mini_batch_size`` and gradients on, the gradients are computed here, mini-batch by mini-batch
    (the returned value is then a leaf whose ``backward()`` adds nothing): GradCache for the in-batch-negative
    losses (the loss and gradients of the whole batch), gradient accumulation for the others (the mean of
    the mini-batches' losses and of their gradients)."""
    groups = batch['groups']
    if mini_batch_size(loss) is None or not torch.is_grad_enabled() or not isinstance(groups[0], list):
        return call_objective(loss, [embed_group(model, group) for group in groups], batch)
    if unwrap_objective(loss).in_batch_negatives:
        return _grad_cache(model, loss, batch)
    return _accumulate(model, loss, batch)


class _RandomState:
    """The RNG state before a mini-batch's first forward pass, restored for its second one (dropout masks
    are then the same, so the gradients are those of the first pass)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _grad_cache(model: nn.Module, loss: nn.Module, batch: dict[str, Any]) -> Tensor:
    """GradCache: embed every mini-batch without a graph, take the loss over the whole batch and its
    gradient for every embedding, then run each mini-batch again with a graph and back-propagate its share
    of those gradients. Peak memory: one mini-batch's activations plus the batch's embeddings."""
    device = _device(model)
    chunks = [(g, chunk) for g, group in enumerate(batch['groups']) for chunk in group]
    states = []
    cached: list[list[Tensor]] = [[] for _ in batch['groups']]
    with torch.no_grad():
        for g, chunk in chunks:
            states.append(_RandomState(device))
            cached[g].append(model(chunk))
    leaves = [torch.cat(parts).detach().requires_grad_() for parts in cached]
    value = call_objective(loss, leaves, batch)
    value.backward()  # gradients of the embeddings (and of the loss's own parameters, CLIP's temperature)
    offsets = [0] * len(leaves)
    for position, ((g, chunk), state) in enumerate(zip(chunks, states, strict=True)):
        state.restore()
        with _no_sync(model, last=position == len(chunks) - 1):
            embeddings = model(chunk)
            grad = leaves[g].grad[offsets[g] : offsets[g] + len(embeddings)]  # type: ignore[index]
            torch.autograd.backward(embeddings, grad.to(embeddings.dtype))
        offsets[g] += len(embeddings)
    return value.detach().requires_grad_()


def _accumulate(model: nn.Module, loss: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Gradient accumulation: each mini-batch's loss on its own, back-propagated weighted by its share of
    the batch; the weighted mean of the losses."""
    groups = batch['groups']
    size = sum(_rows(chunk) for chunk in groups[0])
    total = torch.zeros((), device=_device(model))
    start = 0
    for position, chunks in enumerate(zip(*groups, strict=True)):
        rows = slice(start, start + _rows(chunks[0]))
        with _no_sync(model, last=position == len(groups[0]) - 1):
            value = call_objective(loss, [model(chunk) for chunk in chunks], batch, rows)
            (value * (rows.stop - rows.start) / size).backward()
        total += value.detach() * (rows.stop - rows.start) / size
        start = rows.stop
    return total.requires_grad_()


def _rows(chunk: dict[str, Any]) -> int:
    return int(chunk['size'])


def _no_sync(model: nn.Module, last: bool) -> Any:
    """Under DDP, gradients are reduced once, on the last mini-batch's backward pass."""
    import contextlib

    no_sync = getattr(model, 'no_sync', None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()
