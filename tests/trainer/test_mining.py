"""Hard-negative mining against sentence-transformers' own ``mine_hard_negatives`` (an independent oracle):
the same tiny model folder, the same data and options give the same negatives, row for row; the
cross-encoder scores what sentence-transformers' ``CrossEncoder.predict`` scores."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from finetuner.api.mining import HardNegativeOptions
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer import mining
from finetuner_trainer.cross_encoder import CrossEncoderScorer
from finetuner_trainer.data import Dataset, Example, Item, Shape
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.mining import (
    EXACT_LIMIT,
    mine_dataset,
    mine_hard_negatives,
    query_block,
    search_method,
    top_k,
)
from finetuner_trainer.models import build_embedder
from tests.support.mining_data import make_tiny_cross_encoder, topic_texts


@pytest.fixture(scope='module')
def tiny_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cross_encoder(tmp_path_factory.mktemp('models') / 'cross-encoder')


@pytest.fixture(scope='module')
def embedder(tiny_bert: Path) -> Any:
    return build_embedder(FinetuneRunSpec(model=str(tiny_bert), train_data='unused'))


def _ours(embedder: Any, questions: list[str], answers: list[str], corpus: list[str] | None = None, **options: Any):
    scorer = options.pop('scorer', None)
    rows, stats = mine_hard_negatives(
        embedder,
        [Item(text=q) for q in questions],
        [Item(text=a) for a in answers],
        HardNegativeOptions(**options),
        [Item(text=c) for c in corpus] if corpus is not None else None,
        scorer,
    )
    return rows, stats


def _st(model_dir: Path, questions: list[str], answers: list[str], ce: Path | None = None, **options: Any):
    from datasets import Dataset as HFDataset
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    model = SentenceTransformer(str(model_dir), device='cpu')
    cross_encoder = CrossEncoder(str(ce), device='cpu') if ce is not None else None
    data = HFDataset.from_dict({'query': questions, 'answer': answers})
    return st_mine(data, model, cross_encoder=cross_encoder, verbose=False, batch_size=16, **options)


def _as_texts(rows: list[Any]) -> list[list[str]]:
    return [[r.query.text, r.positive.text, *(n.text for n in r.negatives)] for r in rows]


OPTION_SETS = [
    {'num_negatives': 3},
    {'num_negatives': 2, 'range_min': 2, 'range_max': 8},
    {'num_negatives': 3, 'absolute_margin': 0.0},
    {'num_negatives': 2, 'relative_margin': 0.05},
    {'num_negatives': 2, 'max_score': 0.99, 'min_score': 0.2},
]


@pytest.mark.parametrize('options', OPTION_SETS, ids=lambda o: '-'.join(f'{k}={v}' for k, v in o.items()))
def test_n_tuples_equal_sentence_transformers(tiny_bert: Path, embedder: Any, options: dict[str, Any]) -> None:
    questions, answers = topic_texts(24, seed=3)
    questions[5] = questions[4]  # a query with two positives
    rows, stats = _ours(embedder, questions, answers, output_format='n-tuple', **options)
    expected = _st(tiny_bert, questions, answers, output_format='n-tuple', **options)
    columns = expected.column_names
    assert _as_texts(rows) == [[row[c] for c in columns] for row in expected]
    assert stats.rows == len(expected) and stats.search == 'exact'


def test_triplets_and_scores_equal_sentence_transformers(tiny_bert: Path, embedder: Any) -> None:
    questions, answers = topic_texts(20, seed=4)
    corpus = [f'{w} {w}' for w in ('red', 'cat', 'bus', 'sing', 'old')]
    rows, _ = _ours(embedder, questions, answers, corpus, num_negatives=2, output_format='triplet', output_scores=True)
    from datasets import Dataset as HFDataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    data = HFDataset.from_dict({'query': questions, 'answer': answers})
    model = SentenceTransformer(str(tiny_bert), device='cpu')
    expected = st_mine(
        data, model, corpus=corpus, num_negatives=2, output_format='triplet', output_scores=True, verbose=False
    )
    assert _as_texts(rows) == [[row['query'], row['answer'], row['negative']] for row in expected]
    ours_scores = torch.tensor([r.scores for r in rows])
    assert torch.allclose(ours_scores, torch.tensor(expected['scores']), atol=1e-5)


def test_cross_encoder_scores_and_rescoring_equal_sentence_transformers(
    tiny_bert: Path, embedder: Any, tiny_ce: Path
) -> None:
    from sentence_transformers import CrossEncoder

    pairs = [('red cat', 'red green cat'), ('bus train', 'an old bus'), ('sing', 'sing read write draw small')]
    ours = CrossEncoderScorer.load(str(tiny_ce), 'crossEncoder').score(pairs, batch_size=2)
    theirs = torch.as_tensor(CrossEncoder(str(tiny_ce), device='cpu').predict(pairs))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours.std() > 1e-3, 'the tiny cross-encoder must spread its scores for the test to mean anything'

    questions, answers = topic_texts(16, seed=5)
    scorer = CrossEncoderScorer.load(str(tiny_ce), 'crossEncoder')
    rows, _ = _ours(embedder, questions, answers, num_negatives=2, scorer=scorer, output_scores=True)
    expected = _st(
        tiny_bert, questions, answers, ce=tiny_ce, num_negatives=2, output_format='n-tuple', output_scores=True
    )
    assert _as_texts(rows) == [[row[c] for c in expected.column_names if c != 'scores'] for row in expected]
    assert torch.allclose(torch.tensor([r.scores for r in rows]), torch.tensor(expected['scores']), atol=1e-4)


def test_two_label_cross_encoders_score_the_relevant_label(tmp_path: Path) -> None:
    folder = make_tiny_cross_encoder(tmp_path / 'ce2', num_labels=2)
    scorer = CrossEncoderScorer.load(str(folder), 'crossEncoder')
    scores = scorer.score([('red', 'red cat'), ('bus', 'old fish')])
    assert scorer.activation == 'softmax' and bool(((scores > 0) & (scores < 1)).all())


def test_random_sampling_stays_in_the_window_and_repeats_with_its_seed(embedder: Any) -> None:
    questions, answers = topic_texts(20, seed=6)
    options = {'num_negatives': 2, 'range_min': 1, 'range_max': 8, 'sampling_strategy': 'random', 'seed': 7}
    rows, _ = _ours(embedder, questions, answers, **options)
    again, _ = _ours(embedder, questions, answers, **options)
    assert _as_texts(rows) == _as_texts(again)
    window, _ = _ours(embedder, questions, answers, num_negatives=7, range_min=1, range_max=8)
    allowed = {r.query.text: {n.text for n in r.negatives} for r in window}
    for row in rows:
        assert {n.text for n in row.negatives} <= allowed[row.query.text]
        assert row.positive.text not in {n.text for n in row.negatives}
        assert row.scores[1] >= row.scores[2], 'negatives come closest first'


def test_faiss_search_finds_the_exact_neighbours_of_a_small_corpus() -> None:
    pytest.importorskip('faiss')
    torch.manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)
    exact_scores, exact = top_k(queries, corpus, 5, 'exact')
    approx_scores, approx = top_k(queries, corpus, 5, 'faiss')
    assert (exact == approx).float().mean() > 0.98
    assert torch.allclose(exact_scores, approx_scores, atol=1e-4) or (exact != approx).any()
    padded_scores, padded = top_k(queries, corpus[:3], 5, 'exact')
    assert (padded[:, 3:] == -1).all() and torch.isinf(padded_scores[:, 3:]).all()
    assert search_method('auto', 10) == 'exact' and search_method('exact', 10**6) == 'exact'
    assert search_method('auto', 10**6) == 'faiss'
    assert search_method('auto', EXACT_LIMIT) == 'exact' and search_method('auto', EXACT_LIMIT + 1) == 'faiss'


def test_exact_search_ranks_a_large_corpus_in_blocks_that_fit_the_score_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fewer queries at once against a larger corpus (a block's scores within SCORE_BUDGET), the same answer
    as one matrix product of every query."""
    assert query_block(1000) == 1024 and query_block(10**6) == 67 and query_block(10**9) == 1
    torch.manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(500, 16), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(70, 16), dim=-1)
    expected_scores, expected = torch.topk(queries @ corpus.T, 10, dim=1)
    monkeypatch.setattr(mining, 'SCORE_BUDGET', 3_000)  # 6 queries a block against 500 documents
    blocks: list[int] = []
    scores, found = top_k(queries, corpus, 10, 'exact', report=lambda stage, done, total: blocks.append(done))
    assert blocks == [0, *range(6, 70, 6), 70]
    assert torch.equal(found, expected) and torch.allclose(scores, expected_scores)


