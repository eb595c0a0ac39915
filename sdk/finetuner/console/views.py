"""What the console's pages show, read from a backend: plain typed views, no web framework here.

Every view is rebuilt from the backend and the run's output location on each request (status from
the cluster or the local run folder; curves, metrics and examples from what the trainer wrote), so a
console that restarts, or runs as several replicas, shows the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml

from finetuner.api import layout
from finetuner.api.v1alpha1 import BestRun, BestRunSelector, Condition, Phase
from finetuner.backends.base import Backend, ExperimentRecord, RunRecord
from finetuner.console import charts
from finetuner.console.events import EventRow, run_events
from finetuner.errors import BackendError, FinetunerError, RunNotFinishedError
from finetuner.run import ExampleQuery, ExampleResults
from finetuner.storage import StorageError, open_store
from finetuner.sweeps import sweep_points, sweep_run_name

PHASES: tuple[str, ...] = tuple(p.value for p in Phase)
# Metrics drawn by epoch and shown side by side in an experiment, in this order when present.
MAIN_METRICS = ('mrr', 'map', 'ndcg_at_k', 'precision_at_k', 'recall_at_k', 'hit_at_k')
# Spec fields that differ between runs without being a choice worth charting.
NOT_PARAMETERS = frozenset({'description', 'experiment', 'trainData', 'evalData', 'output'})


def age(created_at: str | None, now: datetime | None = None) -> str:
    """kubectl's style: 45s, 12m, 3h, 5d."""
    if not created_at:
        return ''
    try:
        created = datetime.fromisoformat(created_at.replace('Z', '+00:00'))
    except ValueError:
        return ''
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    seconds = max(0, int(((now or datetime.now(timezone.utc)) - created).total_seconds()))
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= size:
            return f'{seconds // size}{unit}'
    return f'{seconds}s'


@dataclass(frozen=True)
class RunRow:
    """One line of the runs page."""

    name: str
    experiment: str
    model: str
    phase: str
    details: str
    percent: float | None
    epoch: str
    loss: float | None
    created_at: str
    age: str

    @property
    def terminal(self) -> bool:
        return Phase(self.phase).terminal


def run_row(record: RunRecord, now: datetime | None = None) -> RunRow:
    status = record.status
    progress = status.progress
    phase = str(status.phase or Phase.CREATED.value)
    finished = phase == Phase.FINISHED.value
    return RunRow(
        name=record.name,
        experiment=record.spec.experiment,
        model=record.spec.model,
        phase=phase,
        details=status.details or '',
        percent=100.0 if finished else (progress.percent if progress else None),
        epoch=f'{progress.epoch}/{progress.epochs}' if progress and progress.epochs else '',
        loss=progress.loss if progress else None,
        created_at=record.created_at or '',
        age=age(record.created_at, now),
    )


def run_rows(backend: Backend, experiment: str | None = None, phase: str | None = None) -> list[RunRow]:
    """Newest first, filtered by experiment and phase."""
    records = backend.list_runs(experiment=experiment or None)
    rows = [run_row(r) for r in records]
    if phase:
        rows = [r for r in rows if r.phase == phase]
    return sorted(rows, key=lambda r: (r.created_at, r.name), reverse=True)


# --- a run -------------------------------------------------------------------------------------


@dataclass
class Reports:
    """What the trainer wrote in the run's output location (empty while it has written nothing)."""

    points: list[dict[str, Any]] = field(default_factory=list)  # progress_history.json
    epochs: list[dict[str, Any]] = field(default_factory=list)  # metrics.json "epochs"
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    examples: ExampleResults = field(default_factory=ExampleResults)
    artifact_files: list[str] = field(default_factory=list)  # artifact/manifest.json "files"
    error: str | None = None  # the store could not be read


def _read(store: Any, key: str) -> Any:
    try:
        return store.read_json_or_none(key)
    except ValueError:  # a report being rewritten or torn: the next poll reads it whole
        return None


def read_reports(record: RunRecord) -> Reports:
    if not record.status.output_uri:
        return Reports()
    try:
        store = open_store(record.status.output_uri)
        history, metrics, examples = (
            _read(store, k) for k in (layout.PROGRESS_HISTORY, layout.METRICS, layout.EXAMPLES)
        )
        manifest = _read(store, layout.ARTIFACT_MANIFEST)
    except StorageError as e:
        return Reports(error=f'cannot read {record.status.output_uri}: {e}')
    reports = Reports()
    if isinstance(history, dict) and isinstance(history.get('points'), list):
        reports.points = [p for p in history['points'] if isinstance(p, dict) and _number(p.get('loss'))]
    if isinstance(metrics, dict):
        reports.epochs = [e for e in metrics.get('epochs') or [] if isinstance(e, dict)]
        reports.before = _numbers(metrics.get('before'))
        reports.after = _numbers(metrics.get('after'))
    if record.status.metrics is not None:  # the status is what the operator vouches for
        reports.before = record.status.metrics.before or reports.before
        reports.after = record.status.metrics.after or reports.after
    reports.examples = ExampleResults.from_reports(examples, metrics)
    if isinstance(manifest, dict):
        files = manifest.get('files') or {}
        reports.artifact_files = sorted(str(f) for f in files)
    return reports


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _numbers(raw: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in raw.items() if _number(v)} if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class MetricRow:
    name: str
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


