"""docs/EXTENDING.md, followed: a toy loss, a toy model family and a toy callback, each registered in
the one place the document names, train through the real loop (``finetuner_trainer.train``).

The registrations happen in fixtures (the call the decorator makes at import) and are undone after
each test, so the registries the rest of the suite checks stay the shipped ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from finetuner.api.callback_options import CallbackOptions
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import CallbackSpec, TrainerConfig
from finetuner_trainer import train
from finetuner_trainer.callbacks import CALLBACKS, build_callbacks, register_callback
from finetuner_trainer.context import TrainContext
from finetuner_trainer.data import Item, Shape
from finetuner_trainer.embedder import FAMILIES, Embedder, register_family
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.hooks import Callback, Control, TrainState
from finetuner_trainer.losses import LOSSES, PairObjective, register_loss
from finetuner_trainer.models import load_embedder
from tests.support.tiny import labelled_texts, text_pairs
from tests.trainer.conftest import ConfigFactory

# --- a toy model family: characters -> embeddings -> mean over the text --------------------------


class CharacterEmbedder(Embedder):
    """Texts as their bytes (capped at 32), an embedding per byte, the mean over the text."""

    family: ClassVar[str] = 'toy-chars'
    kinds: ClassVar[tuple[str, ...]] = ('text',)
    onnx_graphs: ClassVar[dict[str, str]] = {'text': 'model.onnx'}
    name_prefix: ClassVar[str | None] = 'toy-chars:'  # spec.model 'toy-chars:<dim>'

    def __init__(self, name: str, dim: int, options: dict[str, Any]):
        super().__init__(name, options)
        self.dim = dim
        self.table = nn.Embedding(256, dim)

    @classmethod
    def build(cls, name: str, source: str, options: dict[str, Any]) -> CharacterEmbedder:
        return cls(name, int(source), options)

    @classmethod
    def load(cls, directory: Path, description: dict[str, Any]) -> CharacterEmbedder:
        embedder = cls(description['name'], int(description['dim']), dict(description.get('options') or {}))
        embedder.table.load_state_dict(load_file(directory / 'chars.safetensors'))
        return embedder

    @property
    def backbone_dim(self) -> int:
        return self.dim

    def collate_kind(self, kind: str, items: list[Item]) -> dict[str, Tensor]:
        codes = [list((item.text or '').encode())[:32] or [0] for item in items]
        width = max(len(c) for c in codes)
        ids = torch.zeros((len(codes), width), dtype=torch.long)
        mask = torch.zeros((len(codes), width), dtype=torch.long)
        for row, c in enumerate(codes):
            ids[row, : len(c)] = torch.tensor(c)
            mask[row, : len(c)] = 1
        return {'input_ids': ids, 'attention_mask': mask}

    def encode(self, kind: str, inputs: dict[str, Tensor]) -> Tensor:
        mask = inputs['attention_mask'].unsqueeze(-1).float()
        return (self.table(inputs['input_ids']) * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.table]

    def preprocessing(self) -> dict[str, Any]:
        return {'bytes': 32}

    def save_backbone(self, directory: Path) -> dict[str, Any]:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.table.state_dict().items()},
            directory / 'chars.safetensors',
        )
        return {'format': 'toy-chars', 'dim': self.dim, 'load': 'torch.nn.Embedding(256, dim) from chars.safetensors'}


# --- a toy loss: pull each query onto its document -------------------------------------------------

CALLS: dict[str, int] = {}


class PullTogetherLoss(PairObjective):
    """Mean squared distance between a query's and its document's normalised embeddings."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, queries: Tensor, documents: Tensor, scores: Tensor | None = None) -> Tensor:
        CALLS['PullTogetherLoss'] = CALLS.get('PullTogetherLoss', 0) + 1
        q, d = nn.functional.normalize(queries, dim=-1), nn.functional.normalize(documents, dim=-1)
        return self.weight * (q - d).pow(2).sum(-1).mean()


# --- a toy callback: stop after a number of optimizer steps ----------------------------------------


