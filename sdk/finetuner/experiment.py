"""An experiment groups runs: ``finetuner.create_experiment('flickr')``; ``default`` always exists.

An experiment may carry a sweep: one run per point of a grid or random search over fit() arguments,
``parallelism`` of them at a time, and the best run by a metric::

    experiment = finetuner.create_experiment(
        'lr-sweep',
        run_template=dict(model='efficientnet_b0', train_data='train.csv', epochs=2),
        sweep={'parameters': {'learning_rate': [1e-5, 1e-4], 'loss': ['TripletMarginLoss', 'ArcFaceLoss']},
               'parallelism': 2},
        best_run={'metric': 'mrr', 'mode': 'max'},
    )
    experiment.wait()
    experiment.display()          # one row per run: its point, phase and metric; the best one marked
    best = experiment.best_run()  # a Run

On Kubernetes this creates the Experiment custom resource the operator reconciles; locally the local
backend creates the same runs (same names, ``<experiment>-000``, ...) through its queue.
"""

from __future__ import annotations

import difflib
import time
from typing import Any

from pydantic import ValidationError

from finetuner import fitting
from finetuner.api.v1alpha1 import (
    BestRunSelector,
    ExperimentSpec,
    ExperimentStatus,
    FinetuneRunSpec,
    Phase,
    Sweep,
    format_validation_error,
)
from finetuner.backends.base import Backend, ExperimentRecord, Reservation, delete_datasets
from finetuner.errors import ArgumentError, ExperimentNotFoundError, RunNotFoundError
from finetuner.run import Run
from finetuner.sweeps import best_run, sweep_points, sweep_run_name, sweep_run_spec

# Fields a sweep may vary, by their fit() name (snake_case) and wire name (camelCase).
_WIRE_NAMES = {name: info.alias or name for name, info in FinetuneRunSpec.model_fields.items()}
_SDK_NAMES = {wire: name for name, wire in _WIRE_NAMES.items()}
_NOT_SWEPT = ('train_data', 'eval_data', 'experiment', 'callbacks')  # data and grouping, not hyperparameters


