"""onnx_quantize through the SDK with the real trainer: fit, the int8 model's metrics in the run's status,
get_model(is_onnx=True) loading the int8 graphs, encode, and the mistakes a user can make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import finetuner
from finetuner.backends.local import LocalBackend
from finetuner.errors import ArgumentError
from tests.support.tiny import labelled_texts, make_tiny_bert

pytest.importorskip('finetuner_trainer.runner')


@pytest.mark.slow
def test_fit_with_onnx_quantize_reports_the_int8_models_quality_and_ships_it(
    local: LocalBackend, tmp_path: Path
) -> None:
    tiny_bert = make_tiny_bert(tmp_path / 'bert')
    run = finetuner.fit(
        model=str(tiny_bert),
        train_data=labelled_texts(4, 8),
        eval_data=labelled_texts(4, 4, seed=1),
        epochs=1,
        batch_size=16,
        cpu=True,
        num_workers=0,
        to_onnx=True,
        onnx_quantize='auto',
        run_name='quantized',
    )
    final = run.wait(timeout=240, poll=0.2)
    assert final['status'] == 'FINISHED', run.logs()
    metrics = run.metrics()
    quantized = metrics.quantized
    assert quantized is not None and quantized.methods == {'text': 'dynamic'}
    # The int8 model is evaluated on the same data as the float one: every retrieval metric, and its change.
    assert set(quantized.metrics) == set(metrics.after) - {'val_loss'}
    for name, value in quantized.metrics.items():
        assert quantized.relative_change[name] == pytest.approx(100 * (value / metrics.after[name] - 1), abs=1e-9)
    assert 'int8 ONNX model: ' in run.logs()
    status = run.full_status()
    assert status.metrics is not None and status.metrics.quantized == quantized

    saved = Path(run.save_model(tmp_path / 'model'))
    export = json.loads((saved / 'onnx' / 'export.json').read_text())
    assert export['quantization'] == 'auto'
    assert export['quantized']['text']['file'] == 'model.int8.onnx'
    assert (saved / 'onnx' / 'model.int8.onnx').is_file() and (saved / 'onnx' / 'model.onnx').is_file()

    texts = ['red green cat', 'blue dog fast', 'old yellow train and a slow white bus']
    int8 = finetuner.get_model(saved, is_onnx=True)
    float32 = finetuner.get_model(saved, is_onnx=True, quantized=False)
    assert (int8.precision, float32.precision) == ('int8', 'float32')
    assert finetuner.get_model(saved, is_onnx=True, quantized=True).precision == 'int8'
    torch_side = finetuner.encode(finetuner.get_model(saved), texts)
    np.testing.assert_allclose(finetuner.encode(float32, texts), torch_side, rtol=1e-4, atol=1e-5)
    embeddings = finetuner.encode(int8, texts)
    cosine = (embeddings * torch_side).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(torch_side, axis=1)
    assert cosine.min() >= 0.99, cosine


def test_onnx_quantize_needs_to_onnx(local: LocalBackend) -> None:
    needs = 'onnx_quantize: onnx_quantize makes an int8 copy of the ONNX model: set to_onnx=True as well'
    with pytest.raises(ArgumentError, match=needs):
        finetuner.fit(model='bert-base-cased', train_data=labelled_texts(2, 2), onnx_quantize='auto')
    with pytest.raises(ArgumentError, match=r"onnx_quantize: .*'auto', 'dynamic' or 'static'"):
        finetuner.fit(model='bert-base-cased', train_data=labelled_texts(2, 2), to_onnx=True, onnx_quantize='int4')


def test_get_model_quantized_mistakes_name_the_fix(tmp_path: Path) -> None:
    import torch

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.models import build_embedder
    from finetuner_trainer.onnx_export import export_onnx

    torch.manual_seed(0)
    embedder = build_embedder(FinetuneRunSpec(model=str(make_tiny_bert(tmp_path / 'bert')), train_data='x'))
    embedder.save(tmp_path / 'artifact')
    export_onnx(embedder, tmp_path / 'artifact' / 'onnx')
    (tmp_path / 'artifact' / 'manifest.json').write_text('{}')
    with pytest.raises(ArgumentError, match='quantized: int8 models are ONNX graphs: pass is_onnx=True'):
        finetuner.get_model(tmp_path / 'artifact', quantized=True)
    with pytest.raises(ArgumentError, match=r'quantized: .* has no int8 ONNX model; fine-tune with to_onnx=True and'):
        finetuner.get_model(tmp_path / 'artifact', is_onnx=True, quantized=True)
    assert finetuner.get_model(tmp_path / 'artifact', is_onnx=True).precision == 'float32'
