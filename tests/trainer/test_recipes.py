"""Default recipes: a spec that leaves the loss, miner, schedule or learning rate empty gets the recipe of
its data's shape; whatever the spec sets stays as it is."""

from __future__ import annotations

import logging

import pytest

from finetuner.api.v1alpha1 import FinetuneRunSpec, SchedulerOptions
from finetuner_trainer.data import Shape
from finetuner_trainer.losses import check_loss_fits
from finetuner_trainer.recipes import (
    IMAGE_RECIPES,
    RECIPES,
    apply_recipe,
    default_learning_rate,
    recipe_for,
    warmup_steps,
)

LOG = logging.getLogger('test-recipes')


def spec(**fields: object) -> FinetuneRunSpec:
    return FinetuneRunSpec.model_validate({'model': 'x', 'trainData': 'file:///data.jsonl', **fields})


@pytest.mark.parametrize('shape', list(Shape))
def test_every_shape_has_a_recipe_whose_loss_trains_that_shape(shape: Shape) -> None:
    recipe = RECIPES[shape]
    check_loss_fits(recipe.loss, shape, recipe.miner)  # raises ConfigError when the loss does not fit
    filled, _ = apply_recipe(spec(), shape, LOG)
    assert filled.loss == recipe.loss and filled.miner == recipe.miner


def test_an_empty_spec_gets_the_labelled_recipe(caplog: pytest.LogCaptureFixture) -> None:
    recipe = RECIPES[Shape.LABELLED]
    with caplog.at_level(logging.INFO, logger='test-recipes'):
        filled, warmup = apply_recipe(spec(), Shape.LABELLED, LOG)
    assert filled.loss == recipe.loss
    assert filled.loss_options == recipe.loss_options
    assert filled.scheduler == recipe.scheduler
    assert warmup == recipe.warmup_ratio
    assert f'recipe for labelled: loss {recipe.loss}' in caplog.text


def test_what_the_spec_sets_is_kept() -> None:
    given = spec(
        loss='TripletMarginLoss',
        lossOptions={'margin': 0.3},
        scheduler='constant',
        schedulerOptions={'numWarmupSteps': 7},
    )
    filled, warmup = apply_recipe(given, Shape.LABELLED, LOG)
    assert filled == given
    assert warmup == 0.0


def test_options_and_miner_of_the_recipe_only_come_with_its_own_loss() -> None:
    # the user's loss options are never mixed with the recipe's
    filled, _ = apply_recipe(spec(lossOptions={'temperature': 0.5}), Shape.LABELLED, LOG)
    assert filled.loss == RECIPES[Shape.LABELLED].loss and filled.loss_options == {'temperature': 0.5}


def test_a_given_warmup_is_not_replaced_by_the_recipes_share() -> None:
    filled, warmup = apply_recipe(spec(schedulerOptions=SchedulerOptions(num_warmup_steps=3)), Shape.PAIRS, LOG)
    assert filled.scheduler == RECIPES[Shape.PAIRS].scheduler
    assert filled.scheduler_options.num_warmup_steps == 3 and warmup == 0.0


def test_learning_rate_and_warmup_steps() -> None:
    assert default_learning_rate(Shape.PAIRS, 1e-4) == pytest.approx(1e-4 * RECIPES[Shape.PAIRS].learning_rate_scale)
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(0.1, 5) == 1  # at least one step
    assert warmup_steps(0.5, 2) == 1  # never every step
    assert warmup_steps(0.1, 1) == 0 and warmup_steps(0.0, 100) == 0


@pytest.mark.parametrize('kinds', [{'image'}, {'tensor'}, {'image', 'tensor'}])
def test_labelled_images_get_the_image_recipe(kinds: set[str]) -> None:
    assert recipe_for(Shape.LABELLED, kinds) is IMAGE_RECIPES[Shape.LABELLED]
    assert default_learning_rate(Shape.LABELLED, 1e-4, kinds) == pytest.approx(3e-5)


@pytest.mark.parametrize(
    ('shape', 'kinds'),
    [(Shape.LABELLED, {'text'}), (Shape.TEXT_IMAGE, {'text', 'image'}), (Shape.PAIRS, {'image'}), (Shape.PAIRS, set())],
)
def test_other_data_gets_the_shape_recipe(shape: Shape, kinds: set[str]) -> None:
    assert recipe_for(shape, kinds) is RECIPES[shape]


def test_labelled_text_trains_minilm_at_1e_4() -> None:
    # all-MiniLM-L6-v2's catalog default is 2e-5; the labelled recipe's scale makes it 1e-4
    assert default_learning_rate(Shape.LABELLED, 2e-5, {'text'}) == pytest.approx(1e-4)


def test_recipe_callbacks_come_with_its_loss_and_only_when_the_spec_names_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    from finetuner.api.v1alpha1 import CallbackSpec

    wise = CallbackSpec(name='WiSEFTCallback', options={'alpha': 0.5})
    monkeypatch.setitem(RECIPES, Shape.PAIRS, replace(RECIPES[Shape.PAIRS], callbacks=(wise,)))
    filled, _ = apply_recipe(spec(), Shape.PAIRS, LOG)
    assert filled.callbacks == [wise]
    own = spec(callbacks=[{'name': 'EarlyStopping'}])
    assert apply_recipe(own, Shape.PAIRS, LOG)[0].callbacks == own.callbacks
    named_loss = spec(loss='MultipleNegativesRankingLoss')
    assert apply_recipe(named_loss, Shape.PAIRS, LOG)[0].callbacks == []
