"""finetuner: fine-tune embedding models on Kubernetes or on this machine.

::

    import finetuner
    run = finetuner.fit(model='efficientnet_b0', train_data=docs)
    print(run.name, run.status())

Without a cluster everything runs on this machine (the ``local`` backend); ``finetuner.login(
backend='kubernetes', ...)`` sends runs to a cluster instead. Importing this package loads
neither torch nor a Kubernetes client: those come with the backend or model that needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetuner import callbacks, fitting
from finetuner import experiment as _experiments
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import BestRunSelector, CSVOptions, ExperimentSpec, Sweep, check_dns1123_name
from finetuner.backends import current as _backend
from finetuner.backends import login as _login
from finetuner.backends.base import Backend
from finetuner.data import pull_records, push_records, resolve
from finetuner.errors import (
    ArgumentError,
    BackendError,
    ExperimentNotFoundError,
    FinetunerError,
    RunFailedError,
    RunNotFinishedError,
    RunNotFoundError,
)
from finetuner.experiment import Experiment
from finetuner.fitting import DEFAULT_EXPERIMENT
from finetuner.models import build_model, describe_models, encode, get_model, list_models
from finetuner.pretrained import cos_sim
from finetuner.run import Run

__version__ = '0.1.0'


def login(
    backend: str | None = None,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    in_cluster: bool | None = None,
    endpoint: str | None = None,
    bucket: str | None = None,
    prefix: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    home: str | Path | None = None,
    cpu_runs: int | None = None,
    gpus: list[int] | None = None,
) -> Backend:
    """Choose where runs go. Without arguments: the ``local`` backend (or ``FINETUNER_BACKEND``).

    - ``backend='kubernetes'``: ``kubeconfig`` / ``context`` / ``namespace``, or ``in_cluster=True``;
    - ``backend='local'``: runs are kept under ``home`` (default ``FINETUNER_HOME`` or ~/.cache/finetuner);
      they wait in a queue for a free GPU (one training per GPU) or CPU slot: ``cpu_runs`` sets how many
      train at once on the CPU (default 1), ``gpus`` which GPUs are given out (default all; ``[]`` none).
      Both are kept in ``home`` and apply to every process using it (see docs/LOCAL.md);
    - object store for data and models: ``bucket`` (and ``prefix``), ``endpoint`` for S3-compatible
      stores (MinIO, Ceph), credentials from the usual AWS variables or ``profile``, ``region``.
    """
    return _login(
        backend,
        kubeconfig=kubeconfig,
        context=context,
        namespace=namespace,
        in_cluster=in_cluster,
        endpoint=endpoint,
        bucket=bucket,
        prefix=prefix,
        profile=profile,
        region=region,
        home=home,
        cpu_runs=cpu_runs,
        gpus=gpus,
    )


# --- fit ----------------------------------------------------------------------------------------


def fit(*args: Any, **kwargs: Any) -> Run:
    # The signature and the docstring are generated from the contract (see finetuner.fitting).
    given = fitting.bind(args, kwargs)
    return fitting.fit(_backend(), given)


fit.__signature__ = fitting.signature()  # type: ignore[attr-defined]
fit.__doc__ = fitting.docstring(
    """Fine-tune ``model`` on ``train_data``; return the submitted :class:`Run` (phase CREATED).

    Every argument is checked before anything is uploaded or submitted; a mistake raises
    :class:`~finetuner.errors.ArgumentError` naming the argument. Data given as documents, files or
    folders is uploaded to the backend's object store; only its reference goes into the run. An
    argument left None takes the contract's default. Both generations of Finetuner arguments work:
    ``cpu=True`` or ``device='cpu'``; ``scheduler_step`` at the top level or inside ``scheduler_options``.
    """
)


# Finetuner's other names of fit(): the same function.
create_run = fit
create_training_run = fit


def list_callbacks() -> dict[str, type[Any]]:
    """The callback classes by name (``finetuner.callbacks``), as Finetuner's ``list_callbacks``."""
    return dict(callbacks.CALLBACK_CLASSES)