class Experiment:
    def __init__(self, record: ExperimentRecord, backend: Backend) -> None:
        self._record = record
        self._backend = backend

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def description(self) -> str | None:
        return self._record.spec.description

    @property
    def spec(self) -> ExperimentSpec:
        """The experiment as created: its run template, sweep and how the best run is chosen."""
        return self._record.spec

    def __repr__(self) -> str:
        return f'Experiment(name={self.name!r}, runs={self._record.status.runs.total})'

    def status(self) -> ExperimentStatus:
        """Its runs counted by phase, the best run so far, and how many sweep points have runs."""
        self._record = self._backend.get_experiment(self.name)
        return self._record.status

    # --- runs ---------------------------------------------------------------------------------
    def list_runs(self, page: int | None = None, size: int | None = None) -> list[Run]:
        """Its runs, oldest first: all of them, or one page (Finetuner's ``page``, ``size``: at most 100)."""
        records = self._backend.list_runs(experiment=self.name)
        if page is not None or size is not None:
            from finetuner import _page

            first, last = _page(1 if page is None else page, 50 if size is None else size)
            records = records[first:last]
        return [Run(record, self._backend) for record in records]

    def runs(self) -> list[Run]:
        """Its runs, oldest first (a sweep's in the order of its points)."""
        order = {sweep_run_name(self.name, i): i for i in range(len(self.points()))}
        return sorted(self.list_runs(), key=lambda run: (order.get(run.name, len(order)), run.record.created_at or ''))

    def get_run(self, name: str) -> Run:
        record = self._backend.get_run(name)
        if record.spec.experiment != self.name:
            raise RunNotFoundError(name, f'experiment {self.name!r}')
        return Run(record, self._backend)

    def delete_run(self, name: str) -> None:
        self.get_run(name)
        self._backend.delete_run(name)

    def delete_runs(self) -> None:
        for run in self.list_runs():
            self._backend.delete_run(run.name)

    def create_run(self, *args: Any, **fit_arguments: Any) -> Run:
        """``finetuner.fit(...)`` with this experiment (the same arguments, in the same order)."""
        given = fitting.bind(args, fit_arguments)
        if given['experiment_name'] is not None and given['experiment_name'] != self.name:
            raise ArgumentError('experiment_name', f'is set by the experiment ({self.name!r}); leave it out')
        from finetuner import fit

        return fit(**{k: v for k, v in given.items() if v is not None}, experiment_name=self.name)

    def create_training_run(
        self,
        model: str,
        train_data: Any,
        run_name: str | None = None,
        eval_data: Any = None,
        csv_options: Any = None,
        **fit_arguments: Any,
    ) -> Run:
        """Finetuner's ``Experiment.create_training_run``: a run of this experiment; the other keyword
        arguments are fit()'s."""
        return self.create_run(
            model=model,
            train_data=train_data,
            run_name=run_name,
            eval_data=eval_data,
            csv_options=csv_options,
            **fit_arguments,
        )

    def create_synthesis_run(
        self, query_data: Any, corpus_data: Any, models: Any, num_relations: int = 3, **arguments: Any
    ) -> Run:
        """``finetuner.synthesize(...)`` with this experiment: a synthesis run whose ``train_data``
        feeds ``create_run(loss='MarginMSELoss', train_data=run.train_data, ...)``."""
        if 'experiment_name' in arguments and arguments['experiment_name'] != self.name:
            raise ArgumentError('experiment_name', f'is set by the experiment ({self.name!r}); leave it out')
        from finetuner.synthesis import synthesize

        return synthesize(query_data, corpus_data, models, num_relations, **{**arguments, 'experiment_name': self.name})

    # --- sweeps -------------------------------------------------------------------------------
    def points(self) -> list[dict[str, Any]]:
        """The sweep's points in order (fit() argument names), one run each; [] without a sweep."""
        sweep = self.spec.sweep
        if sweep is None:
            return []
        return [{_SDK_NAMES.get(k, k): v for k, v in point.items()} for point in sweep_points(sweep)]

    def best_run(self) -> Run | None:
        """The FINISHED run with the best ``metrics().after[metric]`` (``best_run`` of the spec, default:
        highest mrr); ties go to the first name. None while no run has finished with that metric."""
        runs = self.list_runs()
        best = best_run(
            ((r.name, r.record.status.phase, _after(r)) for r in runs),
            self.spec.best_run,
        )
        return next((r for r in runs if best is not None and r.name == best.name), None)

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> ExperimentStatus:
        """Block until every sweep point has a run and every run has ended; the final status.
        A TimeoutError says how many runs were still going."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = len(self.points())
        while True:
            status = self.status()
            going = status.runs.created + status.runs.started
            if going == 0 and status.sweep_created >= total and self._runs_ended():
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f'experiment {self.name!r}: {going} runs still going and {total - status.sweep_created} '
                    f'sweep points without a run after {timeout} s'
                )
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def _runs_ended(self) -> bool:
        """Whether every run reads ended from its own record: the experiment's counts are written by whoever
        reconciles it and can lag a run it has just created."""
        return all(run.record.status.phase in (Phase.FINISHED, Phase.FAILED) for run in self.list_runs())

    def rows(self) -> list[dict[str, Any]]:
        """The runs side by side as data, in :meth:`runs` order: ``name``, ``status``, ``parameters`` (the run's
        sweep point, fit() names), ``before`` and ``after`` (the best-run metric, None until measured) and
        ``best`` (whether it is :meth:`best_run`)."""
        metric = self.spec.best_run.metric
        best = self.best_run()
        points = {sweep_run_name(self.name, i): point for i, point in enumerate(self.points())}
        rows = []
        for run in self.runs():
            status = run.record.status
            metrics = status.metrics
            rows.append(
                {
                    'name': run.name,
                    'status': str(status.phase or Phase.CREATED.value),
                    'parameters': points.get(run.name, {}),
                    'before': metrics.before.get(metric) if metrics else None,
                    'after': metrics.after.get(metric) if metrics else None,
                    'best': best is not None and run.name == best.name,
                }
            )
        return rows

    def table(self) -> Any:
        """The runs side by side (a rich Table): each run's sweep point, phase and metric; the best marked."""
        from rich.table import Table

        selector = self.spec.best_run
        rows = self.rows()
        keys = sorted({k for point in self.points() for k in point})
        title = f'Experiment {self.name}'
        best = next((row for row in rows if row['best']), None)
        if best is not None:
            title += f': best run {best["name"]} ({selector.metric} {best["after"]:.4f}, {selector.mode})'
        table = Table(title=title)
        for column in ('run', 'status', *keys, f'{selector.metric} before', f'{selector.metric} after', 'best'):
            table.add_column(column, justify='right' if column.startswith(selector.metric) else 'left')
        for row in rows:
            table.add_row(
                row['name'],
                row['status'],
                *(_cell(row['parameters'].get(k)) for k in keys),
                '' if row['before'] is None else f'{row["before"]:.4f}',
                '' if row['after'] is None else f'{row["after"]:.4f}',
                '*' if row['best'] else '',
            )
        return table

    def display(self, console: Any = None) -> None:
        """Print :meth:`table` (on ``console``, a rich Console; without one, never cutting a run name)."""
        from finetuner.tables import print_whole

        print_whole(self.table(), console)


