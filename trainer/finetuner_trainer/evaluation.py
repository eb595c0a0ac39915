"""Retrieval evaluation: rank an index for every query and score the rankings.

A query's relevant items are the index items with the same label; for pair data, the documents it is
paired with: each distinct query is one query and each distinct document one index item, as in
sentence-transformers' ``InformationRetrievalEvaluator`` (a pair given twice is not two queries, a
question with two answers has both as relevant, an answer shared by two questions is relevant to both).
Rankings are cut at ``limit`` (``k``); every metric is computed per query and averaged over the queries
that have at least one relevant item in the index.

Definitions (``r`` = binary relevance of the ranked list cut at ``k``, ``R`` = relevant items in
the index for this query, ``k' = len(r)`` which is ``k`` unless the index is smaller):

- ``precision_at_k`` = sum(r) / k';  ``recall_at_k`` = sum(r) / R;  ``f1_score_at_k`` their harmonic mean
- ``hit_at_k`` = 1 if any relevant item is in the top k
- ``reciprocal_rank`` = 1 / rank of the first relevant item (0 when none is in the top k)
- ``average_precision`` = sum over relevant ranks i of precision@i, divided by min(R, k')
  (equal to scikit-learn's ``average_precision_score`` when the whole index is ranked)
- ``r_precision`` = relevant items among the first R, divided by R
- ``dcg_at_k`` = sum r_i / log2(i + 1);  ``ndcg_at_k`` = dcg / dcg of the ideal ranking
  (scikit-learn's ``dcg_score`` / ``ndcg_score`` with ``k``)

``mrr`` and ``map`` are aliases of ``reciprocal_rank`` and ``average_precision`` (experiments rank
runs by ``mrr`` by default).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from finetuner.api.layout import Record
from finetuner.catalog import EVALUATION_METRICS

log = logging.getLogger(__name__)

Distance = Literal['cosine', 'euclidean', 'sqeuclidean']
DISTANCES: tuple[str, ...] = ('cosine', 'euclidean', 'sqeuclidean')
METRIC_ALIASES: dict[str, str] = {'mrr': 'reciprocal_rank', 'map': 'average_precision'}
ALL_METRIC_NAMES: tuple[str, ...] = (*EVALUATION_METRICS, *METRIC_ALIASES)

# Queries are ranked in blocks so that a large index never needs a full (queries x index) matrix.
_QUERY_BLOCK = 1024


class EvaluationError(ValueError):
    """Evaluation data that cannot be scored (no labels, no relevant items, wrong shapes)."""


def pairwise_distances(queries: torch.Tensor, index: torch.Tensor, distance: str) -> torch.Tensor:
    """(n_queries, n_index) distances; smaller is closer."""
    if distance not in DISTANCES:
        raise EvaluationError(f'unknown distance {distance!r}; choose one of {", ".join(DISTANCES)}')
    queries = queries.float()
    index = index.float()
    if distance == 'cosine':
        q = torch.nn.functional.normalize(queries, dim=-1)
        i = torch.nn.functional.normalize(index, dim=-1)
        return 1.0 - q @ i.T
    euclidean = torch.cdist(queries, index)
    return euclidean if distance == 'euclidean' else euclidean.square()


def ranking_metrics(relevance: Sequence[int] | np.ndarray, num_relevant: int) -> dict[str, float]:
    """All metrics of one ranked list (binary relevance, already cut at k) with R relevant items."""
    r = np.asarray(relevance, dtype=np.float64)
    if num_relevant <= 0:
        raise EvaluationError('a query needs at least one relevant item in the index to be scored')
    k = r.size
    hits = float(r.sum())
    precision = hits / k if k else 0.0
    recall = hits / num_relevant
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    relevant_ranks = np.flatnonzero(r) + 1
    reciprocal_rank = 1.0 / float(relevant_ranks[0]) if relevant_ranks.size else 0.0
    precision_at_hits = np.cumsum(r)[relevant_ranks - 1] / relevant_ranks
    average_precision = float(precision_at_hits.sum()) / min(num_relevant, k) if k else 0.0
    r_precision = float(r[:num_relevant].sum()) / num_relevant
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((r * discounts).sum())
    ideal = float(discounts[: min(num_relevant, k)].sum())
    return {
        'average_precision': average_precision,
        'dcg_at_k': dcg,
        'f1_score_at_k': f1,
        'hit_at_k': 1.0 if hits else 0.0,
        'ndcg_at_k': dcg / ideal if ideal else 0.0,
        'precision_at_k': precision,
        'r_precision': r_precision,
        'recall_at_k': recall,
        'reciprocal_rank': reciprocal_rank,
    }


@dataclass
class Ranking:
    """The top-``limit`` index positions and distances of every query, and how many are relevant."""

    indices: np.ndarray  # (n_queries, k) index positions, closest first
    distances: np.ndarray  # (n_queries, k)
    relevance: np.ndarray  # (n_queries, k) 1 where the match is relevant
    num_relevant: np.ndarray  # (n_queries,) relevant items in the index (self excluded)


def _label_ids(query_labels: Sequence[Any], index_labels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    vocabulary: dict[Any, int] = {}
    q = np.array([vocabulary.setdefault(label, len(vocabulary)) for label in query_labels], dtype=np.int64)
    i = np.array([vocabulary.setdefault(label, len(vocabulary)) for label in index_labels], dtype=np.int64)
    return q, i


def rank(
    query_emb: torch.Tensor,
    index_emb: torch.Tensor,
    query_labels: Sequence[Any],
    index_labels: Sequence[Any],
    *,
    limit: int = 20,
    distance: str = 'cosine',
    exclude_self: bool = False,
    query_ids: Sequence[Any] | None = None,
    index_ids: Sequence[Any] | None = None,
    relevant: Sequence[frozenset[int]] | None = None,
) -> Ranking:
    """Rank the index for every query. With ``exclude_self`` an index item with the query's id
    (by default: the same position, when query and index are the same items) is never a match.
    ``relevant``: each query's relevant index positions, instead of the index items sharing its label."""
    if query_emb.ndim != 2 or index_emb.ndim != 2 or query_emb.shape[1] != index_emb.shape[1]:
        raise EvaluationError(
            f'query and index embeddings must be 2-d with one width; got {tuple(query_emb.shape)} '
            f'and {tuple(index_emb.shape)}'
        )
    if len(query_labels) != query_emb.shape[0] or len(index_labels) != index_emb.shape[0]:
        raise EvaluationError('there must be one label per query and one per index item')
    if relevant is not None and len(relevant) != query_emb.shape[0]:
        raise EvaluationError('there must be one set of relevant index positions per query')
    if limit < 1:
        raise EvaluationError(f'limit must be at least 1, got {limit}')
    q_labels, i_labels = _label_ids(query_labels, index_labels)
    self_mask: np.ndarray | None = None
    if exclude_self:
        if query_ids is None or index_ids is None:
            if query_emb.shape[0] != index_emb.shape[0]:
                raise EvaluationError('exclude_self without ids needs the query and index data to be the same items')
            query_ids = index_ids = list(range(query_emb.shape[0]))
        position = {item_id: j for j, item_id in enumerate(index_ids)}
        self_mask = np.array([position.get(item_id, -1) for item_id in query_ids], dtype=np.int64)
    n_index = index_emb.shape[0]
    k = min(limit, n_index - (1 if self_mask is not None and (self_mask >= 0).any() else 0))
    k = max(k, 1)
    all_idx, all_dist = [], []
    for start in range(0, query_emb.shape[0], _QUERY_BLOCK):
        block = pairwise_distances(query_emb[start : start + _QUERY_BLOCK], index_emb, distance)
        if self_mask is not None:
            rows = torch.arange(block.shape[0])
            cols = torch.from_numpy(self_mask[start : start + block.shape[0]])
            valid = cols >= 0
            block[rows[valid], cols[valid]] = float('inf')
        # Stable sort: ties keep index order, so results do not depend on the kernel.
        dist, idx = torch.sort(block, dim=1, stable=True)
        all_idx.append(idx[:, :k].numpy())
        all_dist.append(dist[:, :k].numpy())
    indices = np.concatenate(all_idx)
    distances = np.concatenate(all_dist)
    if relevant is None:
        relevance = (i_labels[indices] == q_labels[:, None]).astype(np.int64)
        counts = np.bincount(i_labels, minlength=int(max(q_labels.max(initial=0), i_labels.max(initial=0))) + 1)
        num_relevant = counts[q_labels].copy()
    else:
        rows = zip(indices.tolist(), relevant, strict=True)
        relevance = np.array([[int(j in chosen) for j in row] for row, chosen in rows], dtype=np.int64)
        relevance = relevance.reshape(indices.shape)
        num_relevant = np.array([len(chosen) for chosen in relevant], dtype=np.int64)
    if self_mask is not None:
        own = np.maximum(self_mask, 0)
        if relevant is None:
            is_self_relevant = (self_mask >= 0) & (i_labels[own] == q_labels)
        else:
            own_relevant = [int(j) in chosen for j, chosen in zip(own, relevant, strict=True)]
            is_self_relevant = (self_mask >= 0) & np.array(own_relevant, dtype=bool)
        num_relevant -= is_self_relevant.astype(np.int64)
        # An excluded self-match may still sit in the top k when its distance is inf: drop it.
        relevance[np.isinf(distances)] = 0
    return Ranking(indices=indices, distances=distances, relevance=relevance, num_relevant=num_relevant)


