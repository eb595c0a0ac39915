"""Hard-negative mining: what mined negatives do to fine-tuning, and how fast mining is.

- ``quality``: the ``quality`` benchmark's question -> answer task (chatterbot-corpus, 20% of the
  questions held out with all their answers), all-MiniLM-L6-v2, ``MultipleNegativesRankingLoss``, one
  epoch, batch 32, lr 5e-5, max length 64. One side trains on the (question, answer) pairs as they
  are (in-batch negatives only), the other with ``hardNegatives`` (the trainer mines, with the
  pretrained model and before training, :data:`HARD_NEGATIVES` for every pair, then trains on the
  (question, answer, negative) triplets). Both judged on the held-out questions (nDCG@10, MRR@10),
  median over seeds; the pretrained model's numbers are in each row's ``pretrained``.
- ``throughput``: queries mined per second by ``finetuner_trainer.mining.mine_hard_negatives`` on
  the training pairs, all-MiniLM-L6-v2 on the CPU (embedding the corpus and the queries, exact search,
  choosing the negatives), median of rounds.
- ``search``: the exact top-k (a matrix product in blocks of queries) against faiss' HNSW index, index
  build included, on random unit vectors of MiniLM's width, as many queries as documents, at growing
  corpus sizes: queries/s of each, and the recall@10 of HNSW against the exact answer. Where HNSW
  starts to pay is what ``search: auto`` uses (``EXACT_LIMIT`` in ``finetuner_trainer.mining``).

Synthesis (a cross-encoder scoring mined relations, then MarginMSE) is not in the table: it needs a
trained cross-encoder, and none ships in a package that installs offline here (row says so).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import data, ours
from bench.common import BenchmarkUnavailable, Row, Settings
from bench.text_throughput import text_model
from finetuner.api.layout import Record

BENCHMARK = 'mining'
HARD_NEGATIVES: dict[str, Any] = {'num_negatives': 1, 'relative_margin': 0.05}
# The tiny random model scores everything alike: a margin would leave it almost no negatives.
TINY_HARD_NEGATIVES: dict[str, Any] = {'num_negatives': 1}
DIMENSION = 384  # all-MiniLM-L6-v2's embedding width
METRICS = (('ndcg_at_k', 'nDCG@10'), ('mrr', 'MRR@10'))


BATCH = 32
K = 10


@dataclass
class QATask:
    """Question -> answer retrieval on chatterbot-corpus: training pairs, held-out questions and answers."""

    train: list[Record]
    queries: list[str]
    query_labels: list[str]
    index: list[str]
    index_labels: list[str]
    epochs: int = 1
    learning_rate: float = 5e-5
    max_length: int = 64
    seeds: int = 1

    @property
    def setting(self) -> str:
        return (
            f'question -> answer: {len(self.train)} training pairs, {len(self.queries)} held-out queries, '
            f'{len(self.index)} in the index, {self.epochs} epoch, lr {self.learning_rate:g}, batch {BATCH}'
            + (f', median of {self.seeds} seeds' if self.seeds > 1 else '')
        )


def qa_task(settings: Settings) -> QATask:
    if settings.mode == 'tiny':
        from tests.support.tiny import text_pairs

        pairs = [data.QAPair(r.chunks[0].text or '', r.chunks[1].text or '', 'tiny') for r in text_pairs(n=64, seed=1)]
    else:
        pairs = data.chatterbot_pairs()
    train, test = data.split_by_question(pairs, 0.2, seed=0)
    if settings.mode == 'quick':
        train = data.repeat_to_pairs(train, 320, seed=0)
    questions = sorted({p.question for p in test})
    return QATask(
        train=data.pair_records(train),
        queries=questions,
        query_labels=questions,
        index=[p.answer for p in test],
        index_labels=[p.question for p in test],
    )


def _metrics(task: QATask, query_emb: Any, index_emb: Any) -> dict[str, float]:
    import torch

    from finetuner_trainer.evaluation import retrieval_metrics

    return retrieval_metrics(
        torch.as_tensor(query_emb), torch.as_tensor(index_emb), task.query_labels, task.index_labels, limit=K
    )


def _hard_negatives(settings: Settings) -> dict[str, Any]:
    return TINY_HARD_NEGATIVES if settings.mode == 'tiny' else HARD_NEGATIVES


def _train_and_judge(task: QATask, settings: Settings, seed: int, mined: bool) -> dict[str, float]:
    import finetuner
    from finetuner.api.mining import HardNegativeOptions

    model_dir = text_model(settings)
    name = f'mining-{"mined" if mined else "plain"}-{seed}'
    spec = ours.spec_for(
        str(model_dir),
        task.train,
        settings.workdir,
        name,
        loss='MultipleNegativesRankingLoss',
        batch_size=BATCH,
        epochs=task.epochs,
        learning_rate=task.learning_rate,
        model_options={'max_length': task.max_length},
        device=settings.device,
        seed=seed,
        hard_negatives=HardNegativeOptions(**_hard_negatives(settings)) if mined else None,
    )
    result = ours.train_run(spec, settings.workdir, name)
    model = finetuner.get_model(Path(result.artifact_uri.removeprefix('file://')), device=settings.device)
    return _metrics(task, finetuner.encode(model, task.queries), finetuner.encode(model, task.index))


def quality_rows(settings: Settings) -> list[Row]:
    """MNRL with mined hard negatives against MNRL without, median over seeds."""
    from bench import st_reference

    task = qa_task(settings)
    task.seeds = settings.pick(full=3, quick=1, tiny=1)
    pretrained = st_reference.load(text_model(settings), task.max_length, settings.device)
    before = _metrics(task, st_reference.encode(pretrained, task.queries), st_reference.encode(pretrained, task.index))
    with_negatives: list[dict[str, float]] = []
    without: list[dict[str, float]] = []
    for seed in range(task.seeds):  # the sides alternate, seed by seed
        with_negatives.append(_train_and_judge(task, settings, seed, mined=True))
        without.append(_train_and_judge(task, settings, seed, mined=False))
    options = ', '.join(f'{k} {v}' for k, v in _hard_negatives(settings).items())
    return [
        Row.compare(
            benchmark=BENCHMARK,
            measure=f'retrieval {label} of MultipleNegativesRankingLoss with mined hard negatives ({options}) '
            f'({task.setting})',
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


def _training_pairs(settings: Settings) -> tuple[list[Any], list[Any]]:
    from finetuner_trainer.data import Item

    task = qa_task(settings)
    queries = [Item(text=r.chunks[0].text) for r in task.train]
    positives = [Item(text=r.chunks[1].text) for r in task.train]
    return queries, positives


def throughput_row(settings: Settings) -> Row:
    """Queries mined per second, end to end (embedding, exact search, choice), pretrained MiniLM."""
    from finetuner.api.mining import HardNegativeOptions
    from finetuner.mining import load_model
    from finetuner_trainer.mining import mine_hard_negatives

    model = load_model(str(text_model(settings)), settings.device)
    queries, positives = _training_pairs(settings)
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


def _search_rate(queries: Any, corpus: Any, method: str) -> tuple[float, Any]:
    from finetuner_trainer.mining import top_k

    began = time.perf_counter()
    _, found = top_k(queries, corpus, 10, method)
    return len(queries) / (time.perf_counter() - began), found


def search_rows(settings: Settings) -> list[Row]:
    """Exact top-k against faiss HNSW (build included) at growing corpus sizes, as many queries as documents."""
    import torch

    from finetuner_trainer.mining import EXACT_LIMIT, faiss_available

    if not faiss_available():
        raise BenchmarkUnavailable('faiss is not installed (pip install faiss-cpu)')
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in settings.pick(full=(5_000, 20_000, 50_000), quick=(5_000, 20_000), tiny=(500,)):
        corpus = torch.nn.functional.normalize(torch.randn(size, DIMENSION, generator=generator), dim=-1)
        queries = torch.nn.functional.normalize(torch.randn(size, DIMENSION, generator=generator), dim=-1)
        hnsw: list[float] = []
        exact: list[float] = []
        recall = 0.0
        for _ in range(settings.pick(full=2, quick=1, tiny=1)):
            rate, approximate = _search_rate(queries, corpus, 'faiss')
            hnsw.append(rate)
            rate, truth = _search_rate(queries, corpus, 'exact')
            exact.append(rate)
            hits = sum(len(set(a.tolist()) & set(t.tolist())) for a, t in zip(approximate, truth, strict=True))
            recall = hits / truth.numel()
        rows.append(
            Row.compare(
                benchmark=BENCHMARK,
                measure=f'nearest-10 search, {size:,} random {DIMENSION}-d documents and as many queries: faiss HNSW '
                '(M 32, efConstruction 80, efSearch 128; index build included) against exact top-k',
                unit='queries/s',
                samples_ours=hnsw,
                samples_reference=exact,
                reference_name='exact top-k (torch, blocks of 1024 queries)',
                target_ratio=None,
                target=f'auto picks HNSW past {EXACT_LIMIT:,} documents',
                extra={'hnsw_recall_at_10': recall},
            )
        )
    return rows


def synthesis_row() -> Row:
    return Row.not_measured(
        benchmark=BENCHMARK,
        measure='synthesis (relations mined by all-MiniLM-L6-v2, scored by a cross-encoder) -> MarginMSELoss '
        'against the pretrained model',
        reason='needs a trained cross-encoder (e.g. cross-encoder/ms-marco-MiniLM-L6-v2), and none ships in a '
        'package that installs offline here; the pipeline itself is tested end to end with a tiny random one',
    )


def run(settings: Settings) -> list[Row]:
    rows = [*quality_rows(settings), throughput_row(settings), *search_rows(settings)]
    return rows if settings.mode == 'tiny' else [*rows, synthesis_row()]  # tiny: rows with numbers only
