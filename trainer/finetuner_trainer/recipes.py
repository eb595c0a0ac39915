"""Default recipes: what a run trains with when its spec leaves the loss, miner, learning rate or schedule
empty, chosen per data shape (and, for labelled images, per modality: :data:`IMAGE_RECIPES`).

The values were chosen on the ``dev`` splits of the held-out tasks in ``bench/tasks.py`` (never on the
splits the published table reports) so that the fine-tuned model is not worse than the pretrained one on
classes it never trained on and scores at least as high as sentence-transformers' own trainer with its
usual loss for the shape (docs/RECIPES.md has the measurements). A field the spec sets is never changed:
a recipe only fills what is empty.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from finetuner.api.v1alpha1 import CallbackSpec, FinetuneRunSpec
from finetuner_trainer.data import Shape


@dataclass(frozen=True)
class Recipe:
    """The defaults of one data shape."""

    loss: str
    loss_options: dict[str, Any] = field(default_factory=dict)  # only with the recipe's own loss
    miner: str | None = None  # only with the recipe's own loss
    scheduler: str | None = None  # when the spec names none
    warmup_ratio: float = 0.0  # warm-up steps as a share of all steps, when the spec gives none
    learning_rate_scale: float = 1.0  # times the backbone's default learning rate, when the spec gives none
    callbacks: tuple[CallbackSpec, ...] = ()  # only with the recipe's own loss, and when the spec names none


RECIPES: dict[Shape, Recipe] = {
    # Labelled items: a supervised contrastive loss over class-balanced batches (every item's same-class
    # items are its positives, every other item of the batch a negative), linear decay after a warm-up.
    # Temperature 0.2, 5x the backbone's default learning rate (1e-4 for all-MiniLM-L6-v2) and the weights
    # averaged with the pretrained ones at the end (WiSE-FT, alpha 0.5). On the tuning splits (docs/RECIPES.md)
    # a low rate kept classes never trained on above the pretrained model but trailed sentence-transformers
    # on classes trained on (topics); a high rate led there but fell below the pretrained model on the unseen
    # classes of dev-2; the high rate averaged with the pretrained weights scored above both on both.
    Shape.LABELLED: Recipe(
        loss='SupConLoss',
        loss_options={'temperature': 0.2},
        scheduler='linear',
        warmup_ratio=0.1,
        learning_rate_scale=5.0,
        callbacks=(CallbackSpec(name='WiSEFTCallback', options={'alpha': 0.5}),),
    ),
    # Query-document pairs: in-batch negatives, as sentence-transformers does.
    Shape.PAIRS: Recipe(
        loss='MultipleNegativesRankingLoss', scheduler='linear', warmup_ratio=0.1, learning_rate_scale=1.0
    ),
    Shape.SCORED_PAIRS: Recipe(loss='CosineSimilarityLoss', scheduler='linear', warmup_ratio=0.1),
    Shape.TEXT_IMAGE: Recipe(loss='CLIPLoss', scheduler='linear', warmup_ratio=0.1),
    # (query, document, negatives...): the given negatives beside the in-batch ones, as sentence-transformers'
    # MultipleNegativesRankingLoss takes them; scored tuples (a cross-encoder's scores): margin distillation.
    Shape.TUPLES: Recipe(loss='MultipleNegativesRankingLoss', scheduler='linear', warmup_ratio=0.1),
    Shape.SCORED_TUPLES: Recipe(loss='MarginMSELoss', scheduler='linear', warmup_ratio=0.1),
}

# Recipes of shapes whose items are images, where they differ from RECIPES. Labelled images: the same loss (at
# temperature 0.1, no weight averaging) and schedule at 0.3x the backbone's default learning rate (3e-5 for
# efficientnet_lite0), with the pretrained BatchNorm statistics kept (timm models' batch_norm: frozen). On
# digits-unseen (dev) the backbone's default rate with BatchNorm trained fell from the pretrained 0.88 nDCG@10
# to 0.73 on digits never trained on, whatever the rate (1e-5 and 3e-6 as well); frozen BatchNorm at 3e-5
# reached 0.91.
IMAGE_RECIPES: dict[Shape, Recipe] = {
    Shape.LABELLED: replace(
        RECIPES[Shape.LABELLED], loss_options={'temperature': 0.1}, learning_rate_scale=0.3, callbacks=()
    )
}
IMAGE_KINDS = frozenset({'image', 'tensor'})


def recipe_for(shape: Shape, kinds: Iterable[str] = ('text',)) -> Recipe:
    """The recipe of ``shape`` for data whose items are of ``kinds`` (``Dataset.kinds``): the image recipe
    when every item is an image (or pixel tensor) and there is one for the shape."""
    kinds = set(kinds)
    if kinds and kinds <= IMAGE_KINDS and shape in IMAGE_RECIPES:
        return IMAGE_RECIPES[shape]
    return RECIPES[shape]


def apply_recipe(
    spec: FinetuneRunSpec, shape: Shape, log: logging.Logger, kinds: Iterable[str] = ('text',)
) -> tuple[FinetuneRunSpec, float]:
    """The spec with its empty loss (and, with the recipe's loss, its empty miner, loss options and callbacks) and its
    empty schedule filled from the recipe of ``shape`` and ``kinds``; and the warm-up share of the steps still
    to turn into ``schedulerOptions.numWarmupSteps`` once the number of steps is known (0 when the spec gives
    them)."""
    recipe = recipe_for(shape, kinds)
    update: dict[str, Any] = {}
    if spec.loss is None:
        update['loss'] = recipe.loss
        if not spec.loss_options:
            update['loss_options'] = dict(recipe.loss_options)
        if spec.miner is None and recipe.miner is not None:
            update['miner'] = recipe.miner
        if not spec.callbacks and recipe.callbacks:
            update['callbacks'] = list(recipe.callbacks)
    warmup = 0.0
    if spec.scheduler is None and recipe.scheduler is not None:
        update['scheduler'] = recipe.scheduler
        if spec.scheduler_options.num_warmup_steps == 0:
            warmup = recipe.warmup_ratio
    if update:
        log.info('recipe for %s: %s', shape.value, ', '.join(f'{k} {v}' for k, v in update.items()))
    return (spec.model_copy(update=update) if update else spec), warmup


def default_learning_rate(shape: Shape, backbone_default: float, kinds: Iterable[str] = ('text',)) -> float:
    """The learning rate when the spec gives none: the backbone's default times the recipe's scale."""
    return backbone_default * recipe_for(shape, kinds).learning_rate_scale


def warmup_steps(ratio: float, total: int) -> int:
    """Warm-up steps for a share of ``total`` steps (at least one when the share is not zero)."""
    return min(max(1, math.ceil(ratio * total)), max(total - 1, 0)) if ratio > 0 and total > 1 else 0
