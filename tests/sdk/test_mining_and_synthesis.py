"""The SDK side of mining and synthesis: ``finetuner.mine_hard_negatives`` here, ``finetuner.synthesize`` on the
local backend (synthesis run -> FINISHED -> its train_data -> a MarginMSE run -> FINISHED, the real trainer),
and every bad argument refused with its name before anything is stored."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import finetuner
from finetuner.api.layout import Record
from finetuner.backends.local import LocalBackend
from finetuner.errors import ArgumentError
from tests.support.mining_data import make_tiny_cross_encoder, pair_records, topic_texts
from tests.support.tiny import make_tiny_bert


@pytest.fixture(scope='module')
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('models')
    return {'bert': make_tiny_bert(root / 'bert'), 'ce': make_tiny_cross_encoder(root / 'ce')}


def test_mined_tuples_go_straight_into_fit(local: LocalBackend, models: dict[str, Path], tmp_path: Path) -> None:
    questions, answers = topic_texts(16)
    rows = [
        {'anchor': q, 'positive': a} for q, a in zip(questions, answers, strict=True)
    ]  # sentence-transformers columns
    tuples = finetuner.mine_hard_negatives(rows, model=models['bert'], num_negatives=2, show_progress=False)
    assert tuples and all(isinstance(r, Record) and len(r.chunks) == 4 for r in tuples)
    assert all(r.chunks[1].text not in {c.text for c in r.chunks[2:]} for r in tuples)
    scored = finetuner.mine_hard_negatives(
        pair_records(questions, answers),
        ['red red', 'bus bus'],
        model=str(models['bert']),
        num_negatives=1,
        cross_encoder=models['ce'],
        output_scores=True,
        output_format='triplet',
        show_progress=False,
    )
    assert all(len(r.chunks) == 3 and r.chunks[1].score is not None and r.chunks[2].score is not None for r in scored)

    run = finetuner.fit(
        model=str(models['bert']),
        train_data=tuples,
        loss='MultipleNegativesRankingLoss',
        epochs=1,
        batch_size=4,
        cpu=True,
        num_workers=0,
    )
    assert run.wait(timeout=300, poll=0.5)['status'] == 'FINISHED', run.logs()[-2000:]


def test_synthesis_then_margin_mse_on_the_local_backend(local: LocalBackend, models: dict[str, Path]) -> None:
    questions, answers = topic_texts(20, seed=1)
    experiment = finetuner.create_experiment('distil')
    run = experiment.create_synthesis_run(
        query_data=questions,
        corpus_data=answers,
        models=finetuner.SynthesisModels(relation_miner=str(models['bert']), cross_encoder=str(models['ce'])),
        num_relations=3,
        cpu=True,
    )
    assert run.status() == {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}
    assert run.config.task == 'synthesis' and run.experiment_name == 'distil'
    with pytest.raises(finetuner.RunNotFinishedError, match='has no training data yet'):
        run.train_data  # noqa: B018
    final = run.wait(timeout=300, poll=0.5)
    assert final['status'] == 'FINISHED', run.logs()[-2000:]
    assert final['details'].startswith('Training data at file://') and final['details'].endswith('(run.train_data)')
    assert run.train_data.endswith('/artifact/data.jsonl')
    assert 'synthesis: 20 queries' in run.logs() or 'synthesis:' in run.logs()
    records = [json.loads(line) for line in Path(run.train_data.removeprefix('file://')).read_text().splitlines()]
    assert len(records) == len(set(questions)) and all(len(r['chunks']) == 4 for r in records)
    assert run.metrics().after['pairs'] == 3 * len(records)

    tuned = experiment.create_run(
        model=str(models['bert']),
        train_data=run.train_data,
        loss='MarginMSELoss',
        epochs=1,
        batch_size=4,
        cpu=True,
        num_workers=0,
    )
    assert tuned.wait(timeout=300, poll=0.5)['status'] == 'FINISHED', tuned.logs()[-2000:]
    assert {r.name for r in experiment.list_runs()} == {run.name, tuned.name}


SYNTH = {'query_data': ['red cat'], 'corpus_data': ['a red cat', 'a blue bus'], 'num_relations': 1}


def _models(models: dict[str, Path], **change: Any) -> dict[str, Any]:
    return {'relation_miner': str(models['bert']), 'cross_encoder': str(models['ce']), **change}


@pytest.mark.parametrize(
    ('change', 'argument', 'message'),
    [
        ({'corpus_data': []}, 'corpus_data', 'is empty; give at least one document'),
        ({'query_data': ['red', Record(chunks=[Record(text='q'), Record(text='d')])]}, 'query_data[1]', 'has no text'),
        ({'query_data': [{'uri': 'cat.png'}]}, 'query_data[0]', 'has no text (image)'),
        ({'num_relations': 3}, 'num_relations', 'corpus_data holds 2 distinct documents'),
        ({'num_relations': 0}, 'synthesis.num_relations', 'greater than or equal to 1'),
        ({'num_relations': '3'}, 'num_relations', 'must be a whole number'),
        ({'models': 'bert'}, 'models', 'give finetuner.SynthesisModels'),
        ({'models': {'relation_miner': 'x'}}, 'models', 'give both relation_miner and cross_encoder'),
        ({'learning_rate': 1e-3}, 'learning_rate', 'synthesize() trains nothing'),
        ({'run_name': 'Bad_Name'}, 'run_name', 'is not a valid name'),
    ],
)
def test_synthesize_refuses_bad_arguments_by_name(
    local: LocalBackend, models: dict[str, Path], change: dict[str, Any], argument: str, message: str
) -> None:
    arguments = {**SYNTH, 'models': _models(models), **change}
    with pytest.raises(ArgumentError, match=re.escape(message)) as caught:
        finetuner.synthesize(**arguments)
    assert caught.value.argument == argument
    assert (
        finetuner.list_runs() == [] and not list((local.home / 'datasets').glob('*'))
        if (local.home / 'datasets').exists()
        else True
    )


def test_synthesize_refuses_a_folder_that_is_not_a_cross_encoder(local: LocalBackend, models: dict[str, Path]) -> None:
    with pytest.raises(ArgumentError, match=r'is not a cross-encoder: its config\.json declares BertModel') as caught:
        finetuner.synthesize(**SYNTH, models=_models(models, cross_encoder=str(models['bert'])))
    assert caught.value.argument == 'models.cross_encoder'


def test_fit_refuses_another_task(local: LocalBackend, models: dict[str, Path]) -> None:
    with pytest.raises(ArgumentError, match=r'task: fit\(\) fine-tunes a model; a synthesis run comes from'):
        finetuner.fit(model=str(models['bert']), train_data=['a'], task='synthesis')


@pytest.mark.parametrize(
    ('call', 'argument', 'message'),
    [
        ({'pairs': []}, 'pairs', 'is empty; give at least one document'),
        ({'pairs': ['just a text']}, 'pairs[0]', 'has no chunks (a single item); mining takes (query, document) pairs'),
        ({'pairs': 'my-dataset'}, 'pairs', "'my-dataset' is a reference the trainer reads"),
        ({'corpus': []}, 'corpus', 'is empty'),
        ({'corpus': 'a text'}, 'corpus', 'must be a list of documents'),
        ({'num_negatives': 0}, 'num_negatives', 'greater than or equal to 1'),
        ({'num_negatives': 4, 'range_min': 1, 'range_max': 3}, 'num_negatives', 'num_negatives 4 do not fit'),
        ({'range_min': 5, 'range_max': 5}, 'range_max', 'range_max 5 must be larger than range_min 5'),
        ({'sampling_strategy': 'best'}, 'sampling_strategy', "must be 'top' or 'random'"),
        ({'margin': 0.1, 'absolute_margin': 0.1}, 'margin', 'older name of absolute_margin'),
        ({'search': 'faiss2'}, 'search', "must be 'auto', 'exact' or 'faiss'"),
        ({'model': ''}, 'model', 'give a backbone name'),
    ],
)
def test_mine_hard_negatives_refuses_bad_arguments_by_name(
    models: dict[str, Path], call: dict[str, Any], argument: str, message: str
) -> None:
    questions, answers = topic_texts(6)
    arguments = {
        'pairs': pair_records(questions, answers),
        'model': str(models['bert']),
        'show_progress': False,
        **call,
    }
    with pytest.raises(ArgumentError, match=re.escape(message)) as caught:
        finetuner.mine_hard_negatives(**arguments)
    assert caught.value.argument == argument


def test_mining_with_a_model_that_is_not_a_cross_encoder_names_it(models: dict[str, Path]) -> None:
    questions, answers = topic_texts(6)
    with pytest.raises(ArgumentError, match='is not a cross-encoder') as caught:
        finetuner.mine_hard_negatives(
            pair_records(questions, answers),
            model=str(models['bert']),
            cross_encoder=str(models['bert']),
            show_progress=False,
        )
    assert caught.value.argument == 'cross_encoder'


def test_describe_models_lists_the_cross_encoders(capsys: pytest.CaptureFixture[str]) -> None:
    finetuner.describe_models(task='text-to-text')
    out = capsys.readouterr().out
    assert 'Cross-encoders (finetuner.synthesize, mine_hard_negatives)' in out
    assert 'cross-encoder/ms-marco-MiniLM-L6-v2' in out and 'crossencoder-base-en' in out
    finetuner.describe_models(task='image-to-image')
    assert 'Cross-encoders' not in capsys.readouterr().out
