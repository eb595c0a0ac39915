"""The console over HTTP (Starlette's test client and a real server): pages, filters, downloads,
errors as pages, read-only, air-gapped, and the `finetuner console` command."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

import finetuner
from finetuner.backends.local import LocalBackend
from finetuner.cli import main
from tests.cluster.harness import free_port, wait_for, write_kubeconfig
from tests.console.conftest import start

pytest.importorskip('starlette', reason="the console extra is not installed: pip install 'kube-finetuner[console]'")

from starlette.testclient import TestClient

from finetuner.console.app import SECURITY_HEADERS, BackendSource, create_app

ROOT = Path(__file__).resolve().parents[2]


def rows(html: str) -> dict[str, str]:
    """Run name -> phase, as the runs table lists them."""
    return dict(re.findall(r'<tr data-run="([^"]+)" data-phase="([^"]+)"', html))


def side_by_side(html: str) -> dict[str, tuple[str, list[str]]]:
    """Run name -> (phase, parameter cells), as an experiment page's table puts them side by side."""
    found = {}
    for name, row in re.findall(r'<tr data-run="([^"]+)"[^>]*>(.*?)</tr>', html, re.S):
        phase = re.search(r'<span class="phase phase-(\w+)"', row)
        found[name] = (phase.group(1).upper() if phase else '', re.findall(r'<td class="parameter">([^<]*)</td>', row))
    return found


@pytest.fixture
def client(stand_in: LocalBackend) -> TestClient:
    return TestClient(create_app(stand_in), raise_server_exceptions=False)


def test_runs_page_lists_phase_progress_model_loss_experiment_and_age(client: TestClient, two_runs: Any) -> None:
    page = client.get('/')
    assert page.status_code == 200
    assert rows(page.text) == {'held-run': 'STARTED', 'done-run': 'FINISHED'}
    held_row = page.text[page.text.index('data-run="held-run"') :].split('</tr>')[0]
    assert '<progress max="100" value="33.33">' in held_row and 'epoch 1/2' in held_row  # step 2 of 6
    assert 'stand-in' in held_row and '0.5556' in held_row  # model, and the loss after step 2: 1 / 1.8
    assert '/experiments/other' in held_row and re.search(r'<td title="[^"]+Z">\d+s</td>', held_row)
    assert page.text.index('held-run') < page.text.index('done-run')  # newest first


def test_runs_are_filtered_by_experiment_and_phase(client: TestClient, two_runs: Any) -> None:
    assert rows(client.get('/?phase=STARTED').text) == {'held-run': 'STARTED'}
    assert rows(client.get('/?experiment=colours').text) == {'done-run': 'FINISHED'}
    assert rows(client.get('/?experiment=colours&phase=STARTED').text) == {}
    assert 'No runs match these filters.' in client.get('/fragments/runs?experiment=colours&phase=STARTED').text
    page = client.get('/?experiment=colours')
    assert '<option value="colours" selected>colours</option>' in page.text  # the form shows the filter
    bad = client.get('/?phase=RUNNING')
    assert bad.status_code == 400
    assert 'phase &#39;RUNNING&#39; is not one of CREATED, STARTED, FINISHED, FAILED' in bad.text
    bad = client.get('/fragments/runs?experiment=Bad_Name')
    assert bad.status_code == 400 and 'experiment &#39;Bad_Name&#39; is not a valid name' in bad.text


