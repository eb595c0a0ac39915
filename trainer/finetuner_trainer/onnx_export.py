"""ONNX export of a fine-tuned embedder, checked against torch before it is shipped.

One graph per kind of content the model embeds, as its family declares (``Embedder.onnx_graphs``:
``model.onnx`` for a timm CNN (images) or a text encoder, ``text.onnx`` and ``image.onnx`` for CLIP's
two towers). Each graph takes the tensors the embedder's own preprocessing produces
(``pixel_values``; ``input_ids``, ``attention_mask`` ...) with dynamic batch and sequence axes, and
returns ``embeddings`` (projection head included).

A family may have a graph fused after export (``Embedder.onnx_fusion_options``: BERT-like text
encoders are exported with eager attention and fused by ONNX Runtime's transformer optimiser into
``Attention``, ``BiasGelu``, ``EmbedLayerNormalization`` and ``LayerNormalization``), so the
artifact ships the fused graph; the fusions are listed in ``export.json``. Residual additions and their
layer norms are never fused into ``SkipLayerNormalization`` (:data:`SLOW_FUSIONS`), neither here nor by
ONNX Runtime when it loads a graph (:func:`ort_session`): on the CPU its kernel is slower than the
``Add`` and ``LayerNormalization`` it replaces. A fused graph that ONNX
Runtime cannot run, or that disagrees with torch, is replaced by the plain graph (the reason is
recorded) rather than failing the run.

After export, ONNX Runtime runs every graph on sample inputs of two different shapes and the result
is compared with torch: the maximum absolute difference is reported in ``onnx/export.json`` and an
export above tolerance raises :class:`OnnxExportError` instead of shipping a wrong model.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from finetuner.api.layout import Record
from finetuner_trainer.cpus import available_cpus
from finetuner_trainer.embedder import Embedder
from finetuner_trainer.errors import ConfigError

log = logging.getLogger(__name__)

ONNX_DIR = 'onnx'
EXPORT_MANIFEST = 'export.json'
OPSET = 17
OUTPUT_NAME = 'embeddings'
SEQUENCE_INPUTS = ('input_ids', 'attention_mask', 'token_type_ids', 'position_ids')

# Fusions that slow the CPU down, as ONNX Runtime names them: the python transformer optimiser's
# ``FusionOptions`` switches (fuse_transformer) and the graph transformers ORT itself applies when a
# session loads a graph (ort_session). ``SkipLayerNormalization`` (a residual Add, a bias Add and a
# LayerNormalization in one kernel) took 670-990 us where the three ops it replaces took 130-260 us
# (onnxruntime 1.32, one thread of an AVX-512 Xeon, hidden size 384, batches of 32x8, 21x17 and 4x64
# tokens); in all-MiniLM-L6-v2 it was 12% of the float graph's time and 19% of the int8 graph's.
SLOW_FUSIONS: tuple[str, ...] = ('enable_skip_layer_norm', 'enable_bias_skip_layer_norm')
SLOW_SESSION_OPTIMIZERS: tuple[str, ...] = ('SkipLayerNormFusion', 'BiasSkipLayerNormFusion')


def denormals_flushed() -> bool:
    """Whether this thread flushes denormal floats to zero (x86's FTZ/DAZ bits of MXCSR, per thread):
    with DAZ a denormal operand reads as zero, so the product of the smallest positive float32
    denormal and one is zero exactly when they are set."""
    return float(np.float32(1e-45) * np.float32(1.0)) == 0.0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero on the calling thread inside the block; the thread's previous
    setting is restored after it, so the caller's own (torch) arithmetic is unchanged.

    Why: attention's softmax over padded positions and the activations of small weights produce
    denormals, and on x86 an instruction that meets one takes a microcode assist of ~100 cycles. In
    all-MiniLM-L6-v2's int8 graph on one thread of a Xeon, ``Softmax`` took 18.2 ms of a pass with
    denormals and 6.5 ms flushed; the embeddings were bitwise the same (a denormal is < 1.2e-38, far
    below what a float32 sum of O(1) terms keeps). Where the CPU has no such switch (not x86), the block
    runs unchanged."""
    before = denormals_flushed()
    if before or not torch.set_flush_denormal(True):
        yield  # already flushing, or the CPU cannot
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class OnnxExportError(RuntimeError):
    """The ONNX graph could not be built, or ONNX Runtime disagrees with torch beyond tolerance."""


@dataclass
class GraphReport:
    kind: str
    file: str
    inputs: list[str]
    max_abs_diff: float
    tolerance: float
    shapes_checked: list[dict[str, list[int]]] = field(default_factory=list)
    optimization: dict[str, Any] = field(default_factory=dict)


class _KindGraph(nn.Module):
    """The part of an embedder that embeds one kind of content, as a function of plain tensors."""

    def __init__(self, embedder: Embedder, kind: str, input_names: Sequence[str]):
        super().__init__()
        self.embedder = embedder
        self.kind = kind
        self.input_names = tuple(input_names)

    def forward(self, *tensors: Tensor) -> Tensor:
        inputs = dict(zip(self.input_names, tensors, strict=True))
        out = self.embedder.encode(self.kind, inputs)
        head = self.embedder.head
        return head(out) if head is not None else out


def sample_records(kind: str, seed: int = 0) -> list[list[Record]]:
    """Two batches of different size (and text length) used to check dynamic axes."""
    if kind == 'text':
        return [
            [Record(text='red cat'), Record(text='a big blue dog runs fast'), Record(text='green')],
            [Record(text='old yellow train and a slow white bus with a happy bird'), Record(text='sad fish')],
        ]
    from PIL import Image  # Pillow is imported where images are made: a text export never loads it

    rng = np.random.default_rng(seed)

    def image(size: int) -> Record:
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format='PNG')
        return Record(blob=base64.b64encode(out.getvalue()).decode())

    return [[image(48), image(40)], [image(64), image(32), image(56)]]


