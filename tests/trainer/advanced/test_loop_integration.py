"""Evaluation, callbacks, checkpoints, ONNX and the plot inside the real training loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import load_file

from finetuner.api import layout
from finetuner.api.v1alpha1 import CallbackSpec
from finetuner_trainer import train
from tests.support.tiny import labelled_texts
from tests.trainer.conftest import ConfigFactory

ROOT = Path(__file__).resolve().parents[3]


def _folder(uri: str) -> Path:
    return Path(urlparse(uri).path)


def test_metrics_before_after_per_epoch_onnx_and_plot(make_config: ConfigFactory, tiny_bert: Path) -> None:
    config = make_config(
        labelled_texts(4, 6, seed=0),
        labelled_texts(4, 3, seed=1),
        model=str(tiny_bert),
        epochs=2,
        batch_size=8,
        num_items_per_class=2,
        learning_rate=1e-3,
        to_onnx=True,
        callbacks=[CallbackSpec(name='EvaluationCallback', options={'limit': 5, 'gather_examples': True})],
    )
    result = train(config)
    output = _folder(config.output_uri)
    metrics = json.loads((output / layout.METRICS).read_text())
    for phase in ('before', 'after'):
        assert {'mrr', 'map', 'ndcg_at_k', 'precision_at_k', 'recall_at_k', 'val_loss'} <= set(metrics[phase])
        assert all(0.0 <= metrics[phase][k] <= 1.0 for k in ('mrr', 'precision_at_k', 'hit_at_k'))
    assert [row['epoch'] for row in metrics['epochs']] == [1, 2]
    assert metrics['after']['mrr'] == metrics['epochs'][-1]['mrr']
    # Example results sit in their own file (before and after), not in metrics.json the operator polls.
    assert 'examples' not in metrics
    examples = json.loads((output / layout.EXAMPLES).read_text())
    assert len(examples['before']) == len(examples['after']) == 5 and examples['after'][0]['matches']
    progress = json.loads((output / layout.PROGRESS).read_text())
    assert progress['metrics']['mrr'] == metrics['after']['mrr']  # live metrics for the CR status
    points = json.loads((output / layout.PROGRESS_HISTORY).read_text())['points']
    steps = [point['step'] for point in points]
    assert steps == list(range(1, progress['step'] + 1))  # every step's loss, in order
    assert {point['epoch'] for point in points} == {1, 2}
    artifact = _folder(result.artifact_uri)
    manifest = json.loads((artifact / 'manifest.json').read_text())
    assert {'onnx/model.onnx', 'onnx/export.json', 'training_curves.png'} <= set(manifest['files'])
    assert manifest['description']['onnx']['max_abs_diff'] < 1e-4
    # A file:// output is the local backend's: only what a resume needs, and nothing once the run is done.
    assert not (output / layout.CHECKPOINTS).exists()


def test_early_stopping_stops_and_the_best_epoch_is_published(make_config: ConfigFactory, tiny_bert: Path) -> None:
    config = make_config(
        labelled_texts(4, 6, seed=0),
        labelled_texts(4, 3, seed=1),
        model=str(tiny_bert),
        epochs=5,
        batch_size=8,
        num_items_per_class=2,
        learning_rate=1e-3,
        callbacks=[
            # A baseline no loss can beat: no epoch improves, so training stops after patience + 1 epochs.
            CallbackSpec(name='EarlyStopping', options={'monitor': 'val_loss', 'baseline': -1.0, 'patience': 2}),
            # "Best" = highest training loss: a deterministic choice that is not the last epoch.
            CallbackSpec(name='BestModelCheckpoint', options={'monitor': 'train_loss', 'mode': 'max'}),
            CallbackSpec(name='TrainingCheckpoint', options={'last_k_epochs': 5}),
        ],
    )
    result = train(config)
    assert [row['epoch'] for row in result.history] == [1, 2, 3]
    best_epoch = max(result.history, key=lambda row: row['train_loss'])['epoch']
    output = _folder(config.output_uri)
    state = torch.load(output / f'checkpoints/epoch-{best_epoch:04d}/state.pt', weights_only=True)
    best_weights = state['components']['model']
    from finetuner_trainer.models import load_embedder

    published = load_embedder(_folder(result.artifact_uri)).state_dict()
    trained = [key for key in best_weights if key in published]
    assert len(trained) == len(best_weights)  # every trained weight is in the artifact
    for key in trained:
        assert torch.equal(published[key], best_weights[key]), key
    if best_epoch != 3:
        last = torch.load(output / 'checkpoints/epoch-0003/state.pt', weights_only=True)['components']['model']
        assert any(not torch.equal(published[key], last[key]) for key in trained)
    metrics = json.loads((output / layout.METRICS).read_text())
    # The final metrics are measured again on the published (best) weights, not the last epoch's.
    assert metrics['after']['val_loss'] != pytest.approx(result.history[-1]['val_loss'], abs=0.0) or best_epoch == 3


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path) -> None:
    config = make_config(
        labelled_texts(4, 40, seed=0),  # 20 steps per epoch: killed after epoch 1, 40 steps still to go
        model=str(tiny_bert),
        epochs=3,
        batch_size=8,
        num_items_per_class=2,
        learning_rate=1e-3,
    )
    config_file = tmp_path / 'config.json'
    config_file.write_text(config.model_dump_json(by_alias=True))
    output = _folder(config.output_uri)
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    command = [sys.executable, '-m', 'finetuner_trainer', '--config', str(config_file)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = output / layout.CHECKPOINT_LATEST
    deadline = time.monotonic() + 240
    while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, 'the trainer finished before it could be killed: make the epochs longer'
    killed_at = json.loads(latest.read_text())
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert not (output / layout.ARTIFACT_MANIFEST).exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:]
    path = killed_at['path']
    assert f'resumed from {path} (epoch {killed_at["epoch"]}, step {killed_at["step"]})' in second.stdout
    # Only the epoch that was running is trained again: the resumed attempt starts right after the checkpoint.
    trained = [line for line in second.stdout.splitlines() if 'epoch ' in line and '/3 done' in line]
    assert [int(line.split('epoch ')[1].split('/')[0]) for line in trained] == list(range(killed_at['epoch'] + 1, 4))
    assert (output / layout.ARTIFACT_MANIFEST).exists()
    metrics = json.loads((output / layout.METRICS).read_text())
    assert [row['epoch'] for row in metrics['epochs']] == [1, 2, 3]


def test_step_checkpoint_resume_continues_the_same_trajectory(
    make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A crash after step 7 of 8 resumes from the step-6 checkpoint (2 batches into epoch 2) and ends
    with exactly the weights of an uninterrupted run: same batches, same optimizer state, same RNG."""
    import finetuner_trainer.loop as loop

    records = labelled_texts(4, 8, seed=0)
    spec = {'model': str(tiny_bert), 'batch_size': 8, 'num_items_per_class': 2, 'learning_rate': 1e-3, 'epochs': 2}
    base = make_config(records, checkpoint_every_steps=3, **spec)
    uninterrupted = base.model_copy(update={'output_uri': (tmp_path / 'one-go').as_uri()})
    interrupted = base.model_copy(update={'output_uri': (tmp_path / 'crashed').as_uri()})
    reference = train(uninterrupted)
    assert reference.steps == 8

    real_step = loop._train_step
    calls = {'n': 0}

    def crash_at_step_7(ctx, batch):
        calls['n'] += 1
        if calls['n'] == 7:
            raise RuntimeError('node lost')
        return real_step(ctx, batch)

    monkeypatch.setattr(loop, '_train_step', crash_at_step_7)
    with pytest.raises(RuntimeError, match='node lost'):
        train(interrupted)
    output = _folder(interrupted.output_uri)
    assert json.loads((output / layout.CHECKPOINT_LATEST).read_text())['path'] == 'checkpoints/step-00000006'
    monkeypatch.setattr(loop, '_train_step', real_step)
    caplog.set_level('INFO', logger='finetuner_trainer')
    resumed = train(interrupted)
    assert 'resumed from checkpoints/step-00000006 (epoch 1, step 6, 2 batches into epoch 2)' in caplog.text
    assert resumed.steps == 8 and [row['epoch'] for row in resumed.history] == [1, 2]
    ours = load_file(_folder(resumed.artifact_uri) / 'model.safetensors')
    theirs = load_file(_folder(reference.artifact_uri) / 'model.safetensors')
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6)
    before_a = json.loads((output / layout.METRICS).read_text())['before']
    before_b = json.loads((_folder(uninterrupted.output_uri) / layout.METRICS).read_text())['before']
    assert before_a == pytest.approx(before_b)  # the first attempt's "before", not re-measured
    kept = os.listdir(output / 'checkpoints') if (output / 'checkpoints').exists() else []  # the folder may go too
    assert [p for p in kept if p.startswith('step-')] == []
