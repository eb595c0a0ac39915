"""The README's and docs' kubectl lines, run with the real kubectl binary against the test cluster.

The cluster is the full one (API server, operator, simulated node, S3), so what kubectl prints is what a
user of this project would see on a real cluster: validation by the API server, printer columns, describe
with events, explain from the published OpenAPI, wait, logs and cascading delete.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.fixtures import Cluster
from tests.cluster.harness import wait_for
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images

KUBECTL = shutil.which('kubectl')
pytestmark = pytest.mark.skipif(KUBECTL is None, reason='kubectl is not installed (it is at /usr/bin/kubectl here)')
ROOT = Path(__file__).resolve().parents[2]
RUN = 'finetune-flickr-dataset-efficientnet-1'  # examples/run.yaml
INVALID = sorted((ROOT / 'examples' / 'invalid').glob('*.yaml'))


def kubectl(cluster: Cluster, *args: str, ok: bool = True, timeout: float = 120) -> str:
    """Run kubectl on the test cluster's kubeconfig; stdout and stderr together."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, '--kubeconfig', str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, f'kubectl {" ".join(args)} exited {result.returncode}:\n{output}'
    return output


def header(output: str) -> list[str]:
    return output.splitlines()[0].split()


def layer_of(path: Path) -> dict[str, str]:
    """The ``# layer:`` and ``# kubectl:`` lines of an invalid example (what refuses it, and what it says)."""
    found = dict(re.findall(r'^# (layer|kubectl): (.*)$', path.read_text(), re.MULTILINE))
    assert {'layer', 'kubectl'} <= set(found), f'{path.name} lacks its # layer: and # kubectl: lines'
    return found


def test_the_readme_kubectl_lines(cluster: Cluster) -> None:
    """README: apply -f crds/, apply -f examples/run.yaml, get finetuner, get ftr -o wide, describe, explain."""
    cluster.node.pause(True)  # the example run trains efficientnet_b0 on a GPU: here it stays CREATED
    applied = kubectl(cluster, 'apply', '-f', 'crds/')
    assert 'customresourcedefinition.apiextensions.k8s.io/finetuneruns.finetuner.dev configured' in applied
    assert 'unchanged' in kubectl(cluster, 'apply', '-f', 'crds/'), 'a second apply changes nothing'

    assert kubectl(cluster, 'apply', '-f', 'examples/run.yaml').strip() == f'finetunerun.finetuner.dev/{RUN} created'
    wait_for(lambda: _status(cluster).get('jobName'), what='the operator took the run')

    everything = kubectl(cluster, 'get', 'finetuner')
    assert header(everything) == ['NAME', 'PHASE', 'MODEL', 'LOSS', 'PROGRESS', 'AGE']
    assert re.search(rf'finetunerun.finetuner.dev/{RUN}\s+CREATED\s+efficientnet_b0\s+TripletMarginLoss\s', everything)
    assert "the server doesn't have a resource type" not in everything

    wide = kubectl(cluster, 'get', 'ftr', '-o', 'wide')
    assert header(wide) == [
        'NAME',
        'PHASE',
        'MODEL',
        'LOSS',
        'PROGRESS',
        'AGE',
        'REASON',
        'EXPERIMENT',
        'GPUS',
        'JOB',
        'TASK',
    ]
    row = wide.splitlines()[1].split()
    assert row[0] == RUN and re.fullmatch(r'\d+s', row[4]), f'AGE is an age: {row}'
    assert row[-3:] == ['finetune-flickr-dataset', '1', f'{RUN}-trainer']  # TASK is empty: task left to its default
    labels = kubectl(cluster, 'get', 'ftr', RUN, '--show-labels')
    assert 'finetuner.dev/experiment=finetune-flickr-dataset' in labels

    described = kubectl(cluster, 'describe', 'ftr', RUN)
    for line in (f'Name:         {RUN}', 'API Version:  finetuner.dev/v1alpha1', 'Kind:         FinetuneRun'):
        assert line in described
    assert re.search(r'Model:\s+efficientnet_b0', described) and re.search(r'Phase:\s+CREATED', described)
    assert re.search(r'Normal\s+JobCreated\s+\S+\s+\S+\s+Created Job', described) or 'JobCreated' in described

    explained = kubectl(cluster, 'explain', 'finetunerun.spec')
    assert 'KIND:       FinetuneRun' in explained and 'VERSION:    v1alpha1' in explained
    assert re.search(r'trainData\s+<string> -required-', explained)
    assert 'imagePullSecrets' in explained and 'affinity' in explained
    gpus = kubectl(cluster, 'explain', 'finetunerun.spec.resources.gpus')
    assert 'FIELD: gpus <integer>' in gpus and 'GPUs per node (0 trains on CPU).' in gpus


def _status(cluster: Cluster, name: str = RUN) -> dict[str, Any]:
    found = [o for o in cluster.server.objects('finetuner.dev/v1alpha1/finetuneruns') if o['metadata']['name'] == name]
    return (found[0].get('status') or {}) if found else {}