@dataclass
class RunView:
    record: RunRecord
    row: RunRow
    spec_yaml: str
    conditions: list[Condition]
    events: list[EventRow]
    events_error: str | None
    reports: Reports
    metrics: list[MetricRow]
    charts: list[Any]  # Markup SVGs
    log_tail: str
    log_note: str | None

    @property
    def terminal(self) -> bool:
        return self.row.terminal

    @property
    def example_pairs(self) -> list[tuple[ExampleQuery | None, ExampleQuery | None]]:
        """(before, after) of each example query; the trainer lists the same queries in both."""
        before, after = self.reports.examples.before, self.reports.examples.after
        return [
            (before[i] if i < len(before) else None, after[i] if i < len(after) else None)
            for i in range(max(len(before), len(after)))
        ]


def metric_rows(reports: Reports) -> list[MetricRow]:
    names = sorted(set(reports.before) | set(reports.after))
    return [MetricRow(n, reports.before.get(n), reports.after.get(n)) for n in names]


def run_charts(reports: Reports) -> list[Any]:
    """Training loss by step; losses by epoch; retrieval metrics by epoch (epoch 0: before fine-tuning)."""
    step_loss = charts.Series('train loss', [(float(p['step']), float(p['loss'])) for p in reports.points])
    drawn = [
        charts.chart(
            [step_loss],
            title='Training loss (running mean of the epoch)',
            x=charts.Axis('step', integer=True),
            y_label='loss',
        )
    ]
    epoch_losses = [
        charts.Series(name, [(float(e['epoch']), float(e[name])) for e in reports.epochs if _number(e.get(name))])
        for name in ('train_loss', 'val_loss')
    ]
    if any(s.points for s in epoch_losses):
        drawn.append(
            charts.chart(epoch_losses, title='Loss by epoch', x=charts.Axis('epoch', integer=True), y_label='loss')
        )
    names = [m for m in MAIN_METRICS if m in reports.before or any(m in e for e in reports.epochs)]
    metric_series = []
    for name in names:
        points = [(0.0, reports.before[name])] if name in reports.before else []
        points += [(float(e['epoch']), float(e[name])) for e in reports.epochs if _number(e.get(name))]
        metric_series.append(charts.Series(name, points))
    if metric_series:
        drawn.append(
            charts.chart(
                metric_series,
                title='Retrieval metrics by epoch (0 = before fine-tuning)',
                x=charts.Axis('epoch', integer=True),
                y_label='value',
            )
        )
    return drawn


def log_tail(backend: Backend, name: str, lines: int) -> tuple[str, str | None]:
    """The last ``lines`` lines of the trainer's log, and a note when there is none (yet)."""
    try:
        text = backend.logs(name)
    except RunNotFinishedError as e:
        return '', str(e)
    except FinetunerError as e:
        return '', f'cannot read the log: {e}'
    tail = text.splitlines()[-lines:]
    return '\n'.join(tail), None if tail else 'the trainer has written no log yet'


def run_view(backend: Backend, name: str, log_lines: int = 200) -> RunView:
    """Everything the run page shows. RunNotFoundError for an unknown run; BackendError when the
    backend cannot be reached (parts that cannot be read on their own, like Events, carry a note)."""
    record = backend.get_run(name)
    try:
        events, events_error = run_events(backend, record), None
    except BackendError as e:
        events, events_error = [], str(e)
    reports = read_reports(record)
    tail, note = log_tail(backend, name, log_lines)
    return RunView(
        record=record,
        row=run_row(record),
        spec_yaml=yaml.safe_dump(record.spec.to_k8s(), sort_keys=False, allow_unicode=True),
        conditions=list(record.status.conditions),
        events=events,
        events_error=events_error,
        reports=reports,
        metrics=metric_rows(reports),
        charts=run_charts(reports),
        log_tail=tail,
        log_note=note,
    )


# --- an experiment -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentRunRow:
    row: RunRow
    parameters: dict[str, str]
    metrics: dict[str, float]
    best: bool