class StopAfterOptions(CallbackOptions):
    steps: int = Field(default=1, ge=1, description='Optimizer steps before stopping.')


class StopAfter(Callback):
    """Stops training after ``steps`` optimizer steps (it only flips Control.should_stop)."""

    def __init__(self, **options: Any):
        self.options = StopAfterOptions(**options)
        self.seen = 0

    def on_batch_end(self, ctx: TrainContext, state: TrainState, control: Control, loss: float) -> None:
        self.seen += 1
        if state.step >= self.options.steps:
            control.should_stop = True


@pytest.fixture
def toy_family() -> Iterator[type[CharacterEmbedder]]:
    register_family(CharacterEmbedder)  # what @register_family does when its module is imported
    yield CharacterEmbedder
    FAMILIES.pop(CharacterEmbedder.family)


@pytest.fixture
def toy_loss() -> Iterator[None]:
    register_loss(Shape.PAIRS)(PullTogetherLoss)  # what @register_loss(Shape.PAIRS) does at import
    CALLS.clear()
    yield
    LOSSES.pop('PullTogetherLoss')


@pytest.fixture
def toy_callback() -> Iterator[None]:
    register_callback(StopAfterOptions)(StopAfter)  # what @register_callback(StopAfterOptions) does at import
    yield
    CALLBACKS.pop('StopAfter')


def _with(config: TrainerConfig, **spec: Any) -> TrainerConfig:
    """The config with spec fields the contract's generated enums do not list yet: the names a test
    registers live only in this process (crdgen would add them to sdk/finetuner/registered.py)."""
    return config.model_copy(update={'spec': config.spec.model_copy(update=spec)})


def _artifact(uri: str) -> Path:
    return Path(urlparse(uri).path)


def test_a_registered_loss_trains_one_step_and_reaches_the_generated_catalog(
    toy_family: type[CharacterEmbedder], toy_loss: None, make_config: ConfigFactory
) -> None:
    from finetuner.api import crdgen

    base = make_config(text_pairs(4), model='toy-chars:8', loss='MultipleNegativesRankingLoss', batch_size=4)
    result = train(_with(base, loss='PullTogetherLoss', loss_options={'weight': 2.0}))
    assert result.steps == 1 and CALLS['PullTogetherLoss'] >= 1
    assert result.history[0]['train_loss'] > 0
    tables = crdgen.registered_tables()  # what `python -m finetuner.api.crdgen` writes for the SDK and the CRD
    assert tables['LOSSES']['PullTogetherLoss'] == {'shapes': ('pairs',), 'objective': 'pair'}
    # The shapes it was registered with are the ones the trainer accepts.
    labelled = make_config(labelled_texts(2, 2), model='toy-chars:8')
    with pytest.raises(ConfigError, match='loss: PullTogetherLoss trains on query-document pairs, but the data holds'):
        train(_with(labelled, loss='PullTogetherLoss'))


def test_a_registered_family_trains_saves_loads_and_exports_to_onnx(
    toy_family: type[CharacterEmbedder], make_config: ConfigFactory
) -> None:
    from finetuner.api import crdgen
    from finetuner_trainer.inference_onnx import OnnxEmbedder

    config = make_config(
        text_pairs(4), model='toy-chars:8', loss='MultipleNegativesRankingLoss', batch_size=4, to_onnx=True
    )
    result = train(config)
    assert result.steps == 1 and result.output_dim == 8
    folder = _artifact(result.artifact_uri)
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert manifest['family'] == 'toy-chars' and manifest['format'] == 'toy-chars'
    records = [Record(text=t) for t in ('red cat', 'a big blue dog', 'x')]
    loaded = load_embedder(folder)
    assert isinstance(loaded, CharacterEmbedder)
    onnx = OnnxEmbedder.load(folder)
    np.testing.assert_allclose(onnx.encode(records), loaded.embed(records).numpy(), atol=1e-5)
    assert crdgen.registered_tables()['FAMILIES']['toy-chars'] == {'kinds': ('text',), 'select_models': {}}


