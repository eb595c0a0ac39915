"""Inference: embedding with the artifact's ONNX graph vs torch eager, batch 32, on the CPU.

The artifact comes from a real run with ``toOnnx: true`` (one training step; the trainer checks ONNX
Runtime against torch before shipping the graph). Both sides embed through ``finetuner.encode``: the
torch side loaded with ``finetuner.get_model(artifact)``, the ONNX side with the embedder that
``get_model(artifact, is_onnx=True)`` returns (built directly to pin its threads like torch's). Both
use the artifact's own preprocessing (tokenizer with dynamic padding, or timm's image transform) on
the same records, so the ratio is the speed-up a user of ``encode`` sees, preprocessing included.
"""

from __future__ import annotations

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

        def eager_round(eager: Any = eager, records: list[Record] = records) -> float:
            began = time.perf_counter()
            finetuner.encode(eager, records, batch_size=BATCH)
            return len(records) / (time.perf_counter() - began)

        def onnx_round(onnx: Any = onnx, records: list[Record] = records) -> float:
            began = time.perf_counter()
            finetuner.encode(onnx, records, batch_size=BATCH)
            return len(records) / (time.perf_counter() - began)

        samples_onnx, samples_eager = alternate(onnx_round, eager_round, rounds)
        split = split_time(eager, onnx, records)
        row = Row.compare(
            benchmark=BENCHMARK,
            measure=f'encode {label}, batch {BATCH}, CPU: ONNX artifact vs torch eager',
            unit='items/s',
            samples_ours=samples_onnx,
            samples_reference=samples_eager,
            reference_name='torch eager',
            target_ratio=TARGETS[kind],
            extra={k: v for k, v in split.items() if isinstance(v, float)},
        )
        if row.met is False:
            row.note = (
                f'target missed. Split of one pass over the same {len(records)} items (seconds): preprocessing '
                f"{split['preprocess_s']:.3f} (the artifact's own tokenizer or image transform, the same on both "
                f'sides), network in ONNX Runtime {split["onnx_network_s"]:.3f}, network in torch eager '
                f'{split["eager_network_s"]:.3f}: the networks alone run at '
                f'{split["eager_network_s"] / split["onnx_network_s"]:.2f}x, preprocessing is '
                f'{split["preprocess_s"] / (split["preprocess_s"] + split["onnx_network_s"]):.0%} of the ONNX side.'
            )
        rows.append(row)
    return rows


def split_time(eager: Any, onnx: Any, records: list[Record]) -> dict[str, float]:
    """Where an encode pass goes: preprocessing (collate) alone, then each network on the collated
    batches alone (a profile by subtraction-free direct timing of the parts)."""
    import torch

    batches = [eager.collate(records[i : i + BATCH]) for i in range(0, len(records), BATCH)]
    began = time.perf_counter()
    for i in range(0, len(records), BATCH):
        eager.collate(records[i : i + BATCH])
    preprocess = time.perf_counter() - began
    began = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            eager(batch)
    eager_network = time.perf_counter() - began
    began = time.perf_counter()
    for batch in batches:
        for kind, inputs, _ in batch['parts']:
            graph_kind = 'image' if kind == 'tensor' and 'image' in onnx.sessions else kind
            feeds = {name: inputs[name].cpu().numpy() for name in onnx.inputs[graph_kind]}
            onnx.sessions[graph_kind].run(None, feeds)
    onnx_network = time.perf_counter() - began
    return {'preprocess_s': preprocess, 'eager_network_s': eager_network, 'onnx_network_s': onnx_network}
