"""Quality uplift: retrieval on held-out chatterbot-corpus questions, before and after fine-tuning.

The question-answer pairs are split by question (20% of the questions and all their answers are
held out). Both sides fine-tune all-MiniLM-L6-v2 on the training pairs with
``MultipleNegativesRankingLoss``, the same epochs, batch size, learning rate and max length: this
project through ``finetuner_trainer.train`` (the artifact read back with ``finetuner.get_model`` and
embedded with ``finetuner.encode``), sentence-transformers through its own trainer. Every held-out
question is a query; the index is every held-out answer, relevant when it answers that question.
Metrics at k = 10 from ``finetuner_trainer.evaluation.retrieval_metrics``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import data, ours, st_reference
from bench.common import Row, Settings
from bench.text_throughput import MAX_LENGTH, text_model
from finetuner.api.layout import Record

BENCHMARK = 'quality'
BATCH = 32
LEARNING_RATE = 5e-5
HELD_OUT = 0.2
K = 10
METRICS = (('mrr', 'MRR@10'), ('recall_at_k', 'recall@10'), ('ndcg_at_k', 'nDCG@10'), ('map', 'mAP@10'))
UPLIFT_TARGET = 0.10


def _eval_set(test: list[data.QAPair]) -> tuple[list[str], list[str], list[str], list[str]]:
    questions = sorted({p.question for p in test})
    return questions, questions, [p.answer for p in test], [p.question for p in test]


def _tiny_pairs() -> list[data.QAPair]:
    from tests.support.tiny import text_pairs

    return [data.QAPair(r.chunks[0].text or '', r.chunks[1].text or '', 'tiny') for r in text_pairs(n=64, seed=1)]


def _metrics(query_emb: Any, index_emb: Any, query_labels: list[str], index_labels: list[str]) -> dict[str, float]:
    import torch

    from finetuner_trainer.evaluation import retrieval_metrics

    return retrieval_metrics(
        torch.as_tensor(query_emb), torch.as_tensor(index_emb), query_labels, index_labels, limit=K
    )


def run(settings: Settings) -> list[Row]:
    import finetuner

    model_dir = text_model(settings)
    pairs = _tiny_pairs() if settings.mode == 'tiny' else data.chatterbot_pairs()
    train, test = data.split_by_question(pairs, HELD_OUT, seed=0)
    if settings.mode == 'quick':
        train = data.repeat_to_pairs(train, 320, seed=0)
    epochs = settings.pick(full=1, quick=1, tiny=1)
    queries, query_labels, index, index_labels = _eval_set(test)
    train_records: list[Record] = data.pair_records(train)

    pretrained = st_reference.load(model_dir, MAX_LENGTH, settings.device)
    before = _metrics(
        st_reference.encode(pretrained, queries), st_reference.encode(pretrained, index), query_labels, index_labels
    )

    began = time.perf_counter()
    spec = ours.spec_for(
        str(model_dir),
        train_records,
        settings.workdir,
        'quality',
        loss='MultipleNegativesRankingLoss',
        batch_size=BATCH,
        epochs=epochs,
        learning_rate=LEARNING_RATE,
        model_options={'max_length': MAX_LENGTH},
        device=settings.device,
    )
    result = ours.train_run(spec, settings.workdir, 'quality-ours')
    ours_seconds = time.perf_counter() - began
    artifact = Path(result.artifact_uri.removeprefix('file://'))
    model = finetuner.get_model(artifact, device=settings.device)
    after_ours = _metrics(finetuner.encode(model, queries), finetuner.encode(model, index), query_labels, index_labels)

    began = time.perf_counter()
    st_model, _ = st_reference.train(
        model_dir,
        train_records,
        'pairs',
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        epochs=epochs,
        learning_rate=LEARNING_RATE,
        device=settings.device,
        output_dir=settings.workdir / 'st-quality',
        bf16=settings.gpu,
    )
    st_seconds = time.perf_counter() - began
    after_st = _metrics(
        st_reference.encode(st_model, queries), st_reference.encode(st_model, index), query_labels, index_labels
    )

    setting = (
        f'{len(train)} training pairs, {len(queries)} held-out questions, {len(index)} answers, '
        f'{epochs} epoch, lr {LEARNING_RATE:g}, batch {BATCH}'
    )
    rows = []
    for key, label in METRICS:
        rows.append(
            Row.compare(
                benchmark=BENCHMARK,
                measure=f'retrieval {label} after fine-tuning ({setting})',
                unit='',
                samples_ours=[after_ours[key]],
                samples_reference=[after_st[key]],
                reference_name='sentence-transformers fine-tuned',
                target_ratio=None,
                target='–',
                extra={'pretrained': before[key]},
            )
        )
    uplift_ours = after_ours['mrr'] / before['mrr'] - 1 if before['mrr'] else 0.0
    uplift_st = after_st['mrr'] / before['mrr'] - 1 if before['mrr'] else 0.0
    met = uplift_ours >= UPLIFT_TARGET and uplift_ours >= uplift_st
    rows.append(
        Row(
            benchmark=BENCHMARK,
            measure=f'MRR@10 relative uplift over the pretrained model (pretrained MRR@10 {before["mrr"]:.4f})',
            unit='%',
            ours=100 * uplift_ours,
            reference=100 * uplift_st,
            reference_name='sentence-transformers',
            ratio=(uplift_ours / uplift_st) if uplift_st > 0 else None,
            target=f'>= +{UPLIFT_TARGET:.0%} and >= the reference',
            met=met,
            extra={'train_seconds_ours': ours_seconds, 'train_seconds_reference': st_seconds},
        )
    )
    return rows
