"""Matryoshka embeddings: the wrapper around any loss (``lossOptions.matryoshka_dims``/``_weights``) and
``truncate_dim`` when encoding (``get_model``, ``encode``, the ONNX artifact, the saved
sentence-transformers folder)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import finetuner
from finetuner.errors import ArgumentError
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.losses import MatryoshkaObjective, build_objective
from tests.support.tiny import labelled_texts, text_pairs


def test_the_wrapper_sums_the_weighted_losses_of_the_prefixes() -> None:
    torch.manual_seed(0)
    queries, documents = torch.randn(8, 32), torch.randn(8, 32)
    options = {'matryoshka_dims': [32, 16, 4], 'matryoshka_weights': [1.0, 0.5, 2.0], 'scale': 10.0}
    wrapped = build_objective('MultipleNegativesRankingLoss', options, None, {}, 32, 0)
    assert isinstance(wrapped, MatryoshkaObjective) and wrapped.objective.scale == 10.0
    plain = build_objective('MultipleNegativesRankingLoss', {'scale': 10.0}, None, {}, 32, 0)
    expected = sum(
        w * plain(queries[:, :d], documents[:, :d]) for d, w in zip([32, 16, 4], [1.0, 0.5, 2.0], strict=True)
    )
    assert float(wrapped(queries, documents)) == pytest.approx(float(expected), rel=1e-6)

    embeddings, labels = torch.randn(12, 32), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    label_loss = build_objective('TripletMarginLoss', {'matryoshka_dims': [32, 8], 'margin': 0.3}, None, {}, 32, 4)
    plain_label = build_objective('TripletMarginLoss', {'margin': 0.3}, None, {}, 32, 4)
    expected = plain_label(embeddings, labels) + plain_label(embeddings[:, :8], labels)
    assert float(label_loss(embeddings, labels)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    ('options', 'field', 'message'),
    [
        ({'matryoshka_dims': [64, 16]}, 'matryoshka_dims', '64 is not between 1 and the embedding size 32'),
        ({'matryoshka_dims': [16, 16]}, 'matryoshka_dims', 'repeats a size'),
        ({'matryoshka_dims': 16}, 'matryoshka_dims', 'must be a list of embedding sizes'),
        ({'matryoshka_dims': [32, 16], 'matryoshka_weights': [1.0]}, 'matryoshka_weights', 'must be 2 non-negative'),
        ({'matryoshka_weights': [1.0]}, 'matryoshka_weights', 'given without matryoshka_dims'),
    ],
)
def test_bad_matryoshka_options_name_the_field(options: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf'lossOptions\.{field}: .*{message}'):
        build_objective('MultipleNegativesRankingLoss', options, None, {}, 32, 0)


@pytest.fixture(scope='module')
def matryoshka_artifact(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT trained with Matryoshka dims [32, 16, 8] (and exported to ONNX), as save_model leaves it."""
    import finetuner_trainer
    from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig
    from tests.support.tiny import write_jsonl

    folder = tmp_path_factory.mktemp('matryoshka')
    spec = FinetuneRunSpec(
        model=str(tiny_bert),
        train_data=str(write_jsonl(text_pairs(n=24, seed=2), folder / 'train.jsonl')),
        loss='MultipleNegativesRankingLoss',
        loss_options={'matryoshka_dims': [32, 16, 8]},
        epochs=1,
        batch_size=8,
        device='cpu',
        to_onnx=True,
    )
    config = TrainerConfig(run_name='matryoshka', spec=spec, output_uri=(folder / 'out').as_uri())
    result = finetuner_trainer.train(config, logging.getLogger('test'))
    return Path(result.artifact_uri.removeprefix('file://'))


TEXTS = [r.text for r in labelled_texts(n_classes=3, per_class=3, seed=4)]


def test_truncate_dim_keeps_the_first_dimensions(matryoshka_artifact: Path) -> None:
    full = finetuner.encode(finetuner.get_model(matryoshka_artifact), TEXTS)
    assert full.shape == (len(TEXTS), 32)
    truncated = finetuner.encode(finetuner.get_model(matryoshka_artifact, truncate_dim=8), TEXTS)
    np.testing.assert_allclose(truncated, full[:, :8], atol=1e-6)
    per_call = finetuner.encode(finetuner.get_model(matryoshka_artifact), TEXTS, truncate_dim=16)
    np.testing.assert_allclose(per_call, full[:, :16], atol=1e-6)


def test_truncate_dim_on_the_onnx_artifact_and_the_sentence_transformers_folder(matryoshka_artifact: Path) -> None:
    from sentence_transformers import SentenceTransformer

    torch_side = finetuner.encode(finetuner.get_model(matryoshka_artifact, truncate_dim=8), TEXTS)
    onnx_side = finetuner.encode(finetuner.get_model(matryoshka_artifact, is_onnx=True, truncate_dim=8), TEXTS)
    assert onnx_side.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(onnx_side, torch_side, atol=1e-4)
    st = SentenceTransformer(str(matryoshka_artifact), device='cpu', truncate_dim=8)
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), torch_side, atol=1e-5)


@pytest.mark.parametrize(
    ('value', 'message'),
    [(64, "64 is more than the model's 32 dimensions; give at most 32"), (0, 'at least 1'), (2.5, 'whole number')],
)
def test_a_bad_truncate_dim_is_refused_naming_it(matryoshka_artifact: Path, value: Any, message: str) -> None:
    with pytest.raises(ArgumentError, match=rf'truncate_dim.*{message}'):
        finetuner.get_model(matryoshka_artifact, truncate_dim=value)
    model = finetuner.get_model(matryoshka_artifact)
    with pytest.raises(ArgumentError, match=rf'truncate_dim.*{message}'):
        finetuner.encode(model, TEXTS, truncate_dim=value)
