"""The console in a real headless Chromium: what a person sees, from the local backend and from the
simulated cluster (KMock API server + operator + simulated node + moto S3), and that it updates while
runs train without a reload."""

from __future__ import annotations

import sys
import urllib.request
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

import finetuner
from finetuner.api.v1alpha1 import ExperimentSpec
from finetuner.backends.local import LocalBackend
from finetuner.console import API_CALLS
from tests.cluster.harness import wait_for
from tests.console.conftest import STAND_IN, serving, start

pytest.importorskip('starlette', reason="the console extra is not installed: pip install 'kube-finetuner[console]'")

TIMEOUT = 60.0
CONSOLE_AGENT = 'finetuner-console-test'
# What the SDK itself calls in the cluster test (fit, wait, progress): not the console's business.
SDK_CALLS = {
    ('finetuner.dev', 'finetuneruns', 'create'),
    ('finetuner.dev', 'experiments', 'create'),
}


def visit(driver: Any, url: str) -> None:
    driver.get(url)
    driver.execute_script('window.__sameDocument = true')  # gone if the page reloads


def same_document(driver: Any) -> bool:
    return bool(driver.execute_script('return window.__sameDocument === true'))


# Reads go through one script each: the page replaces its live parts every refresh, so an element
# found in one call may be gone by the next (Selenium's StaleElementReferenceException).


def text(driver: Any, selector: str) -> str | None:
    return driver.execute_script(
        'const e = document.querySelector(arguments[0]); return e ? e.innerText : null', selector
    )


def attributes(driver: Any, selector: str, name: str) -> list[str | None]:
    script = 'return Array.from(document.querySelectorAll(arguments[0])).map(e => e.getAttribute(arguments[1]))'
    return driver.execute_script(script, selector, name)


def listed(driver: Any) -> dict[str, str]:
    script = "return Array.from(document.querySelectorAll('tr[data-run]')).map(r => [r.dataset.run, r.dataset.phase])"
    return dict(driver.execute_script(script))


def series_points(driver: Any) -> dict[str, int]:
    script = (
        "return Array.from(document.querySelectorAll('svg.chart g.series'))"
        '.map(g => [g.dataset.name, parseInt(g.dataset.points, 10)])'
    )
    return dict(driver.execute_script(script))


def shown_images(driver: Any, selector: str) -> list[list[int]]:
    """[naturalWidth, naturalHeight] of the images the browser decoded under ``selector``."""
    script = (
        'return Array.from(document.querySelectorAll(arguments[0]))'
        '.map(i => [i.complete ? i.naturalWidth : 0, i.naturalHeight])'
    )
    return driver.execute_script(script, selector)


def only_same_origin(driver: Any, origin: str) -> list[str]:
    """Every resource the page loaded (the performance timeline), none from another origin."""
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [n for n in names if not n.startswith(origin) and not n.startswith('data:')]


