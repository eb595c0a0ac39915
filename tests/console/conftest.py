"""Fixtures of the console tests: the console served over real HTTP, a headless Chromium, runs made
by the stand-in trainer on the local backend or on the simulated cluster, and screenshots on demand."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import finetuner
import finetuner.backends
from finetuner.backends.local import LocalBackend
from tests.cluster.fixtures import api_server, cluster, register_markers, s3, s3_server  # noqa: F401
from tests.cluster.harness import wait_for

STAND_IN = Path(__file__).with_name('stand_in.py')
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path('/usr/bin/chromium')
CHROMEDRIVER = Path('/usr/bin/chromedriver')
# Flags that work on these machines (no sandbox as root, no GPU, nothing reached but the console).
CHROMIUM_FLAGS = (
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    '--window-size=1280,900',
)
SCREENSHOTS = os.environ.get('FINETUNER_CONSOLE_SCREENSHOTS')  # a folder: the tests save the docs' pictures


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


@pytest.fixture(autouse=True)
def _fresh_sdk_session() -> Iterator[None]:
    yield
    finetuner.backends.use(None)


@pytest.fixture
def stand_in(_isolated_home: Path) -> Iterator[LocalBackend]:
    """The local backend running tests/console/stand_in.py as its trainer."""
    backend = LocalBackend(command=[sys.executable, str(STAND_IN)])
    finetuner.backends.use(backend)
    yield backend
    for run in backend.list_runs():  # a held run must not outlive its test
        if run.status.phase in ('CREATED', 'STARTED'):
            backend.cancel_run(run.name, timeout=5)


@pytest.fixture
def local(_isolated_home: Path) -> Iterator[LocalBackend]:
    """The local backend with the real trainer, as `import finetuner` gets it."""
    backend = LocalBackend()
    finetuner.backends.use(backend)
    yield backend
    for run in backend.list_runs():
        if run.status.phase in ('CREATED', 'STARTED'):
            backend.cancel_run(run.name, timeout=10)


@pytest.fixture
def train_file(tmp_path: Path) -> str:
    from tests.support.tiny import labelled_texts, write_jsonl

    return str(write_jsonl(labelled_texts(2, 3), tmp_path / 'train.jsonl'))


def start(train_file: str, name: str, gate: Path | None = None, **fit: Any) -> finetuner.Run:
    options = {'hold_at': 2, 'gate': str(gate)} if gate else {}
    return finetuner.fit(model='stand-in', train_data=train_file, run_name=name, model_options=options, **fit)


@pytest.fixture
def two_runs(stand_in: LocalBackend, train_file: str, tmp_path: Path) -> tuple[finetuner.Run, finetuner.Run]:
    """A FINISHED run in experiment `colours` and one held STARTED (after step 2) in `other`."""
    done = start(train_file, 'done-run', epochs=2, experiment_name='colours')
    held = start(train_file, 'held-run', gate=tmp_path / 'gate', epochs=2, experiment_name='other')
    assert done.wait(timeout=60, poll=0.1)['status'] == 'FINISHED', done.logs()
    wait_for(lambda: (held.progress() or None) and held.progress().step == 2, timeout=60, what='held-run at step 2')
    return done, held


@contextmanager
def serving(backend: Any, refresh: float = 0.3) -> Iterator[str]:
    """The console for ``backend`` (a Backend or a BackendSource) on a free loopback port; its URL."""
    from finetuner.console.app import BackendSource
    from finetuner.console.server import bind, make_server, url_of

    source = backend if isinstance(backend, BackendSource) else BackendSource.of(backend)
    sock = bind('127.0.0.1', 0)
    server = make_server(source, sock, refresh=refresh, log_level='warning')
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, name='console', daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=20, what='the console to start')
        yield url_of(sock).replace('localhost', '127.0.0.1')
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def console_url(stand_in: LocalBackend) -> Iterator[str]:
    with serving(stand_in) as url:
        yield url


def chromium_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'kube-finetuner[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f'{path} is missing: bash scripts/setup.sh installs it (apt-get install -y chromium chromium-driver)'
    return None


@pytest.fixture(scope='session')
def browser() -> Iterator[Any]:
    """A headless Debian Chromium driven by Selenium through Debian's chromedriver."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix='console-chromium-')
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f'--user-data-dir={profile}'):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> Path | None:
    """Save the whole page as FINETUNER_CONSOLE_SCREENSHOTS/NAME.png when that variable is set."""
    if not SCREENSHOTS:
        return None
    folder = Path(SCREENSHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(1280, 600)  # then the document is as tall as its content, not the window
    height = driver.execute_script('return document.documentElement.scrollHeight')
    driver.set_window_size(1280, max(600, min(int(height) + 140, 6000)))  # + the window's own bars
    path = folder / f'{name}.png'
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)
    return path