def list_model_options() -> dict[str, list[dict[str, Any]]]:
    """The ``model_options`` each backbone of the catalog takes, as Finetuner's ``list_model_options``:
    ``{name: [{'name', 'type', 'required', 'default', 'description', 'choices'}, ...]}``. The trainer
    refuses an option its model family does not take; an option left out takes its default."""
    from finetuner.catalog import BACKBONES, model_options_of

    return {
        backbone.name: [
            {
                'name': option.name,
                'type': option.type,
                'required': False,
                'default': option.default,
                'description': option.description,
                'choices': list(option.choices),
            }
            for option in model_options_of(backbone.family)
        ]
        for backbone in BACKBONES
    }


# --- runs ---------------------------------------------------------------------------------------


def _check_name(name: Any, argument: str) -> str:
    try:
        return check_dns1123_name(name, argument)
    except ValueError as e:
        raise ArgumentError(argument, str(e).removeprefix(f'{argument} ')) from e


def get_run(run_name: str, experiment_name: str | None = None) -> Run:
    """The run named ``run_name`` (RunNotFoundError when there is none)."""
    _check_name(run_name, 'run_name')
    if experiment_name is not None:
        return get_experiment(experiment_name).get_run(run_name)
    return Run(_backend().get_run(run_name), _backend())


def list_runs(experiment_name: str | None = None, page: int = 1, size: int = 50) -> list[Run]:
    """The runs of every experiment, or of one, oldest first, a page at a time (as Finetuner's):
    ``page`` 1 with ``size`` 50 gives the first 50 runs, page 2 the next 50; ``size`` is at most 100."""
    if experiment_name is not None:
        _check_name(experiment_name, 'experiment_name')
    first, last = _page(page, size)
    backend = _backend()
    return [Run(record, backend) for record in backend.list_runs(experiment=experiment_name)[first:last]]


def _page(page: Any, size: Any) -> tuple[int, int]:
    """The slice of a listing that ``page`` (from 1) of ``size`` items (1 to 100, as Finetuner's) is."""
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ArgumentError('page', f'must be a page number from 1, got {page!r}')
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PAGE_SIZE:
        raise ArgumentError('size', f'must be from 1 to {MAX_PAGE_SIZE} items per page, got {size!r}')
    return (page - 1) * size, page * size


MAX_PAGE_SIZE = 100


def delete_run(run_name: str, experiment_name: str | None = None) -> None:
    """Delete the run, stopping it first when it is still going, and the data uploaded for it alone."""
    _check_name(run_name, 'run_name')
    if experiment_name is not None:
        get_experiment(experiment_name).get_run(run_name)
    _backend().delete_run(run_name)


def delete_runs(experiment_name: str | None = None) -> None:
    """Delete every run (of one experiment, when named)."""
    if experiment_name is not None:
        _check_name(experiment_name, 'experiment_name')
    backend = _backend()
    for record in backend.list_runs(experiment=experiment_name):
        backend.delete_run(record.name)


# --- experiments --------------------------------------------------------------------------------


def create_experiment(
    name: str = DEFAULT_EXPERIMENT,
    description: str | None = None,
    *,
    run_template: dict[str, Any] | None = None,
    sweep: dict[str, Any] | Sweep | None = None,
    best_run: str | dict[str, Any] | BestRunSelector | None = None,
) -> Experiment:
    """Get or create the experiment ``name``; with ``sweep``, create it with one run per sweep point.

    Args:
        name: The experiment's name (a DNS-1123 label).
        description: Free text.
        run_template: fit() arguments every sweep point starts from (model, train_data, epochs, ...); data
            given as documents or files is uploaded once. Required with ``sweep``.
        sweep: ``{'parameters': {'learning_rate': [1e-5, 1e-4], ...}, 'kind': 'grid' | 'random',
            'count': N (random), 'seed': 0, 'parallelism': 1}``; parameters are named as fit() names
            them. Each point becomes a run ``<name>-000``, ``<name>-001``, ..., ``parallelism`` at a time.
        best_run: the metric of ``run.metrics().after`` that ranks runs (``'mrr'``), or
            ``{'metric': 'val_loss', 'mode': 'min'}``. Default: highest mrr.

    Returns:
        The :class:`Experiment` (``runs()``, ``best_run()``, ``display()``, ``wait()``).

    Raises:
        ArgumentError: a bad argument, a sweep point the contract refuses, or (with a sweep) an experiment
            of that name that exists already; nothing was uploaded or created.
    """
    _check_name(name, 'name')
    backend = _backend()
    if run_template is not None or sweep is not None or best_run is not None:
        return _experiments.create_sweep(backend, name, description, run_template, sweep, best_run)
    try:
        spec = ExperimentSpec(description=description)
    except ValidationError as e:
        raise ArgumentError('description', e.errors()[0]['msg']) from e
    return Experiment(backend.create_experiment(name, spec), backend)


