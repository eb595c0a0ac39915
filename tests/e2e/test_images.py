"""The project's images, built by ``scripts/build-images.sh`` and run with podman.

- The operator image against the test cluster (default suite wherever podman runs containers; the
  image is built, or brought up to date from the layer cache, first): ``podman run`` of the image
  with the chart's FINETUNER_* settings drives a run to FINISHED.
- The trainer image (``-m images``; its first build takes ~6 min and ~7 GB): ``--help``, a tiny
  training inside it, the SDK's whole lifecycle with every trainer pod run from it by the simulated
  node, and a two-node run whose ranks meet through the headless Service's name in ``/etc/hosts``.

Without podman every test here skips, saying why.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cluster.fixtures import Cluster
from tests.cluster.harness import OperatorContainer
from tests.cluster.runtime import Podman, image_name
from tests.e2e import test_lifecycle, test_multinode
from tests.e2e.targets import Target
from tests.reliability.test_faults import STAND_IN, assert_ends, submit
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, write_jsonl

TRAINER = image_name('trainer')


@pytest.mark.operator_image
@pytest.mark.node(command=STAND_IN)
def test_the_operator_image_drives_a_run_on_the_test_cluster(cluster: Cluster) -> None:
    operator = cluster.operator
    assert isinstance(operator, OperatorContainer)
    state = Podman().run(['inspect', '--format', '{{.State.Status}} {{.ImageName}}', operator.name])
    assert state.stdout.split() == ['running', image_name('operator')], state.stderr

    submit(cluster, 'from-image', seconds=0.5)

    status = assert_ends(cluster, 'from-image', timeout=120.0)  # FINISHED only once it read the manifest in S3
    assert status['details'] == f'Fine-tuned model at s3://{cluster.bucket}/runs/default/from-image/artifact'
    operator.stop()
    assert not operator.errors, 'the operator in its container stops cleanly on SIGTERM (exit code 0)'
    log = operator.tail()  # the container's output: the operator's own log lines
    assert 'finetuner operator configured: image kube-finetuner/trainer:test' in log
    assert 'FinetuneRun default/from-image STARTED -> FINISHED' in log
    assert 'Found credentials in environment variables' in log, 'the S3 keys reached it as variables'


def _podman_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return Podman().run(['run', '--rm', '--network=host', *args], timeout=timeout)


@pytest.mark.images
@pytest.mark.slow
def test_the_trainer_image_trains_inside(trainer_image: str, tmp_path: Path) -> None:
    shown = _podman_run(trainer_image, '--help')
    assert shown.returncode == 0, shown.stderr
    assert 'usage: python -m finetuner_trainer [-h] --config CONFIG' in shown.stdout

    work = tmp_path / 'work'
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    write_jsonl(labelled_images(n_classes=3, per_class=4), work / 'train.jsonl')
    config = {
        'runName': 'in-image',
        'namespace': 'default',
        'outputUri': 'file:///work/output',
        'terminationLog': '/work/termination-log',
        'spec': {
            'model': TINY_TIMM,
            'modelOptions': TINY_TIMM_OPTIONS,
            'trainData': '/work/train.jsonl',
            'epochs': 1,
            'batchSize': 12,
            'device': 'cpu',
            'numWorkers': 0,
        },
    }
    (work / 'config.json').write_text(json.dumps(config))
    # As a trainer pod runs it: uid 1000, a read-only root, a writable /tmp and HOME, offline.
    trained = _podman_run(
        '--user',
        '1000:1000',
        '--read-only',
        '-v',
        f'{work}:/work',
        '-e',
        'HF_HUB_OFFLINE=1',
        trainer_image,
        '--config',
        '/work/config.json',
    )
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    manifest = json.loads((work / 'output' / 'artifact' / 'manifest.json').read_text())
    assert 'model.safetensors' in manifest['files']
    metrics = json.loads((work / 'output' / 'metrics.json').read_text())
    assert [row['epoch'] for row in metrics['epochs']] == [1]


@pytest.mark.images
@pytest.mark.slow
@pytest.mark.operator_config(trainer_image=TRAINER)
@pytest.mark.node(runtime='podman')
def test_fit_lifecycle_with_the_trainer_image(trainer_image: str, cluster: Cluster, tmp_path: Path) -> None:
    target = Target('simulated', cluster.api, 'default', cluster.bucket, timeout=600.0)
    test_lifecycle.test_fit_finishes_and_the_model_downloads(target, tmp_path)
    images = {c['image'] for pod in cluster.server.objects('v1/pods') for c in pod['spec']['containers']}
    assert images == {TRAINER}


@pytest.mark.images
@pytest.mark.slow
@pytest.mark.operator_config(trainer_image=TRAINER)
@pytest.mark.node(runtime='podman')
def test_two_nodes_with_the_trainer_image(
    trainer_image: str, cluster: Cluster, tmp_path: Path, rendezvous_port: int
) -> None:
    test_multinode.test_two_nodes_rendezvous_through_the_service_and_match_one_node(cluster, tmp_path, rendezvous_port)


rendezvous_port = test_multinode.rendezvous_port  # the fixture, for the two-node test
