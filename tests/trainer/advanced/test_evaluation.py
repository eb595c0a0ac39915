"""Retrieval metrics against hand-computed rankings and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, dcg_score, ndcg_score

from finetuner.api.layout import Record
from finetuner.catalog import EVALUATION_METRICS
from finetuner_trainer.evaluation import (
    EvaluationError,
    Evaluator,
    build_eval_set,
    rank,
    ranking_metrics,
    retrieval_metrics,
)


def line(*positions: float) -> torch.Tensor:
    """1-d embeddings: euclidean distance to a query at 0 is the position itself."""
    return torch.tensor([[p] for p in positions], dtype=torch.float32)


def test_hand_computed_ranking() -> None:
    # Index at distances 1..6 with labels A B A B B A; limit 4 -> relevance [1, 0, 1, 0], R = 3.
    metrics = retrieval_metrics(line(0.0), line(1, 2, 3, 4, 5, 6), ['A'], list('ABABBA'), limit=4, distance='euclidean')
    expected = {
        'precision_at_k': 0.5,
        'recall_at_k': 2 / 3,
        'f1_score_at_k': 4 / 7,
        'hit_at_k': 1.0,
        'reciprocal_rank': 1.0,
        'average_precision': (1 + 2 / 3) / 3,
        'r_precision': 2 / 3,
        'dcg_at_k': 1.5,
        'ndcg_at_k': 1.5 / (1 + 1 / math.log2(3) + 0.5),
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert set(EVALUATION_METRICS) <= set(metrics)
    assert metrics['mrr'] == metrics['reciprocal_rank']
    assert metrics['map'] == metrics['average_precision']


def test_mean_over_queries_and_miss() -> None:
    # Query 1 finds its only match at rank 3; query 2 (label C) finds nothing in the top 2.
    index = line(1, 2, 3, 10)
    labels = ['A', 'A', 'B', 'C']
    one = ranking_metrics([0, 0, 1], 1)
    assert one['reciprocal_rank'] == pytest.approx(1 / 3)
    assert one['average_precision'] == pytest.approx(1 / 3)
    assert one['ndcg_at_k'] == pytest.approx(0.5)  # 1/log2(4) over ideal 1
    assert one['r_precision'] == 0.0
    miss = ranking_metrics([0, 0], 1)
    assert all(v == 0.0 for v in miss.values())
    both = retrieval_metrics(line(0, 0), index, ['B', 'C'], labels, limit=3, distance='euclidean')
    assert both['reciprocal_rank'] == pytest.approx((1 / 3 + 0) / 2)
    assert both['hit_at_k'] == pytest.approx(0.5)
    assert both['recall_at_k'] == pytest.approx(0.5)


def test_distances() -> None:
    q = torch.tensor([[1.0, 0.0]])
    index = torch.tensor([[10.0, 1.0], [0.5, 0.0], [0.0, 1.0]])
    # cosine ranks direction (items 0 and 1 nearly same direction), euclidean ranks position.
    cos = rank(q, index, [0], [0, 1, 2], limit=3, distance='cosine')
    euc = rank(q, index, [0], [0, 1, 2], limit=3, distance='euclidean')
    sq = rank(q, index, [0], [0, 1, 2], limit=3, distance='sqeuclidean')
    assert cos.indices[0].tolist() == [1, 0, 2]
    assert euc.indices[0].tolist() == [1, 2, 0]
    assert sq.indices[0].tolist() == [1, 2, 0]
    assert sq.distances[0] == pytest.approx(euc.distances[0] ** 2)
    with pytest.raises(EvaluationError, match="unknown distance 'manhattan'"):
        rank(q, index, [0], [0, 1, 2], distance='manhattan')


def test_exclude_self() -> None:
    emb = line(0, 1, 5, 6)
    labels = ['A', 'A', 'B', 'B']
    with_self = retrieval_metrics(emb, emb, labels, labels, limit=1, distance='euclidean')
    without = retrieval_metrics(emb, emb, labels, labels, limit=1, distance='euclidean', exclude_self=True)
    assert with_self['precision_at_k'] == 1.0  # every item finds itself
    assert with_self['recall_at_k'] == 0.5
    assert without['precision_at_k'] == 1.0  # the nearest other item has the same label
    assert without['recall_at_k'] == 1.0  # R excludes the item itself
    ranking = rank(emb, emb, labels, labels, limit=3, distance='euclidean', exclude_self=True)
    assert all(q not in row for q, row in enumerate(ranking.indices.tolist()))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_against_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    queries = torch.from_numpy(rng.normal(size=(7, 5))).float()
    index = torch.from_numpy(rng.normal(size=(30, 5))).float()
    q_labels = rng.integers(0, 3, size=7).tolist()
    i_labels = rng.integers(0, 3, size=30).tolist()
    scores = -torch.cdist(queries, index).numpy()
    truth = np.array([[int(il == ql) for il in i_labels] for ql in q_labels])
    answerable = truth.sum(1) > 0
    full = retrieval_metrics(queries, index, q_labels, i_labels, limit=30, distance='euclidean')
    expected_ap = np.mean([average_precision_score(t, s) for t, s in zip(truth, scores, strict=True) if t.any()])
    assert full['average_precision'] == pytest.approx(expected_ap)
    for k in (1, 5, 10):
        top = retrieval_metrics(queries, index, q_labels, i_labels, limit=k, distance='euclidean')
        assert top['ndcg_at_k'] == pytest.approx(ndcg_score(truth[answerable], scores[answerable], k=k))
        assert top['dcg_at_k'] == pytest.approx(dcg_score(truth[answerable], scores[answerable], k=k))
        order = np.argsort(-scores, axis=1)[:, :k]
        hits = np.take_along_axis(truth, order, axis=1)[answerable]
        assert top['precision_at_k'] == pytest.approx(hits.sum(1).mean() / k)
        assert top['hit_at_k'] == pytest.approx((hits.sum(1) > 0).mean())


def test_no_relevant_item_is_an_error() -> None:
    with pytest.raises(EvaluationError, match='no query has a relevant item'):
        retrieval_metrics(line(0), line(1, 2), ['A'], ['B', 'C'])


def test_build_eval_set_labelled_pairs_and_clip() -> None:
    labelled = [Record(text='a', label=1), Record(text='b', label=2)]
    es = build_eval_set(labelled)
    assert es.same_items and es.index is es.queries
    pairs = [
        Record(chunks=[Record(text='q1'), Record(text='doc')]),
        Record(chunks=[Record(text='q2'), Record(text='doc')]),
        Record(chunks=[Record(text='q3'), Record(text='other')]),
    ]
    es = build_eval_set(pairs)
    assert [r.text for r in es.queries] == ['q1', 'q2', 'q3'] and es.pair_count == 3
    merged = es.merged()
    assert [r.text for r in merged.index] == ['doc', 'other']  # identical documents are one document
    assert merged.relevant == [frozenset({0}), frozenset({0}), frozenset({1})]
    clip = [Record(chunks=[Record(blob='aGk=', modality='image'), Record(text='a red one', modality='text')])]
    es = build_eval_set(clip, multi_modal=True)
    assert es.queries[0].text == 'a red one' and es.index[0].blob == 'aGk='
    with pytest.raises(EvaluationError, match='query_data item 1 has no label'):
        build_eval_set([Record(text='a', label=1), Record(text='b')])
    with pytest.raises(EvaluationError, match='query_data is empty'):
        build_eval_set([])


def test_evaluator_with_an_embedder_and_examples() -> None:
    records = [Record(text=t, label=t[0]) for t in ['a1', 'a2', 'b1', 'b2']]
    position = {'a1': 0.0, 'a2': 1.0, 'b1': 10.0, 'b2': 11.0}

    def embed(items: list[Record], batch_size: int) -> torch.Tensor:
        return torch.tensor([[position[r.text], 1.0] for r in items])

    evaluator = Evaluator(
        build_eval_set(records), limit=2, distance='euclidean', gather_examples=True, num_example_queries=2
    )
    metrics = evaluator.evaluate(embed)
    assert metrics['precision_at_k'] == 0.5  # the other same-label item, then one of the other class
    assert metrics['reciprocal_rank'] == 1.0
    assert len(evaluator.examples) == 2
    assert evaluator.examples[0]['query'] == 'a1'
    assert evaluator.examples[0]['matches'][0] == {'content': 'a2', 'label': 'a', 'distance': 1.0, 'relevant': True}
    with pytest.raises(EvaluationError, match="distance 'dot' is unknown"):
        Evaluator(build_eval_set(records), distance='dot')


def test_examples_of_images_carry_a_thumbnail_the_browser_can_show() -> None:
    import base64
    import io

    from PIL import Image

    from finetuner_trainer.data import Item
    from tests.support.tiny import png_bytes

    big = io.BytesIO()
    Image.new('RGB', (300, 150), (200, 10, 10)).save(big, format='PNG')
    items = [Item(image=big.getvalue()), Item(image=png_bytes((10, 200, 10), size=32)), Item(image=b'not an image')]
    labels = ['red', 'green', 'red']

    def embed(batch: list[Item], batch_size: int) -> torch.Tensor:
        return torch.tensor([[float(i), 1.0] for i in range(len(batch))])

    from finetuner_trainer.evaluation import EvalSet

    evaluator = Evaluator(EvalSet(items, items, labels, labels, True), limit=2, gather_examples=True)
    evaluator.evaluate(embed)
    first = evaluator.examples[0]
    assert first['query'].startswith('<image, ') and first['image'].startswith('data:image/jpeg;base64,')
    thumbnail = Image.open(io.BytesIO(base64.b64decode(first['image'].split(',', 1)[1])))
    assert thumbnail.format == 'JPEG' and thumbnail.size == (96, 48)  # longer side 96, aspect kept
    assert thumbnail.getpixel((48, 24))[0] > 150  # still red
    undecodable = [m for e in evaluator.examples for m in e['matches'] if m['content'] == '<image, 12 bytes>']
    assert undecodable and all('image' not in m for m in undecodable)  # no picture, and no failure
    small = next(m for e in evaluator.examples for m in e['matches'] if m['label'] == 'green')
    assert Image.open(io.BytesIO(base64.b64decode(small['image'].split(',', 1)[1]))).size == (32, 32)  # never enlarged


def _pair(query: str, document: str) -> Record:
    return Record(chunks=[Record(text=query), Record(text=document)])


def test_pair_copies_merge_into_distinct_queries_and_documents_with_every_answer_relevant() -> None:
    records = [
        *[_pair('My printer is not printing.', 'Check the cable.')] * 3,  # one pair given three times
        _pair('Hi', 'Hello.'),
        _pair('Hi', 'Hey there.'),  # a question with two answers
        _pair('Hello', 'Hello.'),  # an answer shared by two questions
    ]
    es = build_eval_set(records, [Record(text='unrelated'), Record(text='Hello.')]).merged()
    assert [q.text for q in es.queries] == ['My printer is not printing.', 'Hi', 'Hello']
    assert [d.text for d in es.index] == ['Check the cable.', 'Hello.', 'Hey there.', 'unrelated', 'Hello.']
    assert es.relevant == [frozenset({0}), frozenset({1, 2}), frozenset({1})]  # distractors relevant to none
    assert es.merged() is es  # merging twice changes nothing
    # 'Hi' ranks 'Hey there.' first and 'Hello.' second: both relevant (before, the pair (Hi, Hello.) counted
    # 'Hey there.' as a miss); the printer question is one query, not three.
    vectors = {
        'My printer is not printing.': [1.0, 0, 0],
        'Check the cable.': [1.0, 0, 0],
        'Hi': [0, 1.0, 0],
        'Hey there.': [0, 1.0, 0.1],
        'Hello.': [0, 1.0, 0.3],
        'Hello': [0, 1.0, 0.3],
        'unrelated': [0, 0, 1.0],
    }

    def embed(items: list[Record], batch_size: int) -> torch.Tensor:
        return torch.tensor([vectors[item.text] for item in items])

    evaluator = Evaluator(build_eval_set(records, [Record(text='unrelated')]), limit=2, gather_examples=True)
    metrics = evaluator.evaluate(embed)
    assert metrics['precision_at_k'] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert metrics['recall_at_k'] == pytest.approx(1.0)
    assert [e['query'] for e in evaluator.examples] == ['My printer is not printing.', 'Hi', 'Hello']
    assert [m['relevant'] for m in evaluator.examples[1]['matches']] == [True, True]


def test_pair_metrics_match_sentence_transformers_on_chatterbot_pairs_with_their_repeats() -> None:
    """The oracle is built the way a sentence-transformers user builds an information-retrieval evaluation
    from pairs: queries and corpus as dicts keyed by their text, relevant_docs the set of each query's
    answers. chatterbot-corpus repeats some tech-support pairs ~100 times; each is one query and one
    document there, and must be here too."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from finetuner.offline_data import chatterbot_pairs

    _, held = chatterbot_pairs(held_out=0.2, seed=0)
    texts = [(r.chunks[0].text, r.chunks[1].text) for r in held]
    assert len(set(texts)) < len(texts) / 2  # the data repeats pairs
    queries = {q: q for q, _ in texts}
    corpus = {a: a for _, a in texts}
    relevant_docs: dict[str, set[str]] = {}
    for q, a in texts:
        relevant_docs.setdefault(q, set()).add(a)
    rng = np.random.default_rng(0)
    answer_vector = {a: rng.normal(size=16) for a in corpus}
    vector = {**answer_vector}
    for q, answers in relevant_docs.items():  # a question near its answers, plus noise
        vector[q] = np.mean([answer_vector[a] for a in answers], axis=0) + 1.2 * rng.normal(size=16)

    def embed(items: list[Record], batch_size: int) -> torch.Tensor:
        return torch.tensor(np.stack([vector[item.text] for item in items]), dtype=torch.float32)

    ours = Evaluator(build_eval_set(held), limit=10).evaluate(embed)
    oracle = InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant_docs,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[10],
        accuracy_at_k=[10],
        precision_recall_at_k=[10],
    )
    unit = {t: v / np.linalg.norm(v) for t, v in vector.items()}
    ids = list(corpus)
    matrix = np.stack([unit[a] for a in ids])
    results = [
        [{'corpus_id': a, 'score': float(s)} for a, s in zip(ids, matrix @ unit[q], strict=True)]
        for q in oracle.queries_ids
    ]
    expected = oracle.compute_metrics(results)
    assert ours['ndcg_at_k'] == pytest.approx(expected['ndcg@k'][10], abs=1e-6)
    assert ours['mrr'] == pytest.approx(expected['mrr@k'][10], abs=1e-6)
    assert ours['map'] == pytest.approx(expected['map@k'][10], abs=1e-6)
    assert ours['hit_at_k'] == pytest.approx(expected['accuracy@k'][10], abs=1e-6)
    assert ours['recall_at_k'] == pytest.approx(expected['recall@k'][10], abs=1e-6)


