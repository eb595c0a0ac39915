"""ONNX export parity for a tiny timm CNN, a tiny BERT and a tiny CLIP, and the ONNX Runtime embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.models import build_embedder
from finetuner_trainer.onnx_export import OnnxExportError, export_kind, export_onnx, ort_session
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


def _graph_ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_text_graph_ships_fused_and_matches_torch(exported: dict[str, tuple]) -> None:
    """The BERT artifact holds ORT's fused graph (attention, embedding and plain layer norms, GELU with its
    bias), without SkipLayerNormalization (slower on the CPU than what it replaces), within 1e-4 of torch."""
    embedder, folder, description = exported['bert']
    layers = embedder.backbone.config.num_hidden_layers
    optimization = description['graphs']['text']['optimization']
    assert optimization['fused'] == {
        'Attention': layers,
        'BiasGelu': layers,
        'EmbedLayerNormalization': 1,
        'LayerNormalization': 2 * layers,
    }
    assert optimization['not_fused'] == ['skip_layer_norm', 'bias_skip_layer_norm']
    assert optimization['num_heads'] == embedder.backbone.config.num_attention_heads
    ops = _graph_ops(folder / 'onnx' / 'model.onnx')
    assert {'Attention', 'BiasGelu', 'EmbedLayerNormalization', 'LayerNormalization'} <= ops
    assert 'Softmax' not in ops  # no unfused attention left
    assert 'SkipLayerNormalization' not in ops
    assert description['graphs']['text']['max_abs_diff'] < 1e-4
    # Exporting with eager attention did not change the model's own attention implementation.
    assert embedder.backbone.config._attn_implementation != 'eager'
    # Graphs that are not BERT-like text encoders are shipped as exported.
    assert exported['timm'][2]['graphs']['image']['optimization'] == {}
    assert exported['clip'][2]['graphs']['text']['optimization'] == {}


def test_failed_fusion_ships_the_plain_graph(tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetuner_trainer import onnx_export

    def broken(source: Path, target: Path, options: dict) -> dict[str, int]:
        raise OnnxExportError('the optimiser found no attention to fuse (fusions: none)')

    monkeypatch.setattr(onnx_export, 'fuse_transformer', broken)
    embedder = _embedder('bert', tiny_models)
    report = export_kind(embedder, 'text', tmp_path / 'model.onnx')
    assert report.optimization['fused'] == {}
    assert 'no attention to fuse' in report.optimization['skipped']
    assert report.max_abs_diff < 1e-4
    assert 'Attention' not in _graph_ops(tmp_path / 'model.onnx')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']  # no fused leftover


def test_fused_graph_that_disagrees_is_not_shipped(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused graph is checked like the plain one: one that is off is replaced by the plain graph."""
    import onnx
    from onnx import helper

    from finetuner_trainer import onnx_export

    real = onnx_export.fuse_transformer

    def off_by_one(source: Path, target: Path, options: dict) -> dict[str, int]:
        fused = real(source, target, options)
        model = onnx.load(str(target))
        output = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f'{name}_raw' if name == output else name for name in node.output]
        one = helper.make_tensor('one', onnx.TensorProto.FLOAT, [], [1.0])
        model.graph.initializer.append(one)
        model.graph.node.append(helper.make_node('Add', [f'{output}_raw', 'one'], [output]))
        onnx.save(model, str(target))
        return fused

    monkeypatch.setattr(onnx_export, 'fuse_transformer', off_by_one)
    report = export_kind(_embedder('bert', tiny_models), 'text', tmp_path / 'model.onnx')
    assert 'ONNX Runtime disagrees with torch' in report.optimization['skipped']
    assert report.max_abs_diff < 1e-4
    assert 'Attention' not in _graph_ops(tmp_path / 'model.onnx')


