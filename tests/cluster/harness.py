"""Start the test cluster's parts in their own threads: API server, operator, object store.

Each part runs its own event loop in a thread, so tests stay plain synchronous code that uses
the official client, the SDK or kubectl exactly as against a real cluster. Kopf in particular
must not share pytest's loop (it cancels foreign tasks on exit and installs signal handlers).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from finetuner.api.v1alpha1 import GROUP, VERSION
from tests.cluster.emulator import KubeEmu

T = TypeVar('T')
ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / 'crds'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = '') -> T:
    """Poll until ``predicate()`` is truthy; return its value or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f'{what or predicate!r} not reached in {timeout}s (last value: {last!r})')
        time.sleep(interval)


def write_kubeconfig(url: str, path: Path, namespace: str = 'default') -> Path:
    config = {
        'apiVersion': 'v1',
        'kind': 'Config',
        'current-context': 'kube-finetuner-test',
        'clusters': [{'name': 'kmock', 'cluster': {'server': url}}],
        'users': [{'name': 'tester', 'user': {'token': 'test-token'}}],
        'contexts': [
            {'name': 'kube-finetuner-test', 'context': {'cluster': 'kmock', 'user': 'tester', 'namespace': namespace}}
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


class ApiServer:
    """KubeEmu served over HTTP on loopback from a background thread."""

    def __init__(self) -> None:
        self.emu = KubeEmu()
        self.emu.declare_builtins()  # the project's kinds are served once seed() installs their CRDs
        self.url = ''
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name='kube-api', daemon=True)
        self._error: BaseException | None = None

    def start(self) -> ApiServer:
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError(f'API server did not start: {self._error!r}')
        self.seed()
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emu, kmock.Server(self.emu) as server:
            self.url = str(server.url).rstrip('/')
            self._ready.set()
            await self._stop.wait()
            self.emu.closing = True
            await asyncio.sleep(BOOKMARK_GRACE)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (for direct reads of the store in assertions)."""
        assert self._loop is not None

        async def wrapped() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(30)

    def seed(self) -> None:
        """What a fresh cluster has: namespaces, and the project's CRDs installed."""

        def seed() -> None:
            namespaces = self.emu.kinds['v1/namespaces']
            for name in ('default', 'kube-system'):
                self.emu._create(namespaces, None, {'metadata': {'name': name}})
            crds = self.emu.kinds['apiextensions.k8s.io/v1/customresourcedefinitions']
            for path in sorted(CRD_DIR.glob('*.yaml')):
                self.emu._create(crds, None, yaml.safe_load(path.read_text()))

        self.call(seed)

    def objects(self, key: str) -> list[dict[str, Any]]:
        """A snapshot of every stored object of ``key`` (e.g. 'batch/v1/jobs')."""
        import copy

        return self.call(lambda: [copy.deepcopy(o) for o in self.emu.store[key].values()])


BOOKMARK_GRACE = 0.05


class OperatorRunner:
    """The project's Kopf operator in its own thread and loop (start, stop, start again)."""

    def __init__(self, server: ApiServer, config: Any):
        self.server = server
        self.config = config
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.errors: list[BaseException] = []

    def start(self, timeout: float = 30.0) -> OperatorRunner:
        import kopf

        import finetuner_operator.handlers  # noqa: F401  (registers the handlers once per process)

        self._stop = threading.Event()
        self._ready = threading.Event()
        emu = self.server.emu
        wanted = (f'{GROUP}/{VERSION}/finetuneruns', f'{GROUP}/{VERSION}/experiments', 'batch/v1/jobs', 'v1/pods')
        before = {key: emu.watch_starts.get(key, 0) for key in wanted}

        def target() -> None:
            try:
                asyncio.run(
                    kopf.operator(
                        clusterwide=True,
                        standalone=True,
                        stop_flag=self._stop,
                        ready_flag=self._ready,
                        memo=kopf.Memo(config=self.config),
                    )
                )
            except BaseException as e:
                self.errors.append(e)

        self._thread = threading.Thread(target=target, name='kopf-operator', daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f'operator not ready: {self.errors!r}')
        # Ready only once its watches are open (the ready flag is set before they are).
        wait_for(
            lambda: all(emu.watch_starts.get(key, 0) > count for key, count in before.items()),
            timeout,
            what='operator watches open',
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            if self._thread.is_alive():
                raise RuntimeError('operator did not stop within 30 s')
        self._thread = None

    def restart(self) -> OperatorRunner:
        self.stop()
        return self.start()


class ServerProcess:
    """The API server in its own process (``python -m tests.cluster.serve``), for benchmarks."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen(
            [sys.executable, '-m', 'tests.cluster.serve'],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if first[:1] != ['url']:
            self.process.kill()
            raise RuntimeError(f'the API server process did not start (it said {first!r})')
        self.url = first[1]
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask(self, command: str) -> Any:
        """One command of ``tests.cluster.serve`` and its JSON answer."""
        import json

        assert self.process.stdin is not None and self.process.stdout is not None
        with self._lock:
            self.process.stdin.write(command + '\n')
            self.process.stdin.flush()
            return json.loads(self.process.stdout.readline())

    def watch_starts(self) -> dict[str, int]:
        return self.ask('watch_starts')

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except Exception:
                self.process.kill()


def operator_env(config: Any) -> dict[str, str]:
    """``FINETUNER_*`` variables that make ``python -m finetuner_operator`` read ``config`` (as the chart does)."""
    import json

    env: dict[str, str] = {}
    for name, value in config.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list) and name == 'namespaces':
            text = ','.join(value)
        elif isinstance(value, (dict, list)):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f'FINETUNER_{name.upper()}'] = text
    return env


class OperatorProcess:
    """The operator as its own process (``python -m finetuner_operator``), with the interface of
    :class:`OperatorRunner`: its memory is its own, apart from the test's API server and node."""

    def __init__(self, server: ApiServer, config: Any, kubeconfig: Path, log: Path):
        self.server = server
        self.config = config
        self.kubeconfig = kubeconfig
        self.log = log
        self.process: Any = None
        self.errors: list[BaseException] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        import subprocess

        emu = self.server.emu
        wanted = (f'{GROUP}/{VERSION}/finetuneruns', f'{GROUP}/{VERSION}/experiments', 'batch/v1/jobs', 'v1/pods')
        before = {key: emu.watch_starts.get(key, 0) for key in wanted}
        env = {**os.environ, **operator_env(self.config), 'KUBECONFIG': str(self.kubeconfig)}
        env['FINETUNER_HEALTH_PORT'] = str(free_port())
        env.pop('KUBERNETES_SERVICE_HOST', None)
        argv, env = self.command(env)
        with self.log.open('ab') as sink:
            self.process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
        wait_for(
            lambda: (
                self.process.poll() is not None
                or all(emu.watch_starts.get(key, 0) > count for key, count in before.items())
            ),
            timeout,
            what='operator process watches open',
        )
        if self.process.poll() is not None:
            raise RuntimeError(f'the operator exited with {self.process.returncode}: {self.tail()}')
        return self

    def command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The operator's command line and environment."""
        return [sys.executable, '-m', 'finetuner_operator'], env

    def tail(self) -> str:
        return self.log.read_text(errors='replace')[-3000:] if self.log.exists() else ''

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            self.errors.append(RuntimeError(f'the operator did not stop within 30 s: {self.tail()}'))
            return
        if self.process.returncode != 0:
            self.errors.append(RuntimeError(f'the operator exited with {self.process.returncode}: {self.tail()}'))

    def restart(self) -> OperatorProcess:
        self.stop()
        return self.start()


class OperatorContainer(OperatorProcess):
    """The operator from its image (``podman run``), as the Helm chart runs it: its settings in
    FINETUNER_* variables, the object store's keys in AWS_* variables, a kubeconfig for the test's API
    server mounted read-only, the host's network (the API server and S3 listen on loopback)."""

    KUBECONFIG = '/etc/finetuner-test/kubeconfig'

    def __init__(self, server: ApiServer, config: Any, kubeconfig: Path, log: Path, image: str):
        super().__init__(server, config, kubeconfig, log)
        self.image = image
        self.name = f'kube-finetuner-operator-{os.getpid()}-{free_port()}'

    def command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        from tests.cluster.runtime import Podman

        podman = Podman()
        passed = sorted(k for k in env if k.startswith(('FINETUNER_', 'AWS_')))
        argv = [podman.binary, 'run', '--rm', '--name', self.name, '--network=host', '--pull=never']
        argv += ['-v', f'{self.kubeconfig}:{self.KUBECONFIG}:ro', '-e', f'KUBECONFIG={self.KUBECONFIG}']
        for key in passed:
            argv += ['-e', key]  # values from podman's own environment: never on a command line
        return [*argv, self.image], {**podman.env, **{k: env[k] for k in passed}}

    def stop(self) -> None:
        super().stop()  # SIGTERM to `podman run`, which passes it on to the operator
        from tests.cluster.runtime import Podman

        Podman().run(['rm', '--force', '--ignore', self.name])
