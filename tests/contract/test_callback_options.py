"""Each callback's options are declared once (finetuner.api.callback_options): the SDK's classes and
the trainer's check are the same model, so both refuse the same values with the same words."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from finetuner import callbacks as sdk
from finetuner.api.callback_options import CALLBACK_NAMES, CALLBACK_OPTIONS
from finetuner.api.v1alpha1 import CallbackSpec

trainer = pytest.importorskip('finetuner_trainer.callbacks')
ConfigError = pytest.importorskip('finetuner_trainer.errors').ConfigError


def test_one_options_model_per_callback_on_both_sides() -> None:
    assert tuple(sdk.CALLBACK_CLASSES) == CALLBACK_NAMES
    assert tuple(trainer.CALLBACKS) == CALLBACK_NAMES
    for name, options in CALLBACK_OPTIONS.items():
        assert issubclass(sdk.CALLBACK_CLASSES[name], options), name
        assert trainer.CALLBACKS[name].Options is options, name


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ('WiSEFTCallback', {'alpha': 0}, 'alpha=0 keeps only the pretrained weights; use a value in (0, 1]'),
    ('WiSEFTCallback', {'alpha': 1.5}, 'Input should be less than or equal to 1'),
    ('EarlyStopping', {'patience': 20000}, 'Input should be less than or equal to 10000'),
    ('EarlyStopping', {'patience': -1}, 'Input should be greater than or equal to 0'),
    ('EarlyStopping', {'min_delta': -0.1}, 'Input should be greater than or equal to 0'),
    ('EvaluationCallback', {'distance': 'dot'}, "Input should be 'cosine', 'euclidean' or 'sqeuclidean'"),
    ('EvaluationCallback', {'limit': 0}, 'Input should be greater than or equal to 1'),
    ('TrainingCheckpoint', {'last_k_epochs': 0}, 'Input should be greater than or equal to 1'),
    ('BestModelCheckpoint', {'mode': 'best'}, "Input should be 'auto', 'min' or 'max'"),
    ('WandBLogger', {'mode': 'cloud'}, "Input should be 'online', 'offline' or 'disabled'"),
]


@pytest.mark.parametrize(('name', 'options', 'message'), REFUSED, ids=[f'{n}-{o}' for n, o, _ in REFUSED])
def test_sdk_and_trainer_refuse_alike(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as sdk_error:
        sdk.CALLBACK_CLASSES[name](**options)
    assert message in str(sdk_error.value)
    (option,) = options
    with pytest.raises(ConfigError) as trainer_error:
        trainer.build_callbacks([CallbackSpec(name=name, options=options)])
    assert trainer_error.value.field == f'callbacks[0].options.{option}'
    assert message in trainer_error.value.problem
    assert trainer_error.value.problem.startswith(f'{name} option {option!r}: ')


def test_an_unknown_option_is_refused_on_both_sides() -> None:
    with pytest.raises(ValidationError, match='Extra inputs are not permitted'):
        sdk.EarlyStopping(patiense=3)
    with pytest.raises(ConfigError, match="EarlyStopping has no option 'patiense'; its options are monitor, mode"):
        trainer.build_callbacks([CallbackSpec(name='EarlyStopping', options={'patiense': 3})])


def test_what_the_sdk_accepts_the_trainer_builds_with_the_same_values() -> None:
    given = {
        'EvaluationCallback': sdk.EvaluationCallback(query_data='eval-set', limit=7, distance='euclidean'),
        'EarlyStopping': sdk.EarlyStopping(patience=10000, min_delta=0.01, baseline=0.5),
        'WiSEFTCallback': sdk.WiSEFTCallback(alpha=1.0),
        'TrainingCheckpoint': sdk.TrainingCheckpoint(last_k_epochs=1000),
    }
    built = trainer.build_callbacks([callback.to_spec() for callback in given.values()])
    for (name, callback), made in zip(given.items(), built, strict=True):
        assert type(made).__name__ == name
        assert made.options == CALLBACK_OPTIONS[name](**callback.to_spec().options)
