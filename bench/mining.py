"""Hard-negative mining: what mined negatives do to fine-tuning, and how fast mining is.

- ``quality``: the ``quality`` benchmark's question -> answer task (``bench.tasks``' ``qa``: chatterbot-corpus,
  20% of the questions held out with all their answers, all-MiniLM-L6-v2, its budget), trained by
  ``bench.quality.train_ours`` with ``MultipleNegativesRankingLoss`` on the (question, answer) pairs as they
  are (in-batch negatives only), and the same with ``hardNegatives`` (the trainer mines, with the pretrained
  model and before training, :data:`HARD_NEGATIVES` for every pair, then trains on the (question, answer,
  negative) triplets). Both judged on the held-out questions by ``bench.quality.score`` (nDCG@10, MRR@10),
  median over the task's seeds; the pretrained model's numbers are in each row's ``pretrained``.
- ``throughput``: queries mined per second by ``finetuner_trainer.mining.mine_hard_negatives`` on the
  training pairs, all-MiniLM-L6-v2 on the CPU (embedding the corpus and the queries, exact search,
  choosing the negatives), median of rounds.

Where an approximate index starts to pay is ``bench/mining_search.py``. Synthesis (a cross-encoder scoring
mined relations, then MarginMSE) is not in the table: it needs a trained cross-encoder, and none ships in a
package that installs offline here (row says so).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

from bench import quality
from bench.common import Row, Settings
from bench.tasks import TASKS, RetrievalTask, TaskSplit
from bench.text_throughput import text_model

BENCHMARK = 'mining'
HARD_NEGATIVES: dict[str, Any] = {'num_negatives': 1, 'relative_margin': 0.05}
# The tiny random model scores everything alike: a margin would leave it almost no negatives.
TINY_HARD_NEGATIVES: dict[str, Any] = {'num_negatives': 1}
METRICS = (('ndcg_at_k', 'nDCG@10'), ('mrr', 'MRR@10'))


def qa_task(settings: Settings) -> RetrievalTask:
    """The question -> answer task of ``bench.tasks`` (the tiny one of ``bench.quality`` in tiny mode)."""
    if settings.mode == 'tiny':
        return next(task for task in quality.tiny_tasks(settings) if task.shape == 'pairs')
    return replace(TASKS['qa'], seeds=(0,)) if settings.mode == 'quick' else TASKS['qa']


def _hard_negatives(settings: Settings) -> dict[str, Any]:
    return TINY_HARD_NEGATIVES if settings.mode == 'tiny' else HARD_NEGATIVES


def quality_rows(settings: Settings) -> list[Row]:
    """MNRL with mined hard negatives against MNRL without, median over seeds."""
    from finetuner.api.mining import HardNegativeOptions

    task = qa_task(settings)
    split = task.split('report')
    before = quality.pretrained(task, split.held_out, settings)
    plain = {'loss': 'MultipleNegativesRankingLoss'}
    mined = {**plain, 'hard_negatives': HardNegativeOptions(**_hard_negatives(settings))}
    with_negatives: list[dict[str, float]] = []
    without: list[dict[str, float]] = []
    for seed in task.seeds:  # the sides alternate, seed by seed
        with_negatives.append(quality.train_ours(task, split, seed, settings, mined))
        without.append(quality.train_ours(task, split, seed, settings, plain))
    setting = quality.TaskResult(task, 'report', len(split.train), split.held_out, before).setting
    options = ', '.join(f'{k} {v}' for k, v in _hard_negatives(settings).items())
    return [
        Row.compare(
            benchmark=BENCHMARK,
            measure=f'retrieval {label} of MultipleNegativesRankingLoss with mined hard negatives ({options}) '
            f'({setting})',
            unit='',
            samples_ours=[after[key] for after in with_negatives],
            samples_reference=[after[key] for after in without],
            reference_name='the same without hard negatives',
            target_ratio=None,
            target='–',
            extra={'pretrained': before[key]},
        )
        for key, label in METRICS
    ]


def _training_pairs(split: TaskSplit) -> tuple[list[Any], list[Any]]:
    from finetuner_trainer.data import Item

    queries = [Item(text=r.chunks[0].text) for r in split.train]
    positives = [Item(text=r.chunks[1].text) for r in split.train]
    return queries, positives


def throughput_row(settings: Settings) -> Row:
    """Queries mined per second, end to end (embedding, exact search, choice), pretrained MiniLM."""
    from finetuner.api.mining import HardNegativeOptions
    from finetuner.mining import load_model
    from finetuner_trainer.mining import mine_hard_negatives

    model = load_model(str(text_model(settings)), settings.device)
    queries, positives = _training_pairs(qa_task(settings).split('report'))
    options = HardNegativeOptions(num_negatives=3, search='exact')
    rates: list[float] = []
    unique = 0
    for _ in range(settings.pick(full=3, quick=2, tiny=1)):
        began = time.perf_counter()
        _, stats = mine_hard_negatives(model, queries, positives, options)
        rates.append(stats.queries / (time.perf_counter() - began))
        unique = stats.queries
    return Row(
        benchmark=BENCHMARK,
        measure=f'hard-negative mining throughput, all-MiniLM-L6-v2 on {settings.device.upper()}, {unique} unique '
        f'questions against their {len(set(p.text for p in positives))} answers, 3 negatives each, exact search '
        '(embedding included)',
        unit='queries/s',
        ours=statistics.median(rates),
        samples_ours=rates,
        target='–',
    )


def synthesis_row() -> Row:
    return Row.not_measured(
        benchmark=BENCHMARK,
        measure='synthesis (relations mined by all-MiniLM-L6-v2, scored by a cross-encoder) -> MarginMSELoss '
        'against the pretrained model',
        reason='needs a trained cross-encoder (e.g. cross-encoder/ms-marco-MiniLM-L6-v2), and none ships in a '
        'package that installs offline here; the pipeline itself is tested end to end with a tiny random one',
    )


def run(settings: Settings) -> list[Row]:
    rows = [*quality_rows(settings), throughput_row(settings)]
    return rows if settings.mode == 'tiny' else [*rows, synthesis_row()]  # tiny: rows with numbers only
