"""Bad configuration and bad data exit with EXIT_CONFIG_ERROR and a message naming the problem."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from finetuner.api import layout
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR
from finetuner_trainer import main
from tests.support.tiny import labelled_images, labelled_texts, text_image_pairs, text_pairs
from tests.trainer.conftest import TIMM_SPEC, ConfigFactory

ROOT = Path(__file__).resolve().parents[2]


def _run_in_process(config, tmp_path: Path) -> tuple[int, str, dict]:  # type: ignore[no-untyped-def]
    config_file = tmp_path / 'config.json'
    config_file.write_text(config.model_dump_json(by_alias=True))
    code = main(['--config', str(config_file)])
    out = Path(urlparse(config.output_uri).path)
    failure = json.loads((out / layout.FAILURE).read_text()) if (out / layout.FAILURE).exists() else {}
    termination = Path(config.termination_log).read_text() if Path(config.termination_log).exists() else ''
    return code, termination, failure


CASES = {
    'unknown model': (
        lambda t: {'records': labelled_texts(2, 4), 'model': 'no-such-org/no-such-model'},
        r"model: unknown model 'no-such-org/no-such-model'",
    ),
    'unknown timm model': (
        lambda t: {'records': labelled_images(2, 4), 'model': 'timm:resnet_nonexistent'},
        r"model: 'resnet_nonexistent' is not a timm model",
    ),
    'loss incompatible with data': (
        lambda t: {'records': labelled_texts(2, 4), 'model': str(t['bert']), 'loss': 'CosineSimilarityLoss'},
        r'loss: CosineSimilarityLoss trains on pairs with a score, but the data holds labelled items',
    ),
    'model incompatible with data': (
        lambda t: {'records': labelled_texts(2, 4), **TIMM_SPEC},
        r'model: timm:test_resnet \(timm\) embeds image and tensor, but the data holds text content',
    ),
    'missing labels': (
        lambda t: {'records': [Record(text='red cat'), Record(text='blue dog', label='b')], 'model': str(t['bert'])},
        r'spec.trainData: 1 of 2 records have no label \(first: trainData\[0\]\)',
    ),
    'one item per class with a triplet loss': (
        lambda t: {'records': labelled_texts(4, 1), 'model': str(t['bert']), 'loss': 'TripletMarginLoss'},
        r'trainData: every class has a single item, so TripletMarginLoss finds no positive pairs',
    ),
    'one item per class with the default recipe': (
        lambda t: {'records': labelled_texts(4, 1), 'model': str(t['bert'])},
        r'trainData: every class has a single item, so SupConLoss finds no positive pairs',
    ),
    'a single class': (
        lambda t: {'records': labelled_texts(1, 4), 'model': str(t['bert'])},
        r"trainData: all items have the same label '0'",
    ),
    'corrupt image': (
        lambda t: {
            'records': [*labelled_images(2, 3), Record(blob=base64.b64encode(b'not a png').decode(), label='class-0')],
            **TIMM_SPEC,
        },
        r"spec.trainData\[6\]: image 'blob' is corrupt or not an image",
    ),
    'missing image file': (
        lambda t: {
            'records': [*labelled_images(2, 3), Record(uri='/nonexistent/cat.png', label='class-0')],
            **TIMM_SPEC,
        },
        r"spec.trainData\[6\]: cannot read image '/nonexistent/cat.png'",
    ),
    'wrong modality names': (
        lambda t: {
            'records': text_image_pairs(4),
            'model': str(t['clip']),
            'loss': 'CLIPLoss',
            'multi_modal': True,
            'image_modality': 'picture',
        },
        r"imageModality: trainData\[0\] has chunks with modalities \['text', 'image'\], not 'text' and 'picture'",
    ),
    'CLIPLoss on a text model': (
        lambda t: {'records': text_image_pairs(4), 'model': str(t['bert']), 'loss': 'CLIPLoss', 'multi_modal': True},
        r'model: .* \(text\) embeds text, but the data holds image content',
    ),
    'margin loss without scores': (
        lambda t: {'records': text_pairs(4), 'model': str(t['bert']), 'loss': 'MarginMSELoss'},
        r'loss: MarginMSELoss trains on pairs with a score or tuples with a score per document, but the data holds '
        'query-document pairs',
    ),
    'freeze without projection': (
        lambda t: {'records': labelled_texts(2, 4), 'model': str(t['bert']), 'freeze': True},
        r'freeze: freeze: true trains only the projection head; also set outputDim',
    ),
    'unknown model option': (
        lambda t: {'records': labelled_texts(2, 4), 'model': str(t['bert']), 'model_options': {'poolr': 'cls'}},
        r"modelOptions: unknown option 'poolr'",
    ),
    'batch smaller than two classes': (
        lambda t: {'records': labelled_texts(2, 4), 'model': str(t['bert']), 'batch_size': 4},
        r'batchSize: a batch of 4 holds fewer than 2 classes of numItemsPerClass 4',
    ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_config_and_data_errors_exit_with_the_config_code(
    case: str, make_config: ConfigFactory, tmp_path: Path, tiny_bert: Path, tiny_clip: Path
) -> None:
    build, message = CASES[case]
    fields = build({'bert': tiny_bert, 'clip': tiny_clip})
    config = make_config(fields.pop('records'), **fields)
    code, termination, failure = _run_in_process(config, tmp_path)
    assert code == EXIT_CONFIG_ERROR
    assert failure['exitCode'] == EXIT_CONFIG_ERROR and failure['reason'] == 'ConfigError'
    import re

    assert re.search(message, termination), termination
    assert termination.count('\n') == 1  # one line
    out = Path(urlparse(config.output_uri).path)
    assert not (out / layout.ARTIFACT_MANIFEST).exists()
    assert (out / layout.TRAIN_LOG).exists()


def test_empty_data_file(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = make_config(labelled_images(2, 2), **TIMM_SPEC)
    Path(config.spec.train_data).write_text('')
    code, termination, _ = _run_in_process(config, tmp_path)
    assert code == EXIT_CONFIG_ERROR
    assert 'trainData:' in termination and 'is empty: it holds no records' in termination


def _cli(config_file: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT / 'sdk'), str(ROOT / 'trainer')])}
    return subprocess.run(
        [sys.executable, '-m', 'finetuner_trainer', '--config', str(config_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_cli_exit_code_and_termination_log_for_an_invalid_config(tmp_path: Path) -> None:
    config_file = tmp_path / 'config.json'
    termination = tmp_path / 'termination-log'
    config_file.write_text(
        json.dumps(
            {
                'runName': 'bad',
                'spec': {'model': 'bert-base-cased', 'trainData': '/data.jsonl', 'loss': 'TripletLoss'},
                'outputUri': (tmp_path / 'out').as_uri(),
                'terminationLog': str(termination),
            }
        )
    )
    result = _cli(config_file)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout + result.stderr
    assert "unknown loss 'TripletLoss'" in termination.read_text()
    assert 'configuration error' in result.stdout


def test_cli_exit_code_for_bad_data(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = make_config(labelled_images(2, 2), **TIMM_SPEC)
    Path(config.spec.train_data).write_text('{"text": "a", "label": 1}\nnot json\n')
    config_file = tmp_path / 'config.json'
    config_file.write_text(config.model_dump_json(by_alias=True))
    result = _cli(config_file)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout + result.stderr
    assert Path(config.termination_log).read_text().startswith('spec.trainData: line 2 is not valid JSON')
    out = Path(urlparse(config.output_uri).path)
    assert json.loads((out / layout.FAILURE).read_text())['exitCode'] == EXIT_CONFIG_ERROR


def test_infrastructure_failure_exits_1(make_config: ConfigFactory, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from finetuner_trainer import runner

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError('object store unreachable')

    monkeypatch.setattr(runner, 'build_context', broken)
    config = make_config(labelled_images(2, 2), **TIMM_SPEC)
    code, termination, failure = _run_in_process(config, tmp_path)
    assert code == 1 and failure['reason'] == 'ConnectionError'
    assert 'object store unreachable' in termination