def test_every_invalid_example_is_refused_where_its_layer_says(cluster: Cluster) -> None:
    """Each examples/invalid/ manifest: the API server refuses it (schema or CEL) with the field named, or
    the operator fails it (InvalidSpec); its ``# kubectl:`` line is what the user reads."""
    cluster.node.pause(True)
    assert len(INVALID) >= 15
    for path in INVALID:
        expected = layer_of(path)
        manifest = yaml.safe_load(path.read_text())
        if expected['layer'] == 'operator':
            kubectl(cluster, 'apply', '-f', str(path.relative_to(ROOT)))
            kind = 'experiment' if manifest['kind'] == 'Experiment' else 'ftr'
            if kind == 'ftr':
                shown = kubectl(
                    cluster,
                    'wait',
                    f'ftr/{manifest["metadata"]["name"]}',
                    '--for=jsonpath={.status.reason}=InvalidSpec',
                )
                assert 'condition met' in shown
            described = wait_for(
                lambda m=manifest, k=kind, e=expected['kubectl']: (
                    e in (out := kubectl(cluster, 'describe', k, m['metadata']['name'])) and out
                ),
                what=f'{path.name}: the operator refuses it',
            )
            assert 'InvalidSweepPoint' in described or 'InvalidSpec' in described
            continue
        output = kubectl(cluster, 'apply', '-f', str(path.relative_to(ROOT)), ok=False)
        assert expected['kubectl'] in output, f'{path.name}: {output}'
        if expected['layer'] == 'schema':
            assert 'Invalid value: "object"' not in output or 'metadata.name' in output
        elif expected['layer'] == 'cel':
            assert 'Invalid value: "object"' in output, f'{path.name} is refused by a CEL rule: {output}'
    created = [o['metadata']['name'] for o in cluster.server.objects('finetuner.dev/v1alpha1/finetuneruns')]
    assert created == [], f'the API server stored none of the invalid runs: {created}'


def _write_training_data(cluster: Cluster) -> str:
    lines = ''.join(json.dumps(r.model_dump(exclude_defaults=True)) + '\n' for r in labelled_images(3, 4))
    cluster.s3.client().put_object(Bucket=cluster.bucket, Key='kubectl/train.jsonl', Body=lines.encode())
    return f's3://{cluster.bucket}/kubectl/train.jsonl'


def test_wait_logs_and_cascading_delete_of_a_training_run(cluster: Cluster, tmp_path: Path) -> None:
    """NOTES.txt and docs: kubectl wait --for=jsonpath='{.status.phase}'=FINISHED, logs job/<run>-trainer,
    delete with cascading (the Job, its pods and the ConfigMap go with the run)."""
    run = {
        'apiVersion': 'finetuner.dev/v1alpha1',
        'kind': 'FinetuneRun',
        'metadata': {'name': 'tiny'},
        'spec': {
            'model': TINY_TIMM,
            'modelOptions': TINY_TIMM_OPTIONS,
            'trainData': _write_training_data(cluster),
            'epochs': 1,
            'batchSize': 12,
            'device': 'cpu',
            'numWorkers': 0,
            'resources': {'gpus': 0},
        },
    }
    manifest = tmp_path / 'tiny.yaml'
    manifest.write_text(yaml.safe_dump(run))
    assert 'finetunerun.finetuner.dev/tiny created' in kubectl(cluster, 'apply', '-f', str(manifest))

    waited = kubectl(
        cluster, 'wait', 'ftr/tiny', '--for=jsonpath={.status.phase}=FINISHED', '--timeout=180s', timeout=200
    )
    assert waited.strip() == 'finetunerun.finetuner.dev/tiny condition met'

    logs = kubectl(cluster, 'logs', 'job/tiny-trainer')
    assert 'tiny' in logs and logs.strip(), 'the trainer pod log, found through the Job selector'
    # with a selector kubectl prints the last 10 lines of each pod unless told otherwise
    assert kubectl(cluster, 'logs', '-l', 'finetuner.dev/run=tiny', '--tail=-1').strip() == logs.strip()

    edited = kubectl(cluster, 'patch', 'ftr', 'tiny', '--type=merge', '-p', '{"spec":{"epochs":3}}', ok=False)
    assert (
        'is invalid: spec: Invalid value: "object": the training spec cannot change once the run has a trainer Job'
        in edited
    )
    kubectl(cluster, 'patch', 'ftr', 'tiny', '--type=merge', '-p', '{"spec":{"description":"kept"}}')

    deleted = kubectl(cluster, 'delete', 'ftr', 'tiny', '--cascade=foreground', '--wait=true', '--timeout=60s')
    assert deleted.strip() == 'finetunerun.finetuner.dev "tiny" deleted'
    wait_for(
        lambda: not any(cluster.server.objects(key) for key in ('batch/v1/jobs', 'v1/pods', 'v1/configmaps')),
        what='the Job, its pods and the ConfigMap deleted with the run',
    )
    assert 'No resources found' in kubectl(cluster, 'get', 'ftr')


def test_serve_starts_a_test_cluster_for_a_users_kubectl(tmp_path: Path) -> None:
    """``python -m tests.cluster.serve --kubeconfig PATH`` (its module docstring): kubectl works against it."""
    import sys

    kubeconfig = tmp_path / 'kubeconfig'
    process = subprocess.Popen(
        [sys.executable, '-m', 'tests.cluster.serve', '--kubeconfig', str(kubeconfig)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().startswith('url http://127.0.0.1:')
        assert process.stderr is not None and f'KUBECONFIG={kubeconfig}' in process.stderr.readline()
        assert KUBECTL is not None
        crds = subprocess.run(
            [KUBECTL, '--kubeconfig', str(kubeconfig), 'get', 'crd'], capture_output=True, text=True, check=True
        ).stdout
        assert header(crds) == ['NAME', 'CREATED', 'AT'] and 'finetuneruns.finetuner.dev' in crds
    finally:
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(30) == 0
