"""The console's web application: Starlette routes rendering Jinja2 templates, read-only.

Pages: ``/`` (runs, filtered by ``?experiment=`` and ``?phase=``), ``/runs/NAME``, ``/experiments`` and
``/experiments/NAME``. Each page has a fragment under ``/fragments/...`` that ``static/console.js``
fetches every ``refresh`` seconds to update the page in place while something can still change; the
pages work without script too (reload to update). Artifacts download from ``/runs/NAME/artifact/FILE``
and, zipped, from ``/runs/NAME/artifact.zip``.

Only GET (and HEAD) exist: nothing here can change a run. Errors are pages, never tracebacks: an
unknown run or experiment is a 404 naming it; a backend or object store that cannot be reached is a 503
naming the backend and the reason.
"""

from __future__ import annotations

import logging
import mimetypes
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from finetuner.api import layout
from finetuner.api.v1alpha1 import Phase, check_dns1123_name
from finetuner.backends.base import Backend
from finetuner.console import views
from finetuner.console.artifacts import chunks, zip_stream
from finetuner.errors import BackendError, ExperimentNotFoundError, RunNotFoundError
from finetuner.storage import StorageError, open_store

log = logging.getLogger('finetuner.console')
HERE = Path(__file__).parent

# No request leaves for another origin: scripts, styles and images come from the console itself;
# example pictures are inline data: URIs.
SECURITY_HEADERS = {
    'Content-Security-Policy': (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    'X-Frame-Options': 'DENY',
}


class BackendUnavailable(Exception):
    """The backend could not be created (bad kubeconfig, no cluster configuration)."""

    def __init__(self, description: str, reason: str):
        super().__init__(f'{description}: {reason}')
        self.description = description
        self.reason = reason


class BackendSource:
    """The backend the console reads, created on first use and again after a failure, so that a
    console started before its cluster was reachable recovers by itself."""

    def __init__(self, factory: Callable[[], Backend], description: str):
        self._factory = factory
        self._backend: Backend | None = None
        self.description = description

    @classmethod
    def of(cls, backend: Backend) -> BackendSource:
        source = cls(lambda: backend, describe_backend(backend))
        source._backend = backend
        return source

    def get(self) -> Backend:
        if self._backend is None:
            try:
                self._backend = self._factory()
            except Exception as e:  # the factory is the SDK's make_backend: a message a person can act on
                raise BackendUnavailable(self.description, str(e)) from e
            self.description = describe_backend(self._backend)
        return self._backend


def describe_backend(backend: Backend) -> str:
    if backend.name == 'kubernetes':
        client = getattr(backend, 'api_client', None)
        host = getattr(getattr(client, 'configuration', None), 'host', None) or 'unknown API server'
        return f'the kubernetes backend (namespace {getattr(backend, "namespace", "?")!r} at {host})'
    return f'the {backend.name} backend ({getattr(backend, "home", "")})'


class SecurityHeaders:
    """Pure ASGI middleware adding SECURITY_HEADERS to every response."""

    def __init__(self, app: Any):
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message['type'] == 'http.response.start':
                message['headers'] = [*message.get('headers', []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / 'templates'),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters['number'] = lambda v, digits=4: '' if v is None else f'{v:.{digits}f}'
    env.filters['signed'] = lambda v, digits=4: '' if v is None else f'{v:+.{digits}f}'
    env.filters['urlpath'] = lambda v: quote(str(v), safe='/')
    return Jinja2Templates(env=env)


class Console:
    """The routes' state: where runs come from and how pages refresh."""

    def __init__(self, source: BackendSource, refresh: float, log_lines: int):
        self.source = source
        self.refresh = refresh
        self.log_lines = log_lines
        self.templates = _templates()

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        context = {
            'backend': self.source.description,
            'refresh_ms': int(self.refresh * 1000),
            'phases': views.PHASES,
            **context,
        }
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    # --- pages ---------------------------------------------------------------------------------
    def _runs_context(self, request: Request) -> dict[str, Any]:
        experiment = request.query_params.get('experiment') or ''
        phase = request.query_params.get('phase') or ''
        if phase and phase not in views.PHASES:
            raise HTTPException(400, f'phase {phase!r} is not one of {", ".join(views.PHASES)}')
        if experiment:
            try:
                check_dns1123_name(experiment, 'experiment')
            except ValueError as e:
                raise HTTPException(400, str(e)) from e
        backend = self.source.get()
        query = urlencode({k: v for k, v in (('experiment', experiment), ('phase', phase)) if v})
        return {
            'rows': views.run_rows(backend, experiment or None, phase or None),
            'experiment': experiment,
            'phase': phase,
            'query': query,
        }

    def runs(self, request: Request) -> Response:
        context = self._runs_context(request)
        experiments = [e.name for e in self.source.get().list_experiments()]
        return self.render(request, 'runs.html', experiments=experiments, **context)

    def runs_fragment(self, request: Request) -> Response:
        return self.render(request, '_runs_table.html', **self._runs_context(request))

    def _name(self, request: Request, kind: type[RunNotFoundError | ExperimentNotFoundError]) -> str:
        """The name in the path; one that no run or experiment can have is simply not there."""
        name = request.path_params['name']
        try:
            check_dns1123_name(name, 'the name')
        except ValueError as e:
            raise kind(name, f'{self.source.description}: {e}') from e
        return name

    def _run_view(self, request: Request) -> views.RunView:
        return views.run_view(self.source.get(), self._name(request, RunNotFoundError), self.log_lines)

    def _experiment_view(self, request: Request) -> views.ExperimentView:
        return views.experiment_view(self.source.get(), self._name(request, ExperimentNotFoundError))

    def run(self, request: Request) -> Response:
        return self.render(request, 'run.html', view=self._run_view(request))

    def run_fragment(self, request: Request) -> Response:
        return self.render(request, '_run_live.html', view=self._run_view(request))

    def experiments(self, request: Request) -> Response:
        return self.render(request, 'experiments.html', rows=views.experiment_rows(self.source.get()))

    def experiment(self, request: Request) -> Response:
        return self.render(request, 'experiment.html', view=self._experiment_view(request))

    def experiment_fragment(self, request: Request) -> Response:
        return self.render(request, '_experiment_live.html', view=self._experiment_view(request))

    # --- artifact ------------------------------------------------------------------------------
    def _artifact(self, request: Request) -> tuple[Any, list[str]]:
        name = self._name(request, RunNotFoundError)
        record = self.source.get().get_run(name)
        reports = views.read_reports(record)
        if reports.error:
            raise BackendError(reports.error)
        if record.status.phase != Phase.FINISHED.value or not reports.artifact_files:
            raise HTTPException(404, f'run {name!r} has no artifact to download (it is {record.status.phase})')
        return open_store(record.status.output_uri or '').child(layout.ARTIFACT), reports.artifact_files

    def artifact_file(self, request: Request) -> Response:
        name, path = request.path_params['name'], request.path_params['path']
        store, files = self._artifact(request)
        if path not in files:  # only what the manifest lists: no other key of the bucket
            raise HTTPException(404, f'the artifact of run {name!r} has no file {path!r}')
        filename = posixpath.basename(path)
        media = mimetypes.guess_type(filename)[0] or 'application/octet-stream'
        disposition = {'Content-Disposition': f"attachment; filename*=UTF-8''{quote(filename)}"}
        return StreamingResponse(chunks(store, path), media_type=media, headers=disposition)

    def artifact_zip(self, request: Request) -> Response:
        name = request.path_params['name']
        store, files = self._artifact(request)
        headers = {'Content-Disposition': f"attachment; filename*=UTF-8''{quote(name)}-artifact.zip"}
        return StreamingResponse(zip_stream(store, files), media_type='application/zip', headers=headers)


def _error_handlers(console: Console) -> dict[Any, Callable[..., Any]]:
    def page(request: Request, status: int, title: str, message: str, **extra: Any) -> Response:
        return console.render(request, 'error.html', status_code=status, title=title, message=message, **extra)

    def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RunNotFoundError):
            return page(request, 404, f'No run named {exc.name!r}', str(exc), kind='run', missing=exc.name)
        if isinstance(exc, ExperimentNotFoundError):
            title = f'No experiment named {exc.name!r}'
            return page(request, 404, title, str(exc), kind='experiment', missing=exc.name)
        detail = getattr(exc, 'detail', '')
        if not detail or detail == 'Not Found':  # Starlette's own for a path no route matches
            detail = f'nothing at {request.url.path}'
        return page(request, 404, 'Not found', detail)

    def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return not_found(request, exc)
        if exc.status_code == 405:
            message = f'{request.method} is not allowed: the console is read-only (GET only).'
            return page(request, 405, 'Read-only', message)
        return page(request, exc.status_code, 'Bad request', str(exc.detail))

    def unreachable(request: Request, exc: Exception) -> Response:
        if isinstance(exc, BackendUnavailable):
            description, reason = exc.description, exc.reason
        else:
            description, reason = console.source.description, str(exc)
        log.warning('%s %s: %s is unreachable: %s', request.method, request.url.path, description, reason)
        return page(request, 503, 'The backend cannot be reached', reason, kind='backend', unreachable=description)

    def failure(request: Request, exc: Exception) -> Response:
        log.exception('%s %s failed', request.method, request.url.path)
        message = f'{type(exc).__name__}: {exc}. The console log has the details.'
        return page(request, 500, 'The console failed on this page', message)

    return {
        RunNotFoundError: not_found,
        ExperimentNotFoundError: not_found,
        HTTPException: http_error,
        BackendUnavailable: unreachable,
        BackendError: unreachable,
        StorageError: unreachable,
        Exception: failure,
    }


def create_app(
    backend: Backend | BackendSource,
    *,
    refresh: float = 2.0,
    log_lines: int = 200,
) -> Starlette:
    """The console for ``backend`` (or a :class:`BackendSource` that creates it on first use);
    ``refresh``: seconds between two updates of a page while something can change."""
    source = backend if isinstance(backend, BackendSource) else BackendSource.of(backend)
    console = Console(source, refresh, log_lines)
    routes = [
        Route('/', console.runs, name='runs'),
        Route('/runs', console.runs),
        Route('/runs/{name}', console.run, name='run'),
        Route('/runs/{name}/artifact.zip', console.artifact_zip, name='artifact_zip'),
        Route('/runs/{name}/artifact/{path:path}', console.artifact_file, name='artifact_file'),
        Route('/experiments', console.experiments, name='experiments'),
        Route('/experiments/{name}', console.experiment, name='experiment'),
        Route('/fragments/runs', console.runs_fragment),
        Route('/fragments/runs/{name}', console.run_fragment),
        Route('/fragments/experiments/{name}', console.experiment_fragment),
        Route('/healthz', lambda request: PlainTextResponse('ok')),
        Mount('/static', StaticFiles(directory=HERE / 'static'), name='static'),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers=_error_handlers(console),
        middleware=[Middleware(SecurityHeaders)],
    )
    app.state.console = console
    return app