def test_run_page_shows_spec_status_events_curves_metrics_examples_log_and_artifact(
    client: TestClient, two_runs: Any
) -> None:
    page = client.get('/runs/done-run')
    assert page.status_code == 200
    text = page.text
    assert 'model: stand-in' in text and 'experiment: colours' in text and 'epochs: 2' in text  # the spec, as YAML
    assert 'data-terminal="true"' in text and 'phase-finished' in text
    for reason in ('Created', 'Started', 'Succeeded'):  # the local backend's phase changes
        assert f'<td>{reason}</td>' in text
    assert re.search(r'data-name="train loss" data-points="6"', text)  # one point per step
    assert re.search(r'data-name="mrr" data-points="3"', text)  # before + 2 epochs
    assert re.search(r'data-name="val_loss" data-points="2"', text)
    assert re.search(
        r'<tr data-metric="mrr">\s*<td>mrr</td><td class="num">0.4000</td><td class="num">0.9000</td>', text
    )
    assert '+0.5000' in text
    assert text.count('<img src="data:image/jpeg;base64,') == 3 + 2 * 9  # 3 queries, 3 matches before and after
    assert text.count('data-relevant="true"') == 3 + 9  # one in three before, all after
    assert 'stand-in trainer: artifact published' in text  # the log tail
    assert 'href="/runs/done-run/artifact.zip"' in text and 'href="/runs/done-run/artifact/config.json"' in text

    running = client.get('/runs/held-run').text
    assert 'data-terminal="false"' in running and 'step 2/6' in running
    assert 'The model can be downloaded once the run has FINISHED.' in running
    assert 'after the first epoch' in running  # examples before fine-tuning only, so far
    fragment = client.get('/fragments/runs/held-run').text
    assert fragment.lstrip().startswith('<div class="live-root"') and '<html' not in fragment


def test_artifact_downloads_file_by_file_and_as_one_zip(client: TestClient, two_runs: Any, stand_in: Any) -> None:
    artifact = stand_in.run_dir('done-run') / 'output' / 'artifact'
    one = client.get('/runs/done-run/artifact/config.json')
    assert one.status_code == 200 and one.content == (artifact / 'config.json').read_bytes()
    assert one.headers['content-disposition'] == "attachment; filename*=UTF-8''config.json"
    archive = client.get('/runs/done-run/artifact.zip')
    assert archive.headers['content-type'] == 'application/zip'
    with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
        assert z.testzip() is None
        assert sorted(z.namelist()) == ['config.json', 'model.safetensors']
        assert z.read('model.safetensors') == (artifact / 'model.safetensors').read_bytes()
    outside = client.get('/runs/done-run/artifact/../config.json')
    assert outside.status_code == 404
    listed_only = client.get('/runs/done-run/artifact/manifest.json')
    assert listed_only.status_code == 404
    assert 'the artifact of run &#39;done-run&#39; has no file &#39;manifest.json&#39;' in listed_only.text
    early = client.get('/runs/held-run/artifact.zip')
    assert early.status_code == 404 and 'has no artifact to download (it is STARTED)' in early.text


def test_unknown_run_and_experiment_are_404_pages_naming_them(client: TestClient) -> None:
    page = client.get('/runs/no-such-run')
    assert page.status_code == 404
    assert 'No run named &#39;no-such-run&#39;' in page.text and 'href="/">all runs' in page.text
    impossible = client.get('/runs/Not_A_Name')
    assert impossible.status_code == 404 and 'No run named &#39;Not_A_Name&#39;' in impossible.text
    assert 'is not a valid name: use lower-case letters, digits and' in impossible.text
    assert client.get('/fragments/runs/no-such-run').status_code == 404
    assert client.get('/runs/no-such-run/artifact.zip').status_code == 404
    experiment = client.get('/experiments/nope')
    assert experiment.status_code == 404 and 'No experiment named &#39;nope&#39;' in experiment.text
    other = client.get('/no/such/page')
    assert other.status_code == 404 and 'nothing at /no/such/page' in other.text


def test_the_console_is_read_only(client: TestClient, two_runs: Any) -> None:
    for method in ('POST', 'PUT', 'PATCH', 'DELETE'):
        for path in ('/', '/runs/held-run', '/runs/held-run/artifact.zip', '/experiments/other'):
            answer = client.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert f'{method} is not allowed: the console is read-only (GET only).' in answer.text
    assert finetuner.get_run('held-run').phase == 'STARTED'


def test_pages_load_nothing_from_elsewhere(client: TestClient, two_runs: Any) -> None:
    for path in ('/', '/runs/done-run', '/runs/held-run', '/experiments', '/experiments/colours', '/runs/nope'):
        page = client.get(path)
        for header, value in SECURITY_HEADERS.items():
            assert page.headers[header] == value
        references = re.findall(r'(?:src|href|action)="([^"]*)"', page.text)
        assert references and all(r.startswith(('/', 'data:image/', '#')) for r in references), (path, references)
        assert 'http://' not in page.text.replace('http://www.w3.org/2000/svg', '')
        assert 'https://' not in page.text
    for asset in ('/static/console.js', '/static/console.css'):
        answer = client.get(asset)
        assert answer.status_code == 200 and 'http' not in answer.text  # no import of anything remote
    assert "default-src 'none'" in SECURITY_HEADERS['Content-Security-Policy']