def retrieval_metrics(
    query_emb: torch.Tensor,
    index_emb: torch.Tensor,
    query_labels: Sequence[Any],
    index_labels: Sequence[Any],
    *,
    limit: int = 20,
    distance: str = 'cosine',
    exclude_self: bool = False,
    query_ids: Sequence[Any] | None = None,
    index_ids: Sequence[Any] | None = None,
    relevant: Sequence[frozenset[int]] | None = None,
) -> dict[str, float]:
    """Mean of every metric in ``catalog.EVALUATION_METRICS`` over the answerable queries, plus the
    aliases ``mrr`` and ``map``. Queries without any relevant index item are left out (logged).
    ``relevant``: as for :func:`rank`."""
    ranking = rank(
        query_emb,
        index_emb,
        query_labels,
        index_labels,
        limit=limit,
        distance=distance,
        exclude_self=exclude_self,
        query_ids=query_ids,
        index_ids=index_ids,
        relevant=relevant,
    )
    return metrics_of_ranking(ranking)


def metrics_of_ranking(ranking: Ranking) -> dict[str, float]:
    answerable = np.flatnonzero(ranking.num_relevant > 0)
    if answerable.size == 0:
        raise EvaluationError(
            'no query has a relevant item in the index data (no index item shares a query label); '
            'check that query_data and index_data use the same labels'
        )
    skipped = ranking.num_relevant.size - answerable.size
    if skipped:
        log.info(
            'evaluation: %d of %d queries have no relevant index item and are not scored',
            skipped,
            len(ranking.num_relevant),
        )
    totals = dict.fromkeys(EVALUATION_METRICS, 0.0)
    for q in answerable:
        for name, value in ranking_metrics(ranking.relevance[q], int(ranking.num_relevant[q])).items():
            totals[name] += value
    result = {name: float(totals[name]) / int(answerable.size) for name in EVALUATION_METRICS}
    for alias, name in METRIC_ALIASES.items():
        result[alias] = result[name]
    return result


