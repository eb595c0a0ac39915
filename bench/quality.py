"""Quality uplift: retrieval on held-out chatterbot-corpus data, before and after fine-tuning.

Two retrieval tasks, each fine-tuned by both sides from the same pretrained all-MiniLM-L6-v2 with
the same epochs, batch size, learning rate and max length: this project through
``finetuner_trainer.train`` (the artifact read back with ``finetuner.get_model`` and embedded with
``finetuner.encode``), sentence-transformers through its own trainer.

- ``qa``: question -> answer. The pairs are split by question (20% of the questions and all their
  answers held out); ``MultipleNegativesRankingLoss`` on both sides. Every held-out question is a
  query; the index is every held-out answer, relevant when it answers that question.
- ``topics``: question -> questions of the same topic (the demo's task). Questions labelled with
  their corpus file (ai, food, history, ...), 30% of each topic held out; ours
  ``TripletMarginLoss`` over class-balanced batches, sentence-transformers ``BatchAllTripletLoss``
  over label-grouped batches. Every held-out question is a query against the other held-out
  questions, relevant when they share its topic.

Metrics at k = 10 from ``finetuner_trainer.evaluation.retrieval_metrics``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import data, ours, st_reference
from bench.common import Row, Settings
from bench.text_throughput import text_model
from finetuner.api.layout import Record

BENCHMARK = 'quality'
BATCH = 32
K = 10
METRICS = (('mrr', 'MRR@10'), ('recall_at_k', 'recall@10'), ('ndcg_at_k', 'nDCG@10'), ('map', 'mAP@10'))
UPLIFT_TARGET = 0.10


@dataclass
class Task:
    """One retrieval task: its training records and its held-out queries and index."""

    name: str
    title: str
    loss: str  # ours
    st_task: st_reference.TextTask
    epochs: int
    learning_rate: float
    max_length: int
    train: list[Record]
    queries: list[str]
    query_labels: list[str]
    index: list[str]
    index_labels: list[str]
    exclude_self: bool = False
    spec_fields: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1  # both sides train once per seed; the table shows the median over seeds

    @property
    def setting(self) -> str:
        return (
            f'{self.title}: {len(self.train)} training {"pairs" if self.st_task == "pairs" else "questions"}, '
            f'{len(self.queries)} held-out queries, {len(self.index)} in the index, {self.epochs} epoch'
            f'{"s" if self.epochs > 1 else ""}, lr {self.learning_rate:g}, batch {BATCH}'
            + (f', median of {self.seeds} seeds' if self.seeds > 1 else '')
        )


def qa_task(settings: Settings) -> Task:
    if settings.mode == 'tiny':
        from tests.support.tiny import text_pairs

        pairs = [data.QAPair(r.chunks[0].text or '', r.chunks[1].text or '', 'tiny') for r in text_pairs(n=64, seed=1)]
    else:
        pairs = data.chatterbot_pairs()
    train, test = data.split_by_question(pairs, 0.2, seed=0)
    if settings.mode == 'quick':
        train = data.repeat_to_pairs(train, 320, seed=0)
    questions = sorted({p.question for p in test})
    return Task(
        name='qa',
        title='question -> answer',
        loss='MultipleNegativesRankingLoss',
        st_task='pairs',
        epochs=1,
        learning_rate=5e-5,
        max_length=64,
        train=data.pair_records(train),
        queries=questions,
        query_labels=questions,
        index=[p.answer for p in test],
        index_labels=[p.question for p in test],
        seeds=settings.pick(full=2, quick=1, tiny=1),
    )


def topics_task(settings: Settings) -> Task:
    from finetuner.demo import TASKS

    recipe = TASKS['topics']  # the demo's recipe and data, so the benchmark measures what the README shows
    if settings.mode == 'tiny':
        from tests.support.tiny import labelled_texts

        records = labelled_texts(n_classes=4, per_class=12, seed=1)
        train, held = records[::2], records[1::2]
    else:
        train, held = recipe.load()
    texts = [r.text or '' for r in held]
    labels = [str(r.label) for r in held]
    return Task(
        name='topics',
        title=recipe.title,
        loss=recipe.loss,
        st_task='triplet',
        epochs=recipe.epochs,
        learning_rate=recipe.learning_rate,
        max_length=recipe.max_length,
        train=train,
        queries=texts,
        query_labels=labels,
        index=texts,
        index_labels=labels,
        exclude_self=True,
        spec_fields=dict(recipe.fit_options),
        seeds=settings.pick(full=3, quick=1, tiny=1),
    )


def _metrics(task: Task, query_emb: Any, index_emb: Any) -> dict[str, float]:
    import torch

    from finetuner_trainer.evaluation import retrieval_metrics

    return retrieval_metrics(
        torch.as_tensor(query_emb),
        torch.as_tensor(index_emb),
        task.query_labels,
        task.index_labels,
        limit=K,
        exclude_self=task.exclude_self,
        query_ids=list(range(len(task.queries))) if task.exclude_self else None,
        index_ids=list(range(len(task.index))) if task.exclude_self else None,
    )


def evaluate_task(task: Task, settings: Settings) -> list[Row]:
    """Pretrained, ours and sentence-transformers' fine-tuning on ``task``: a row per metric and
    the uplift row."""
    import finetuner

    model_dir = text_model(settings)
    pretrained = st_reference.load(model_dir, task.max_length, settings.device)
    before = _metrics(task, st_reference.encode(pretrained, task.queries), st_reference.encode(pretrained, task.index))

    after_ours: list[dict[str, float]] = []
    after_st: list[dict[str, float]] = []
    ours_seconds = st_seconds = 0.0
    for seed in range(task.seeds):
        began = time.perf_counter()
        spec = ours.spec_for(
            str(model_dir),
            task.train,
            settings.workdir,
            f'quality-{task.name}-{seed}',
            loss=task.loss,
            batch_size=BATCH,
            epochs=task.epochs,
            learning_rate=task.learning_rate,
            model_options={'max_length': task.max_length},
            device=settings.device,
            seed=seed,
            **task.spec_fields,
        )
        result = ours.train_run(spec, settings.workdir, f'quality-{task.name}-ours-{seed}')
        ours_seconds += time.perf_counter() - began
        model = finetuner.get_model(Path(result.artifact_uri.removeprefix('file://')), device=settings.device)
        after_ours.append(_metrics(task, finetuner.encode(model, task.queries), finetuner.encode(model, task.index)))

        began = time.perf_counter()
        st_model, _ = st_reference.train(
            model_dir,
            task.train,
            task.st_task,
            batch_size=BATCH,
            max_length=task.max_length,
            epochs=task.epochs,
            learning_rate=task.learning_rate,
            seed=seed,
            device=settings.device,
            output_dir=settings.workdir / f'st-quality-{task.name}-{seed}',
            bf16=settings.gpu,
        )
        st_seconds += time.perf_counter() - began
        after_st.append(
            _metrics(task, st_reference.encode(st_model, task.queries), st_reference.encode(st_model, task.index))
        )

    rows = [
        Row.compare(
            benchmark=BENCHMARK,
            measure=f'retrieval {label} after fine-tuning ({task.setting})',
            unit='',
            samples_ours=[after[key] for after in after_ours],
            samples_reference=[after[key] for after in after_st],
            reference_name='sentence-transformers fine-tuned',
            target_ratio=None,
            target='–',
            extra={'pretrained': before[key]},
        )
        for key, label in METRICS
    ]
    mrr_ours = statistics.median(after['mrr'] for after in after_ours)
    mrr_st = statistics.median(after['mrr'] for after in after_st)
    uplift_ours = mrr_ours / before['mrr'] - 1 if before['mrr'] else 0.0
    uplift_st = mrr_st / before['mrr'] - 1 if before['mrr'] else 0.0
    per_seed = {
        f'uplift_ours_seed{i}': 100 * (after['mrr'] / before['mrr'] - 1) for i, after in enumerate(after_ours)
    } | {f'uplift_reference_seed{i}': 100 * (after['mrr'] / before['mrr'] - 1) for i, after in enumerate(after_st)}
    rows.append(
        Row(
            benchmark=BENCHMARK,
            measure=f'MRR@10 relative uplift over the pretrained model, {task.title} '
            f'(pretrained MRR@10 {before["mrr"]:.4f})',
            unit='%',
            ours=100 * uplift_ours,
            reference=100 * uplift_st,
            reference_name='sentence-transformers',
            ratio=(uplift_ours / uplift_st) if uplift_st > 0 else None,
            target=f'>= +{UPLIFT_TARGET:.0%} and >= the reference',
            met=uplift_ours >= UPLIFT_TARGET and uplift_ours >= uplift_st,
            extra={'train_seconds_ours': ours_seconds, 'train_seconds_reference': st_seconds, **per_seed},
        )
    )
    return rows


def run(settings: Settings) -> list[Row]:
    tasks = [topics_task(settings)] if settings.mode == 'quick' else [topics_task(settings), qa_task(settings)]
    return [row for task in tasks for row in evaluate_task(task, settings)]