def sweep(
    name: str,
    *,
    grid: dict[str, list[Any]] | None = None,
    random: dict[str, list[Any]] | None = None,
    count: int | None = None,
    seed: int = 0,
    parallelism: int = 1,
    metric: str = 'mrr',
    mode: str = 'max',
    description: str | None = None,
    **fit_arguments: Any,
) -> Experiment:
    """A sweep in one call: ``finetuner.sweep('lr', grid={'learning_rate': [1e-5, 1e-4]}, model=..., train_data=...)``.

    ``grid``: every combination of the values; ``random``: ``count`` combinations drawn with ``seed``.
    ``parallelism`` runs at a time; the best run has the best ``metric`` (``mode`` max or min). The other
    keyword arguments are fit()'s, the run template. See :func:`create_experiment`.
    """
    if (grid is None) == (random is None):
        raise ArgumentError('grid', 'give grid={...} (every combination) or random={...} with count=N, not both')
    chosen = {
        'kind': 'grid' if grid is not None else 'random',
        'parameters': grid if grid is not None else random,
        'count': count,
        'seed': seed,
        'parallelism': parallelism,
    }
    return create_experiment(
        name,
        description,
        run_template=fit_arguments,
        sweep=chosen,
        best_run={'metric': metric, 'mode': mode},
    )


def get_experiment(name: str) -> Experiment:
    _check_name(name, 'name')
    backend = _backend()
    return Experiment(backend.get_experiment(name), backend)


def list_experiments(page: int = 1, size: int = 50) -> list[Experiment]:
    """The experiments by name, a page at a time (as Finetuner's): ``page`` from 1, ``size`` at most 100."""
    first, last = _page(page, size)
    backend = _backend()
    return [Experiment(record, backend) for record in backend.list_experiments()[first:last]]


def delete_experiment(name: str) -> None:
    """Delete the experiment and every run in it."""
    _check_name(name, 'name')
    _backend().delete_experiment(name)


def delete_experiments() -> None:
    """Delete every experiment and its runs."""
    backend = _backend()
    for record in backend.list_experiments():
        backend.delete_experiment(record.name)


# --- datasets -----------------------------------------------------------------------------------


def push_data(name: str, data: Any, csv_options: dict[str, Any] | None = None) -> str:
    """Store ``data`` (documents, a CSV/JSONL path or an image folder) as the dataset ``name``.

    Later runs refer to it by name: ``fit(train_data=name)``. Returns the name.
    """
    try:
        check_dns1123_name(name, 'name', max_len=63)
    except ValueError as e:
        raise ArgumentError('name', str(e).removeprefix('name ')) from e
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str) and not Path(data).expanduser().exists():
        raise ArgumentError('data', f'no file or folder {data!r}; push documents or a local path')
    ref = resolve(data, 'data', csv_options=CSVOptions.model_validate(csv_options or {}))
    if not ref.needs_upload:
        raise ArgumentError('data', 'is already a reference; push documents, a file or a folder')
    assert ref.records is not None
    return push_records(_backend().data_store(), name, ref.records)


def pull_data(name: str, as_documents: bool = False) -> Any:
    """The records of dataset ``name`` (``as_documents=True``: a docarray ``DocList[LegacyDocument]``)."""
    records = pull_records(_backend().data_store(), _check_name(name, 'name'))
    if as_documents:
        from finetuner.data import to_legacy_documents

        return to_legacy_documents(records)
    return records


__all__ = [
    'ArgumentError',
    'BackendError',
    'Experiment',
    'ExperimentNotFoundError',
    'FinetunerError',
    'Record',
    'Run',
    'RunFailedError',
    'RunNotFinishedError',
    'RunNotFoundError',
    'build_model',
    'callbacks',
    'cos_sim',
    'create_experiment',
    'create_run',
    'create_training_run',
    'delete_experiment',
    'delete_experiments',
    'delete_run',
    'delete_runs',
    'describe_models',
    'encode',
    'fit',
    'get_experiment',
    'get_model',
    'get_run',
    'list_callbacks',
    'list_experiments',
    'list_model_options',
    'list_models',
    'list_runs',
    'login',
    'pull_data',
    'push_data',
    'sweep',
]