# ---------------------------------------------------------------------------------------------
# Evaluating a model on Records
# ---------------------------------------------------------------------------------------------

EmbedFn = Callable[[list[Record], int], torch.Tensor]


class EmbeddingMemo:
    """An :data:`EmbedFn` that embeds each item once for one set of weights: what the validation loss
    embedded, the retrieval evaluation of the same items reuses (an evaluation of the run's own
    evaluation data then encodes it once, not once for the loss and again for the ranking). Items are
    known by identity; the memo keeps them alive while it lives. Build a new one whenever the weights
    change."""

    def __init__(self, embed: EmbedFn):
        self.embed = embed
        self.rows: dict[int, tuple[Any, torch.Tensor]] = {}

    def __call__(self, values: list[Any], batch_size: int) -> torch.Tensor:
        missing = list({id(v): v for v in values if id(v) not in self.rows}.values())
        if missing:
            embedded = self.embed(missing, batch_size)
            for value, row in zip(missing, embedded, strict=True):
                self.rows[id(value)] = (value, row)
        if not values:
            return self.embed([], batch_size)
        return torch.stack([self.rows[id(v)][1] for v in values])


@dataclass
class EvalSet:
    """What is embedded and how items match: queries and index items with labels (and ids)."""

    queries: list[Any]  # Records, or the trainer's Items (what the embedder takes)
    index: list[Any]
    query_labels: list[Any]
    index_labels: list[Any]
    same_items: bool  # the index is the query set itself (exclude_self applies)
    query_is_text_of_pair: bool = False  # CLIP: queries are text chunks, index are image chunks
    # Ids that tell a query's own item in the index (exclude_self) once queries are a sample of the index.
    query_ids: list[Any] | None = None
    index_ids: list[Any] | None = None
    # Pair data: the first ``pair_count`` index items are the documents of query 0, 1, ... in turn (the rest
    # are distractors), until ``merged`` makes every query and document distinct.
    pair_count: int | None = None
    # Each query's relevant index positions (merged pair data); None: the index items sharing its label.
    relevant: list[frozenset[int]] | None = None

    def merged(self) -> EvalSet:
        """Pair data with copies merged: each distinct query once (in order of first appearance), each
        distinct document once, a query's relevant documents every document it was paired with;
        distractors stay at the end of the index, relevant to none. Labelled data is returned as it is."""
        if self.pair_count is None:
            return self
        query_at: dict[Any, int] = {}
        doc_at: dict[Any, int] = {}
        queries: list[Any] = []
        docs: list[Any] = []
        relevant: list[set[int]] = []
        for query, doc in zip(self.queries, self.index[: self.pair_count], strict=True):
            q = query_at.setdefault(content_key(query), len(queries))
            if q == len(queries):
                queries.append(query)
                relevant.append(set())
            d = doc_at.setdefault(content_key(doc), len(docs))
            if d == len(docs):
                docs.append(doc)
            relevant[q].add(d)
        extra = self.index[self.pair_count :]
        return EvalSet(
            queries=queries,
            index=docs + extra,
            query_labels=list(range(len(queries))),
            index_labels=[*range(len(docs)), *(f'__distractor_{j}' for j in range(len(extra)))],
            same_items=False,
            query_is_text_of_pair=self.query_is_text_of_pair,
            relevant=[frozenset(r) for r in relevant],
        )

    def sample_queries(self, size: int, seed: int) -> EvalSet:
        """``size`` of the queries drawn at random (``seed``), in their order; the index stays whole."""
        import random

        if self.pair_count is not None:
            return self.merged().sample_queries(size, seed)
        if size >= len(self.queries):
            return self
        chosen = sorted(random.Random(seed).sample(range(len(self.queries)), size))
        positions = list(range(len(self.index)))
        return EvalSet(
            queries=[self.queries[i] for i in chosen],
            index=self.index,
            query_labels=[self.query_labels[i] for i in chosen],
            index_labels=self.index_labels,
            same_items=False,
            query_is_text_of_pair=self.query_is_text_of_pair,
            query_ids=chosen if self.same_items else None,
            index_ids=positions if self.same_items else None,
            relevant=[self.relevant[i] for i in chosen] if self.relevant is not None else None,
        )


