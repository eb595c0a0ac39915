"""The seed documents' snippets, run as written on the local backend; only their data is given.

Each snippet runs as its own Python program (like a user's script), with the lines that build
data replaced: docarray 2.x has no ``DocumentArray``, so ``DocList[LegacyDocument]`` is given, and
``DocumentArray.pull(name)`` becomes ``finetuner.push_data`` beforehand. The CLIP snippet's
``openai/clip-vit-base-patch32`` cannot load offline: a tiny random CLIP folder takes its place.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import finetuner
from finetuner.backends.local import LocalBackend

ROOT = Path(__file__).resolve().parents[2]

IMAGE_DATA = textwrap.dedent(
    """
    from docarray import DocList
    from docarray.documents.legacy import LegacyDocument
    from tests.support.tiny import png_bytes, PALETTE
    def DocumentArray(*_):
        return DocList[LegacyDocument](
            LegacyDocument(blob=png_bytes(PALETTE[i % 3], seed=i), tags={'finetuner_label': f'class-{i % 3}'})
            for i in range(12)
        )
    """
)

SEED_RUN_JOB = """
import finetuner

train_data = DocumentArray(...)

run = finetuner.fit(
    model='efficientnet_b0',
    train_data=train_data
)
print(f'Run name: {run.name}')
print(f'Run status: {run.status()}')
"""

SEED_ADVANCED = """
import finetuner

train_data = DocumentArray(...)
eval_data = DocumentArray(...)

# Create an experiment
finetuner.create_experiment(name='finetune-flickr-dataset')

run = finetuner.fit(
    model='efficientnet_b0',
    train_data=train_data,
    eval_data=eval_data,
    run_name='finetune-flickr-dataset-efficientnet-1',
    description='this is a trial run on flickr8k dataset with efficientnet b0.',
    experiment_name='finetune-flickr-dataset', # link to the experiment created above.
    model_options={}, # additional options to pass to the model constructor
    loss='TripletMarginLoss', # Use CLIPLoss for CLIP fine-tuning.
    miner='TripletMarginMiner',
    miner_options={'margin': 0.2}, # additional options for the miner constructor
    optimizer='Adam',
    optimizer_options={'weight_decay': 0.01}, # additional options for the optimizer
    learning_rate = 1e-4,
    epochs=5,
    batch_size=128,
    scheduler_step='batch',
    freeze=False, # If applied will freeze the embedding model, only train the MLP.
    output_dim=512, # Attach a MLP on top of embedding model.
    cpu=False,
    num_workers=4,
    to_onnx=False,  # If set, please pass `is_onnx` when making inference.
)
print(run.name, run.status()['status'])
"""

SEED_CLIP = """
import finetuner
finetuner.login()

finetuner.describe_models()

from finetuner.callbacks import BestModelCheckpoint, EvaluationCallback

run = finetuner.fit(
        model='openai/clip-vit-base-patch32',
        run_name='clip-fashion-1',
        train_data='clip-fashion-train-data',
        eval_data='clip-fashion-eval-data',
        epochs=5,
        learning_rate= 1e-5,
        callbacks=[BestModelCheckpoint(), EvaluationCallback(query_data='clip-fashion-eval-data')],
        loss='CLIPLoss',
        image_modality='image',
        text_modality='text',
        multi_modal=True,
    )
print(run.status())
"""

SEED_CLIP_RECONNECT = """
import finetuner
finetuner.login()
run = finetuner.get_run('clip-fashion-1')
print(run.wait(timeout=400, poll=0.5)['status'])
run.save_model('clip-model')
"""


def _python(code: str, cwd: Path) -> str:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    out = subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_seed_run_job_prints_name_and_created_then_fails_offline_with_a_clear_reason(
    local: LocalBackend, tmp_path: Path
) -> None:
    out = _python(IMAGE_DATA + SEED_RUN_JOB, tmp_path)
    name_line, status_line = out.strip().splitlines()
    name = re.fullmatch(r'Run name: ([a-z]+-[a-z]+)', name_line)
    assert name, out
    assert status_line == "Run status: {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}"
    run = finetuner.get_run(name.group(1))
    final = run.wait(timeout=240, poll=0.5)
    # efficientnet_b0's ImageNet weights are not packaged and this machine is offline.
    assert final['status'] == 'FAILED'
    assert final['details'].startswith("the pretrained weights of 'efficientnet_b0' are not on this machine")


def test_seed_advanced_configuration_is_accepted(local: LocalBackend, tmp_path: Path) -> None:
    out = _python(IMAGE_DATA + SEED_ADVANCED, tmp_path)
    assert out.strip() == 'finetune-flickr-dataset-efficientnet-1 CREATED'
    run = finetuner.get_run('finetune-flickr-dataset-efficientnet-1', experiment_name='finetune-flickr-dataset')
    spec = run.config
    assert (spec.miner, spec.miner_options, spec.output_dim, spec.batch_size) == (
        'TripletMarginMiner',
        {'margin': 0.2},
        512,
        128,
    )
    assert (spec.learning_rate, spec.epochs, spec.num_workers, spec.device) == (1e-4, 5, 4, 'auto')
    run.cancel()
    assert run.status() == {'status': 'FAILED', 'details': 'Run cancelled by user'}


@pytest.mark.slow
def test_seed_clip_snippet_runs_reconnects_and_saves(
    local: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip('finetuner_trainer.runner')
    from tests.support.tiny import make_tiny_clip, text_image_pairs

    clip = make_tiny_clip(tmp_path / 'tiny-clip')
    # Stand-in for DocumentArray.push(...): the fashion data, pushed by name.
    finetuner.push_data('clip-fashion-train-data', text_image_pairs(12))
    finetuner.push_data('clip-fashion-eval-data', text_image_pairs(6, seed=1))
    out = _python(SEED_CLIP.replace("'openai/clip-vit-base-patch32'", repr(str(clip)), 1), tmp_path)
    assert 'Finetuner backbones' in out and 'openai/clip-vit-base-patch32' in out
    assert out.strip().splitlines()[-1] == "{'status': 'CREATED', 'details': 'Run submitted and awaits execution'}"
    out = _python(SEED_CLIP_RECONNECT, tmp_path)
    assert out.strip() == 'FINISHED', finetuner.get_run('clip-fashion-1').logs()[-3000:]
    assert (tmp_path / 'clip-model' / 'manifest.json').is_file()
    callbacks = finetuner.get_run('clip-fashion-1').config.callbacks
    assert [c.name for c in callbacks] == ['BestModelCheckpoint', 'EvaluationCallback']
    data = local.home.as_uri()
    assert callbacks[1].options['query_data'] == f'{data}/datasets/clip-fashion-eval-data/data.jsonl'
    assert (
        finetuner.get_run('clip-fashion-1').config.train_data == f'{data}/datasets/clip-fashion-train-data/data.jsonl'
    )
