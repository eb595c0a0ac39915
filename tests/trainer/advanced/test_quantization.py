"""Int8 ONNX graphs (onnxQuantize) of each model family: made by ONNX Runtime's quantisation tools, recorded
in export.json, loaded and encoded by the ONNX embedder, and close to the float graph's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.data import to_dataset
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.inference_onnx import OnnxEmbedder
from finetuner_trainer.models import build_embedder
from finetuner_trainer.onnx_export import export_onnx, ort_session
from finetuner_trainer.quantization import calibration_items, quantize_for_artifact, quantize_onnx
from tests.support.tiny import (
    TINY_TIMM,
    TINY_TIMM_OPTIONS,
    labelled_images,
    labelled_texts,
    make_tiny_bert,
    make_tiny_clip,
    text_image_pairs,
)

# The bound the tests hold every family's int8 embeddings to, on generated data the model never saw:
# cosine similarity to the float graph's embedding of the same item, for every item. Measured on these tiny
# random models (2 layers, every family and method): 0.999 and above. Real models are further from their
# float graph (docs/BENCHMARKS.md: all-MiniLM-L6-v2 dynamic, efficientnet_b0 static), which is why the
# trainer measures the int8 model's retrieval quality instead of trusting a bound.
COSINE_BOUND = 0.99


def _spec(family: str, models: dict[str, Path], **fields) -> FinetuneRunSpec:
    if family == 'timm':
        return FinetuneRunSpec(model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS, train_data='x', **fields)
    if family == 'bert':
        return FinetuneRunSpec(model=str(models['bert']), train_data='x', **fields)
    return FinetuneRunSpec(model=str(models['clip']), train_data='x', loss='CLIPLoss', multi_modal=True, **fields)


def _training_records(family: str) -> list:
    if family == 'timm':
        return labelled_images(3, 8, seed=1)
    if family == 'bert':
        return labelled_texts(4, 8, seed=1)
    return text_image_pairs(12, seed=1)


def _check_records(family: str) -> list:
    """Generated items of another seed than the training data."""
    if family == 'timm':
        return labelled_images(2, 4, seed=7)
    if family == 'bert':
        return labelled_texts(3, 4, seed=7)
    pairs = text_image_pairs(6, seed=7)
    return [p.chunks[0] for p in pairs] + [p.chunks[1] for p in pairs]


@pytest.fixture(scope='module')
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('quantized-models')
    return {'bert': make_tiny_bert(root / 'bert'), 'clip': make_tiny_clip(root / 'clip')}


def _quantized(family: str, models: dict[str, Path], folder: Path, choice: str = 'auto', output_dim: int | None = None):
    torch.manual_seed(0)
    spec = _spec(family, models, output_dim=output_dim)
    embedder = build_embedder(spec)
    embedder.save(folder)
    export_onnx(embedder, folder / 'onnx')
    training = to_dataset(_training_records(family), spec, 'trainData')
    return embedder, quantize_onnx(embedder, folder / 'onnx', choice, training)


@pytest.fixture(scope='module')
def quantized(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """family -> (embedder, artifact-like folder, export description with its quantized section)."""
    root = tmp_path_factory.mktemp('quantized')
    out = {}
    for family, output_dim in (('timm', 8), ('bert', None), ('clip', None)):
        embedder, description = _quantized(family, models, root / family, output_dim=output_dim)
        out[family] = (embedder, root / family, description)
    return out


def _ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ('family', 'methods'),
    [('timm', {'image': 'static'}), ('bert', {'text': 'dynamic'}), ('clip', {'text': 'dynamic', 'image': 'static'})],
)
def test_auto_quantises_text_dynamically_and_images_statically(family: str, methods: dict, quantized: dict) -> None:
    _, folder, _ = quantized[family]
    saved = json.loads((folder / 'onnx' / 'export.json').read_text())
    assert saved['quantization'] == 'auto'
    assert {kind: q['method'] for kind, q in saved['quantized'].items()} == methods
    for kind, q in saved['quantized'].items():
        float_file = saved['graphs'][kind]['file']
        assert q['file'] == float_file.replace('.onnx', '.int8.onnx')
        assert (folder / 'onnx' / q['file']).is_file() and (folder / 'onnx' / float_file).is_file()
        ops = _ops(folder / 'onnx' / q['file'])
        if q['method'] == 'dynamic':
            assert 'DynamicQuantizeLinear' in ops and 'MatMulInteger' in ops, ops
            assert q['calibration'] is None
        else:
            assert {'QuantizeLinear', 'DequantizeLinear'} <= ops, ops
            # Calibrated on the run's own training data: every item of this kind (fewer than 64 here).
            assert q['calibration'] == {'items': 24 if family == 'timm' else 12, 'source': 'training data'}
        assert q['cosine_to_float']['min'] >= COSINE_BOUND
    if family == 'bert':  # the float graph ships fused; the int8 one is quantised from the graph before fusion
        assert 'Attention' in _ops(folder / 'onnx' / saved['graphs']['text']['file'])
        int8_ops = _ops(folder / 'onnx' / saved['quantized']['text']['file'])
        assert 'QAttention' not in int8_ops and 'Attention' not in int8_ops, int8_ops
        assert 'SkipLayerNormalization' not in int8_ops, int8_ops
        # Nor does the session that runs it fuse the residual layer norms (slower on the CPU: onnx_export).
        ort_session(folder / 'onnx' / saved['quantized']['text']['file'], 1, optimized_path=folder / 'run.onnx')
        run_ops = _ops(folder / 'run.onnx')
        assert 'LayerNormalization' in run_ops and 'SkipLayerNormalization' not in run_ops, run_ops
        assert saved['quantized']['text']['graph'] == 'as exported, before fusion'
    elif family == 'timm':
        assert saved['quantized']['image']['graph'] == 'the float graph shipped'


def test_a_cnn_keeps_its_stem_float(quantized: dict) -> None:
    """float_stem: in the QDQ graph the first convolution takes its float weights straight from an initializer;
    every later one takes int8 weights through a DequantizeLinear."""
    import onnx

    _, folder, description = quantized['timm']
    assert description['quantized']['image']['float_stem'] is True
    graph = onnx.load(str(folder / 'onnx' / description['quantized']['image']['file'])).graph
    made_by = {output: node.op_type for node in graph.node for output in node.output}
    weights = [made_by.get(node.input[1], 'initializer') for node in graph.node if node.op_type == 'Conv']
    assert len(weights) >= 3, weights
    assert weights[0] == 'initializer', weights
    assert set(weights[1:]) == {'DequantizeLinear'}, weights


@pytest.mark.parametrize('family', ['timm', 'bert', 'clip'])
def test_int8_artifact_loads_and_encodes_close_to_the_float_graphs(family: str, quantized: dict) -> None:
    embedder, folder, _ = quantized[family]
    records = _check_records(family)
    int8 = OnnxEmbedder.load(folder)  # the int8 graphs by default when the artifact has them
    float32 = OnnxEmbedder.load(folder, quantized=False)
    assert int8.precision == 'int8' and float32.precision == 'float32'
    assert int8.quantization == {'timm': {'image': 'static'}, 'bert': {'text': 'dynamic'}}.get(
        family, {'text': 'dynamic', 'image': 'static'}
    )
    actual = int8.encode(records, batch_size=4)
    expected = float32.encode(records, batch_size=4)
    assert actual.shape == expected.shape == (len(records), embedder.output_dim)
    np.testing.assert_allclose(expected, embedder.embed(records).numpy(), atol=1e-4)
    assert not np.allclose(actual, expected, atol=1e-6)  # really another model
    cosine = _cosines(actual, expected)
    assert cosine.min() >= COSINE_BOUND, cosine


def test_forced_methods_apply_to_every_graph(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / 'cwd'
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # ONNX Runtime's tools leave files in the working directory when they fail
    _, static_text = _quantized('bert', models, tmp_path / 'bert', 'static')
    assert static_text['quantized']['text']['method'] == 'static'
    assert {'QuantizeLinear', 'DequantizeLinear'} <= _ops(tmp_path / 'bert' / 'onnx' / 'model.int8.onnx')
    _, dynamic_cnn = _quantized('timm', models, tmp_path / 'timm', 'dynamic')
    assert dynamic_cnn['quantized']['image']['method'] == 'dynamic'
    assert 'ConvInteger' in _ops(tmp_path / 'timm' / 'onnx' / 'model.int8.onnx')
    for family in ('bert', 'timm'):
        records = _check_records(family)
        cosine = _cosines(
            OnnxEmbedder.load(tmp_path / family).encode(records),
            OnnxEmbedder.load(tmp_path / family, quantized=False).encode(records),
        )
        assert cosine.min() >= COSINE_BOUND, (family, cosine)
    assert list(workdir.iterdir()) == []


def test_without_training_items_of_its_kind_a_static_graph_calibrates_on_generated_items(
    models: dict[str, Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    spec = _spec('timm', models)
    embedder = build_embedder(spec)
    embedder.save(tmp_path)
    export_onnx(embedder, tmp_path / 'onnx')
    description = quantize_onnx(embedder, tmp_path / 'onnx', 'auto', None)
    assert description['quantized']['image']['calibration'] == {'items': 5, 'source': 'generated samples'}


def test_calibration_items_are_spread_over_the_training_data() -> None:
    spec = FinetuneRunSpec(model=TINY_TIMM, train_data='x')
    dataset = to_dataset(labelled_images(4, 25), spec, 'trainData')
    items = calibration_items(dataset, 'image', 10)
    everything = [e.items[0] for e in dataset.examples]
    assert items == everything[::10]
    assert calibration_items(dataset, 'text', 10) == []
    assert calibration_items(None, 'image', 10) == []


def test_loading_int8_graphs_that_are_not_there_names_the_fix(quantized: dict, tmp_path: Path) -> None:
    import shutil

    _, folder, _ = quantized['timm']
    plain = tmp_path / 'plain'
    shutil.copytree(folder, plain)
    manifest = json.loads((plain / 'onnx' / 'export.json').read_text())
    del manifest['quantized']
    (plain / 'onnx' / 'export.json').write_text(json.dumps(manifest))
    assert OnnxEmbedder.load(plain).precision == 'float32'
    with pytest.raises(FileNotFoundError, match='has no int8 ONNX model; fine-tune with to_onnx=True and onnx_'):
        OnnxEmbedder.load(plain, quantized=True)


def test_a_graph_that_cannot_be_quantised_fails_the_run_naming_the_option(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetuner_trainer import quantization

    def broken(source: Path, target: Path, plan: object) -> dict:
        raise ValueError('Unable to find data type for weight_name')

    monkeypatch.setattr(quantization, 'quantize_dynamic_graph', broken)
    torch.manual_seed(0)
    embedder = build_embedder(_spec('bert', models))
    embedder.save(tmp_path)
    export_onnx(embedder, tmp_path / 'onnx')
    with pytest.raises(ConfigError) as caught:
        quantize_for_artifact(embedder, tmp_path, 'auto', None)
    assert caught.value.field == 'onnxQuantize'
    assert 'dynamic quantisation of the text graph failed: ValueError: Unable to find data type' in str(caught.value)
    assert 'Run again without onnxQuantize' in str(caught.value)
    assert not (tmp_path / 'onnx' / 'model.int8.onnx').exists()
    assert 'quantized' not in json.loads((tmp_path / 'onnx' / 'export.json').read_text())


def test_non_finite_int8_embeddings_are_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetuner_trainer import quantization

    real = quantization.ort_session

    class NaNSession:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            return [np.full_like(out, np.nan) for out in self.session.run(names, feeds)]

    monkeypatch.setattr(
        quantization,
        'ort_session',
        lambda path, threads=None: (NaNSession if 'int8' in str(path) else lambda s: s)(real(path, threads)),
    )
    torch.manual_seed(0)
    embedder = build_embedder(_spec('bert', models))
    embedder.save(tmp_path)
    export_onnx(embedder, tmp_path / 'onnx')
    with pytest.raises(ConfigError, match='the int8 text graph returned embeddings that are not finite'):
        quantize_for_artifact(embedder, tmp_path, 'auto', None)