@pytest.mark.parametrize('threads', [1, 3])
def test_numpy_image_transform_equals_the_torch_transform(threads: int) -> None:
    """The ONNX path's PIL + numpy preprocessing gives the torch path's pixel values exactly, whether
    the images of a batch are prepared one after the other or side by side on threads."""
    import io
    import threading
    import time

    from PIL import Image

    from finetuner_trainer.families.timm_cnn import TimmEmbedder
    from finetuner_trainer.models import decode_image
    from finetuner_trainer.numpy_images import NumpyImageTransform

    rng = np.random.default_rng(0)
    images = []
    for width, height in [(224, 224), (300, 200), (97, 123), (640, 480)]:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, format='JPEG')
        images.append(out.getvalue())
    for options in ({'pretrained': False, 'image_size': 224}, TINY_TIMM_OPTIONS):
        model = 'efficientnet_b0' if options.get('image_size') == 224 else TINY_TIMM.removeprefix('timm:')
        embedder = TimmEmbedder('x', model, options)
        numpy_transform = NumpyImageTransform.from_transform(embedder.transform, threads=threads)
        assert numpy_transform is not None and numpy_transform.threads == threads
        expected = torch.stack([embedder.transform(decode_image(data)) for data in images]).numpy()

        def worker(_: int) -> str:
            time.sleep(0.02)  # long enough that the pool hands the items to several threads
            return threading.current_thread().name

        workers = set(numpy_transform.map(worker, range(8)))
        assert (len(workers) > 1) if threads > 1 else (workers == {threading.current_thread().name})
        actual = numpy_transform(images)
        assert actual.dtype == np.float32
        np.testing.assert_array_equal(actual, expected)
        again = numpy_transform(images[:2])  # another batch shape: new buffers, same values
        np.testing.assert_array_equal(again, expected[:2])


def test_unfamiliar_image_transform_keeps_the_torch_preprocessing() -> None:
    from torchvision import transforms as T

    from finetuner_trainer.numpy_images import NumpyImageTransform

    normalize = T.Normalize([0.5] * 3, [0.5] * 3)
    assert NumpyImageTransform.from_transform(T.Compose([T.Resize(8), T.ToTensor(), normalize])) is not None
    assert NumpyImageTransform.from_transform(T.Compose([T.RandomCrop(8), T.ToTensor(), normalize])) is None
    assert NumpyImageTransform.from_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None
    assert NumpyImageTransform.from_transform(None) is None


def test_onnx_text_encoding_is_numpy_with_dynamic_padding_in_input_order(exported: dict[str, tuple]) -> None:
    from finetuner.api.layout import Record
    from finetuner_trainer.inference_onnx import OnnxEmbedder
    from finetuner_trainer.models import as_item

    embedder, folder, _ = exported['bert']
    onnx_model = OnnxEmbedder.load(folder)
    texts = ['red', 'a big blue dog runs fast and far away', 'green cat', 'old yellow train and a slow bus', 'sad']
    records = [Record(text=t) for t in texts]
    feeds = onnx_model.feeds('text', [as_item(r) for r in records[:3]])
    assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in feeds.values())
    longest = max(len(embedder.tokenizer(t)['input_ids']) for t in texts[:3])
    assert feeds['input_ids'].shape == (3, longest)  # padded to this batch's longest text, not max_length
    expected = embedder.embed(records).numpy()
    for batch_size in (1, 2, 32):
        np.testing.assert_allclose(onnx_model.encode(records, batch_size=batch_size), expected, atol=1e-4)
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        onnx_model.encode(records, batch_size=0)
    with pytest.raises(ValueError, match='embeds text, not image'):
        onnx_model.encode(labelled_images(1, 1))


def _session_ops(path: Path, tmp_path: Path, optimizers: bool) -> set[str]:
    """The op types of the graph an ONNX Runtime session runs: ours (``ort_session``), or ONNX Runtime's own
    defaults (``optimizers``: every graph optimisation on)."""
    import onnxruntime as ort

    optimized = tmp_path / f'optimized-{optimizers}.onnx'
    if optimizers:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    else:
        ort_session(path, threads=1, optimized_path=optimized)
    return _graph_ops(optimized)


def test_sessions_do_not_fuse_skip_layer_norms_on_the_cpu(exported: dict[str, tuple], tmp_path: Path) -> None:
    """ONNX Runtime would fuse the shipped graph's residual Add + LayerNormalization into SkipLayerNormalization
    when it loads it; the sessions the ONNX embedder opens keep them apart and keep the shipped fusions."""
    path = exported['bert'][1] / 'onnx' / 'model.onnx'
    assert 'SkipLayerNormalization' in _session_ops(path, tmp_path, optimizers=True)  # what the setting prevents
    ops = _session_ops(path, tmp_path, optimizers=False)
    assert 'SkipLayerNormalization' not in ops
    assert {'Attention', 'BiasGelu', 'EmbedLayerNormalization', 'LayerNormalization'} <= ops


