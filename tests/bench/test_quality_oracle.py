"""bench.quality's metrics against an independent oracle: sentence-transformers' InformationRetrievalEvaluator.

The oracle ranks with numpy (cosine similarity, the query itself left out of its own ranking) and scores the
ranked lists with the evaluator's own ``compute_metrics`` (nDCG@10, MAP@10, MRR@10); bench.quality.score
must give the same numbers on the same embeddings, for both held-out layouts of bench.tasks (every item
queries the others by label; distinct queries against a corpus of documents).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sentence_transformers.evaluation import InformationRetrievalEvaluator

from bench.quality import score
from bench.tasks import HeldOut, by_label, by_pair
from finetuner.api.layout import Record


def oracle(queries: np.ndarray, corpus: np.ndarray, held: HeldOut) -> dict[str, float]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    similarity = q @ c.T
    evaluator = InformationRetrievalEvaluator(
        queries={f'q{i}': f'query {i}' for i in range(len(held.queries))},
        corpus={f'd{j}': f'document {j}' for j in range(len(held.corpus))},
        relevant_docs={f'q{i}': {f'd{j}' for j in rel} for i, rel in enumerate(held.relevant)},
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[10],
        accuracy_at_k=[10],
        precision_recall_at_k=[10],
    )
    results: list[Any] = [
        [{'corpus_id': f'd{j}', 'score': float(similarity[i, j])} for j in range(len(held.corpus)) if j != itself]
        for i, itself in enumerate(held.itself)
    ]
    metrics = evaluator.compute_metrics(results)
    return {'ndcg_at_k': metrics['ndcg@k'][10], 'map': metrics['map@k'][10], 'mrr': metrics['mrr@k'][10]}


def labelled(n: int, classes: int, seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [Record(text=f'item {i}', label=f'c{int(rng.integers(classes))}') for i in range(n)]


def pairs(n: int, queries: int, seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [
        Record(chunks=[Record(text=f'question {int(rng.integers(queries))}'), Record(text=f'answer {i}')])
        for i in range(n)
    ]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_labelled_held_out_scores_match_the_sentence_transformers_evaluator(seed: int) -> None:
    held = by_label(labelled(60, classes=5, seed=seed))
    rng = np.random.default_rng(100 + seed)
    # embeddings that carry some of the label, so the metrics are neither 0 nor 1
    centres = {label: rng.normal(size=16) for label in {r.label for r in held.queries}}
    embeddings = np.stack([centres[r.label] + 1.5 * rng.normal(size=16) for r in held.queries])
    ours = score(embeddings, embeddings, held)
    expected = oracle(embeddings, embeddings, held)
    assert 0.05 < expected['ndcg_at_k'] < 0.95
    # were the query itself ranked (similarity 1, relevant to nothing) every MRR would be at most 0.5
    assert expected['mrr'] > 0.5
    assert ours == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('seed', [0, 1])
def test_pair_held_out_scores_match_the_sentence_transformers_evaluator(seed: int) -> None:
    held = by_pair(pairs(50, queries=20, seed=seed))
    assert len(held.queries) < len(held.corpus)  # some queries have several relevant answers
    rng = np.random.default_rng(200 + seed)
    corpus = rng.normal(size=(len(held.corpus), 12))
    queries = np.stack([corpus[sorted(rel)].mean(axis=0) + 0.8 * rng.normal(size=12) for rel in held.relevant])
    ours = score(queries, corpus, held)
    expected = oracle(queries, corpus, held)
    assert 0.05 < expected['mrr'] < 0.99
    assert ours == pytest.approx(expected, abs=1e-6)