def content_key(item: Any) -> Any:
    """What makes two evaluation items one item: the same text, or the same image (bytes, URI or pixels);
    anything else (a tensor) is only equal to itself."""
    if isinstance(item, Record):
        if item.text is None and item.uri is None and item.blob is None and item.tensor is None:
            return ('object', id(item))
        return ('record', item.model_dump_json(include={'text', 'uri', 'blob', 'tensor'}))
    text, image = getattr(item, 'text', None), getattr(item, 'image', None)
    if text is not None:
        return ('text', text)
    if image is not None:
        return ('image', hashlib.sha256(image).hexdigest())
    return ('object', id(item))


def _chunk(record: Record, modality: str | None, position: int) -> Record:
    if modality is not None:
        for chunk in record.chunks:
            if chunk.modality == modality:
                return chunk
    return record.chunks[position]


def pair_eval_set(queries: list[Any], index: list[Any], pair_count: int, multi_modal: bool) -> EvalSet:
    """Pair data as given: query i paired with index item i for i < ``pair_count``, the rest distractors."""
    labels: list[Any] = list(range(pair_count))
    index_labels = [*labels, *(f'__distractor_{j}' for j in range(len(index) - pair_count))]
    return EvalSet(
        queries,
        index,
        labels,
        index_labels,
        same_items=False,
        query_is_text_of_pair=multi_modal,
        pair_count=pair_count,
    )


