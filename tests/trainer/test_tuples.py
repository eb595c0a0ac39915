"""(query, document, negative...) tuples: read in every form, batched, and trained by the losses that use
explicit negatives, each checked against an independent implementation (sentence-transformers' losses,
TripletMarginLoss computed by hand on exactly the given triplets)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.data import Shape, parse_docarray, parse_jsonl, to_dataset
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.losses import build_objective, tuple_triplets
from finetuner_trainer.runner import train
from tests.support.mining_data import topic_texts
from tests.trainer.conftest import ConfigFactory

SPEC = FinetuneRunSpec(model='m', train_data='t')


def tuple_records(n: int = 16, negatives: int = 2, scored: bool = False) -> list[Record]:
    questions, answers = topic_texts(n)
    records = []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        others = [answers[(i + 5 * (j + 1)) % n] for j in range(negatives)]
        scores = [0.9, *(0.5 - 0.1 * j for j in range(negatives))] if scored else [None] * (negatives + 1)
        documents = [Record(text=t, score=s) for t, s in zip([answer, *others], scores, strict=True)]
        records.append(Record(chunks=[Record(text=question), *documents]))
    return records


def test_tuples_and_scored_tuples_are_shapes_of_their_own() -> None:
    plain = to_dataset(tuple_records(4), SPEC, 'trainData')
    assert plain.shape == Shape.TUPLES and [len(e.items) for e in plain.examples] == [4] * 4
    scored = to_dataset(tuple_records(4, scored=True), SPEC, 'trainData')
    assert scored.shape == Shape.SCORED_TUPLES
    assert scored.examples[0].scores == pytest.approx((0.9, 0.5, 0.4))


@pytest.mark.parametrize(
    ('records', 'message'),
    [
        (
            [Record(chunks=[Record(text='q'), Record(text='d')]), Record(chunks=[Record(text=t) for t in 'qde'])],
            r'has 3 chunks and trainData\[0\] has 2',
        ),
        (
            [Record(chunks=[Record(text='q'), Record(text='d', score=1.0), Record(text='e')])],
            'scores 1 of its 2 documents; score every document',
        ),
        (
            [Record(chunks=[Record(text=t) for t in 'qde'], score=0.3)],
            'is a tuple with a score on the parent',
        ),
    ],
)
def test_tuples_that_do_not_fit_name_the_record(records: list[Record], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        to_dataset(records, SPEC, 'trainData')
    assert caught.value.field == f'trainData[{len(records) - 1}]'  # the odd record, counted from 0


def test_sentence_transformers_columns_in_jsonl_are_tuples() -> None:
    rows = [
        {'anchor': 'red cat', 'positive': 'a red cat', 'negative': 'a blue bus'},
        {'anchor': 'old bus', 'positive': 'an old bus', 'negative_1': 'a cat', 'negative_2': 'a dog'},
    ]
    triplet, tuple4 = parse_jsonl(''.join(json.dumps(r) + '\n' for r in rows).encode(), 'trainData')
    assert [c.text for c in triplet.chunks] == ['red cat', 'a red cat', 'a blue bus']
    assert [c.text for c in tuple4.chunks] == ['old bus', 'an old bus', 'a cat', 'a dog']
    scored = parse_jsonl(json.dumps({'query': 'q', 'pos': 'd', 'neg': 'e', 'scores': [0.8, 0.1]}).encode(), 'x')
    assert [c.score for c in scored[0].chunks] == [None, 0.8, 0.1]
    margin = parse_jsonl(json.dumps({'query': 'q', 'pos': 'd', 'neg': 'e', 'label': 0.7}).encode(), 'x')
    assert [c.score for c in margin[0].chunks] == [None, 0.0, -0.7], 'MarginMSE label: score(pos) - score(neg)'
    pair = parse_jsonl(json.dumps({'sentence1': 'a', 'sentence2': 'b', 'score': 0.25}).encode(), 'x')
    assert pair[0].score == 0.25 and len(pair[0].chunks) == 2
    with pytest.raises(ConfigError, match=r"trainData\[0\]: 'scores' has 1 values for 2 documents"):
        parse_jsonl(json.dumps({'query': 'q', 'pos': 'd', 'neg': 'e', 'scores': [0.8]}).encode(), 'trainData')


def test_docarray_parents_with_more_chunks_are_tuples() -> None:
    from docarray import DocList
    from docarray.documents.legacy import LegacyDocument

    docs = DocList[LegacyDocument](
        [
            LegacyDocument(
                chunks=DocList[LegacyDocument](
                    [
                        LegacyDocument(text='red cat'),
                        LegacyDocument(text='a red cat', tags={'finetuner_score': 0.9}),
                        LegacyDocument(text='a blue bus', tags={'finetuner_score': 0.2}),
                    ]
                )
            )
        ]
    )
    path = Path(__import__('tempfile').mkdtemp()) / 'docs.bin'
    docs.save_binary(str(path), protocol='protobuf', compress=None)
    (record,) = parse_docarray(path.read_bytes(), 'trainData')
    dataset = to_dataset([record], SPEC, 'trainData')
    assert dataset.shape == Shape.SCORED_TUPLES and dataset.examples[0].scores == (0.9, 0.2)


def _embeddings(batch: int = 6, negatives: int = 2, dim: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, dim, requires_grad=True) for _ in range(2 + negatives)]


class _Columns(nn.Module):
    """What sentence-transformers' losses call as a model: features in, {'sentence_embedding'} out."""

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {'sentence_embedding': features['x']}


