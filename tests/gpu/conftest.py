"""Fixtures of the GPU tests: a tiny BERT, and run configurations on a given device."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig
from tests.support.tiny import make_tiny_bert, write_jsonl

ContextFactory = Callable[..., Any]


@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp('models') / 'bert')


@pytest.fixture
def make_context(tmp_path: Path) -> ContextFactory:
    """The trainer's loop context (``runner.build_context``) for ``records`` and the given spec fields."""

    def factory(records: list[Record], **spec: Any) -> Any:
        from finetuner.storage import open_store
        from finetuner_trainer.runner import build_context

        spec.setdefault('epochs', 1)
        spec.setdefault('num_workers', 0)
        config = TrainerConfig(
            run_name='gpu-test',
            spec=FinetuneRunSpec(train_data=str(write_jsonl(records, tmp_path / 'train.jsonl')), **spec),
            output_uri=(tmp_path / 'output').as_uri(),
            termination_log=str(tmp_path / 'termination-log'),
        )
        return build_context(config, open_store(config.output_uri), logging.getLogger('gpu-test'))

    return factory
