"""ONNX export parity for a tiny timm CNN, a tiny BERT and a tiny CLIP, and the ONNX Runtime embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.models import build_embedder
from finetuner_trainer.onnx_export import OnnxExportError, export_kind, export_onnx
from tests.support.tiny import (
    TINY_TIMM,
    TINY_TIMM_OPTIONS,
    labelled_images,
    labelled_texts,
    make_tiny_bert,
    make_tiny_clip,
    text_image_pairs,
)


@pytest.fixture(scope='module')
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('tiny-models')
    return {'bert': make_tiny_bert(root / 'bert'), 'clip': make_tiny_clip(root / 'clip')}


def _embedder(kind: str, tiny_models: dict[str, Path], output_dim: int | None = None):
    torch.manual_seed(0)
    if kind == 'timm':
        spec = FinetuneRunSpec(model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS, train_data='x', output_dim=output_dim)
    elif kind == 'bert':
        spec = FinetuneRunSpec(model=str(tiny_models['bert']), train_data='x', output_dim=output_dim)
    else:
        spec = FinetuneRunSpec(model=str(tiny_models['clip']), train_data='x', loss='CLIPLoss', multi_modal=True)
    return build_embedder(spec)


OUTPUT_DIMS = {'timm': 8, 'bert': None, 'clip': None}  # timm with a projection head, the others without


@pytest.fixture(scope='module')
def exported(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Each family saved and exported once, shared by the parity and the ONNX Runtime tests:
    family -> (embedder, folder with the saved model and onnx/, export description)."""
    root = tmp_path_factory.mktemp('exported')
    result = {}
    for family, output_dim in OUTPUT_DIMS.items():
        embedder = _embedder(family, tiny_models, output_dim)
        embedder.save(root / family)
        result[family] = (embedder, root / family, export_onnx(embedder, root / family / 'onnx'))
    return result


@pytest.mark.parametrize(
    ('family', 'files'),
    [('timm', ['model.onnx']), ('bert', ['model.onnx']), ('clip', ['text.onnx', 'image.onnx'])],
)
def test_export_parity(family: str, files: list[str], exported: dict[str, tuple]) -> None:
    embedder, folder, description = exported[family]
    assert sorted(g['file'] for g in description['graphs'].values()) == sorted(files)
    assert description['max_abs_diff'] < 1e-4
    saved = json.loads((folder / 'onnx' / 'export.json').read_text())
    assert saved['max_abs_diff'] == description['max_abs_diff']
    for graph in description['graphs'].values():
        # Two sample batches of different batch size (and, for text, sequence length) were checked.
        batch_sizes = {shape[graph['inputs'][0]][0] for shape in graph['shapes_checked']}
        assert len(batch_sizes) == 2
        if 'input_ids' in graph['inputs']:
            assert len({shape['input_ids'][1] for shape in graph['shapes_checked']}) == 2
    assert embedder.training  # the export left the model in the mode it found it


def test_onnx_runtime_embedder_matches_torch(exported: dict[str, tuple]) -> None:
    from finetuner_trainer.inference_onnx import OnnxEmbedder

    for family, records in (
        ('timm', labelled_images(2, 2)),
        ('bert', labelled_texts(2, 3)),
        ('clip', [r.chunks[0] for r in text_image_pairs(3)] + [r.chunks[1] for r in text_image_pairs(3)]),
    ):
        embedder, folder, _ = exported[family]
        onnx_model = OnnxEmbedder.load(folder)
        expected = embedder.embed(records).numpy()
        actual = onnx_model.encode(records, batch_size=2)
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_wrong_graph_fails_loudly(tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = _embedder('timm', tiny_models)
    # Make the torch side differ from what was exported: the check must refuse to ship the graph.
    original = type(embedder).encode

    calls = {'n': 0}

    def drifting(self, kind, inputs):
        calls['n'] += 1
        out = original(self, kind, inputs)
        return out if calls['n'] == 1 else out + 1.0

    monkeypatch.setattr(type(embedder), 'encode', drifting)
    with pytest.raises(OnnxExportError, match='ONNX Runtime disagrees with torch on the image graph'):
        export_kind(embedder, 'image', tmp_path / 'model.onnx')
