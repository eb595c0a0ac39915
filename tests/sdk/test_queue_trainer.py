"""The local queue with the real trainer: a run the machine's restart interrupted resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal

import pytest

import finetuner
from finetuner.backends.local import LocalBackend
from tests.sdk.queue_support import wait_until
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images

pytest.importorskip('finetuner_trainer.runner')


@pytest.mark.slow
def test_a_run_interrupted_by_a_restart_resumes_from_its_last_checkpoint(local: LocalBackend) -> None:
    run = finetuner.fit(
        model=TINY_TIMM,
        model_options=TINY_TIMM_OPTIONS,
        train_data=labelled_images(n_classes=3, per_class=8),
        run_name='interrupted',
        epochs=3,
        batch_size=6,
        num_items_per_class=2,
        device='cpu',
        num_workers=0,
        checkpoint_every_steps=1,
    )
    run_dir = local.run_dir('interrupted')
    latest = run_dir / 'output' / 'checkpoints' / 'latest.json'
    wait_until(lambda: latest.exists() or run.status()['status'] in ('FINISHED', 'FAILED'), 180, 'a checkpoint')
    assert run.status()['status'] == 'STARTED', run.logs()[-2000:]
    os.killpg(int((run_dir / 'supervisor.pid').read_text()), signal.SIGKILL)  # the machine goes down
    wait_until(lambda: local._supervisor_alive('interrupted', run_dir) is False, what='the supervisor gone')
    state = json.loads((run_dir / 'state.json').read_text())
    (run_dir / 'state.json').write_text(json.dumps({**state, 'boot_id': 'a-boot-before-the-restart'}))

    final = finetuner.get_run('interrupted').wait(timeout=300, poll=0.5)  # the backend used after the restart

    assert final['status'] == 'FINISHED', run.logs()[-3000:]
    log = run.logs()
    first, second = log.split('the machine restarted during attempt 1', 1)
    assert 'resumed from' not in first
    assert 'resumed from checkpoints/' in second, second[-2000:]
    assert run.full_status().attempts == 2
    assert run.full_status().artifact_uri is not None