def _after(run: Run) -> dict[str, float] | None:
    metrics = run.record.status.metrics
    return metrics.after if metrics is not None else None


def _cell(value: Any) -> str:
    return '' if value is None else str(value)


# --- creating an experiment with a sweep ------------------------------------------------------------


def sweep_spec(sweep: Any) -> Sweep:
    """A :class:`Sweep` from one, or from a dict whose parameters are named as fit() names them."""
    if isinstance(sweep, Sweep):
        return sweep
    if not isinstance(sweep, dict):
        raise ArgumentError('sweep', f'must be a dict or a finetuner.api.v1alpha1.Sweep, got a {type(sweep).__name__}')
    parameters = sweep.get('parameters')
    if not isinstance(parameters, dict) or not parameters:
        raise ArgumentError(
            'sweep.parameters', "give the fit() arguments to vary and their values, e.g. {'epochs': [1, 2]}"
        )
    wire = {}
    for key, values in parameters.items():
        field = key if key in _WIRE_NAMES else _SDK_NAMES.get(key)
        if field is None or field in _NOT_SWEPT:
            close = difflib.get_close_matches(key, [n for n in _WIRE_NAMES if n not in _NOT_SWEPT], n=1)
            hint = f'did you mean {close[0]!r}?' if close else 'see help(finetuner.fit) for the arguments'
            raise ArgumentError(f'sweep.parameters.{key}', f'is not a fit() argument a sweep can vary; {hint}')
        if not isinstance(values, (list, tuple)) or not values:
            raise ArgumentError(f'sweep.parameters.{key}', f'give a non-empty list of values to try, got {values!r}')
        wire[_WIRE_NAMES[field]] = list(values)
    try:
        return Sweep.model_validate({**sweep, 'parameters': wire})
    except ValidationError as e:
        raise ArgumentError('sweep', format_validation_error(e)) from e


def best_run_selector(best: Any) -> BestRunSelector:
    """``'mrr'``, ``{'metric': 'val_loss', 'mode': 'min'}`` or a BestRunSelector (None: highest mrr)."""
    if best is None:
        return BestRunSelector()
    if isinstance(best, BestRunSelector):
        return best
    try:
        return BestRunSelector.model_validate({'metric': best} if isinstance(best, str) else best)
    except ValidationError as e:
        raise ArgumentError('best_run', format_validation_error(e)) from e