def test_multiple_negatives_ranking_with_negatives_equals_sentence_transformers() -> None:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Reference

    columns = _embeddings()
    ours = build_objective('MultipleNegativesRankingLoss', {}, None, {}, 8, 0)
    value = ours(columns[0], columns[1], None, torch.stack(columns[2:], dim=1))
    expected = Reference(_Columns()).compute_loss_from_embeddings(columns, None)
    assert torch.allclose(value, expected, atol=1e-6)
    without = ours(columns[0], columns[1])
    assert not torch.allclose(value, without), 'the negatives must count'


def test_margin_mse_on_scored_tuples_equals_sentence_transformers() -> None:
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss as Reference

    columns = _embeddings(negatives=3)
    scores = torch.rand(6, 4)
    ours = build_objective('MarginMSELoss', {}, None, {}, 8, 0)
    value = ours(columns[0], columns[1], scores, torch.stack(columns[2:], dim=1))
    expected = Reference(_Columns()).compute_loss_from_embeddings(columns, scores)
    assert torch.allclose(value, expected, atol=1e-6)


def test_triplet_margin_loss_trains_on_exactly_the_given_triplets() -> None:
    columns = _embeddings(negatives=2)
    objective = build_objective('TripletMarginLoss', {'margin': 0.5}, None, {}, 8, 0)
    value = objective(*tuple_triplets(columns))
    q, d = (nn.functional.normalize(c, dim=-1) for c in columns[:2])
    losses = []
    for negative in columns[2:]:
        n = nn.functional.normalize(negative, dim=-1)
        losses.append(torch.relu((q - d).norm(dim=-1) - (q - n).norm(dim=-1) + 0.5))
    every = torch.cat(losses)
    expected = every[every > 0].mean()  # pytorch-metric-learning's AvgNonZeroReducer
    assert torch.allclose(value, expected, atol=1e-5)


@pytest.mark.parametrize(
    ('loss', 'scored'),
    [('MultipleNegativesRankingLoss', False), ('TripletMarginLoss', False), ('MarginMSELoss', True)],
)
def test_a_run_trains_on_tuples(make_config: ConfigFactory, tiny_bert: Path, loss: str, scored: bool) -> None:
    records = tuple_records(16, scored=scored)
    config = make_config(records, records[:8], model=str(tiny_bert), loss=loss, batch_size=8)
    result = train(config)
    assert result.steps >= 2
    assert 'mrr' in result.metrics['after'] and 'val_loss' in result.metrics['after']


@pytest.mark.parametrize(
    ('spec', 'field', 'message'),
    [
        ({'loss': 'CosineSimilarityLoss'}, 'loss', 'CosineSimilarityLoss trains on pairs with a score, but the data'),
        (
            {'loss': 'TripletMarginLoss', 'miner': 'TripletMarginMiner'},
            'miner',
            'nothing for TripletMarginMiner to mine',
        ),
        ({'loss': 'ArcFaceLoss'}, 'loss', 'tuples with negatives'),
    ],
)
def test_losses_that_do_not_take_tuples_are_refused(
    make_config: ConfigFactory, tiny_bert: Path, spec: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        train(make_config(tuple_records(8), model=str(tiny_bert), **spec))
    assert caught.value.field == field


def test_fit_with_hard_negatives_mines_then_trains(make_config: ConfigFactory, tiny_bert: Path) -> None:
    questions, answers = topic_texts(16)
    pairs = [Record(chunks=[Record(text=q), Record(text=a)]) for q, a in zip(questions, answers, strict=True)]
    config = make_config(
        pairs,
        pairs[:6],
        model=str(tiny_bert),
        loss='MultipleNegativesRankingLoss',
        batch_size=8,
        hard_negatives={'num_negatives': 2},
    )
    result = train(config)
    assert result.steps >= 2 and 'mrr' in result.metrics['after']
    log = (Path(config.output_uri.removeprefix('file://')) / 'config.json').read_text()
    assert '"hardNegatives"' in log


def test_image_tuples_train_an_image_backbone(make_config: ConfigFactory) -> None:
    from tests.support.tiny import PALETTE, TINY_TIMM, TINY_TIMM_OPTIONS, png_bytes

    def image(k: int, seed: int) -> Record:
        return Record(blob=base64.b64encode(png_bytes(PALETTE[k], seed=seed)).decode())

    records = [Record(chunks=[image(i % 3, i), image(i % 3, 100 + i), image((i + 1) % 3, 200 + i)]) for i in range(8)]
    result = train(
        make_config(records, model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS, batch_size=4, loss='TripletMarginLoss')
    )
    assert result.steps == 2