def test_profile_prefix_switches_the_profiler_on(exported: dict[str, tuple], tmp_path: Path) -> None:
    _, folder, _ = exported['bert']
    session = ort_session(folder / 'onnx' / 'model.onnx', threads=1, profile_prefix=str(tmp_path / 'profile'))
    feeds = {name: np.ones((2, 5), dtype=np.int64) for name in (i.name for i in session.get_inputs())}
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    assert {e['args']['op_name'] for e in events if e.get('cat') == 'Node'} >= {'Attention', 'LayerNormalization'}


def _identity_graph(path: Path) -> Path:
    """A graph that multiplies its input by one: a denormal input comes out unchanged unless denormals are
    flushed to zero on the thread that runs it."""
    import onnx
    from onnx import TensorProto, helper

    one = helper.make_tensor('one', TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node('Mul', ['x', 'one'], ['embeddings'])],
        'identity',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info('embeddings', TensorProto.FLOAT, [None])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# torch.set_flush_denormal says whether the CPU can flush (x86 with SSE3); False is this thread's default.
needs_x86 = pytest.mark.skipif(not torch.set_flush_denormal(False), reason='this CPU cannot flush denormals')


@needs_x86
def test_flush_denormals_is_scoped_to_the_block_and_the_thread() -> None:
    import threading

    from finetuner_trainer.onnx_export import denormals_flushed, flush_denormals

    assert not denormals_flushed()
    seen_by_other_thread: list[bool] = []
    look = threading.Event()

    def other_thread() -> None:  # runs before the block starts (a new thread inherits its creator's setting)
        look.wait(timeout=30)
        seen_by_other_thread.append(denormals_flushed())

    other = threading.Thread(target=other_thread)
    other.start()
    with flush_denormals():
        assert denormals_flushed()
        look.set()
        other.join()
        with flush_denormals():  # nested: the inner block leaves the outer one's setting alone
            assert denormals_flushed()
        assert denormals_flushed()
    assert not denormals_flushed() and seen_by_other_thread == [False]
    torch.set_flush_denormal(True)  # a caller that flushes already keeps flushing after the block
    try:
        with flush_denormals():
            assert denormals_flushed()
        assert denormals_flushed()
    finally:
        torch.set_flush_denormal(False)


@needs_x86
def test_sessions_flush_denormals_on_their_threads_not_the_callers(tmp_path: Path) -> None:
    from finetuner_trainer.onnx_export import denormals_flushed, flush_denormals

    path = _identity_graph(tmp_path / 'identity.onnx')
    tiny = np.full(4, 1e-40, dtype=np.float32)  # denormal: float32's smallest normal is 1.18e-38
    one_thread = ort_session(path, threads=1)  # ONNX Runtime would switch FTZ/DAZ on for the opening thread
    assert not denormals_flushed()
    assert one_thread.get_session_options().get_session_config_entry('session.set_denormal_as_zero') == '1'
    (plain,) = one_thread.run(None, {'x': tiny})
    np.testing.assert_array_equal(plain, tiny)  # one thread: the caller's, which does not flush outside the block
    with flush_denormals():
        (flushed,) = one_thread.run(None, {'x': tiny})
    np.testing.assert_array_equal(flushed, np.zeros(4, dtype=np.float32))
    many = np.full(1_000_000, 1e-40, dtype=np.float32)  # split between ONNX Runtime's thread and the caller's
    with flush_denormals():
        (flushed_many,) = ort_session(path, threads=2).run(None, {'x': many})
    assert not flushed_many.any()


def test_onnx_embedder_runs_flushed_and_its_embeddings_are_unchanged(exported: dict[str, tuple]) -> None:
    """Flushing denormals speeds attention's softmax up and does not change the embeddings: the ONNX embedder
    (which flushes) and the same session run without flushing give bitwise the same numbers."""
    from finetuner_trainer.embedder import as_item
    from finetuner_trainer.inference_onnx import OnnxEmbedder
    from finetuner_trainer.onnx_export import OUTPUT_NAME, denormals_flushed

    _, folder, _ = exported['bert']
    onnx_model = OnnxEmbedder.load(folder, threads=1)
    feeds = onnx_model.feeds('text', [as_item(record) for record in labelled_texts(3, 4)])
    flushed = onnx_model.run('text', feeds)
    assert not denormals_flushed()  # the block ended with the run
    (plain,) = onnx_model.sessions['text'].run([OUTPUT_NAME], feeds)
    np.testing.assert_array_equal(flushed, plain)