def _inputs_of(embedder: Embedder, kind: str, records: Sequence[Record]) -> dict[str, Tensor]:
    batch = embedder.collate(list(records))
    ((part_kind, inputs, _),) = batch['parts']
    if part_kind != kind:
        raise OnnxExportError(f'sample {kind} records were collated as {part_kind}')
    return {name: value.cpu() for name, value in inputs.items() if isinstance(value, Tensor)}


def fuse_transformer(source: Path, target: Path, options: dict[str, Any]) -> dict[str, int]:
    """Write ORT's fused version of the graph at ``source`` to ``target``; the fusions made (op: count)."""
    from onnxruntime.transformers.fusion_options import FusionOptions  # heavy: loaded only to fuse a graph
    from onnxruntime.transformers.optimizer import optimize_model

    fusions = FusionOptions(options.get('model_type', 'bert'))
    for switch in SLOW_FUSIONS:
        setattr(fusions, switch, False)
    # opt_level 0: only the portable python fusions, no hardware-specific ORT rewrites baked in.
    model = optimize_model(str(source), opt_level=0, use_gpu=False, optimization_options=fusions, **options)
    fused = {op: int(n) for op, n in model.get_fused_operator_statistics().items() if n}
    if not fused.get('Attention'):
        raise OnnxExportError(f'the optimiser found no attention to fuse (fusions: {fused or "none"})')
    model.save_model_to_file(str(target))
    return fused