def build_eval_set(
    query_data: list[Record],
    index_data: list[Record] | None = None,
    *,
    multi_modal: bool = False,
    text_modality: str | None = None,
    image_modality: str | None = None,
) -> EvalSet:
    """Turn evaluation records into queries and an index.

    - labelled items: queries are the items; the index is ``index_data`` or the query items themselves;
    - pairs (records with two chunks): queries are the first chunks, the index the second chunks,
      query i paired with document i; copies are merged when evaluated (``EvalSet.merged``);
    - ``multi_modal`` (CLIP): queries are the text chunks, the index the image chunks.
    """
    if not query_data:
        raise EvaluationError('EvaluationCallback query_data is empty; give at least one record')
    paired = all(len(r.chunks) >= 2 for r in query_data)
    if paired:
        if multi_modal:
            queries = [_chunk(r, text_modality or 'text', 0) for r in query_data]
            docs = [_chunk(r, image_modality or 'image', 1) for r in query_data]
        else:
            queries = [r.chunks[0] for r in query_data]
            docs = [r.chunks[1] for r in query_data]
        index = docs + [r.chunks[1] if r.chunks else r for r in index_data or []]
        return pair_eval_set(queries, index, len(docs), multi_modal)
    missing = [j for j, r in enumerate(query_data) if r.label is None]
    if missing:
        raise EvaluationError(
            f'EvaluationCallback query_data item {missing[0]} has no label: labelled items need "label", '
            'or give query-document pairs (records with two chunks)'
        )
    if index_data is None:
        return EvalSet(query_data, query_data, [r.label for r in query_data], [r.label for r in query_data], True)
    missing = [j for j, r in enumerate(index_data) if r.label is None]
    if missing:
        raise EvaluationError(
            f'EvaluationCallback index_data item {missing[0]} has no label; every index item needs one'
        )
    return EvalSet(query_data, index_data, [r.label for r in query_data], [r.label for r in index_data], False)