def run_template(backend: Backend, name: str, arguments: Any) -> tuple[dict[str, Any], Reservation, Any]:
    """The FinetuneRun spec (camelCase) a sweep's points are applied to, built from fit() arguments as
    fit() builds a run's spec; data given as documents or files is uploaded once, for every point.
    Returns (template, the datasets to upload, the upload plan)."""
    if not isinstance(arguments, dict):
        raise ArgumentError('run_template', f'must be a dict of fit() arguments, got a {type(arguments).__name__}')
    for own in ('run_name', 'experiment_name'):
        if arguments.get(own) is not None:
            raise ArgumentError(f'run_template.{own}', f'is set by the experiment (runs {name}-000, ...); leave it out')
    for required in ('model', 'train_data'):
        if arguments.get(required) is None:
            raise ArgumentError(f'run_template.{required}', f'is required: the {required} every sweep point trains')
    given = fitting.bind((), {**arguments, 'experiment_name': name})
    fitting.check_names(given)
    callbacks = fitting.callback_specs(given['callbacks'])
    spec = fitting.build_spec(given, name, name, callbacks)
    reservation = Reservation(name=name)
    spec, plan = fitting.plan_data(given, reservation, spec, callbacks, backend)
    return spec.model_dump(by_alias=True, exclude_defaults=True, mode='json'), reservation, plan


def create_sweep(
    backend: Backend,
    name: str,
    description: str | None,
    template_arguments: Any,
    sweep: Any,
    best: Any,
) -> Experiment:
    """Check everything, upload the template's data once, then create the experiment (see create_experiment)."""
    try:
        backend.get_experiment(name)
    except ExperimentNotFoundError:
        pass
    else:
        raise ArgumentError(
            'name',
            f'experiment {name!r} already exists; get it with finetuner.get_experiment({name!r}), or '
            f'delete_experiment({name!r}) first to run another sweep under this name',
        )
    if template_arguments is None:
        raise ArgumentError('run_template', 'is required with a sweep: the fit() arguments every point starts from')
    parsed_sweep = sweep_spec(sweep) if sweep is not None else None
    template, uploads, plan = run_template(backend, name, template_arguments)
    spec = experiment_spec(description, template, parsed_sweep, best_run_selector(best))
    plan.upload()
    try:
        record = backend.create_experiment(name, spec, uploads=uploads)
    except BaseException:
        delete_datasets(uploads.data_uri, uploads.datasets)
        raise
    if record.spec != spec:  # another process created it first
        delete_datasets(uploads.data_uri, uploads.datasets)
        raise ArgumentError('name', f'experiment {name!r} was just created by someone else; choose another name')
    return Experiment(record, backend)


def experiment_spec(
    description: str | None, template: dict[str, Any], sweep: Sweep | None, best: BestRunSelector
) -> ExperimentSpec:
    """The ExperimentSpec, every point checked against the contract before anything is uploaded."""
    try:
        spec = ExperimentSpec(description=description, run_template=template, sweep=sweep, best_run=best)
    except ValidationError as e:
        raise ArgumentError('description', format_validation_error(e)) from e
    for point in sweep_points(sweep) if sweep is not None else []:
        try:
            sweep_run_spec(template, point)
        except ValidationError as e:
            shown = {_SDK_NAMES.get(k, k): v for k, v in point.items()}
            first = e.errors()[0]
            where = '.'.join([_SDK_NAMES.get(str(first['loc'][0]), str(first['loc'][0])), *map(str, first['loc'][1:])])
            problem = first['msg'].removeprefix('Value error, ').replace('Input should be', 'must be')
            raise ArgumentError(
                'sweep.parameters', f'point {shown}: {where}: {problem} (got {first["input"]!r})'
            ) from e
    return spec