@contextmanager
def _full_float32() -> Iterator[None]:
    """torch's reference outputs in full float32 precision. The trainer switches TF32 on for training on
    CUDA (runner.pick_device); a TF32 reference differs from ONNX Runtime's float32 by about 1e-3 of the
    output, over the export tolerance, and the check would refuse a correct graph."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_graph(
    embedder: Embedder,
    kind: str,
    module: nn.Module,
    names: list[str],
    path: Path,
    samples: Sequence[Sequence[Record]],
    atol: float,
    rtol: float,
) -> tuple[float, float, list[dict[str, list[int]]]]:
    """Run the graph at ``path`` in ONNX Runtime on every sample batch and compare with torch: (worst
    difference, tolerance, shapes); raises :class:`OnnxExportError` above tolerance."""
    device = next(embedder.parameters()).device
    session = ort_session(path)
    worst = 0.0
    tolerance = 0.0
    shapes = []
    for records in samples:
        inputs = _inputs_of(embedder, kind, records)
        with torch.no_grad(), _full_float32():
            expected = module(*(inputs[name].to(device) for name in names)).float().cpu().numpy()
        feeds = {name: inputs[name].numpy() for name in names}
        (actual,) = session.run([OUTPUT_NAME], feeds)
        if actual.shape != expected.shape:
            raise OnnxExportError(
                f'ONNX {kind} graph of {embedder.name} returned shape {actual.shape}, torch {expected.shape}'
            )
        diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
        allowed = atol + rtol * float(np.max(np.abs(expected))) if expected.size else atol
        worst = max(worst, diff)
        tolerance = max(tolerance, allowed)
        shapes.append({name: list(value.shape) for name, value in feeds.items()})
        if not np.isfinite(actual).all() or diff > allowed:
            raise OnnxExportError(
                f'ONNX Runtime disagrees with torch on the {kind} graph of {embedder.name}: max abs diff '
                f'{diff:.3g} > tolerance {allowed:.3g} (inputs {shapes[-1]}); the ONNX model is not shipped'
            )
    return worst, tolerance, shapes


def export_kind(
    embedder: Embedder,
    kind: str,
    path: Path,
    samples: Sequence[Sequence[Record]] | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    fuse: bool = True,
) -> GraphReport:
    """Export the ``kind`` graph of ``embedder`` to ``path`` and check it with ONNX Runtime.

    ``fuse``: when the family fuses this graph (a BERT-like text encoder), ship ORT's fused graph when it
    passes the same check."""
    samples = samples or sample_records(kind)
    was_training = embedder.training
    embedder.eval()
    device = next(embedder.parameters()).device
    fusion = embedder.onnx_fusion_options(kind) if fuse else None
    optimization: dict[str, Any] = {}
    try:
        first = _inputs_of(embedder, kind, samples[0])
        names = list(first)
        module = _KindGraph(embedder, kind, names).eval()  # a new module trains by default; export restores that
        dynamic_axes: dict[str, dict[int, str]] = {
            name: ({0: 'batch', 1: 'sequence'} if name in SEQUENCE_INPUTS else {0: 'batch'}) for name in names
        }
        dynamic_axes[OUTPUT_NAME] = {0: 'batch'}
        path.parent.mkdir(parents=True, exist_ok=True)
        with embedder.onnx_fusion_export() if fusion else nullcontext():
            try:
                with torch.no_grad():
                    torch.onnx.export(
                        module,
                        tuple(first[name].to(device) for name in names),
                        str(path),
                        input_names=names,
                        output_names=[OUTPUT_NAME],
                        dynamic_axes=dynamic_axes,
                        opset_version=OPSET,
                        do_constant_folding=True,
                        dynamo=False,
                    )
            except Exception as e:  # the exporter raises many types; all mean "no graph"
                raise OnnxExportError(f'exporting the {kind} graph of {embedder.name} to ONNX failed: {e}') from e
            worst, tolerance, shapes = _check_graph(embedder, kind, module, names, path, samples, atol, rtol)
            if fusion is not None:
                fused_path = path.with_name(path.stem + '.fused.onnx')
                try:
                    fused = fuse_transformer(path, fused_path, fusion)
                    worst, tolerance, shapes = _check_graph(
                        embedder, kind, module, names, fused_path, samples, atol, rtol
                    )
                except Exception as e:  # the optimiser and ORT raise many types; all mean "ship the plain graph"
                    log.warning('ONNX %s graph of %s: keeping the unfused graph (%s)', kind, embedder.name, e)
                    optimization = {'fused': {}, 'skipped': f'{type(e).__name__}: {e}'}
                else:
                    fused_path.replace(path)
                    optimization = {
                        'fused': fused,
                        'optimizer': 'onnxruntime.transformers',
                        'not_fused': [switch.removeprefix('enable_') for switch in SLOW_FUSIONS],
                        **fusion,
                    }
                finally:
                    fused_path.unlink(missing_ok=True)
    finally:
        embedder.train(was_training)
    log.info('ONNX %s graph %s: max abs diff vs torch %.3g (tolerance %.3g)', kind, path.name, worst, tolerance)
    return GraphReport(kind, path.name, names, worst, tolerance, shapes, optimization)


def export_onnx(
    embedder: Embedder,
    directory: Path | str,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Export every graph of ``embedder`` into ``directory`` and write ``export.json`` describing them.

    Returns that description: {"format": "onnx", "opset", "graphs": {kind: {file, inputs,
    max_abs_diff, tolerance}}, "max_abs_diff"}."""
    directory = Path(directory)
    reports = [
        export_kind(embedder, kind, directory / file, atol=atol, rtol=rtol)
        for kind, file in embedder.onnx_graphs.items()
    ]
    description = {
        'format': 'onnx',
        'opset': OPSET,
        'family': embedder.family,
        'output': OUTPUT_NAME,
        'graphs': {
            r.kind: {
                'file': r.file,
                'inputs': r.inputs,
                'max_abs_diff': r.max_abs_diff,
                'tolerance': r.tolerance,
                'shapes_checked': r.shapes_checked,
                'optimization': r.optimization,
            }
            for r in reports
        },
        'max_abs_diff': max(r.max_abs_diff for r in reports),
    }
    (directory / EXPORT_MANIFEST).write_text(json.dumps(description, indent=2, sort_keys=True))
    return description