def test_a_backend_that_cannot_be_reached_is_a_page_saying_which_and_why(tmp_path: Path) -> None:
    from finetuner.backends.kubernetes import KubernetesBackend

    port = free_port()  # nothing listens there
    kubeconfig = write_kubeconfig(f'http://127.0.0.1:{port}', tmp_path / 'kubeconfig')
    backend = KubernetesBackend(kubeconfig=str(kubeconfig))
    backend.api_client.configuration.retries = 0
    client = TestClient(create_app(backend), raise_server_exceptions=False)
    for path in ('/', '/runs/any-run', '/experiments', '/fragments/runs'):
        page = client.get(path)
        assert page.status_code == 503, path
        assert 'The backend cannot be reached' in page.text
        assert f'the kubernetes backend (namespace &#39;default&#39; at http://127.0.0.1:{port})' in page.text
        assert 'cannot reach the Kubernetes API' in page.text and 'Connection refused' in page.text
        assert 'Traceback' not in page.text

    def no_config() -> Any:
        from finetuner.backends import make_backend

        return make_backend('kubernetes', kubeconfig=str(tmp_path / 'missing-kubeconfig'))

    source = BackendSource(no_config, 'the kubernetes backend (kubeconfig missing-kubeconfig)')
    page = TestClient(create_app(source), raise_server_exceptions=False).get('/')
    assert page.status_code == 503
    assert 'the kubernetes backend (kubeconfig missing-kubeconfig)' in page.text
    assert 'cannot load the Kubernetes configuration' in page.text and 'Traceback' not in page.text