@pytest.mark.parametrize(
    ('options', 'field', 'message'),
    [
        ({'num_negatives': 5, 'range_min': 3, 'range_max': 6}, 'numNegatives', 'do not fit'),
        ({'range_min': 9, 'range_max': 9}, 'rangeMax', 'must be larger than rangeMin'),
        ({'min_score': 0.9, 'max_score': 0.1}, 'minScore', 'swap them'),
    ],
)
def test_windows_that_cannot_hold_the_negatives_are_refused(options: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValueError, match=f'{field}.*{message}|{message}'):
        HardNegativeOptions(**options)


def test_what_is_not_a_cross_encoder_is_refused_naming_the_field(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        ConfigError, match=r"crossEncoder: '.*bert' is not a cross-encoder: its config.json declares BertModel"
    ):
        CrossEncoderScorer.load(str(tiny_bert), 'crossEncoder')
    three = make_tiny_cross_encoder(tmp_path / 'three', num_labels=3)
    with pytest.raises(ConfigError, match='classifies into 3 labels; a cross-encoder that scores relevance has one'):
        CrossEncoderScorer.load(str(three), 'crossEncoder')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConfigError, match=r'holds no config\.json: not a Hugging Face model folder'):
        CrossEncoderScorer.load(str(tmp_path / 'empty'), 'synthesis.crossEncoder')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ConfigError, match="cannot load cross-encoder 'nobody/no-such-model'"):
        CrossEncoderScorer.load('nobody/no-such-model', 'crossEncoder')


