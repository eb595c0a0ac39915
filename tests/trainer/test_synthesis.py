"""Synthesis runs in the trainer: relations mined with the run's model, scored by a cross-encoder (checked
against sentence-transformers' ``CrossEncoder.predict``), published as data MarginMSELoss trains on,
and resumed from their checkpoints after a crash."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from finetuner.api.layout import Record
from finetuner.api.mining import SYNTHESIS_DATA, SYNTHESIS_FORMAT
from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig
from finetuner_trainer import synthesis
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.models import build_embedder
from finetuner_trainer.runner import train
from tests.support.mining_data import make_tiny_cross_encoder, text_records, topic_texts
from tests.support.tiny import write_jsonl


@pytest.fixture(scope='module')
def tiny_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cross_encoder(tmp_path_factory.mktemp('models') / 'cross-encoder')


def synthesis_config(
    tmp_path: Path, model: Path, cross_encoder: Path, queries: list[Record], corpus: list[Record], **options: Any
) -> TrainerConfig:
    query_file = write_jsonl(queries, tmp_path / 'data' / 'queries.jsonl')
    corpus_file = write_jsonl(corpus, tmp_path / 'data' / 'corpus.jsonl')
    spec = FinetuneRunSpec(
        model=str(model),
        train_data=str(query_file),
        task='synthesis',
        synthesis={'corpus_data': str(corpus_file), 'cross_encoder': str(cross_encoder), **options},
        device='cpu',
    )
    return TrainerConfig(
        run_name='synthesis', spec=spec, output_uri=(tmp_path / 'output').as_uri(), termination_log=str(tmp_path / 'tl')
    )


def read_output(config: TrainerConfig) -> tuple[list[Record], dict[str, Any], dict[str, Any]]:
    out = Path(config.output_uri.removeprefix('file://'))
    records = [Record.model_validate_json(line) for line in (out / SYNTHESIS_DATA).read_text().splitlines()]
    return (
        records,
        json.loads((out / 'artifact' / 'manifest.json').read_text()),
        json.loads((out / 'metrics.json').read_text()),
    )


def test_relations_are_the_closest_documents_scored_by_the_cross_encoder(
    tmp_path: Path, tiny_bert: Path, tiny_ce: Path
) -> None:
    from sentence_transformers import CrossEncoder

    questions, answers = topic_texts(20, seed=2)
    corpus = [*answers, questions[0]]  # the query's own text is never its relation
    config = synthesis_config(
        tmp_path, tiny_bert, tiny_ce, text_records(questions), text_records(corpus), num_relations=3
    )
    result = train(config)
    records, manifest, metrics = read_output(config)

    assert result.artifact_uri == f'{config.output_uri}/artifact'
    assert manifest['format'] == SYNTHESIS_FORMAT and manifest['records'] == len(set(questions)) == len(records)
    assert metrics['after']['records'] == len(records) and metrics['after']['pairs'] == 3 * len(records)
    progress = json.loads((Path(config.output_uri.removeprefix('file://')) / 'progress.json').read_text())
    assert progress['percent'] == 100.0 and progress['totalSteps'] == len(set(questions))

    embedder = build_embedder(config.spec)
    unique_corpus = list(dict.fromkeys(corpus))
    corpus_emb = torch.nn.functional.normalize(embedder.embed([Record(text=t) for t in unique_corpus]), dim=-1)
    reference = CrossEncoder(str(tiny_ce), device='cpu')
    for record in records:
        query, documents = record.chunks[0].text, record.chunks[1:]
        assert query not in {d.text for d in documents}
        query_emb = torch.nn.functional.normalize(embedder.embed([Record(text=query)]), dim=-1)
        ranked = [unique_corpus[i] for i in (query_emb @ corpus_emb.T)[0].argsort(descending=True).tolist()]
        closest = [text for text in ranked if text != query][:3]
        assert {d.text for d in documents} == set(closest)
        scores = [d.score for d in documents]
        assert scores == sorted(scores, reverse=True), 'best-scored document first'
        expected = reference.predict([(query, d.text) for d in documents])
        assert scores == pytest.approx([float(v) for v in expected], abs=1e-5)


def test_its_data_trains_margin_mse(tmp_path: Path, tiny_bert: Path, tiny_ce: Path) -> None:
    questions, answers = topic_texts(16, seed=3)
    config = synthesis_config(tmp_path, tiny_bert, tiny_ce, text_records(questions), text_records(answers))
    train(config)
    data = f'{config.output_uri}/{SYNTHESIS_DATA}'
    spec = FinetuneRunSpec(
        model=str(tiny_bert), train_data=data, loss='MarginMSELoss', epochs=1, batch_size=4, device='cpu'
    )
    fine_tune = TrainerConfig(run_name='margin', spec=spec, output_uri=(tmp_path / 'tuned').as_uri())
    result = train(fine_tune)
    assert result.steps >= 2 and result.artifact_uri.endswith('/artifact')


def test_a_crashed_synthesis_resumes_from_its_finished_chunks(
    tmp_path: Path, tiny_bert: Path, tiny_ce: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    questions, answers = topic_texts(24, seed=4)
    monkeypatch.setattr(synthesis, 'QUERY_CHUNK', 5)
    whole = synthesis_config(tmp_path / 'whole', tiny_bert, tiny_ce, text_records(questions), text_records(answers))
    train(whole)
    config = synthesis_config(tmp_path / 'crash', tiny_bert, tiny_ce, text_records(questions), text_records(answers))
    real = synthesis._score_chunk
    calls = []

    def dies_on_the_third(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('node lost')
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesis, '_score_chunk', dies_on_the_third)
    with pytest.raises(RuntimeError, match='node lost'):
        train(config)
    out = Path(config.output_uri.removeprefix('file://'))
    assert not (out / 'artifact' / 'manifest.json').exists()
    assert sorted(p.name for p in (out / 'checkpoints' / 'synthesis').glob('part-*')) == [
        'part-00000.jsonl',
        'part-00001.jsonl',
    ]
    calls.clear()
    monkeypatch.setattr(synthesis, '_score_chunk', lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger='finetuner_trainer'):
        train(config)
    assert len(calls) == len(range(10, len(set(questions)), 5)), 'only the unfinished chunks are scored again'
    assert 'resumed: 10 queries were done by an earlier attempt' in caplog.text
    assert read_output(config)[0] == read_output(whole)[0]


@pytest.mark.parametrize(
    ('queries', 'corpus', 'options', 'field', 'message'),
    [
        (['red cat'], [], {}, 'synthesis.corpusData', 'is empty: it holds no records'),
        (
            [Record(chunks=[Record(text='q'), Record(text='d')])],
            ['a'],
            {},
            'trainData',
            'record 1 has no text (chunks)',
        ),
        (['  '], ['a'], {}, 'trainData', 'record 1 has no text (empty text)'),
        (['red cat'], ['a', 'b', 'a'], {'num_relations': 3}, 'synthesis.numRelations', 'the corpus holds 2 distinct'),
    ],
)
def test_bad_inputs_name_the_field(
    tmp_path: Path,
    tiny_bert: Path,
    tiny_ce: Path,
    queries: list[Any],
    corpus: list[str],
    options: dict[str, Any],
    field: str,
    message: str,
) -> None:
    query_records = [q if isinstance(q, Record) else Record(text=q) for q in queries]
    config = synthesis_config(tmp_path, tiny_bert, tiny_ce, query_records, text_records(corpus), **options)
    with pytest.raises(ConfigError) as caught:
        train(config)
    assert caught.value.field == field and message in caught.value.problem


def test_a_model_that_is_not_a_cross_encoder_is_refused(tmp_path: Path, tiny_bert: Path) -> None:
    config = synthesis_config(tmp_path, tiny_bert, tiny_bert, text_records(['q']), text_records(['a', 'b', 'c']))
    with pytest.raises(ConfigError, match='is not a cross-encoder') as caught:
        train(config)
    assert caught.value.field == 'synthesis.crossEncoder'
