"""batchSize left empty: the CPU default of the model's family, and the GPU search for the largest batch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.data import Dataset, Example, Item, Shape
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.losses import build_objective
from finetuner_trainer.models import build_embedder
from finetuner_trainer.runner import BatchProbe, Collator, auto_batch_size, largest_fitting, probe_fits
from tests.support.tiny import labelled_texts


def _probe(tiny_bert: Path) -> BatchProbe:
    model = build_embedder(FinetuneRunSpec(model=str(tiny_bert), train_data='x'))
    records = labelled_texts(4, 4)
    examples = [Example((Item(text=r.text),), label=i // 4) for i, r in enumerate(records)]
    train = Dataset(Shape.LABELLED, examples, ['a', 'b', 'c', 'd'])
    loss = build_objective('TripletMarginLoss', {}, None, {}, model.output_dim, 4)
    return BatchProbe(model, torch.device('cpu'), train, loss, Collator(model, Shape.LABELLED))


def test_the_cpu_default_is_the_familys(tiny_bert: Path, caplog: pytest.LogCaptureFixture) -> None:
    probe = _probe(tiny_bert)
    caplog.set_level('INFO')
    assert probe.model.cpu_batch_size == 32
    assert auto_batch_size(probe, logging.getLogger('test')) == 16  # the text family's 32, capped at 16 examples
    assert 'batchSize not set: 16 (the CPU default for text models)' in caplog.text


def test_a_probe_step_runs_and_leaves_no_gradients(tiny_bert: Path) -> None:
    probe = _probe(tiny_bert)
    assert probe_fits(probe, 8)
    assert all(p.grad is None for p in probe.model.parameters())


def test_the_largest_power_of_two_that_fits() -> None:
    assert largest_fitting(lambda size: size <= 100, 8, 1024) == 64
    assert largest_fitting(lambda size: True, 8, 40) == 32
    with pytest.raises(ConfigError, match='batchSize: not even a batch of 8 fits in memory; set a smaller batchSize'):
        largest_fitting(lambda size: False, 8, 1024)