def test_a_registered_callback_gets_its_options_checked_and_its_hooks_called(
    toy_family: type[CharacterEmbedder], toy_callback: None, make_config: ConfigFactory
) -> None:
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.options\.steps: StopAfter option 'steps': Input should be"):
        build_callbacks([CallbackSpec.model_construct(name='StopAfter', options={'steps': 0})])
    base = make_config(text_pairs(8), model='toy-chars:8', loss='MultipleNegativesRankingLoss', batch_size=4, epochs=3)
    stopper = CallbackSpec.model_construct(name='StopAfter', options={'steps': 1})
    result = train(_with(base, callbacks=[stopper]))
    assert result.steps == 1 and result.epochs_done == 1  # 2 steps per epoch, 3 epochs: stopped after the first step


def test_registering_twice_or_without_metadata_is_refused(toy_family: type[CharacterEmbedder]) -> None:
    class Other(CharacterEmbedder):
        pass

    with pytest.raises(ValueError, match="model family 'toy-chars' is already registered by CharacterEmbedder"):
        register_family(Other)

    class Nameless(Embedder):
        kinds: ClassVar[tuple[str, ...]] = ('text',)

    with pytest.raises(TypeError, match='Nameless must set family, kinds and onnx_graphs'):
        register_family(Nameless)
    with pytest.raises(ValueError, match="loss 'MarginMSELoss' is already registered"):

        @register_loss(Shape.SCORED_PAIRS)
        class MarginMSELoss(PairObjective):
            pass

    with pytest.raises(TypeError, match='a label loss: it trains on labelled items or pairs'):
        register_loss(Shape.TEXT_IMAGE)(nn.Identity)


def _shapes(values: Sequence[Shape]) -> tuple[str, ...]:
    return tuple(shape.value for shape in values)


def test_every_registered_family_and_loss_is_in_the_generated_catalog() -> None:
    """sdk/finetuner/registered.py is what the trainer registers (crdgen --check also fails on drift)."""
    from finetuner import catalog

    assert set(catalog.FAMILY_NAMES) == set(FAMILIES)
    for name, family in FAMILIES.items():
        info = catalog.family_info(name)
        assert info['kinds'] == family.kinds and info['select_models'] == family.select_models
        assert set(family.onnx_graphs) <= set(family.kinds), name
        assert set(family.select_models.values()) <= set(family.kinds), name
    for name, entry in LOSSES.items():
        assert catalog.loss_shapes(name) == _shapes(entry.shapes), name
    assert {b.family for b in catalog.BACKBONES} <= set(FAMILIES)


def test_the_document_names_files_and_registries_that_exist() -> None:
    import re

    from finetuner import callbacks as sdk_callbacks
    from finetuner.api import callback_options
    from finetuner_trainer import callbacks as trainer_callbacks
    from finetuner_trainer import embedder, losses

    root = Path(__file__).resolve().parents[2]
    text = (root / 'docs' / 'EXTENDING.md').read_text()
    paths = re.findall(r'`((?:sdk|trainer|tests|scripts)/[\w/.]+)`', text)
    assert len(paths) >= 10
    for path in paths:
        assert (root / path).exists(), path
    named = {
        losses: ('PML_LOSSES', 'register_loss', 'PairObjective'),
        embedder: ('register_family', 'Embedder'),
        trainer_callbacks: ('register_callback',),
        callback_options: ('CALLBACK_OPTIONS', 'CallbackOptions'),
        sdk_callbacks: ('CALLBACK_CLASSES', '_Callback'),
    }
    for module, names in named.items():
        for name in names:
            assert f'`{name}' in text or f'@{name}' in text or f'({name}' in text, name
            assert hasattr(module, name), (module.__name__, name)
    for method in ('build', 'load', 'claims', 'collate_kind', 'encode', 'save_backbone', 'onnx_feeder'):
        assert f'`{method}' in text and hasattr(Embedder, method), method
