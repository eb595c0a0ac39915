"""Every fit() argument error is caught before any upload or submission, naming the argument."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest

import finetuner
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.backends.local import LocalBackend
from finetuner.callbacks import BestModelCheckpoint, EvaluationCallback
from finetuner.errors import ArgumentError

DOCS = ['red cat', 'blue dog']

CASES: list[tuple[dict[str, Any], str, str]] = [
    ({'learning_rate': -1}, 'learning_rate', 'must be greater than 0 (got -1)'),
    ({'learning_rate': 2}, 'learning_rate', 'must be less than or equal to 1'),
    ({'epochs': 0}, 'epochs', 'must be greater than or equal to 1 (got 0)'),
    ({'batch_size': 0}, 'batch_size', 'must be greater than or equal to 1'),
    ({'loss': 'TripletLoss'}, 'loss', "unknown loss 'TripletLoss'; choose one of"),
    ({'loss': 'tripletmarginloss'}, 'loss', "did you mean 'TripletMarginLoss'?"),
    ({'miner': 'HardMiner'}, 'miner', "unknown miner 'HardMiner'"),
    ({'optimizer': 'adamw'}, 'optimizer', "did you mean 'AdamW'?"),
    ({'scheduler': 'exponential'}, 'scheduler', "unknown scheduler 'exponential'"),
    ({'scheduler_step': 'step'}, 'scheduler_step', "must be 'batch' or 'epoch' (got 'step')"),
    ({'scheduler_options': {'scheduler_step': 'x'}}, 'scheduler_options.scheduler_step', "must be 'batch' or 'epoch'"),
    (
        {'scheduler_step': 'batch', 'scheduler_options': {'scheduler_step': 'epoch'}},
        'scheduler_step',
        "'batch' contradicts scheduler_options",
    ),
    ({'scheduler_options': {'warmup': 3}}, 'scheduler_options.warmup', 'Extra inputs are not permitted'),
    ({'miner_options': {'margin': 0.2}}, 'miner_options', 'miner_options given without miner'),
    ({'loss': 'CLIPLoss'}, 'loss', 'loss CLIPLoss needs multi_modal=True'),
    ({'multi_modal': True, 'loss': 'TripletMarginLoss'}, 'multi_modal', 'set loss CLIPLoss'),
    ({'model': 'efficientnet_b0', 'multi_modal': True, 'loss': 'CLIPLoss'}, 'model', 'needs a CLIP model'),
    ({'model': 'openai/clip-vit-base-patch32'}, 'multi_modal', 'is a text-to-image (CLIP) model'),
    ({'image_modality': 'image'}, 'image_modality', 'only applies to multi_modal=True'),
    ({'val_split': 0.2, 'eval_data': DOCS}, 'eval_data', 'give either eval_data or val_split, not both'),
    ({'val_split': 1.5}, 'val_split', 'must be less than 1'),
    ({'output_dim': 0}, 'output_dim', 'must be greater than or equal to 1'),
    ({'device': 'tpu'}, 'device', "must be 'auto', 'cuda' or 'cpu'"),
    ({'cpu': True, 'device': 'cuda'}, 'cpu', "cpu=True contradicts device='cuda'"),
    ({'num_workers': -1}, 'num_workers', 'must be greater than or equal to 0'),
    ({'sampler': 'balanced'}, 'sampler', "must be 'auto', 'class', 'class-oversample' or 'random'"),
    ({'gpus': 99}, 'gpus', 'must be less than or equal to 16'),
    ({'resources': {'memory': '32 GB'}}, 'resources.memory', 'is not a Kubernetes quantity'),
    ({'csv_options': {'dialect': 'tsv'}}, 'csv_options.dialect', "unknown CSV dialect 'tsv'"),
    (
        {'run_name': 'My Run'},
        'run_name',
        'is not a valid name: use lower-case letters, digits and "-", starting and ending with a letter or digit '
        "(e.g. 'my-run')",
    ),
    ({'run_name': 'x' * 60}, 'run_name', 'is 60 characters long; use at most 52'),
    ({'experiment_name': 'Flickr_8k'}, 'experiment_name', "(e.g. 'flickr-8k')"),
    ({'callbacks': BestModelCheckpoint()}, 'callbacks', 'must be a list of callbacks'),
    ({'callbacks': ['BestModelCheckpoint']}, 'callbacks[0]', 'a str is not a callback'),
    ({'callbacks': [{'name': 'Checkpoint'}]}, 'callbacks[0]', "unknown callback 'Checkpoint'"),
    ({'lr': 1e-4}, 'lr', "fit() has no argument 'lr'"),
    ({'learning_rte': 1e-4}, 'learning_rte', "did you mean 'learning_rate'?"),
    ({'model': ''}, 'model', 'give a backbone name'),
    ({'train_data': None}, 'train_data', 'is required'),
    ({'train_data': []}, 'train_data', 'is empty; give at least one document'),
    ({'train_data': 42}, 'train_data', 'cannot use a int as data'),
    ({'train_data': 'never-pushed'}, 'train_data', "no dataset named 'never-pushed'"),
    ({'train_data': './missing.csv'}, 'train_data', "no file or folder './missing.csv'"),
    ({'train_data': 'Not A Name'}, 'train_data', 'is neither a local path nor a dataset name'),
    ({'train_data': 'http://example.com/data.csv'}, 'train_data', 'unsupported scheme'),
    ({'train_data': [{'text': 'a', 'chunks': [{'text': 'b'}]}]}, 'train_data[0]', 'either content or chunks'),
    ({'train_data': [{'label': 'a'}]}, 'train_data[0]', 'a record needs content'),
    ({'eval_data': 'not-there'}, 'eval_data', "no dataset named 'not-there'"),
    (
        {'callbacks': [EvaluationCallback(query_data='missing-queries')]},
        'callbacks[0].query_data',
        "no dataset named 'missing-queries'",
    ),
]


@pytest.mark.parametrize(('arguments', 'argument', 'message'), CASES, ids=[c[1] + ':' + c[2][:30] for c in CASES])
def test_argument_errors_name_the_argument_and_nothing_is_uploaded(
    scripted: LocalBackend, arguments: dict[str, Any], argument: str, message: str
) -> None:
    call = {'model': 'scripted:ok', 'train_data': DOCS, **arguments}
    with pytest.raises(ArgumentError, match=re.escape(message)) as caught:
        finetuner.fit(**call)
    assert caught.value.argument == argument
    assert str(caught.value).startswith(f'{argument}: ')
    assert not (scripted.home / 'datasets').exists(), 'data was uploaded before the error'
    assert not (scripted.home / 'runs').exists(), 'a run was submitted despite the error'


def test_both_generations_of_arguments_give_the_same_spec(scripted: LocalBackend) -> None:
    old = finetuner.fit(model='scripted:ok', train_data=DOCS, cpu=True, scheduler_step='epoch', run_name='old-style')
    new = finetuner.fit(
        model='scripted:ok',
        train_data=DOCS,
        device='cpu',
        scheduler_options={'scheduler_step': 'epoch'},
        run_name='new-style',
    )
    assert old.config.device == new.config.device == 'cpu'
    assert old.config.scheduler_options.scheduler_step == new.config.scheduler_options.scheduler_step == 'epoch'
    assert old.config.resources.gpus == 0
    assert finetuner.fit(model='scripted:ok', train_data=DOCS, cpu=False).config.device == 'auto'


def _uid(backend: LocalBackend, run: str) -> str:
    uid = json.loads((backend.run_dir(run) / 'run.json').read_text())['uid']
    assert re.fullmatch(r'[0-9a-f]{8}', uid)
    return uid


def test_seed_advanced_arguments_map_onto_the_spec(scripted: LocalBackend) -> None:
    finetuner.create_experiment(name='finetune-flickr-dataset')
    run = finetuner.fit(
        model='scripted:ok',
        train_data=DOCS,
        eval_data=DOCS,
        run_name='finetune-flickr-dataset-efficientnet-1',
        description='this is a trial run on flickr8k dataset with efficientnet b0.',
        experiment_name='finetune-flickr-dataset',
        model_options={},
        loss='TripletMarginLoss',
        miner='TripletMarginMiner',
        miner_options={'margin': 0.2},
        optimizer='Adam',
        optimizer_options={'weight_decay': 0.01},
        learning_rate=1e-4,
        epochs=5,
        batch_size=128,
        scheduler_step='batch',
        freeze=False,
        output_dim=512,
        cpu=False,
        num_workers=4,
        to_onnx=False,
    )
    spec = run.config
    data = scripted.home.as_uri()
    uid = _uid(scripted, run.name)  # uploads are named for this submission alone: <run>-<uid>-train
    assert spec == FinetuneRunSpec.model_validate(
        {
            'model': 'scripted:ok',
            'trainData': f'{data}/datasets/finetune-flickr-dataset-efficientnet-1-{uid}-train/data.jsonl',
            'evalData': f'{data}/datasets/finetune-flickr-dataset-efficientnet-1-{uid}-eval/data.jsonl',
            'description': 'this is a trial run on flickr8k dataset with efficientnet b0.',
            'experiment': 'finetune-flickr-dataset',
            'loss': 'TripletMarginLoss',  # no longer the default (the recipe for the shape is)
            'miner': 'TripletMarginMiner',
            'minerOptions': {'margin': 0.2},
            'optimizerOptions': {'weight_decay': 0.01},
            'learningRate': 1e-4,
            'batchSize': 128,
            'outputDim': 512,
            'numWorkers': 4,
            'schedulerOptions': {'schedulerStep': 'batch'},
        }
    )
    run.cancel()


def test_local_data_is_uploaded_and_only_its_uri_is_in_the_spec(scripted: LocalBackend) -> None:
    run = finetuner.fit(
        model='scripted:ok',
        train_data=DOCS,
        run_name='uploads',
        callbacks=[EvaluationCallback(query_data=['red'], index_data=DOCS), BestModelCheckpoint()],
    )
    data = scripted.home.as_uri()
    uid = _uid(scripted, 'uploads')
    assert run.config.train_data == f'{data}/datasets/uploads-{uid}-train/data.jsonl'
    assert run.config.callbacks[0].options['query_data'] == f'{data}/datasets/uploads-{uid}-0-query/data.jsonl'
    assert run.config.callbacks[0].options['index_data'] == f'{data}/datasets/uploads-{uid}-0-index/data.jsonl'
    assert run.config.callbacks[1].model_dump() == {'name': 'BestModelCheckpoint', 'options': {}}
    assert [r.text for r in finetuner.pull_data(f'uploads-{uid}-0-index')] == DOCS
    assert (scripted.home / 'datasets' / f'uploads-{uid}-train' / 'data.jsonl').read_text().splitlines() == [
        '{"text": "red cat"}',
        '{"text": "blue dog"}',
    ]
    run.wait(timeout=60, poll=0.1)


def test_uri_data_is_referenced_not_copied(scripted: LocalBackend, tmp_path: Path) -> None:
    uri = (tmp_path / 'data.jsonl').as_uri()
    run = finetuner.fit(model='scripted:no-artifact', train_data=uri, run_name='by-uri')
    assert run.config.train_data == uri
    assert not (scripted.home / 'datasets').exists()
    run.wait(timeout=60, poll=0.1)


def test_pushed_dataset_names_become_uris(scripted: LocalBackend) -> None:
    finetuner.push_data('shared-set', DOCS)
    run = finetuner.fit(model='scripted:ok', train_data='shared-set', run_name='by-name')
    assert run.config.train_data == f'{scripted.home.as_uri()}/datasets/shared-set/data.jsonl'
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert 'read 2 records' in run.logs()


def test_generated_run_names_are_memorable_and_unique(scripted: LocalBackend) -> None:
    names = {finetuner.fit(model='scripted:no-artifact', train_data=DOCS).name for _ in range(3)}
    assert len(names) == 3
    assert all(re.fullmatch(r'[a-z]+-[a-z]+', name) for name in names)


# fit() names two spec fields differently (Finetuner's names); every other spec field is an argument of its own name.
RENAMED = {'experiment': 'experiment_name'}
SDK_ONLY = {'run_name', 'cpu', 'scheduler_step', 'gpus', 'nodes'}  # no spec field of their own


def test_fit_signature_covers_every_spec_field() -> None:
    parameters = inspect.signature(finetuner.fit).parameters
    expected = {RENAMED.get(name, name) for name in FinetuneRunSpec.model_fields} | SDK_ONLY
    assert set(parameters) == expected
    assert [p.name for p in parameters.values() if p.default is inspect.Parameter.empty] == ['model', 'train_data']
    first = ['model', 'train_data', 'eval_data', 'val_split', 'model_artifact', 'run_name', 'description']
    assert list(parameters)[:8] == [*first, 'experiment_name'], "Finetuner's positional order"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(parameters.values())[8:])


def _snake(text: str) -> str:
    """camelCase words (the CR's field names) as snake_case (fit()'s argument names)."""
    return re.sub(r'\b[a-z]+(?:[A-Z][a-z0-9]*)+\b', lambda m: re.sub('([A-Z])', r'_\1', m.group(0)).lower(), text)


def test_fit_docstring_documents_every_argument_from_the_fields_descriptions() -> None:
    doc = finetuner.fit.__doc__ or ''
    section = doc.split('\nArgs:\n', 1)[1].split('\nReturns:\n', 1)[0]
    entries = dict(re.findall(r'^    (\w+): (.+(?:\n        .+)*)', section, re.M))
    assert list(entries) == list(inspect.signature(finetuner.fit).parameters)
    for name, info in FinetuneRunSpec.model_fields.items():
        text = ' '.join(entries[RENAMED.get(name, name)].split())
        first_words = ' '.join(_snake(info.description or '').split()[:3])
        if name not in ('model', 'train_data', 'eval_data', 'callbacks', 'experiment'):  # the SDK's own words
            assert text.startswith(first_words), (name, text)
        assert not re.search(r'\b[a-z]+[A-Z]\w*Data\b|\btrainData\b|\bevalData\b', text), (name, text)
    assert 'Default: 5.' in entries['epochs'] and "the recipe for the data's shape" in ' '.join(entries['loss'].split())
    assert 'Raises:\n    ArgumentError' in doc


def test_positional_arguments_keep_finetuners_order(scripted: LocalBackend) -> None:
    run = finetuner.fit('scripted:ok', DOCS, None, 0.5, None, 'positional', 'a description')
    assert (run.name, run.config.val_split, run.config.description) == ('positional', 0.5, 'a description')
    run.wait(timeout=60, poll=0.1)
    with pytest.raises(TypeError, match='too many positional arguments'):
        finetuner.fit('scripted:ok', DOCS, None, 0.5, None, 'positional-2', None, None, {})


def test_cli_fit_flags_follow_the_same_arguments() -> None:
    from finetuner import cli

    help_text = ' '.join(cli._parser()._subparsers._group_actions[0].choices['fit'].format_help().split())  # type: ignore[union-attr]
    for name in cli.fit_flag_names():
        assert f'--{name.replace("_", "-")}' in help_text, name
    single_valued = {'epochs', 'learning_rate', 'to_onnx', 'device', 'sampler', 'queue_name', 'output_dim', 'seed'}
    assert single_valued <= set(cli.fit_flag_names())
    assert not {'model_options', 'resources', 'callbacks', 'tolerations'} & set(cli.fit_flag_names())
    assert 'Passes over the training data' in help_text and '{auto,cuda,cpu}' in help_text
