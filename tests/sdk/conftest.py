"""Fixtures of the SDK tests: a local backend per test, with the scripted or the real trainer."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import finetuner.backends
from finetuner.backends.local import LocalBackend

SCRIPTED_TRAINER = Path(__file__).with_name('scripted_trainer.py')


@pytest.fixture
def scripted(_isolated_home: Path) -> Iterator[LocalBackend]:
    """The local backend running tests/sdk/scripted_trainer.py instead of the trainer."""
    backend = LocalBackend(command=[sys.executable, str(SCRIPTED_TRAINER)])
    finetuner.backends.use(backend)
    yield backend
    finetuner.backends.use(None)


@pytest.fixture
def local(_isolated_home: Path) -> Iterator[LocalBackend]:
    """The default local backend (the real trainer), as `import finetuner` gets it."""
    finetuner.backends.use(None)
    yield finetuner.backends.current()  # type: ignore[misc]
    finetuner.backends.use(None)
