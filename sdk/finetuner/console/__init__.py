"""The run console: a read-only web page of the runs and experiments of a backend.

``finetuner console`` serves it for the backend the SDK would use (``--backend``, ``--namespace`` and
the other login options choose another); the Helm chart can run it in the cluster
(``console.enabled``). Pages: runs (live), a run (status, Events, curves, metrics and example results
before and after, log tail, artifact downloads) and an experiment (runs side by side, the metric by
each swept parameter, the best run). See docs/CONSOLE.md.

It needs the ``console`` extra (``pip install 'kube-finetuner[console]'``: Starlette, Jinja2, uvicorn).
``import finetuner`` never imports this package, so the SDK stays light without it.
"""

from __future__ import annotations

import importlib.util

REQUIRED = ('starlette', 'jinja2', 'uvicorn')

# Every Kubernetes API call the console makes, as (API group, resource, verb): all of them reads. The Helm
# chart's console Role grants exactly these (tests/helm/test_chart_console.py), and tests/console checks
# that the console makes no other call against the test cluster.
API_CALLS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ('finetuner.dev', 'finetuneruns', 'get'),
        ('finetuner.dev', 'finetuneruns', 'list'),
        ('finetuner.dev', 'experiments', 'get'),
        ('finetuner.dev', 'experiments', 'list'),
        ('', 'events', 'list'),
        ('', 'pods', 'list'),
        ('', 'pods/log', 'get'),
    }
)
INSTALL_HINT = "pip install 'kube-finetuner[console]'"


def check_installed() -> None:
    """Raise MissingDependencyError naming the extra when a library of the console is missing."""
    from finetuner.models import MissingDependencyError

    missing = [name for name in REQUIRED if _find(name) is None]
    if missing:
        raise MissingDependencyError(f'the console needs {", ".join(missing)}, which is not installed: {INSTALL_HINT}')


def _find(name: str) -> object | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module set to None in sys.modules counts as missing
        return None
