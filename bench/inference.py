"""Inference: embedding with the artifact's ONNX graph vs torch eager, batch 32, on the CPU.

The artifact comes from a real run with ``toOnnx: true`` (one training step; the trainer checks ONNX
Runtime against torch before shipping the graph). Both sides embed through ``finetuner.encode``: the
torch side loaded with ``finetuner.get_model(artifact)``, the ONNX side with the embedder that
``get_model(artifact, is_onnx=True)`` returns (built directly to pin its threads like torch's). Both
use the artifact's own preprocessing (tokenizer with dynamic padding, or timm's image transform) on
the same records, so the ratio is the speed-up a user of ``encode`` sees, preprocessing included: the
torch side through the embedder's collate (torch tensors), the ONNX side through its numpy
preprocessing. Both sides run the same batches (``finetuner_trainer.models.plan_batches``: texts
longest first by token count, a few long ones in a batch of their own rather than padding 31 short
ones to their length; images in input order). ``split_time`` then times each part alone, including
both networks on the very same batches (torch in eval mode, as ``encode`` runs it), so the table says
how much of a ratio is the network and how much the preprocessing.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench import data, ours
from bench.common import Row, Settings, alternate
from bench.text_throughput import MAX_LENGTH, text_model
from finetuner.api.layout import Record

BENCHMARK = 'inference'
BATCH = 32
TARGETS = {'image': 2.0, 'text': 1.2}


def _cases(settings: Settings) -> list[tuple[str, str, dict[str, Any], str]]:
    """(label, spec model, model options, kind) per model measured in this mode."""
    if settings.mode == 'tiny':
        return [
            ('test_resnet 32 px', 'timm:test_resnet', {'pretrained': False, 'image_size': 32}, 'image'),
            ('tiny BERT', str(text_model(settings)), {'max_length': MAX_LENGTH}, 'text'),
        ]
    return [
        ('efficientnet_b0 224 px', 'efficientnet_b0', {'pretrained': False, 'image_size': 224}, 'image'),
        ('all-MiniLM-L6-v2', str(text_model(settings)), {'max_length': MAX_LENGTH}, 'text'),
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


def build_artifact(model: str, options: dict[str, Any], kind: str, settings: Settings) -> Path:
    """A real ``toOnnx: true`` run (one training step) through ``finetuner_trainer.train``: the
    artifact folder, holding the model, ``manifest.json`` and ``onnx/``."""
    if kind == 'image':
        records = data.labelled_images(BATCH, 32 if settings.mode == 'tiny' else 224, n_classes=BATCH // 4)
        fields: dict[str, Any] = {'loss': 'TripletMarginLoss'}
    else:
        texts = _records('text', 2 * BATCH, settings)
        records = [Record(chunks=[texts[i], texts[i + 1]]) for i in range(0, len(texts), 2)]
        fields = {'loss': 'MultipleNegativesRankingLoss'}
    spec = ours.spec_for(
        model,
        records,
        settings.workdir,
        f'inference-{kind}',
        batch_size=BATCH,
        epochs=1,
        model_options=options,
        to_onnx=True,
        device='cpu',
        **fields,
    )
    result = ours.train_run(spec, settings.workdir, f'inference-{kind}')
    return Path(result.artifact_uri.removeprefix('file://'))


def run(settings: Settings) -> list[Row]:
    import finetuner
    from finetuner_trainer.inference_onnx import OnnxEmbedder

    rounds = settings.pick(full=5, quick=3, tiny=1)
    batches = settings.pick(full=4, quick=2, tiny=1)
    rows = []
    for label, model, options, kind in _cases(settings):
        directory = build_artifact(model, options, kind, settings)
        records = _records(kind, batches * BATCH, settings)
        eager = finetuner.get_model(directory)
        # What get_model(is_onnx=True) returns, with the session's threads pinned like torch's.
        onnx = OnnxEmbedder.load(directory, threads=settings.threads)
        for side in (eager, onnx):  # warm-up: lazy initialisation of both sides
            finetuner.encode(side, records[:BATCH], batch_size=BATCH)

        cpu_rates: dict[str, list[float]] = {'eager': [], 'onnx': []}

        def encode_round(
            side: str, model: Any, records: list[Record] = records, cpu_rates: dict[str, list[float]] = cpu_rates
        ) -> float:
            # items/s in wall time (the table's ratio), and in process CPU time (kept in extra).
            wall, cpu = time.perf_counter(), time.process_time()
            finetuner.encode(model, records, batch_size=BATCH)
            cpu_rates[side].append(len(records) / max(time.process_time() - cpu, 1e-9))
            return len(records) / (time.perf_counter() - wall)

        def eager_round(eager: Any = eager, encode_round: Any = encode_round) -> float:
            return encode_round('eager', eager)

        def onnx_round(onnx: Any = onnx, encode_round: Any = encode_round) -> float:
            return encode_round('onnx', onnx)

        samples_onnx, samples_eager = alternate(onnx_round, eager_round, rounds)
        split = split_time(eager, onnx, records, repeats=settings.pick(full=3, quick=3, tiny=1))
        split['ratio_cpu'] = statistics.median(cpu_rates['onnx']) / statistics.median(cpu_rates['eager'])
        row = Row.compare(
            benchmark=BENCHMARK,
            measure=f'encode {label}, batch {BATCH}, CPU: ONNX artifact vs torch eager',
            unit='items/s',
            samples_ours=samples_onnx,
            samples_reference=samples_eager,
            reference_name='torch eager',
            target_ratio=TARGETS[kind],
            extra=split,
        )
        row.note = split_note(split, len(records), missed=row.met is False)
        rows.append(row)
    return rows


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