@dataclass
class ExperimentView:
    record: ExperimentRecord
    runs: list[ExperimentRunRow]
    parameters: list[str]
    swept: bool  # parameters come from spec.sweep (else: the spec fields that differ between runs)
    selector: BestRunSelector
    best: BestRun | None
    metric_names: list[str]
    charts: list[tuple[str, Any]]  # (parameter, Markup SVG)

    @property
    def sweep_points(self) -> int | None:
        """How many runs the sweep makes in all (None without a sweep)."""
        sweep = self.record.spec.sweep
        return len(sweep_points(sweep)) if sweep is not None else None

    @property
    def sweep_created(self) -> int:
        """Sweep points the backend (the operator, or the local queue) has turned into runs so far."""
        return self.record.status.sweep_created

    @property
    def other_runs(self) -> int:
        """Runs of the experiment that are not one of its sweep's points (fit(experiment_name=...))."""
        points = self.sweep_points or 0
        names = {sweep_run_name(self.record.name, i) for i in range(points)}
        return sum(1 for r in self.runs if r.row.name not in names)


def best_run(runs: list[RunRecord], selector: BestRunSelector) -> BestRun | None:
    """The finished run with the best ``metrics.after[metric]``; ties go to the first name (as the operator)."""
    candidates = [
        (float(r.status.metrics.after[selector.metric]), r.name)
        for r in runs
        if r.status.phase == Phase.FINISHED.value
        and r.status.metrics is not None
        and _number(r.status.metrics.after.get(selector.metric))
    ]
    if not candidates:
        return None
    sign = -1.0 if selector.mode == 'max' else 1.0
    value, name = min(candidates, key=lambda c: (sign * c[0], c[1]))
    return BestRun(name=name, metric=selector.metric, value=value)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def experiment_parameters(record: ExperimentRecord, runs: list[RunRecord]) -> tuple[list[str], bool]:
    """The swept spec fields, or else the fields whose values differ between the runs."""
    if record.spec.sweep is not None:
        return sorted(record.spec.sweep.parameters), True
    specs = [r.spec.to_k8s() for r in runs]
    keys = sorted({k for s in specs for k in s} - NOT_PARAMETERS)
    return [k for k in keys if len({_shown(s.get(k)) for s in specs}) > 1], False


def _parameter_chart(parameter: str, runs: list[ExperimentRunRow], metric: str, best: str | None) -> Any:
    measured = [(r.parameters.get(parameter, ''), r.metrics[metric], r.row.name) for r in runs if metric in r.metrics]
    values = [v for v, _, _ in measured]
    numeric = all(_is_float(v) for v in values) and bool(values)
    highlight = None
    if numeric:
        points = [(float(v), m) for v, m, _ in measured]
        positive = all(x > 0 for x, _ in points)
        spread = max(x for x, _ in points) / min(x for x, _ in points) if positive else 0
        axis = charts.Axis(parameter, log=positive and spread >= 100)
    else:
        categories = sorted(set(values))
        points = [(float(categories.index(v)), m) for v, m, _ in measured]
        axis = charts.Axis(parameter, categories=categories)
    for (x, y), (_, _, name) in zip(points, measured, strict=True):
        if name == best:
            highlight = (x, y)
    title = f'{metric} after fine-tuning by {parameter}'
    return charts.chart(
        [charts.Series(metric, points)], title=title, x=axis, y_label=metric, lines=False, highlight=highlight
    )


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def experiment_view(backend: Backend, name: str) -> ExperimentView:
    record = backend.get_experiment(name)
    runs = sorted(backend.list_runs(experiment=name), key=lambda r: r.name)
    selector = record.spec.best_run
    best = record.status.best_run or best_run(runs, selector)
    parameters, swept = experiment_parameters(record, runs)
    rows = []
    for run in runs:
        spec = run.spec.to_k8s()
        after = dict(run.status.metrics.after) if run.status.metrics is not None else {}
        rows.append(
            ExperimentRunRow(
                row=run_row(run),
                parameters={p: _shown(spec.get(p)) for p in parameters},
                metrics={k: float(v) for k, v in after.items() if _number(v)},
                best=best is not None and best.name == run.name,
            )
        )
    present = {m for r in rows for m in r.metrics}
    metric_names = [m for m in (selector.metric, *MAIN_METRICS) if m in present]
    metric_names = list(dict.fromkeys(metric_names))
    drawn = [(p, _parameter_chart(p, rows, selector.metric, best.name if best else None)) for p in parameters]
    return ExperimentView(record, rows, parameters, swept, selector, best, metric_names, drawn)


@dataclass(frozen=True)
class ExperimentRow:
    name: str
    description: str
    total: int
    counts: dict[str, int]
    best: BestRun | None
    age: str


def experiment_rows(backend: Backend) -> list[ExperimentRow]:
    rows = []
    for record in backend.list_experiments():
        runs = record.status.runs
        best = record.status.best_run
        if best is None and runs.finished:
            best = best_run(backend.list_runs(experiment=record.name), record.spec.best_run)
        counts = {'CREATED': runs.created, 'STARTED': runs.started, 'FINISHED': runs.finished, 'FAILED': runs.failed}
        rows.append(
            ExperimentRow(record.name, record.spec.description or '', runs.total, counts, best, age(record.created_at))
        )
    return rows