@dataclass
class Evaluator:
    """Embeds an :class:`EvalSet` with the model and scores the ranking.

    ``embed_query`` / ``embed_index`` take (records, batch_size) and return a (n, d) tensor; for CLIP
    they are the text and the image tower, otherwise one embedder used for both.
    """

    eval_set: EvalSet
    limit: int = 20
    distance: str = 'cosine'
    exclude_self: bool = True
    batch_size: int = 32
    gather_examples: bool = False
    num_example_queries: int = 5
    num_workers: int | None = None  # threads that match queries and index (None: torch's setting)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.eval_set = self.eval_set.merged()
        if self.distance not in DISTANCES:
            raise EvaluationError(
                f'EvaluationCallback distance {self.distance!r} is unknown; choose one of {", ".join(DISTANCES)}'
            )
        if self.limit < 1:
            raise EvaluationError(f'EvaluationCallback limit must be at least 1, got {self.limit}')

    @torch.inference_mode()
    def evaluate(self, embed_query: EmbedFn, embed_index: EmbedFn | None = None) -> dict[str, float]:
        embed_index = embed_index or embed_query
        query_emb = embed_query(self.eval_set.queries, self.batch_size).detach().float().cpu()
        if self.eval_set.same_items and embed_index is embed_query:
            index_emb = query_emb
        else:
            index_emb = embed_index(self.eval_set.index, self.batch_size).detach().float().cpu()
        sampled = self.eval_set.query_ids is not None
        with matching_threads(self.num_workers):
            ranking = rank(
                query_emb,
                index_emb,
                self.eval_set.query_labels,
                self.eval_set.index_labels,
                limit=self.limit,
                distance=self.distance,
                exclude_self=self.exclude_self and (self.eval_set.same_items or sampled),
                query_ids=self.eval_set.query_ids,
                index_ids=self.eval_set.index_ids,
                relevant=self.eval_set.relevant,
            )
        if self.gather_examples:
            self.examples = self._examples(ranking)
        return metrics_of_ranking(ranking)

    def _examples(self, ranking: Ranking) -> list[dict[str, Any]]:
        out = []
        for q in example_queries(self.eval_set.query_labels, self.num_example_queries):
            matches = []
            for pos in range(min(5, ranking.indices.shape[1])):
                j = int(ranking.indices[q, pos])
                if math.isinf(float(ranking.distances[q, pos])):
                    continue
                matches.append(
                    {
                        'content': _describe(self.eval_set.index[j]),
                        'label': _jsonable(self.eval_set.index_labels[j]),
                        'distance': round(float(ranking.distances[q, pos]), 6),
                        'relevant': bool(ranking.relevance[q, pos]),
                        **_thumbnail(self.eval_set.index[j]),
                    }
                )
            out.append(
                {
                    'query': _describe(self.eval_set.queries[q]),
                    'label': _jsonable(self.eval_set.query_labels[q]),
                    'matches': matches,
                    **_thumbnail(self.eval_set.queries[q]),
                }
            )
        return out


def example_queries(labels: Sequence[Any], count: int) -> list[int]:
    """The positions of the queries shown as examples: ``count`` of them, one of each label in turn (in the
    order the labels first appear), so that data sorted by class shows several classes, not the first
    one only; data whose every query has its own label (pairs) gives the first ``count`` queries."""
    by_label: dict[Any, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(_jsonable(label), []).append(position)
    chosen: list[int] = []
    queues = list(by_label.values())
    while len(chosen) < count and queues:
        chosen.extend(queue.pop(0) for queue in queues[: count - len(chosen)])
        queues = [queue for queue in queues if queue]
    return chosen


@contextmanager
def matching_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (at most the CPUs there are) while queries are matched."""
    if count is None:
        yield
        return
    import os

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _describe(item: Any) -> str:
    """A short readable form of a Record or a trainer Item for the examples in metrics.json."""
    text = getattr(item, 'text', None)
    if text is not None:
        return str(text)
    uri = getattr(item, 'uri', None)
    if uri is not None:
        return str(uri)
    blob = getattr(item, 'blob', None)
    if blob is not None:
        return f'<image, {len(blob) * 3 // 4} bytes>'
    image = getattr(item, 'image', None)
    if image is not None:
        return f'<image, {len(image)} bytes>'
    return '<tensor>'


THUMBNAIL_SIZE = 96  # pixels of the longer side of an example's image in examples.json


def _thumbnail(item: Any) -> dict[str, str]:
    """``{'image': 'data:image/jpeg;base64,...'}``: a small picture of an image item for examples.json
    (the run console shows it), or ``{}`` for text, tensors and images that cannot be decoded."""
    import base64
    import io

    data = getattr(item, 'image', None)
    if data is None and getattr(item, 'blob', None) is not None:
        try:
            data = base64.b64decode(item.blob)
        except ValueError:
            return {}
    if not isinstance(data, bytes):
        return {}
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            picture = image.convert('RGB')
    except (UnidentifiedImageError, OSError, ValueError):
        return {}
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    out = io.BytesIO()
    picture.save(out, format='JPEG', quality=80)
    return {'image': 'data:image/jpeg;base64,' + base64.b64encode(out.getvalue()).decode('ascii')}


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
