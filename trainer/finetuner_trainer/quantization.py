"""Int8 ONNX graphs beside the float ones (``onnxQuantize``), made with ONNX Runtime's own quantisation tools.

Each graph of the artifact (``onnx/model.onnx``; CLIP's ``text.onnx`` and ``image.onnx``) gets an int8
copy (``onnx/model.int8.onnx`` ...), quantised as the model's family plans it for that kind of content
(:meth:`~finetuner_trainer.embedder.Embedder.onnx_quantization`):

- ``dynamic`` (transformer text encoders, CLIP's text tower): int8 weights, per output channel; each
  batch's activations are quantised at run time from their own range
  (``onnxruntime.quantization.quantize_dynamic``: ``MatMulInteger``, ``QAttention`` for a fused attention).
  Needs no data.
- ``static`` (CNNs, CLIP's vision tower): int8 weights per channel and uint8 activations whose ranges are
  calibrated (MinMax) on a sample of the run's own training data (``quantize_static`` in QDQ format:
  QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer kernels). The graph is
  pre-processed first (``quant_pre_process``: shape inference and graph optimisations, as ONNX Runtime's
  documentation recommends).

``onnxQuantize: auto`` takes each graph's planned method; ``dynamic`` or ``static`` forces one on every
graph. Afterwards the int8 and the float graph embed the same check items (the calibration sample and
generated items of other shapes); the cosine similarity of their embeddings is recorded in ``export.json``
(``quantized.<kind>``) and a graph whose embeddings are not finite fails with :class:`QuantizationError`
instead of shipping. How much retrieval quality the int8 model keeps is measured by the trainer on the
evaluation data (``metrics.json``'s ``quantized``).

Alternatives measured and not adopted (all-MiniLM-L6-v2, int8, one thread of a 2-core Xeon, onnxruntime
1.32, 2026-12-05; time of one encode pass of the benchmark's texts, the adopted graph 144-148 ms):
``MultiHeadAttention`` fused back in after quantisation 153.6 ms; quantised ``QAttention`` 163.8-171.3 ms;
``FastGelu`` slower and the cosine to the float graph down to 0.982; ``MatMulNBits`` with 8-bit weights
about 5x slower; signed activations (s8s8) ran their matrix products at 20 GOPS where u8s8 ran at 1,068;
per-tensor weights were 5-8% faster but lost nDCG@10 on the held-out task. What did pay is flushing
denormals to zero while the graph runs (``onnx_export.flush_denormals``): ``Softmax`` 18.2 -> 6.5 ms.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from finetuner_trainer.data import Dataset, Item
from finetuner_trainer.embedder import Embedder, QuantizationPlan, as_item
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.onnx_export import EXPORT_MANIFEST, ONNX_DIR, OUTPUT_NAME, ort_session, sample_records

log = logging.getLogger(__name__)

QUANTIZED_SUFFIX = '.int8.onnx'
CALIBRATION_BATCH = 16


class QuantizationError(RuntimeError):
    """ONNX Runtime could not quantise a graph, or the int8 graph's embeddings are unusable."""


def quantized_file(float_file: str) -> str:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return float_file.removesuffix('.onnx') + QUANTIZED_SUFFIX


def calibration_items(dataset: Dataset | None, kind: str, count: int) -> list[Item]:
    """Up to ``count`` items of ``kind`` spread evenly over the training data, in a fixed order (the same
    run calibrates the same way). An image graph takes tensors when the data has no images (timm)."""
    if dataset is None or count < 1:
        return []
    items = [item for example in dataset.examples for item in example.items]
    found = [item for item in items if item.kind == kind]
    if not found and kind == 'image':
        found = [item for item in items if item.kind == 'tensor']
    step = max(1, len(found) // count)
    return found[::step][:count]


class GraphFeeds:
    """The graph inputs (numpy) for items of one kind: the family's numpy preprocessing, as ONNX inference
    feeds it, else its torch collate. Copies: a feeder may reuse its buffer for the next batch."""

    def __init__(self, embedder: Embedder, kind: str, names: Sequence[str]):
        self.embedder = embedder
        self.kind = kind
        self.names = list(names)
        self.feeder = embedder.onnx_feeder(kind, self.names, None)

    def __call__(self, items: Sequence[Item]) -> dict[str, np.ndarray]:
        kinds = {item.kind for item in items}
        if self.feeder is not None and kinds == {self.kind}:
            return {name: np.array(value, copy=True) for name, value in self.feeder(items).items()}
        if len(kinds) != 1:
            raise QuantizationError(f'a batch of the {self.kind} graph mixes {" and ".join(sorted(kinds))} items')
        inputs = self.embedder.collate_kind(kinds.pop(), list(items))
        return {name: inputs[name].cpu().numpy() for name in self.names}


def _batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class _CalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader``: the calibration batches one by one."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_dynamic_graph(source: Path, target: Path, plan: QuantizationPlan) -> dict[str, Any]:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy: loaded only to quantise

    nodes = _excluded_nodes(source, plan.exclude, plan.float_stem)
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=plan.per_channel,
        op_types_to_quantize=list(plan.op_types) if plan.op_types else None,
        nodes_to_exclude=nodes,
        # ORT's fused transformer ops (Attention, EmbedLayerNormalization, BiasGelu) defeat ONNX's shape inference;
        # their outputs are float32.
        extra_options={'DefaultTensorType': TensorProto.FLOAT},
    )
    return {'format': 'QOperator (dynamic)', 'weights': 'int8', 'activations': 'uint8, per batch at run time'}