def test_fit_time_mining_turns_pairs_into_tuples(embedder: Any) -> None:
    questions, answers = topic_texts(16)
    pairs = Dataset(
        Shape.PAIRS, [Example((Item(text=q), Item(text=a))) for q, a in zip(questions, answers, strict=True)]
    )
    log = logging.getLogger('test')
    tuples = mine_dataset(embedder, pairs, HardNegativeOptions(num_negatives=2), torch.device('cpu'), log)
    assert tuples.shape == Shape.TUPLES and all(len(e.items) == 4 for e in tuples.examples)
    scored = mine_dataset(
        embedder, pairs, HardNegativeOptions(num_negatives=2, output_scores=True), torch.device('cpu'), log
    )
    assert scored.shape == Shape.SCORED_TUPLES and all(len(e.scores or ()) == 3 for e in scored.examples)
    labelled = Dataset(Shape.LABELLED, [Example((Item(text='a'),), label=0)])
    with pytest.raises(
        ConfigError, match='hardNegatives: mining needs query-document pairs, but trainData holds labelled'
    ):
        mine_dataset(embedder, labelled, HardNegativeOptions(), torch.device('cpu'), log)
    with pytest.raises(ConfigError, match='hardNegatives: no pair got its 2 negatives'):
        mine_dataset(embedder, pairs, HardNegativeOptions(num_negatives=2, max_score=-2.0), torch.device('cpu'), log)
