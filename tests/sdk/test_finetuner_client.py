"""Finetuner 0.8.1's client calls, as its docs and code define them (jina-ai/finetuner: finetuner/__init__.py,
experiment.py, run.py; finetuner-stubs' model and callback stubs), against the local backend with the
scripted trainer: paged listings, fit's other names, list_callbacks, list_model_options, cos_sim, the
EfficientNet aliases, events, display_examples, the CLI's events and JSON listings. Backbone names with
typos are refused before anything is uploaded. save_model into a folder that holds something is a row of
the bad-input catalogue (tests/reliability/test_bad_inputs.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics.pairwise import cosine_similarity

import finetuner
from finetuner import callbacks
from finetuner.api import layout
from finetuner.backends.local import LocalBackend
from finetuner.catalog import BACKBONES, MODEL_OPTIONS, find_backbone
from finetuner.cli import main
from finetuner.errors import ArgumentError
from finetuner.model_names import ModelNameWarning
from tests.support.tiny import labelled_texts


def _fit(run_name: str | None = None, **kwargs: object) -> finetuner.Run:
    return finetuner.fit(model='scripted:ok', train_data=labelled_texts(2, 3), run_name=run_name, **kwargs)


def _finished(run_name: str | None = None, **kwargs: object) -> finetuner.Run:
    run = _fit(run_name, **kwargs)
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED', run.logs()
    return run


# --- listings a page at a time ----------------------------------------------------------------------


def test_list_runs_and_experiments_page_as_finetuner_does(scripted: LocalBackend) -> None:
    for name in ('run-a', 'run-b', 'run-c'):
        _fit(name)
    for name in ('exp-b', 'exp-a'):
        finetuner.create_experiment(name)
    # "page 1 size 50 gives the 50 runs in the first page. To get 50-100, set page as 2"
    assert [r.name for r in finetuner.list_runs()] == ['run-a', 'run-b', 'run-c']
    assert [r.name for r in finetuner.list_runs(None, 1, 2)] == ['run-a', 'run-b']
    assert [r.name for r in finetuner.list_runs(page=2, size=2)] == ['run-c']
    assert finetuner.list_runs(page=3, size=2) == []
    assert [r.name for r in finetuner.list_runs('default', 1, 1)] == ['run-a']
    assert [e.name for e in finetuner.list_experiments(1, 2)] == ['default', 'exp-a']
    assert [e.name for e in finetuner.list_experiments(page=2, size=2)] == ['exp-b']
    assert [r.name for r in finetuner.get_experiment('default').list_runs(page=2, size=1)] == ['run-b']
    # "The maximum number for size per page is 100"
    with pytest.raises(ArgumentError, match='size: must be from 1 to 100 items per page, got 101'):
        finetuner.list_runs(size=101)
    with pytest.raises(ArgumentError, match='page: must be a page number from 1, got 0'):
        finetuner.list_experiments(page=0)
    finetuner.delete_runs()  # every run, not only a page of them
    assert finetuner.list_runs() == []


def test_create_run_and_create_training_run_are_fit(scripted: LocalBackend) -> None:
    assert finetuner.create_run is finetuner.fit
    assert finetuner.create_training_run is finetuner.fit
    run = finetuner.create_training_run('scripted:ok', labelled_texts(2, 3), run_name='aliased')
    assert run.name == 'aliased' and run.experiment_name == 'default'
    experiment = finetuner.create_experiment('grouped')
    # Finetuner's Experiment.create_training_run(model, train_data, run_name=None, eval_data=None, ...)
    in_experiment = experiment.create_training_run('scripted:ok', labelled_texts(2, 3), 'in-grouped', epochs=2)
    assert (in_experiment.experiment_name, in_experiment.config.epochs) == ('grouped', 2)
    positional = experiment.create_run('scripted:ok', labelled_texts(2, 3), run_name='positional')
    assert positional.experiment_name == 'grouped'
    with pytest.raises(ArgumentError, match="experiment_name: is set by the experiment \\('grouped'\\)"):
        experiment.create_run('scripted:ok', labelled_texts(2, 3), experiment_name='other')


# --- names: callbacks, model options, aliases, typos ---------------------------------------------------


def test_list_callbacks_returns_the_callback_classes_by_name() -> None:
    listed = finetuner.list_callbacks()
    assert listed == callbacks.CALLBACK_CLASSES
    assert set(listed) >= {
        'BestModelCheckpoint',
        'TrainingCheckpoint',
        'WandBLogger',
        'EarlyStopping',
        'EvaluationCallback',
        'WiSEFTCallback',
    }  # every callback stub of Finetuner
    assert listed['EarlyStopping'](patience=3).to_spec().name == 'EarlyStopping'


def test_list_model_options_has_finetuners_keys_for_every_backbone() -> None:
    options = finetuner.list_model_options()
    assert set(options) == {b.name for b in BACKBONES}
    for name, listed in options.items():
        family = find_backbone(name).family
        assert [o['name'] for o in listed] == [o.name for o in MODEL_OPTIONS[family]]
        for option in listed:
            assert {'name', 'type', 'required', 'default'} <= set(option)  # Finetuner's four keys
            assert option['required'] is False
    timm = {o['name']: o for o in options['efficientnet_b0']}
    assert timm['pooler']['choices'] == ['mean', 'max', 'gem'] and timm['pooler']['type'] is str
    assert 'max_length' not in timm and 'image_size' not in {o['name'] for o in options['bert-base-cased']}


def test_efficientnet_aliases_are_finetuners() -> None:
    # finetuner-stubs: EfficientNetB4Stub display_name 'efficientnet-base', EfficientNetB7Stub 'efficientnet-large'
    assert find_backbone('efficientnet-base').name == 'efficientnet_b4'
    assert find_backbone('efficientnet-large').name == 'efficientnet_b7'
    assert find_backbone('efficientnet-large').output_dim == 2560
    assert find_backbone('resnet-base').name == 'resnet50' and find_backbone('resnet-large').name == 'resnet152'


@pytest.mark.parametrize(
    ('model', 'expected'),
    [
        ('efficentnet_b0', "model: unknown backbone 'efficentnet_b0'; did you mean 'efficientnet_b0'?"),
        ('ResNet50', "model: unknown backbone 'ResNet50'; did you mean 'resnet50'?"),
        ('efficientnet_b3', "model: unknown backbone 'efficientnet_b3'; did you mean 'efficientnet_b"),
        ('my_own_net', "model: unknown backbone 'my_own_net'; see finetuner.describe_models() for the catalog"),
    ],
)
def test_misspelt_backbones_are_refused_before_anything_is_uploaded(
    scripted: LocalBackend, model: str, expected: str
) -> None:
    with pytest.raises(ArgumentError) as caught:
        finetuner.fit(model=model, train_data=['a', 'b'])
    assert str(caught.value).startswith(expected)
    assert f'written "timm:{model}"' in str(caught.value) and 'by its id "org/name"' in str(caught.value)
    assert finetuner.list_runs() == []


def test_hub_ids_timm_names_and_folders_stay_valid(scripted: LocalBackend, tmp_path: Path) -> None:
    folder = tmp_path / 'My_Model'
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # none of these warns
        for model in ('timm:efficientnet_b3', 'BAAI/bge-small-en-v1.5', 'gpt2', str(folder), 'efficientnet-base'):
            finetuner.fit(model=model, train_data=['a', 'b'])
    # A top-level hub id close to a catalog name is taken as the id it may be, with a warning.
    with pytest.warns(ModelNameWarning, match="'bert-base-uncased' is not in the catalog .* did you mean 'bert-base"):
        finetuner.fit(model='bert-base-uncased', train_data=['a', 'b'])


# --- cos_sim ------------------------------------------------------------------------------------------


def test_cos_sim_of_vectors_is_a_float_and_of_matrices_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    value = finetuner.cos_sim(a, b)
    assert isinstance(value, float)
    assert value == pytest.approx(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    assert value == pytest.approx(cosine_similarity([a], [b])[0, 0])
    left, right = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    np.testing.assert_allclose(finetuner.cos_sim(left, right), cosine_similarity(left, right), rtol=1e-10)
    np.testing.assert_allclose(finetuner.cos_sim(a, right), cosine_similarity([a], right), rtol=1e-10)
    with pytest.raises(ArgumentError, match='b: has 7 dimensions but a has 8'):
        finetuner.cos_sim(a, b[:7])
    with pytest.raises(ArgumentError, match=r'b: is a zero vector \(row 1\); its cosine similarity is undefined'):
        finetuner.cos_sim(left, np.vstack([right[0], np.zeros(8)]))


# --- events -----------------------------------------------------------------------------------------------


def test_run_events_and_the_events_command(scripted: LocalBackend, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished('with-events')
    events = run.events()
    assert [(e.reason, e.type) for e in events] == [
        ('Created', 'Normal'),
        ('Started', 'Normal'),
        ('Succeeded', 'Normal'),
    ]
    assert [e.time for e in events] == sorted(e.time for e in events)
    assert all(e.object == 'FinetuneRun/with-events' for e in events)

    assert main(['events', 'with-events', '--output', 'json']) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e['reason'] for e in listed] == ['Created', 'Started', 'Succeeded']
    assert set(listed[0]) == {'time', 'type', 'reason', 'message', 'source', 'object', 'count'}
    assert main(['events', 'with-events']) == 0
    assert 'Events of with-events' in capsys.readouterr().out
    assert main(['events', 'no-such-run']) == 1
    assert "run 'no-such-run' not found" in capsys.readouterr().err


# --- the CLI's listings: whole names, JSON ------------------------------------------------------------


def test_listings_never_cut_names_and_speak_json(
    scripted: LocalBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = 'a-rather-long-run-name-that-a-narrow-terminal-cuts'  # 50 characters
    experiment = 'an-experiment-with-a-long-name-too'
    finetuner.create_experiment(experiment)
    _finished(long_name, experiment_name=experiment)
    monkeypatch.setenv('COLUMNS', '60')
    assert Console().width == 60
    assert main(['runs']) == 0
    out = capsys.readouterr().out
    assert long_name in out and experiment in out, out

    assert main(['runs', '-o', 'json']) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row['name'] == long_name and row['status'] == 'FINISHED' and row['experiment'] == experiment
    assert row['progress'] == 100.0 and row['queue_position'] is None
    assert main(['experiments', '--output', 'json']) == 0
    rows = {row['name']: row for row in json.loads(capsys.readouterr().out)}
    assert rows[experiment]['finished'] == 1 and rows[experiment]['total'] == 1
    assert main(['experiments']) == 0
    assert experiment in capsys.readouterr().out
    assert main(['models', '--task', 'image-to-image', '-o', 'json']) == 0
    models = {row['name']: row for row in json.loads(capsys.readouterr().out)}
    assert models['efficientnet_b7']['aliases'] == ['efficientnet-large']


# --- display_examples -----------------------------------------------------------------------------------

EXAMPLES = {
    'before': [
        {
            'query': 'how are you',
            'label': 'greetings',
            'matches': [
                {'content': 'what is ai', 'label': 'ai', 'distance': 0.1, 'relevant': False},
                {'content': 'hello there', 'label': 'greetings', 'distance': 0.2, 'relevant': True},
            ],
        }
    ],
    'after': [
        {
            'query': 'how are you',
            'label': 'greetings',
            'matches': [
                {'content': 'hello there', 'label': 'greetings', 'distance': 0.05, 'relevant': True},
                {
                    'content': 'photos/cat.png',
                    'label': 'ai',
                    'distance': 0.3,
                    'relevant': False,
                    'image': 'data:image/jpeg;base64,AAAA',
                },
            ],
        }
    ],
}


def test_display_examples_shows_top_k_before_and_after_with_marks(scripted: LocalBackend) -> None:
    run = _finished('with-examples')
    scripted.output_store('with-examples').write_json(layout.EXAMPLES, EXAMPLES)
    console = Console(record=True, width=120)
    run.display_examples(k=1, console=console)
    text = console.export_text()
    assert 'Results before fine-tuning (with-examples): top 1' in text
    assert 'Results after fine-tuning (with-examples): top 1' in text
    before, after = text.split('Results after fine-tuning')
    assert 'what is ai' in before and 'hello there' not in before, 'k=1: the closest match only'
    assert '✗' in before and '✓' in after
    assert 'photos/cat.png' not in after
    console = Console(record=True, width=120)
    run.display_examples(k=5, console=console)
    assert 'photos/cat.png' in console.export_text(), 'an image is shown by its path in a terminal'
    html = run.example_results()._repr_html_()
    assert '<img src="data:image/jpeg;base64,AAAA"' in html and 'hello there' in html
    with pytest.raises(ArgumentError, match='k: must be a whole number of matches per query, at least 1; got 0'):
        run.display_examples(k=0)


def test_metrics_and_example_results_read_as_finetuners_dicts(scripted: LocalBackend) -> None:
    run = _finished('as-dicts')
    scripted.output_store('as-dicts').write_json(layout.EXAMPLES, EXAMPLES)
    metrics = run.metrics()
    assert metrics.after, 'the scripted trainer reports metrics'
    # Finetuner's display_metrics: ``for stage in metrics: print_metrics(stage, metrics[stage])``
    assert [(stage, metrics[stage]) for stage in metrics] == [('before', metrics.before), ('after', metrics.after)]
    assert dict(metrics) == {'before': metrics.before, 'after': metrics.after}
    assert metrics['after']['mrr'] == metrics.after['mrr']
    with pytest.raises(KeyError):
        metrics['quantized']  # an attribute only, as Finetuner's dict has no such key
    # Finetuner's display_examples: ``for query in results[stage]: results[stage][query][:k]``
    results = run.example_results()
    assert list(results) == ['before', 'after']
    shown = {
        stage: {query: [str(m.content) for m in matches[:1]] for query, matches in results[stage].items()}
        for stage in results
    }
    assert shown == {'before': {'how are you': ['what is ai']}, 'after': {'how are you': ['hello there']}}
    after = results['after']['how are you']
    assert [(m.content, m.relevant) for m in after] == [('hello there', True), ('photos/cat.png', False)]
    assert dict(results)['before'] == results['before']


def test_experiment_table_never_cuts_run_names(
    scripted: LocalBackend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = 'a-rather-long-run-name-that-a-narrow-terminal-cuts'
    experiment = finetuner.create_experiment('narrow')
    _finished(long_name, experiment_name='narrow')
    monkeypatch.setenv('COLUMNS', '40')
    experiment.display()
    assert long_name in capsys.readouterr().out
    assert main(['experiment', 'narrow']) == 0
    assert long_name in capsys.readouterr().out
    run = finetuner.get_run(long_name)
    run.display_metrics()
    assert f'Retrieval metrics of {long_name}' in capsys.readouterr().out


def test_display_examples_of_a_run_without_evaluation(scripted: LocalBackend) -> None:
    run = _finished('no-examples')
    console = Console(record=True, width=120)
    run.display_examples(console=console)
    assert 'has no example results: it did not evaluate' in console.export_text()
