"""Nearest-neighbour search for hard-negative mining: where an approximate index starts to pay.

``finetuner_trainer.mining.top_k`` ranks a corpus for every query exactly (a matrix product in blocks of
queries, each block's scores within ``SCORE_BUDGET``) or with a faiss HNSW index. Mining asks the corpus
about every training query, so both are compared at as many queries as documents, index build included,
at growing corpus sizes: HNSW's build is timed once, and both searches on a sample of
:data:`QUERY_SAMPLE` queries (a query costs the same however many others there are: exact search is
linear in the queries, HNSW's search per query does not depend on them), so that HNSW's rate for N
queries is N / (build + N / its search rate). HNSW's recall@10 against the exact answer is measured on
the sample. Two kinds of 384-d unit vectors (all-MiniLM-L6-v2's width):

- ``random``: independent Gaussian directions, the worst case for HNSW (no structure to exploit);
- ``clustered``: embedding-like, points of a mixture of Gaussians (one centre per 50 points) in a
  32-d subspace plus isotropic noise, queries drawn from the same mixture (not copies of documents).

``search: auto`` switches from exact to HNSW past ``EXACT_LIMIT`` documents: the measured sizes say
where exact search stops being faster on a CPU.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchmarkUnavailable, Row, Settings

BENCHMARK = 'mining_search'
DIMENSION = 384  # all-MiniLM-L6-v2's embedding width
KINDS = ('random', 'clustered')
QUERY_SAMPLE = 5_000  # queries searched to time both methods (and HNSW's recall)


def vectors(kind: str, size: int, seed: int) -> tuple[Any, Any]:
    """(corpus, queries), ``size`` unit vectors each, of one kind (see the module docstring)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if kind == 'random':
        corpus, queries = (torch.randn(size, DIMENSION, generator=generator) for _ in range(2))
    else:
        basis = torch.randn(32, DIMENSION, generator=generator)
        centres = torch.randn(max(size // 50, 10), 32, generator=generator)

        def draw() -> Any:
            which = torch.randint(len(centres), (size,), generator=generator)
            inside = centres[which] + 0.5 * torch.randn(size, 32, generator=generator)
            return inside @ basis + 0.3 * torch.randn(size, DIMENSION, generator=generator)

        corpus, queries = draw(), draw()
    return torch.nn.functional.normalize(corpus, dim=-1), torch.nn.functional.normalize(queries, dim=-1)


def exact_rate(queries: Any, corpus: Any) -> tuple[float, Any]:
    """(queries/s, the nearest 10 of each query) of the exact search."""
    from finetuner_trainer.mining import top_k

    began = time.perf_counter()
    _, found = top_k(queries, corpus, 10, 'exact')
    return len(queries) / (time.perf_counter() - began), found


def hnsw_rate(queries: Any, corpus: Any) -> tuple[float, Any]:
    """(queries/s for as many queries as documents, index build included, the nearest 10 of each query) of
    the HNSW index that ``top_k`` builds, searched as ``top_k`` searches it."""
    from finetuner_trainer import mining

    began = time.perf_counter()
    index = mining._hnsw(corpus)
    built = time.perf_counter() - began
    index.hnsw.efSearch = mining.EF_SEARCH
    began = time.perf_counter()
    _, found = index.search(queries.numpy(), 10)
    per_query = (time.perf_counter() - began) / len(queries)
    return len(corpus) / (built + len(corpus) * per_query), found


def recall_at_10(found: Any, truth: Any) -> float:
    hits = sum(len(set(a.tolist()) & set(t.tolist())) for a, t in zip(found, truth, strict=True))
    return hits / truth.numel()


def run(settings: Settings) -> list[Row]:
    """Exact top-k against faiss HNSW (build included) per kind and corpus size, as many queries as documents."""
    from finetuner_trainer.mining import EF_SEARCH, EXACT_LIMIT, HNSW_EF_CONSTRUCTION, HNSW_M, faiss_available

    if not faiss_available():
        raise BenchmarkUnavailable('faiss is not installed (pip install faiss-cpu)')
    rows = []
    for size in settings.pick(full=(20_000, 50_000, 100_000), quick=(5_000, 20_000), tiny=(500,)):
        for kind in KINDS:
            corpus, queries = vectors(kind, size, seed=size)
            queries = queries[:QUERY_SAMPLE]
            hnsw: list[float] = []
            exact: list[float] = []
            recall = 0.0
            for _ in range(settings.pick(full=2, quick=1, tiny=1)):
                rate, approximate = hnsw_rate(queries, corpus)
                hnsw.append(rate)
                rate, truth = exact_rate(queries, corpus)
                exact.append(rate)
                recall = recall_at_10(approximate, truth)
            rows.append(
                Row.compare(
                    benchmark=BENCHMARK,
                    measure=f'nearest-10 search, {size:,} {kind} {DIMENSION}-d documents and as many queries: faiss '
                    f'HNSW (M {HNSW_M}, efConstruction {HNSW_EF_CONSTRUCTION}, efSearch {EF_SEARCH}; index build '
                    f'included) against exact top-k (searches timed on {len(queries):,} of the queries)',
                    unit='queries/s',
                    samples_ours=hnsw,
                    samples_reference=exact,
                    reference_name='exact top-k (torch, blocks of queries)',
                    target_ratio=None,
                    target=f'auto picks HNSW past {EXACT_LIMIT:,} documents',
                    extra={'hnsw_recall_at_10': recall},
                )
            )
    return rows
