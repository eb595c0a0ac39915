"""The local queue on a machine with NVIDIA GPUs (skipped without one): GPUs found without torch, one
training per GPU, each trainer pinned to the GPU it was given, CPU runs kept off the GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

import finetuner
from finetuner.backends.local import LocalBackend
from finetuner.backends.scheduling import count_gpus
from tests.sdk.queue_support import wait_until
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images

pytestmark = pytest.mark.skipif(count_gpus() == 0, reason='needs an NVIDIA GPU (nvidia-smi or /proc/driver/nvidia)')


def test_one_training_per_gpu_each_pinned_to_its_own(scripted: LocalBackend, tmp_path: Path) -> None:
    gpus = count_gpus()
    assert scripted.queue_settings().gpus is None  # every GPU found is given out
    gate = tmp_path / 'go'
    options = {'model_options': {'wait_for': str(gate)}}
    data = ['a', 'b']
    on_gpus = [
        finetuner.fit(model='scripted:ok', train_data=data, run_name=f'g{i}', **options) for i in range(gpus + 1)
    ]
    on_cpu = finetuner.fit(model='scripted:ok', train_data=data, run_name='c', device='cpu', **options)
    wait_until(lambda: all(r.status()['status'] == 'STARTED' for r in [*on_gpus[:gpus], on_cpu]), what='started')
    waiting = on_gpus[gpus].full_status()
    assert (waiting.phase, waiting.reason) == ('CREATED', 'Waiting')
    assert waiting.details.startswith(f'Waiting for a free GPU: the {gpus} GPU')
    gate.touch()
    for run in [*on_gpus, on_cpu]:
        assert run.wait(timeout=120, poll=0.2)['status'] == 'FINISHED'
    pinned = sorted(r.logs().splitlines()[1] for r in on_gpus[:gpus])
    assert pinned == sorted(f"CUDA_VISIBLE_DEVICES='{i}'" for i in range(gpus))
    assert on_cpu.logs().splitlines()[1] == "CUDA_VISIBLE_DEVICES=''"


def test_the_real_trainer_trains_on_its_gpu_and_a_cpu_run_sees_none(local: LocalBackend) -> None:
    pytest.importorskip('finetuner_trainer.runner')
    common = {
        'model': TINY_TIMM,
        'model_options': TINY_TIMM_OPTIONS,
        'train_data': labelled_images(n_classes=3, per_class=4),
        'epochs': 1,
        'batch_size': 12,
        'num_workers': 0,
    }
    on_gpu = finetuner.fit(run_name='on-gpu', gpus=1, **common)  # device auto
    on_cpu = finetuner.fit(run_name='on-cpu', gpus=0, **common)  # device auto, but no GPU asked for
    for run in (on_gpu, on_cpu):
        assert run.wait(timeout=300, poll=0.5)['status'] == 'FINISHED', run.logs()[-2000:]
    assert ', device cuda' in on_gpu.logs(), on_gpu.logs()[-2000:]
    assert ', device cpu' in on_cpu.logs(), on_cpu.logs()[-2000:]
