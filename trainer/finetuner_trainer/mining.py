"""Hard-negative mining: each (query, positive) pair gets the corpus documents closest to the query that
are not its positives, as explicit negatives.

The semantics are sentence-transformers' ``util.mine_hard_negatives`` (read, not copied; a test holds
this module to it on the same model and data): the corpus is the given documents plus every positive,
without duplicates; a query given several times has all its documents as positives; candidates are
ranked by cosine similarity of the model's embeddings (or by a cross-encoder's scores when one is
given, which then also gives the positives' scores); the query itself, its positives and padding are
never negatives; ``absoluteMargin`` / ``relativeMargin`` drop candidates scoring too close to the query's
weakest positive, ``maxScore`` / ``minScore`` drop candidates above / below a score; the first
``rangeMin`` of the ``rangeMax`` best candidates are skipped; ``top`` keeps the best ``numNegatives`` of
the rest, ``random`` draws them. ``n-tuple`` output keeps a row only when all its negatives were found;
``triplet`` output makes one row per negative found.

Search is exact (top-k of a matrix product, in blocks of queries whose scores fit :data:`SCORE_BUDGET`)
or, past :data:`EXACT_LIMIT` documents with ``search: auto`` (measured in ``bench/mining_search.py``, see
docs/MINING.md), an approximate faiss HNSW index. Embedding and scoring go in batches and report their progress.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finetuner.api.mining import EXACT_LIMIT, HardNegativeOptions, OutputFormat, Sampling, SearchIndex
from finetuner_trainer.cross_encoder import CrossEncoderScorer
from finetuner_trainer.data import Dataset, Example, Item, Shape
from finetuner_trainer.embedder import Embedder
from finetuner_trainer.errors import ConfigError

QUERY_BLOCK = 1024  # queries ranked at once, at most
SCORE_BUDGET = 2**26  # scores of one block of queries against the corpus at once (256 MB of float32)
HNSW_M = 32  # neighbours per node of the HNSW graph
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH = 128  # candidates kept while searching (at least twice the neighbours asked for)
EMBED_CHUNK = 1024  # items embedded between two progress reports

Report = Callable[[str, int, int], None]  # (stage, done, total)


def no_report(stage: str, done: int, total: int) -> None:
    """A :data:`Report` that reports nothing."""


class ProgressLog:
    """A :data:`Report` that logs a stage's progress about ten times, with items per second."""

    def __init__(self, log: logging.Logger, every_seconds: float = 10.0) -> None:
        self.log = log
        self.every_seconds = every_seconds
        self.stage = ''
        self.started = self.last = time.monotonic()
        self.logged = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.started, self.last, self.logged = stage, now, now, -1
        step = max(1, total // 10)
        if done in (0, total) or done // step != self.logged // step or now - self.last >= self.every_seconds:
            rate = done / (now - self.started) if now > self.started and done else 0.0
            self.log.info('%s: %d/%d (%.0f%%, %.1f/s)', stage, done, total, 100 * done / max(total, 1), rate)
            self.last, self.logged = now, done


def item_key(item: Item) -> Any:
    """What makes two items the same document (the text, or a digest of the image or tensor)."""
    if item.text is not None:
        return ('text', item.text)
    if item.image is not None:
        return ('image', hashlib.sha1(item.image).hexdigest())
    return ('tensor', repr(item.tensor))


def dedupe(items: Sequence[Item]) -> tuple[list[Item], dict[Any, int]]:
    """The items without repeats, first occurrence first, and the position of each key."""
    positions: dict[Any, int] = {}
    unique: list[Item] = []
    for item in items:
        key = item_key(item)
        if key not in positions:
            positions[key] = len(unique)
            unique.append(item)
    return unique, positions


def embed(model: Embedder, items: Sequence[Item], batch_size: int, report: Report, stage: str) -> torch.Tensor:
    """L2-normalised float32 embeddings of ``items`` (CPU), in chunks with progress."""
    parts = []
    report(stage, 0, len(items))
    for start in range(0, len(items), EMBED_CHUNK):
        parts.append(model.embed(list(items[start : start + EMBED_CHUNK]), batch_size=batch_size))
        report(stage, min(start + EMBED_CHUNK, len(items)), len(items))
    if not parts:
        return torch.empty((0, model.output_dim))
    return torch.nn.functional.normalize(torch.cat(parts).float(), dim=-1)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401  # optional (the trainer extra): the approximate index
    except ImportError:
        return False
    return True


def search_method(chosen: str, corpus_size: int) -> str:
    """``exact`` or ``faiss`` for ``search`` (auto: by corpus size and whether faiss is installed)."""
    if chosen == SearchIndex.FAISS.value:
        if not faiss_available():
            raise ConfigError('search', 'faiss is not installed; pip install faiss-cpu, or use search exact or auto')
        return 'faiss'
    if chosen == SearchIndex.EXACT.value or corpus_size <= EXACT_LIMIT or not faiss_available():
        return 'exact'
    return 'faiss'


def top_k(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, method: str, report: Report = no_report
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), both (queries x k), closest first by inner product of normalised embeddings;
    a corpus smaller than ``k`` pads with score -inf and index -1."""
    width = min(k, len(corpus))
    score_parts, index_parts = [], []
    index = _hnsw(corpus) if method == 'faiss' and width else None
    step = query_block(len(corpus))
    report('searching', 0, len(queries))
    for start in range(0, len(queries), step):
        block = queries[start : start + step]
        if index is not None:
            index.hnsw.efSearch = max(EF_SEARCH, 2 * width)
            found_scores, found = index.search(block.numpy(), width)
            score_parts.append(torch.from_numpy(found_scores))
            index_parts.append(torch.from_numpy(found).long())
        else:
            found_scores, found = torch.topk(block @ corpus.T, width, dim=1)
            score_parts.append(found_scores)
            index_parts.append(found)
        report('searching', min(start + step, len(queries)), len(queries))
    scores = torch.cat(score_parts) if score_parts else torch.empty((0, width))
    indices = torch.cat(index_parts) if index_parts else torch.empty((0, width), dtype=torch.long)
    scores[indices < 0] = -math.inf  # faiss answers -1 where it found fewer
    if k > width:
        scores = torch.cat([scores, scores.new_full((len(scores), k - width), -math.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((len(indices), k - width), -1)], dim=1)
    return scores, indices


def query_block(corpus_size: int) -> int:
    """How many queries are ranked at once: :data:`QUERY_BLOCK`, fewer when their scores against a large
    corpus would pass :data:`SCORE_BUDGET` (a million documents: 67 queries, 256 MB)."""
    return max(1, min(QUERY_BLOCK, SCORE_BUDGET // max(corpus_size, 1)))


def _hnsw(corpus: torch.Tensor) -> Any:
    import faiss

    index = faiss.IndexHNSWFlat(corpus.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(corpus.contiguous().numpy())
    return index


@dataclass
class MinedRow:
    """One mined example: the query, its positive, negatives closest first, and the scores of the
    positive and of each negative (cosine similarity, or the cross-encoder's score)."""

    query: Item
    positive: Item
    negatives: list[Item]
    scores: list[float]


@dataclass
class MiningStats:
    """What a mining pass found: counts and score summaries, candidates each filter removed."""

    rows: int = 0
    possible_rows: int = 0
    positive_scores: list[float] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    search: str = 'exact'
    seconds: float = 0.0
    queries: int = 0

    @property
    def missing(self) -> int:
        return max(0, self.possible_rows - self.rows)

    def lines(self) -> list[str]:
        """sentence-transformers' summary: scores of positives and negatives, what was skipped, what is missing."""
        out = [f'mined {self.rows} rows for {self.queries} queries in {self.seconds:.1f}s ({self.search} search)']
        for name, values in (('positive', self.positive_scores), ('negative', self.negative_scores)):
            if values:
                out.append(
                    f'{name} scores: count {len(values)}, mean {statistics.fmean(values):.4f}, '
                    f'median {statistics.median(values):.4f}, min {min(values):.4f}, max {max(values):.4f}'
                )
        out += [f'skipped {count} candidates by {name}' for name, count in self.skipped.items() if count]
        if self.missing:
            out.append(
                f'could not find enough negatives for {self.missing} of {self.possible_rows} rows; widen rangeMax, '
                'or loosen the margins and score bounds'
            )
        return out


@dataclass
class _Pool:
    """Unique queries, the corpus, and each query's positives (corpus positions)."""

    queries: list[Item]
    corpus: list[Item]
    positives: list[list[int]]
    query_in_corpus: list[int]  # the query's own position in the corpus, -1 when absent
    max_positives: int


def _pool(queries: Sequence[Item], positives: Sequence[Item], corpus: Sequence[Item] | None) -> _Pool:
    if len(queries) != len(positives):
        raise ValueError(f'{len(queries)} queries for {len(positives)} positives')
    documents, positions = dedupe([*(corpus if corpus is not None else positives), *positives])
    unique_queries, query_positions = dedupe(queries)
    rows_per_query = [0] * len(unique_queries)
    by_query: list[list[int]] = [[] for _ in unique_queries]
    for query, positive in zip(queries, positives, strict=True):
        q = query_positions[item_key(query)]
        rows_per_query[q] += 1
        document = positions[item_key(positive)]
        if document not in by_query[q]:
            by_query[q].append(document)
    own = [positions.get(item_key(query), -1) for query in unique_queries]
    return _Pool(unique_queries, documents, by_query, own, max(rows_per_query))


def candidate_window(options: HardNegativeOptions, max_positives: int, reranked: bool) -> tuple[int, int]:
    """(rangeMax, candidates to fetch per query), after checking the window (ConfigError naming the option)."""
    filtered = (
        options.absolute_margin is not None
        or options.relative_margin is not None
        or options.max_score is not None
        or (reranked and options.min_score is not None)
    )
    range_max = options.range_max
    if range_max is None:
        range_max = options.range_min + options.num_negatives * (10 if filtered else 1) + max_positives
    if options.range_min >= range_max:
        raise ConfigError('rangeMin', f'{options.range_min} must be smaller than rangeMax {range_max}')
    if options.num_negatives > range_max - options.range_min:
        raise ConfigError(
            'numNegatives',
            f'{options.num_negatives} negatives do not fit in the {range_max - options.range_min} candidates between '
            f'rangeMin {options.range_min} and rangeMax {range_max}; lower numNegatives or widen the range',
        )
    return range_max, range_max + max_positives + 1


def _rescore(
    pool: _Pool, indices: torch.Tensor, scorer: CrossEncoderScorer, batch_size: int, report: Report
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' and the positives' scores by the cross-encoder (candidates as ``indices``)."""
    texts = [_text(item, 'crossEncoder') for item in pool.corpus]
    query_texts = [_text(item, 'crossEncoder') for item in pool.queries]
    pairs = [(query_texts[q], texts[int(c)]) for q in range(len(indices)) for c in indices[q] if c >= 0]
    positive_pairs = [(query_texts[q], texts[p]) for q, docs in enumerate(pool.positives) for p in docs]
    total = len(pairs) + len(positive_pairs)
    done = [0]

    def step(count: int) -> None:
        done[0] += count
        report('cross-encoder scoring', done[0], total)

    scored = scorer.score(pairs + positive_pairs, batch_size=batch_size, progress=step)
    candidate_scores = torch.full(indices.shape, -math.inf)
    candidate_scores[indices >= 0] = scored[: len(pairs)]
    return candidate_scores, scored[len(pairs) :]


def _text(item: Item, field: str) -> str:
    if item.text is None:
        raise ConfigError(field, f'a cross-encoder reads text; an item holds {item.kind} content')
    return item.text


def _filter(
    scores: torch.Tensor, weakest_positive: torch.Tensor, options: HardNegativeOptions, stats: MiningStats
) -> None:
    """Drop (score -inf) the candidates the margins and score bounds exclude, counting each filter."""
    rules: list[tuple[str, torch.Tensor]] = []
    if options.absolute_margin is not None:
        rules.append(('absoluteMargin', scores + options.absolute_margin > weakest_positive.unsqueeze(1)))
    if options.relative_margin is not None:
        threshold = weakest_positive - weakest_positive.abs() * options.relative_margin
        rules.append(('relativeMargin', scores > threshold.unsqueeze(1)))
    if options.max_score is not None:
        rules.append(('maxScore', scores > options.max_score))
    if options.min_score is not None:
        rules.append(('minScore', scores < options.min_score))
    for name, mask in rules:
        mask = mask & torch.isfinite(scores)
        stats.skipped[name] = int(mask.sum())
        scores[mask] = -math.inf


def _choose(
    scores: torch.Tensor, indices: torch.Tensor, options: HardNegativeOptions, range_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, corpus positions) of the chosen negatives per query, best first (-inf: none found)."""
    best, local = torch.topk(scores, k=range_max, dim=1)
    chosen = torch.gather(indices, 1, local)
    best, chosen = best[:, options.range_min :], chosen[:, options.range_min :]
    wanted = options.num_negatives
    if options.sampling_strategy == Sampling.TOP.value:
        return best[:, :wanted], chosen[:, :wanted]
    rng = random.Random(options.seed)
    rows = torch.arange(len(best)).unsqueeze(1)
    options_left = (torch.isfinite(best).sum(1)).clamp(min=wanted).tolist()
    picked = torch.tensor([rng.sample(range(n), k=wanted) for n in options_left], dtype=torch.long)
    picked = picked.reshape(len(best), wanted)
    best, chosen = best[rows, picked], chosen[rows, picked]
    best, order = best.sort(dim=1, descending=True)
    return best, torch.gather(chosen, 1, order)


def mine_hard_negatives(
    model: Embedder,
    queries: Sequence[Item],
    positives: Sequence[Item],
    options: HardNegativeOptions,
    corpus: Sequence[Item] | None = None,
    cross_encoder: CrossEncoderScorer | None = None,
    report: Report = no_report,
) -> tuple[list[MinedRow], MiningStats]:
    """Mine negatives for each (query, positive) pair; the rows (in the order of the unique queries, each
    query's positives in order) and what was found. Raises ConfigError naming an option (camelCase)."""
    started = time.monotonic()
    pool = _pool(queries, positives, corpus)
    range_max, fetch = candidate_window(options, pool.max_positives, cross_encoder is not None)
    method = search_method(options.search, len(pool.corpus))
    corpus_emb = embed(model, pool.corpus, options.batch_size, report, 'embedding the corpus')
    query_emb = embed(model, pool.queries, options.batch_size, report, 'embedding the queries')
    scores, indices = top_k(query_emb, corpus_emb, fetch, method, report)
    owners = torch.tensor([q for q, docs in enumerate(pool.positives) for _ in docs], dtype=torch.long)
    flat = torch.tensor([p for docs in pool.positives for p in docs], dtype=torch.long)
    positive_scores = (query_emb[owners] * corpus_emb[flat]).sum(-1)
    if cross_encoder is not None:
        scores, positive_scores = _rescore(pool, indices, cross_encoder, options.batch_size, report)
    scores[indices < 0] = -math.inf
    own = torch.tensor(pool.query_in_corpus, dtype=torch.long).unsqueeze(1)
    scores[(indices == own) & (own >= 0)] = -math.inf
    for q, docs in enumerate(pool.positives):
        scores[q, torch.isin(indices[q], torch.tensor(docs, dtype=torch.long))] = -math.inf
    stats = MiningStats(search=method, queries=len(pool.queries))
    weakest = torch.full((len(pool.queries),), math.inf).scatter_reduce(0, owners, positive_scores.float(), 'amin')
    _filter(scores, weakest, options, stats)
    negative_scores, chosen = _choose(scores, indices, options, range_max)
    rows = _rows(pool, positive_scores, negative_scores, chosen, options, stats)
    stats.seconds = time.monotonic() - started
    return rows, stats


def _rows(
    pool: _Pool,
    positive_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    chosen: torch.Tensor,
    options: HardNegativeOptions,
    stats: MiningStats,
) -> list[MinedRow]:
    rows: list[MinedRow] = []
    position = 0
    triplets = options.output_format == OutputFormat.TRIPLET.value
    for q, docs in enumerate(pool.positives):
        found = torch.isfinite(negative_scores[q])
        for document in docs:
            positive_score = float(positive_scores[position])
            position += 1
            stats.possible_rows += options.num_negatives if triplets else 1
            stats.positive_scores.append(positive_score)
            if triplets:
                for j in torch.nonzero(found).flatten().tolist():
                    negative = pool.corpus[int(chosen[q, j])]
                    rows.append(
                        MinedRow(
                            pool.queries[q],
                            pool.corpus[document],
                            [negative],
                            [positive_score, float(negative_scores[q, j])],
                        )
                    )
                    stats.negative_scores.append(float(negative_scores[q, j]))
            elif bool(found.all()):
                negatives = [pool.corpus[int(c)] for c in chosen[q]]
                values = [float(v) for v in negative_scores[q]]
                rows.append(MinedRow(pool.queries[q], pool.corpus[document], negatives, [positive_score, *values]))
                stats.negative_scores.extend(values)
    stats.rows = len(rows)
    return rows


def check_minable(dataset: Dataset) -> None:
    """ConfigError unless ``dataset`` holds (query, document) pairs, what mining adds negatives to."""
    if dataset.shape != Shape.PAIRS:
        raise ConfigError(
            'hardNegatives',
            f'mining needs query-document pairs, but trainData holds {dataset.shape.value}; give pairs (records with '
            'two chunks) or remove hardNegatives',
        )


def mine_dataset(
    model: Embedder, dataset: Dataset, options: HardNegativeOptions, device: torch.device, log: logging.Logger
) -> Dataset:
    """``fit(hard_negatives=...)``: the (query, document) pairs of ``dataset`` as tuples with the negatives
    mined by ``model`` (the pretrained model, before training), scored tuples with ``outputScores``."""
    check_minable(dataset)
    scorer = None
    if options.cross_encoder is not None:
        scorer = CrossEncoderScorer.load(options.cross_encoder, 'hardNegatives.crossEncoder', device)
    queries = [example.items[0] for example in dataset.examples]
    positives = [example.items[1] for example in dataset.examples]
    try:
        rows, stats = mine_hard_negatives(model, queries, positives, options, None, scorer, ProgressLog(log))
    except ConfigError as e:
        raise ConfigError(f'hardNegatives.{e.field}', e.problem) from e
    for line in stats.lines():
        log.info('hard negatives: %s', line)
    if not rows:
        raise ConfigError(
            'hardNegatives',
            f'no pair got its {options.num_negatives} negatives ({stats.possible_rows} possible); lower numNegatives, '
            'widen rangeMax, or loosen the margins and score bounds',
        )
    shape = Shape.SCORED_TUPLES if options.output_scores else Shape.TUPLES
    scored = shape == Shape.SCORED_TUPLES
    examples = [
        Example((row.query, row.positive, *row.negatives), scores=tuple(row.scores) if scored else None) for row in rows
    ]
    return Dataset(shape, examples, [], dataset.source)