def test_runs_page_lists_a_finished_and_a_running_run_and_filters_them(
    browser: Any, stand_in: LocalBackend, two_runs: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with serving(stand_in) as url:
        visit(browser, url)
        assert browser.title == 'Runs · finetuner console'
        assert listed(browser) == {'held-run': 'STARTED', 'done-run': 'FINISHED'}
        held = text(browser, 'tr[data-run="held-run"]')
        assert 'STARTED' in held and '33% · epoch 1/2' in held and 'stand-in' in held and 'other' in held
        assert only_same_origin(browser, url) == []
        Select(browser.find_element(By.NAME, 'phase')).select_by_value('STARTED')  # the form submits itself
        wait_for(lambda: 'phase=STARTED' in browser.current_url, timeout=TIMEOUT, what='the phase filter')
        assert listed(browser) == {'held-run': 'STARTED'}


def test_run_page_shows_curves_metrics_and_example_results_with_images(
    browser: Any, stand_in: LocalBackend, two_runs: Any
) -> None:
    with serving(stand_in) as url:
        visit(browser, f'{url}/runs/done-run')
        assert text(browser, '.status .phase') == 'FINISHED'
        assert series_points(browser) == {
            'train loss': 6,
            'train_loss': 2,
            'val_loss': 2,
            **{m: 3 for m in ('mrr', 'map', 'ndcg_at_k', 'precision_at_k', 'recall_at_k', 'hit_at_k')},
        }
        assert text(browser, 'tr[data-metric="mrr"]').split() == ['mrr', '0.4000', '0.9000', '+0.5000']
        queries = shown_images(browser, '.example .query img')
        matches = shown_images(browser, '.example .matches img')
        assert queries == [[32, 32]] * 3 and matches == [[32, 32]] * 18  # decoded pictures, not broken icons
        assert attributes(browser, '.matches-after li.match', 'data-relevant') == ['true'] * 9
        assert attributes(browser, '.matches-before li.match', 'data-relevant').count('true') == 3
        first = text(browser, '.matches-after li.match')
        assert '✓' in first and 'red' in first
        events = text(browser, '.events-table')
        assert 'Created' in events and 'Succeeded' in events
        assert 'stand-in trainer: artifact published' in text(browser, 'pre.log-tail')
        assert attributes(browser, 'a.download', 'href') == ['/runs/done-run/artifact.zip']
        assert only_same_origin(browser, url) == []


def test_run_page_and_runs_page_update_while_a_run_trains(
    browser: Any, stand_in: LocalBackend, train_file: str, tmp_path: Path
) -> None:
    gate = tmp_path / 'gate'
    run = start(train_file, 'live-run', gate=gate, epochs=2)
    wait_for(lambda: (run.progress() or None) and run.progress().step == 2, timeout=TIMEOUT, what='step 2')
    with serving(stand_in) as url:
        visit(browser, f'{url}/runs/live-run')
        assert text(browser, '.status .phase') == 'STARTED'
        assert 'step 2/6' in text(browser, '.progress-line')
        assert series_points(browser)['train loss'] == 2
        assert attributes(browser, '.matches-after li.match', 'class') == []  # before only, so far

        gate.touch()  # the trainer goes on
        wait_for(
            lambda: text(browser, '#live .status .phase') == 'FINISHED',
            timeout=TIMEOUT,
            what='the page to show FINISHED',
        )
        assert same_document(browser), 'the page reloaded instead of updating in place'
        assert 'step 6/6' in text(browser, '.progress-line')
        assert series_points(browser)['train loss'] == 6
        assert len(attributes(browser, '.matches-after li.match', 'class')) == 9
        assert attributes(browser, 'a.download', 'href') == ['/runs/live-run/artifact.zip']
        assert attributes(browser, '.live-root', 'data-terminal') == ['true']

        second_gate = tmp_path / 'second-gate'
        visit(browser, url)
        assert listed(browser) == {'live-run': 'FINISHED'}
        second = start(train_file, 'next-run', gate=second_gate, epochs=2)
        wait_for(lambda: listed(browser).get('next-run') == 'STARTED', timeout=TIMEOUT, what='a new run to appear')
        second_gate.touch()
        wait_for(lambda: listed(browser).get('next-run') == 'FINISHED', timeout=TIMEOUT, what='the row to finish')
        assert same_document(browser)
        assert second.wait(timeout=TIMEOUT, poll=0.1)['status'] == 'FINISHED'


def test_a_missing_run_and_an_unreachable_backend_in_the_browser(browser: Any, stand_in: LocalBackend) -> None:
    from finetuner.console.app import BackendSource

    with serving(stand_in) as url:
        visit(browser, f'{url}/runs/gone-run')
        assert text(browser, 'h1') == "No run named 'gone-run'"

    def broken() -> Any:
        from finetuner.backends import make_backend

        return make_backend('kubernetes', kubeconfig='/nonexistent/kubeconfig')

    with serving(BackendSource(broken, 'the kubernetes backend (kubeconfig /nonexistent/kubeconfig)')) as url:
        visit(browser, url)
        assert text(browser, 'h1') == 'The backend cannot be reached'
        assert text(browser, 'dd.which') == 'the kubernetes backend (kubeconfig /nonexistent/kubeconfig)'
        assert 'cannot load the Kubernetes configuration' in text(browser, 'dd.why')


@pytest.mark.node(command=[sys.executable, str(STAND_IN), '--config', '/etc/finetuner/config.json'])
def test_the_console_of_the_simulated_cluster(browser: Any, cluster: Any, train_file: str, tmp_path: Path) -> None:
    """Runs as FinetuneRuns: the operator's status, its Events, the trainer's reports in S3 (moto)."""
    from finetuner_operator.builders import CONFIG_PATH

    assert CONFIG_PATH == '/etc/finetuner/config.json'  # where the stand-in's --config points
    backend = finetuner.login(backend='kubernetes', namespace='default', bucket=cluster.bucket)
    backend.api_client.user_agent = CONSOLE_AGENT  # the calls below are the console's (and the SDK's)
    gate = tmp_path / 'cluster-gate'
    done = start(train_file, 'cluster-done', epochs=2, gpus=0)
    held = start(train_file, 'cluster-held', gate=gate, epochs=2, gpus=0)
    assert done.wait(timeout=120, poll=0.2)['status'] == 'FINISHED', done.full_status()
    wait_for(
        lambda: (held.progress() or None) and held.progress().step == 2, timeout=120, what='cluster-held at step 2'
    )
    with serving(backend) as url:
        visit(browser, url)
        assert listed(browser) == {'cluster-held': 'STARTED', 'cluster-done': 'FINISHED'}
        assert 'kubernetes backend' in text(browser, '.backend')

        visit(browser, f'{url}/runs/cluster-done')
        assert 'FinetuneRun/cluster-done' in text(browser, '.events-table')  # posted by the operator
        assert 'Succeeded' in text(browser, 'table.conditions')
        assert series_points(browser)['train loss'] == 6  # progress_history.json, read from S3
        assert shown_images(browser, '.example img') == [[32, 32]] * 21
        with urllib.request.urlopen(f'{url}/runs/cluster-done/artifact.zip', timeout=30) as answer:
            with zipfile.ZipFile(BytesIO(answer.read())) as archive:
                assert sorted(archive.namelist()) == ['config.json', 'model.safetensors']

        visit(browser, f'{url}/runs/cluster-held')
        assert text(browser, '.status .phase') == 'STARTED'
        gate.touch()
        wait_for(
            lambda: text(browser, '#live .status .phase') == 'FINISHED',
            timeout=120,
            what='the cluster run page to show FINISHED',
        )
        assert same_document(browser) and series_points(browser)['train loss'] == 6
        visit(browser, f'{url}/experiments')
        check_the_sweep(browser, backend, url, done.config.train_data)
    # Which calls did the console make?
    made = {api_call(method, path) for method, path, agent in cluster.server.emu.requests if agent == CONSOLE_AGENT}
    made -= SDK_CALLS  # fit() and the waits above went through the same client
    assert made <= set(API_CALLS), f'calls the console Role does not grant: {sorted(made - set(API_CALLS))}'
    assert ('finetuner.dev', 'finetuneruns', 'list') in made and ('', 'pods/log', 'get') in made


def api_call(method: str, path_qs: str) -> tuple[str, str, str]:
    """(API group, resource, verb) of a request to the API server, as RBAC names it."""
    parts = path_qs.split('?')[0].strip('/').split('/')
    group, rest = ('', parts[2:]) if parts[0] == 'api' else (parts[1], parts[3:])
    if rest[:1] == ['namespaces'] and len(rest) > 2:
        rest = rest[2:]
    resource = rest[0] + (f'/{rest[2]}' if len(rest) > 2 else '')
    verb = {'GET': 'get' if len(rest) > 1 else 'list', 'POST': 'create', 'PATCH': 'patch', 'DELETE': 'delete'}[method]
    return group, resource, verb


def check_the_sweep(browser: Any, backend: Any, url: str, train_data: str) -> None:
    """An Experiment with a sweep: the operator creates a run per point and picks the best one."""
    spec = ExperimentSpec.model_validate(
        {
            'runTemplate': {'model': 'stand-in', 'trainData': train_data, 'epochs': 1, 'resources': {'gpus': 0}},
            'sweep': {'parameters': {'learningRate': [1e-5, 1e-3, 1e-1]}, 'parallelism': 3},
        }
    )
    backend.create_experiment('rates', spec)

    def best() -> Any:
        status = backend.get_experiment('rates').status
        return status.best_run if status.runs.finished == 3 else None

    chosen = wait_for(best, timeout=120, what='the sweep to finish')
    visit(browser, f'{url}/experiments/rates')
    assert 'Swept parameters: learningRate.' in text(browser, '.summary')
    assert '3 of the 3 runs of a grid sweep.' in text(browser, '.summary')
    assert attributes(browser, 'tr.best', 'data-run') == [chosen.name]  # the operator's status.bestRun
    assert text(browser, f'tr[data-run="{chosen.name}"] td.parameter') == '0.001'  # the stand-in's best point
    assert series_points(browser) == {'mrr': 3}
    assert attributes(browser, 'figure[data-parameter]', 'data-parameter') == ['learningRate']