def test_sampling_pair_queries_samples_distinct_queries_and_keeps_their_relevant_documents() -> None:
    records = [_pair(f'q{i % 4}', f'd{i % 4}') for i in range(20)] + [_pair('q0', 'd9')]
    sampled = build_eval_set(records).sample_queries(2, seed=0)
    assert len(sampled.queries) == 2 and len({q.text for q in sampled.queries}) == 2
    assert [d.text for d in sampled.index] == ['d0', 'd1', 'd2', 'd3', 'd9']
    for query, relevant in zip(sampled.queries, sampled.relevant or [], strict=True):
        expected = {'d0', 'd9'} if query.text == 'q0' else {'d' + query.text[1:]}
        assert {sampled.index[j].text for j in relevant} == expected


def test_the_runs_own_pair_evaluation_data_merges_copies_of_texts_and_of_images() -> None:
    from finetuner_trainer.callbacks import eval_set_from_dataset
    from finetuner_trainer.data import Dataset, Example, Item

    red, blue = b'\x89PNG red', b'\x89PNG blue'
    clip = Dataset(
        'pairs',
        [
            Example((Item(text='a red square'), Item(image=red))),
            Example((Item(text='a crimson square'), Item(image=red))),  # two captions of one image
            Example((Item(text='a blue square'), Item(image=blue))),
            Example((Item(text='a blue square'), Item(image=blue))),  # a pair given twice
        ],
    )
    merged = Evaluator(eval_set_from_dataset(clip, multi_modal=True)).eval_set
    assert [q.text for q in merged.queries] == ['a red square', 'a crimson square', 'a blue square']
    assert [d.image for d in merged.index] == [red, blue] and merged.query_is_text_of_pair
    assert merged.relevant == [frozenset({0}), frozenset({0}), frozenset({1})]
    texts = Dataset('pairs', [Example((Item(text='q'), Item(text='a'))), Example((Item(text='q'), Item(text='b')))])
    merged = Evaluator(eval_set_from_dataset(texts)).eval_set
    assert [q.text for q in merged.queries] == ['q'] and merged.relevant == [frozenset({0, 1})]
