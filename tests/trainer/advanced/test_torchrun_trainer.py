"""The real trainer CLI under ``torchrun --nproc-per-node 2`` (gloo, CPU) against one process.

Every case trains the same global batches from the same seed twice: in this process with
``train(config)``, and as ``torchrun ... -m finetuner_trainer --config FILE``. The two-process run
must follow the one-process loss trajectory (per step, from the log; per epoch, from
metrics.json), end with the same weights, and leave exactly one artifact and one set of
checkpoints, written by rank 0.

Why the runs can be compared this closely: both see the same global batches (the samplers are
seeded per epoch, every rank takes its share of each), start from the same weights (DDP
broadcasts rank 0's), and :class:`~finetuner_trainer.distributed.DistributedObjective` computes the
loss on the gathered global batch, so miners, in-batch negatives and CLIP's negatives span both
ranks. What differs is floating-point summation order: matrix products over a half batch instead
of a whole one, and DDP's mean of two gradient halves. That is ~1e-7 relative per step; over a
handful of steps a tolerance of 1e-4 relative leaves a wide margin while any real divergence (a
rank training on its half batch alone, a lost gradient, a double-counted one) moves the loss by
percents. The models have no random layers in training mode (no dropout, GroupNorm instead of
BatchNorm): with dropout each rank draws its own masks (as it should), so no per-step match exists,
and BatchNorm normalises each rank's share on CPU, where SyncBatchNorm is not available.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import load_file

from finetuner.api import layout
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import CallbackSpec, TrainerConfig
from finetuner_trainer import train
from tests.support.tiny import labelled_images, make_tiny_bert, make_tiny_clip, text_image_pairs, text_pairs
from tests.trainer.conftest import ConfigFactory

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name('torchrun')
STEP_LINE = re.compile(r'epoch (\d+)/\d+ step (\d+)/\d+ \(\d+%\) loss ([0-9.]+)')
# test_efficientnet_gn: a tiny timm CNN with GroupNorm (per-item statistics), see the module docstring.
# Attention key biases get a zero gradient in exact arithmetic (a key bias adds the same q.b to every
# logit of a softmax row); in floating point it is rounding noise, which Adam divides by its own
# RMS, so these entries take +-lr steps of random sign in either run. They carry no information.
ZERO_GRADIENT = re.compile(r'(k_proj|attention\.self\.key)\.bias$')
TIMM_GN = {'model': 'timm:test_efficientnet_gn', 'model_options': {'pretrained': False, 'image_size': 32}}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _folder(uri: str) -> Path:
    return Path(urlparse(uri).path)


def _without_dropout(folder: Path) -> Path:
    """A Hugging Face model folder with every dropout probability set to 0."""
    config_file = folder / 'config.json'
    config = json.loads(config_file.read_text())

    def zero(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: 0.0 if 'dropout' in k and isinstance(v, float) else zero(v) for k, v in node.items()}
        return node

    config_file.write_text(json.dumps(zero(config)))
    return folder


@pytest.fixture(scope='module')
def bert_no_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _without_dropout(make_tiny_bert(tmp_path_factory.mktemp('models') / 'bert'))


@pytest.fixture(scope='module')
def clip_no_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _without_dropout(make_tiny_clip(tmp_path_factory.mktemp('models') / 'clip'))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def _steps(log_text: str) -> list[float]:
    """Per-step losses from the progress lines (each logs the epoch's running mean)."""
    running: dict[int, list[tuple[int, float]]] = {}
    for epoch, step, loss in STEP_LINE.findall(log_text):
        running.setdefault(int(epoch), []).append((int(step), float(loss)))
    losses = []
    for rows in running.values():
        for n, (_, mean) in enumerate(rows, start=1):
            previous = rows[n - 2][1] * (n - 1) if n > 1 else 0.0
            losses.append(mean * n - previous)
    return losses


def _unique_texts(records: list[Record]) -> list[Record]:
    """The records with every text made distinct: a batch never holds the same content twice, so data
    with repeated texts gets batches of other sizes, cut to a multiple of the world size under DDP;
    with distinct contents one process and two see the very same global batches."""
    for i, record in enumerate(records):
        for chunk in record.chunks or []:
            if chunk.text is not None:
                chunk.text = f'{chunk.text} {i}'
    return records


def _torchrun(config: TrainerConfig, folder: Path) -> subprocess.CompletedProcess[str]:
    config_file = folder / 'config.json'
    config_file.write_text(config.model_dump_json(by_alias=True))
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    for key in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    command = [str(TORCHRUN), '--nproc-per-node', '2', '--master-addr', '127.0.0.1']
    command += ['--master-port', str(_free_port()), '-m', 'finetuner_trainer', '--config', str(config_file)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _compare(make_config: ConfigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, **spec: Any) -> None:
    records = spec.pop('records')
    # TrainingCheckpoint: the cluster's checkpoint policy (every epoch, kept once the run is done) on these
    # file:// outputs, whose last checkpoint the assertions below read.
    keep = [CallbackSpec(name='TrainingCheckpoint')]
    base = make_config(records, epochs=2, seed=7, callbacks=keep, **spec)
    one = base.model_copy(update={'output_uri': (tmp_path / 'one').as_uri()})
    two = base.model_copy(update={'output_uri': (tmp_path / 'two').as_uri()})

    caplog.set_level('INFO', logger='finetuner_trainer')
    single = train(one)
    single_steps = _steps(caplog.text)

    result = _torchrun(two, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert 'distributed training: 2 processes (gloo)' in result.stdout
    double_steps = _steps(result.stdout)
    assert len(single_steps) == single.steps == 4
    assert double_steps == pytest.approx(single_steps, rel=1e-4, abs=3e-4)  # the log rounds to 4 decimals
    assert len({round(x, 4) for x in single_steps}) > 1  # the losses move: matching is not trivial

    output = _folder(two.output_uri)
    metrics = json.loads((output / layout.METRICS).read_text())
    single_metrics = json.loads((_folder(one.output_uri) / layout.METRICS).read_text())
    assert [row['epoch'] for row in metrics['epochs']] == [1, 2]
    for ours, theirs in zip(metrics['epochs'], single_metrics['epochs'], strict=True):
        assert ours['train_loss'] == pytest.approx(theirs['train_loss'], rel=1e-4)

    ours_weights = load_file(output / layout.ARTIFACT / 'model.safetensors')
    theirs_weights = load_file(_folder(single.artifact_uri) / 'model.safetensors')
    assert ours_weights.keys() == theirs_weights.keys()
    for key, value in theirs_weights.items():
        if ZERO_GRADIENT.search(key):
            continue
        torch.testing.assert_close(ours_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)

    # Only rank 0 wrote: one published artifact, one checkpoint chain, one progress writer.
    assert result.stdout.count('artifact published at') == 1
    assert result.stdout.count('checkpoint checkpoints/epoch-0002 saved') == 1
    manifest = json.loads((output / layout.ARTIFACT_MANIFEST).read_text())
    on_disk = {p.relative_to(output / layout.ARTIFACT).as_posix() for p in (output / layout.ARTIFACT).rglob('*')}
    assert set(manifest['files']) | {'manifest.json'} == {p for p in on_disk if (output / 'artifact' / p).is_file()}
    for name, size in manifest['files'].items():
        assert (output / layout.ARTIFACT / name).stat().st_size == size, name
    assert sorted(os.listdir(output / layout.CHECKPOINTS)) == ['epoch-0002', 'latest.json']
    state = torch.load(output / 'checkpoints/epoch-0002/state.pt', weights_only=True)
    assert state['step'] == 4 and state['epoch'] == 2
    # Every rank's RNG is in the checkpoint, and the ranks draw from different streams.
    assert len(state['rng_per_rank']) == 2
    assert not torch.equal(state['rng_per_rank'][0]['torch'], state['rng_per_rank'][1]['torch'])
    stray = [p.name for p in output.rglob('*') if p.name.startswith('.') or p.name.endswith('.tmp')]
    assert stray == []
    train_log = (output / layout.TRAIN_LOG).read_text()
    assert 'artifact published at' in train_log  # rank 0's log, not overwritten by rank 1's
    assert 'rank 1 of 2' in (output / 'logs' / 'train.rank-1.log').read_text()
    progress = json.loads((output / layout.PROGRESS).read_text())
    assert progress['step'] == 4 and progress['percent'] == 100.0
    shutil.rmtree(tmp_path / 'one', ignore_errors=True)


def test_labelled_images_triplet_loss_with_miner(
    make_config: ConfigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _compare(
        make_config,
        tmp_path,
        caplog,
        records=labelled_images(4, 4, seed=0),
        loss='TripletMarginLoss',
        loss_options={'margin': 1.0},  # wide enough that the random start violates it: the loss is not 0
        miner='TripletMarginMiner',
        miner_options={'margin': 1.0, 'type_of_triplets': 'all'},
        batch_size=8,
        num_items_per_class=2,
        learning_rate=1e-3,
        **TIMM_GN,
    )


def test_text_pairs_multiple_negatives_ranking_loss(
    make_config: ConfigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, bert_no_dropout: Path
) -> None:
    _compare(
        make_config,
        tmp_path,
        caplog,
        records=_unique_texts(text_pairs(16, seed=0)),
        model=str(bert_no_dropout),
        loss='MultipleNegativesRankingLoss',
        batch_size=8,
        learning_rate=1e-3,
    )


def test_text_image_pairs_clip_loss(
    make_config: ConfigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, clip_no_dropout: Path
) -> None:
    _compare(
        make_config,
        tmp_path,
        caplog,
        records=_unique_texts(text_image_pairs(16, seed=0)),
        model=str(clip_no_dropout),
        loss='CLIPLoss',
        multi_modal=True,
        batch_size=8,
        learning_rate=1e-3,
    )