def test_a_failure_of_the_console_itself_is_a_page_without_a_traceback(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetuner.console import views

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('the view broke')

    monkeypatch.setattr(views, 'run_rows', broken)
    page = client.get('/')
    assert page.status_code == 500
    assert 'The console failed on this page' in page.text and 'RuntimeError: the view broke' in page.text
    assert 'Traceback' not in page.text and 'File "' not in page.text


def test_experiment_pages_put_runs_side_by_side_with_the_best_run(
    client: TestClient, stand_in: LocalBackend, train_file: str
) -> None:
    for name, lr in (('lr-small', 1e-4), ('lr-large', 1e-2)):
        start(train_file, name, epochs=1, experiment_name='rates', learning_rate=lr)
    for name in ('lr-small', 'lr-large'):
        assert finetuner.get_run(name).wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    page = client.get('/experiments/rates').text
    assert 'Parameters that differ between the runs: learningRate.' in page and '2 runs.' in page
    assert re.search(r'<tr data-run="lr-large" class="best">', page)  # equal mrr: the first name wins
    assert '<td class="parameter">0.0001</td>' in page and '<td class="parameter">0.01</td>' in page
    assert 'Best run by <b>mrr</b> (max)' in page and 'data-parameter="learningRate"' in page
    assert re.search(r'data-name="mrr" data-points="2"', page)
    listing = client.get('/experiments').text
    assert (
        re.search(r'<tr data-experiment="rates">', listing) and 'lr-large</a> (mrr 0.7750)' in listing
    )  # 1e-4 and 1e-2 gain alike


def test_a_sweep_made_with_the_sdk_fills_its_experiment_page_as_its_runs_come(
    client: TestClient, stand_in: LocalBackend, train_file: str, tmp_path: Path
) -> None:
    """On the local backend the SDK's sweep creates its runs through the queue, one at a time here
    (parallelism 1); a run joined by hand is counted apart from the sweep's points."""
    gate = tmp_path / 'gate'  # every point holds at step 2 until it exists
    template = dict(model='stand-in', train_data=train_file, epochs=1, model_options={'hold_at': 2, 'gate': str(gate)})
    experiment = finetuner.create_experiment(
        'swept', run_template=template, sweep={'parameters': {'learning_rate': [1e-4, 1e-3]}}
    )
    first = finetuner.get_run('swept-000')
    wait_for(lambda: (first.progress() or None) and first.progress().step == 2, timeout=60, what='swept-000 at step 2')
    start(train_file, 'by-hand', epochs=1, experiment_name='swept', learning_rate=1e-2)  # waits for the slot
    page = client.get('/experiments/swept').text
    assert '1 of the 2 runs of a grid sweep, and 1 other run.' in page and 'none finished yet' in page
    assert 'Swept parameters: learningRate.' in page  # the sweep's own (wire) name for fit()'s learning_rate
    assert side_by_side(page) == {'by-hand': ('CREATED', ['0.01']), 'swept-000': ('STARTED', ['0.0001'])}

    gate.touch()
    status = experiment.wait(timeout=120, poll=0.2)
    assert (status.sweep_created, status.runs.finished, status.runs.total) == (2, 3, 3)
    page = client.get('/experiments/swept').text
    assert '2 of the 2 runs of a grid sweep, and 1 other run.' in page
    assert side_by_side(page) == {
        'by-hand': ('FINISHED', ['0.01']),
        'swept-000': ('FINISHED', ['0.0001']),
        'swept-001': ('FINISHED', ['0.001']),
    }
    assert re.search(r'<tr data-run="swept-001" class="best">', page)  # 1e-3: the stand-in's best rate
    assert 'href="/runs/swept-001">swept-001</a> with mrr 0.9000' in page
    assert re.search(r'data-name="mrr" data-points="3"', page) and 'data-parameter="learningRate"' in page
    assert 'swept-001</a> (mrr 0.9000)' in client.get('/experiments').text
    assert experiment.best_run().name == 'swept-001'  # the SDK's pick is the page's


def test_import_finetuner_does_not_load_the_console() -> None:
    code = (
        'import sys, finetuner, finetuner.cli, finetuner.run\n'
        "loaded = [m for m in ('starlette', 'jinja2', 'uvicorn', 'finetuner.console') if m in sys.modules]\n"
        'print(loaded)\n'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == '[]', out.stdout + out.stderr


def test_console_command_refuses_bad_options_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(['console', '--port', '70000']) == 2
    assert 'error: --port: 70000 is not a TCP port; give 1-65535 (or 0 for any free port)' in capsys.readouterr().err
    assert main(['console', '--refresh', '0']) == 2
    assert 'error: --refresh: 0.0 is not a number of seconds above 0' in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(['console', '--port', str(port)]) == 2
    err = capsys.readouterr().err
    assert f'error: --port: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port' in err


def test_console_command_without_the_extra_says_how_to_install_it() -> None:
    code = "import sys\nsys.modules['starlette'] = None\nfrom finetuner.cli import main\nsys.exit(main(['console']))\n"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert (
        "error: the console needs starlette, which is not installed: pip install 'kube-finetuner[console]'"
        in out.stderr
    )


def test_console_command_serves_the_runs_of_the_backend(two_runs: Any, stand_in: LocalBackend) -> None:
    command = [sys.executable, '-m', 'finetuner.console', '--port', '0', '--home', str(stand_in.home)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith('finetuner console for the default backend (home ')
        url = re.search(r'at (http://\S+) \(read-only', first).group(1).replace('localhost', '127.0.0.1')
        with urllib.request.urlopen(f'{url}/healthz', timeout=10) as answer:
            assert answer.read() == b'ok'
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert rows(answer.read().decode()) == {'held-run': 'STARTED', 'done-run': 'FINISHED'}
    finally:
        process.terminate()
        process.wait(10)


def test_a_failed_run_shows_its_reason_and_no_artifact(
    client: TestClient, stand_in: LocalBackend, train_file: str
) -> None:
    run = finetuner.fit(
        model='stand-in', train_data=train_file, run_name='bad-run', model_options={'fail': 'train_data: no labels'}
    )
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FAILED'
    page = client.get('/runs/bad-run').text
    assert 'phase-failed' in page and 'data-terminal="true"' in page
    assert '<span class="reason">TrainerFailed</span>' in page and 'train_data: no labels' in page
    assert 'No artifact: the run failed.' in page
    assert '<tr class="event-warning"><td>' in page  # the failure, among the phase changes
    assert 'error: train_data: no labels' in page  # the log tail
    assert rows(client.get('/?phase=FAILED').text) == {'bad-run': 'FAILED'}