def ort_session(
    path: Path | str,
    threads: int | None = None,
    *,
    profile_prefix: str | None = None,
    optimized_path: Path | None = None,
) -> Any:
    """An ONNX Runtime session with all graph optimisations enabled (on the CPU, except
    :data:`SLOW_SESSION_OPTIMIZERS`), on ``threads`` intra-op threads (default: the CPUs the process may
    use, its container's CPU quota included; ONNX Runtime's own default is one thread per core of the
    machine, which a CPU-limited container cannot run at once).

    For looking inside: ``profile_prefix`` switches ONNX Runtime's profiler on (``session.end_profiling()``
    returns its JSON file); ``optimized_path`` receives the graph as the session runs it, after ONNX
    Runtime's own optimisations."""
    import onnxruntime as ort  # heavy: loaded only where a graph is run

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Like torch.set_num_threads: the operators' own threads; nodes run one after the other.
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    # ONNX Runtime's own intra-op threads flush denormals (flush_denormals says why); the caller's thread,
    # which runs a share of the work too, flushes inside OnnxEmbedder.run.
    options.add_session_config_entry('session.set_denormal_as_zero', '1')
    providers = [p for p in ('CUDAExecutionProvider', 'CPUExecutionProvider') if p in ort.get_available_providers()]
    # The slow fusions are the CPU kernel's; on a GPU ONNX Runtime fuses the residual layer norms itself.
    disabled = [] if 'CUDAExecutionProvider' in providers else list(SLOW_SESSION_OPTIMIZERS)
    # ORT sets FTZ/DAZ on the thread that opens a session with set_denormal_as_zero: opened inside
    # flush_denormals, the caller's thread gets its own setting back.
    with flush_denormals():
        return ort.InferenceSession(str(path), sess_options=options, providers=providers, disabled_optimizers=disabled)


def export_for_artifact(embedder: Embedder, artifact_folder: Path | str) -> dict[str, Any]:
    """``toOnnx``: export into ``<artifact>/onnx/``. A graph that disagrees with torch fails the run
    with a configuration error (final: a retry would export the same graph) naming ``toOnnx``."""
    try:
        return export_onnx(embedder, Path(artifact_folder) / ONNX_DIR)
    except OnnxExportError as e:
        raise ConfigError('toOnnx', f'{e}. Run again with toOnnx: false to get the torch model only') from e