def quantize_static_graph(
    source: Path, target: Path, plan: QuantizationPlan, feeds: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    from onnx import TensorProto
    from onnxruntime.quantization import (  # heavy: loaded only to quantise
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix='finetuner-quantize-') as tmp:
        prepared = Path(tmp) / 'prepared.onnx'
        try:
            # In the scratch folder: a failing symbolic shape inference leaves its files in the working directory.
            with _working_directory(tmp):
                quant_pre_process(str(source), str(prepared), auto_merge=True, guess_output_rank=True)
        except Exception as e:  # symbolic shape inference fails on some graphs: quantise the graph as exported
            log.warning('quantisation pre-processing of %s skipped: %s', source.name, e)
            prepared = source
        quantize_static(
            str(prepared),
            str(target),
            _CalibrationReader(feeds),  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(plan.op_types) if plan.op_types else None,
            per_channel=plan.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_excluded_nodes(prepared, plan.exclude, plan.float_stem),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={'DefaultTensorType': TensorProto.FLOAT},  # as in quantize_dynamic_graph
        )
    return {'format': 'QDQ (static)', 'weights': 'int8', 'activations': 'uint8, calibrated (MinMax)'}


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


WEIGHTED_OPS = ('Conv', 'MatMul', 'Gemm')


def _excluded_nodes(path: Path, patterns: Sequence[str], float_stem: bool = False) -> list[str]:
    """Names of the nodes to keep in float: those whose name contains one of ``patterns``, and with
    ``float_stem`` the first weighted node (ONNX lists nodes in topological order)."""
    if not patterns and not float_stem:
        return []
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = [node.name for node in graph.node if any(pattern in node.name for pattern in patterns)]
    stem = next((node.name for node in graph.node if node.op_type in WEIGHTED_OPS), None)
    if float_stem and stem is not None and stem not in names:
        names.append(stem)
    return names


def _unfused_graph(embedder: Embedder, kind: str, folder: Path) -> Path:
    """The ``kind`` graph exported again without the family's fusions (checked against torch like the
    shipped one), into ``folder``."""
    from finetuner_trainer.onnx_export import export_kind  # the exporter's own path, only for this plan

    path = folder / 'unfused.onnx'
    with embedder.onnx_fusion_export():  # the same attention as the fused graph was made from
        export_kind(embedder, kind, path, fuse=False)
    return path


def _agreement(expected: np.ndarray, actual: np.ndarray, what: str) -> tuple[float, float]:
    """(min, mean) cosine similarity of the rows of two embedding matrices; raises when unusable."""
    if actual.shape != expected.shape:
        raise QuantizationError(
            f'the int8 {what} graph returned shape {actual.shape}, the float graph {expected.shape}'
        )
    if not np.isfinite(actual).all():
        raise QuantizationError(f'the int8 {what} graph returned embeddings that are not finite')
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    cosine = (expected * actual).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(cosine.min()), float(cosine.mean())


def quantize_kind(
    embedder: Embedder,
    kind: str,
    source: Path,
    names: Sequence[str],
    plan: QuantizationPlan,
    calibration: Sequence[Item],
) -> dict[str, Any]:
    """Write the int8 version of the ``kind`` graph at ``source`` beside it; its description for
    ``export.json``. ``calibration``: the run's items (static plans; generated items when it has none)."""
    target = source.with_name(quantized_file(source.name))
    generated = [as_item(record) for batch in sample_records(kind) for record in batch]
    items = list(calibration) or generated
    graph_feeds = GraphFeeds(embedder, kind, names)
    feeds = [graph_feeds(batch) for batch in _batches(items, CALIBRATION_BATCH)]
    unfused = plan.unfused and embedder.onnx_fusion_options(kind) is not None
    try:
        with tempfile.TemporaryDirectory(prefix='finetuner-unfused-') as tmp:
            graph = _unfused_graph(embedder, kind, Path(tmp)) if unfused else source
            if plan.method == 'dynamic':
                details = quantize_dynamic_graph(graph, target, plan)
            else:
                details = quantize_static_graph(graph, target, plan, feeds)
    except Exception as e:  # ORT's tools raise many types; all mean "no int8 graph"
        target.unlink(missing_ok=True)
        raise QuantizationError(
            f'{plan.method} quantisation of the {kind} graph failed: {type(e).__name__}: {e}'
        ) from e
    checks = feeds + [graph_feeds([as_item(r) for r in batch]) for batch in sample_records(kind, seed=1)]
    float_session, int8_session = ort_session(source), ort_session(target)
    expected = np.concatenate([float_session.run([OUTPUT_NAME], feed)[0] for feed in checks])
    actual = np.concatenate([int8_session.run([OUTPUT_NAME], feed)[0] for feed in checks])
    cosine_min, cosine_mean = _agreement(expected, actual, kind)
    log.info(
        'int8 %s graph %s (%s): cosine to the float graph min %.4f, mean %.4f over %d items',
        kind, target.name, plan.method, cosine_min, cosine_mean, len(expected),
    )  # fmt: skip
    return {
        'file': target.name,
        'method': plan.method,
        **details,
        'per_channel': plan.per_channel,
        'op_types': list(plan.op_types) if plan.op_types else 'onnxruntime defaults',
        'excluded': list(plan.exclude),
        'float_stem': plan.float_stem,
        'graph': 'as exported, before fusion' if unfused else 'the float graph shipped',
        'calibration': (
            {'items': len(items), 'source': 'training data' if calibration else 'generated samples'}
            if plan.method == 'static'
            else None
        ),
        'cosine_to_float': {'min': cosine_min, 'mean': cosine_mean, 'items': len(expected)},
        'bytes': target.stat().st_size,
        'float_bytes': source.stat().st_size,
    }


def quantize_onnx(
    embedder: Embedder, directory: Path | str, choice: str, training: Dataset | None = None
) -> dict[str, Any]:
    """Quantise every graph listed in ``directory/export.json`` (``choice``: auto, dynamic or static) and add
    a ``quantized`` section to it (kind -> description); returns the updated description."""
    directory = Path(directory).resolve()  # absolute: pre-processing runs in a scratch working directory
    manifest_path = directory / EXPORT_MANIFEST
    description = json.loads(manifest_path.read_text())
    forced = None if choice == 'auto' else choice
    quantized = {}
    was_training = embedder.training
    embedder.eval()
    try:
        for kind, graph in description['graphs'].items():
            plan = embedder.onnx_quantization(kind, forced)
            items = calibration_items(training, kind, plan.calibration_items) if plan.method == 'static' else []
            quantized[kind] = quantize_kind(embedder, kind, directory / graph['file'], graph['inputs'], plan, items)
    finally:
        embedder.train(was_training)
    description['quantization'] = choice
    description['quantized'] = quantized
    manifest_path.write_text(json.dumps(description, indent=2, sort_keys=True))
    return description


def quantize_for_artifact(
    embedder: Embedder, artifact_folder: Path | str, choice: str, training: Dataset | None
) -> dict[str, Any]:
    """``onnxQuantize``: int8 graphs into ``<artifact>/onnx/`` beside the float ones. A graph that cannot be
    quantised fails the run with a configuration error naming ``onnxQuantize`` (final: a retry would
    quantise the same graph)."""
    try:
        return quantize_onnx(embedder, Path(artifact_folder) / ONNX_DIR, choice, training)
    except QuantizationError as e:
        raise ConfigError(
            'onnxQuantize', f'{e}. Run again without onnxQuantize to get the float ONNX model only'
        ) from e
