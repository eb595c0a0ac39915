"""The console's views without a server: charts, ages, best runs, swept parameters, example results."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Any

import pytest

from finetuner.api.v1alpha1 import (
    BestRunSelector,
    ExperimentSpec,
    ExperimentStatus,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
    RunCounts,
    RunMetrics,
)
from finetuner.backends.base import ExperimentRecord, RunRecord
from finetuner.run import ExampleResults

pytest.importorskip('jinja2', reason="the console extra is not installed: pip install 'kube-finetuner[console]'")

from finetuner.console import charts, views
from finetuner.console.events import phase_events

SVG = '{http://www.w3.org/2000/svg}'


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # the charts are well-formed XML, not only HTML


def drawn_series(svg: str) -> dict[str, int]:
    return {g.get('data-name'): int(g.get('data-points')) for g in parse(svg).iter(f'{SVG}g') if g.get('data-name')}


def test_age_reads_like_kubectl() -> None:
    now = datetime(2026, 1, 2, 12, 0, 0, tzinfo=timezone.utc)
    assert views.age('2026-01-02T11:59:15Z', now) == '45s'
    assert views.age('2026-01-02T11:47:59.123Z', now) == '12m'
    assert views.age('2026-01-02T09:00:00+00:00', now) == '3h'
    assert views.age('2025-12-28T12:00:00Z', now) == '5d'
    assert views.age('2026-01-02T12:00:30Z', now) == '0s'  # a clock a little ahead is not negative
    assert views.age(None, now) == '' and views.age('yesterday', now) == ''


def test_ticks_are_round_and_cover_the_range() -> None:
    assert charts.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(0.31, 0.74) == [0.4, 0.5, 0.6, 0.7]
    assert charts.nice_ticks(1, 3, integer=True) == [1.0, 2.0, 3.0]  # never 1.5 epochs
    assert charts.format_number(0.0001) == '1.0e-04' and charts.format_number(0.25) == '0.25'


def test_a_chart_is_svg_with_every_point_and_escaped_names() -> None:
    svg = charts.chart(
        [charts.Series('loss <train>', [(1, 0.9), (2, 0.5), (3, 0.4)]), charts.Series('val', [(1, 1.0)])],
        title='Loss & more',
        x=charts.Axis('step', integer=True),
        y_label='loss',
    )
    root = parse(svg)
    assert root.get('aria-label') == 'Loss & more'
    assert drawn_series(svg) == {'loss <train>': 3, 'val': 1}
    assert len(list(root.iter(f'{SVG}polyline'))) == 1  # one line; a single point is only a dot
    tips = [t.text for t in root.iter(f'{SVG}title')]
    assert 'loss <train>: 0.5 at 2' in tips
    legend = [t.text for t in root.iter(f'{SVG}text') if t.get('class') == 'legend-label']
    assert legend == ['loss <train>', 'val']


def test_empty_log_and_category_charts() -> None:
    empty = parse(charts.chart([charts.Series('loss', [])], title='Loss'))
    assert [t.text for t in empty.iter(f'{SVG}text') if t.get('class') == 'chart-empty'] == ['no data yet']
    log = parse(charts.chart([charts.Series('mrr', [(1e-5, 0.2), (1e-3, 0.5)])], title='t', x=charts.Axis(log=True)))
    assert [t.text for t in log.iter(f'{SVG}text') if t.get('class') == 'tick'][-3:] == ['1.0e-05', '1.0e-04', '0.001']
    axis = charts.Axis('loss', categories=['ArcFaceLoss', 'TripletMarginLoss'])
    named = parse(charts.chart([charts.Series('mrr', [(0, 0.3), (1, 0.6)])], title='t', x=axis, lines=False))
    ticks = [t.text for t in named.iter(f'{SVG}text') if t.get('class') == 'tick']
    assert ticks[-2:] == ['ArcFaceLoss', 'TripletMarginLoss']
    assert not list(named.iter(f'{SVG}polyline'))  # points only


def record(name: str, phase: str, mrr: float | None = None, **spec: Any) -> RunRecord:
    metrics = RunMetrics(before={'mrr': 0.1}, after={'mrr': mrr}) if mrr is not None else None
    return RunRecord(
        name=name,
        namespace='local',
        spec=FinetuneRunSpec(model='m', train_data='d', **spec),
        status=FinetuneRunStatus(phase=phase, metrics=metrics),
        created_at='2026-01-01T00:00:00Z',
    )


@pytest.mark.parametrize('mode', ['max', 'min'])
def test_the_best_run_is_the_one_the_operator_picks(mode: str) -> None:
    """The operator's own choice (finetuner_operator.experiments.best_run) is the oracle: the console
    computes the best run itself only where no operator does (the local backend)."""
    experiments = pytest.importorskip('finetuner_operator.experiments')
    runs = [
        record('b-tied', 'FINISHED', 0.7),
        record('a-tied', 'FINISHED', 0.7),
        record('low', 'FINISHED', 0.2),
        record('running', 'STARTED', 0.99),
        record('failed', 'FAILED', 0.0),
        record('no-metrics', 'FINISHED'),
    ]
    selector = BestRunSelector(metric='mrr', mode=mode)
    bodies = [{'metadata': {'name': r.name}, 'status': r.status.to_k8s()} for r in runs]
    assert views.best_run(runs, selector) == experiments.best_run(bodies, selector)
    assert views.best_run(runs, selector).name == ('a-tied' if mode == 'max' else 'low')
    assert views.best_run([record('x', 'STARTED', 0.5)], selector) is None


def test_parameters_are_the_sweep_or_what_differs_between_runs() -> None:
    runs = [
        record('r1', 'FINISHED', 0.5, learning_rate=1e-4, description='first', loss='TripletMarginLoss'),
        record('r2', 'FINISHED', 0.6, learning_rate=1e-3, description='second', loss='TripletMarginLoss'),
    ]
    plain = ExperimentRecord(name='e', namespace='local')
    assert views.experiment_parameters(plain, runs) == (['learningRate'], False)  # description is no parameter
    sweep = ExperimentSpec.model_validate(
        {'runTemplate': {'model': 'm', 'trainData': 'd'}, 'sweep': {'parameters': {'loss': ['A', 'B'], 'epochs': [1]}}}
    )
    swept = ExperimentRecord(name='e', namespace='local', spec=sweep)
    assert views.experiment_parameters(swept, runs) == (['epochs', 'loss'], True)


def test_a_sweep_counts_its_points_runs_and_the_experiment_s_other_runs() -> None:
    """N of M: N is what the backend says it created (status.sweepCreated), M the points of
    finetuner.sweeps (a random sweep draws ``count``); runs joined by hand are counted apart."""
    spec = ExperimentSpec.model_validate(
        {
            'runTemplate': {'model': 'm', 'trainData': 'd'},
            'sweep': {'parameters': {'loss': ['A', 'B'], 'epochs': [1, 2, 3]}, 'kind': 'random', 'count': 4},
        }
    )
    experiment = ExperimentRecord(
        name='e', namespace='local', spec=spec, status=ExperimentStatus(sweep_created=2, runs=RunCounts(total=3))
    )
    runs = [record('e-000', 'FINISHED', 0.5), record('e-001', 'STARTED'), record('by-hand', 'FINISHED', 0.9)]
    rows = [views.ExperimentRunRow(views.run_row(r), {}, {}, False) for r in runs]
    view = views.ExperimentView(experiment, rows, ['epochs', 'loss'], True, BestRunSelector(), None, [], [])
    assert (view.sweep_created, view.sweep_points, view.other_runs) == (2, 4, 1)
    grid = spec.model_copy(update={'sweep': spec.sweep.model_copy(update={'kind': 'grid', 'count': None})})
    plain = views.ExperimentView(
        experiment.model_copy(update={'spec': grid}), rows[:2], [], True, BestRunSelector(), None, [], []
    )
    assert (plain.sweep_points, plain.other_runs) == (6, 0)


def test_example_results_from_the_reports_of_new_and_old_trainers() -> None:
    query = {'query': 'a cat', 'label': 1, 'matches': [{'content': 'a dog', 'distance': 0.3, 'relevant': False}]}
    both = ExampleResults.from_reports({'before': [query], 'after': [query]})
    assert both.before[0].matches[0].content == 'a dog' and both.after[0].label == 1
    old = ExampleResults.from_reports(None, {'before': {}, 'after': {}, 'examples': [query]})
    assert old.before == [] and old.after[0].query == 'a cat'  # older trainers kept the last evaluation's
    assert not ExampleResults.from_reports({'before': [{'query': 'no matches key', 'matches': 'x'}]})
    assert not ExampleResults.from_reports(None, {'before': {}}) and not ExampleResults.from_reports([1, 2])


def test_the_local_backend_s_phase_changes_stand_in_for_events() -> None:
    run = record('r', Phase.FAILED.value)
    run.status.start_time, run.status.completion_time = '2026-01-01T00:00:05Z', '2026-01-01T00:01:00Z'
    run.status.reason, run.status.details = 'ConfigError', 'train_data: no labels'
    events = phase_events(run)
    assert [(e.reason, e.type) for e in events] == [
        ('Created', 'Normal'),
        ('Started', 'Normal'),
        ('ConfigError', 'Warning'),
    ]
    assert events[-1].message == 'train_data: no labels' and events[-1].object == 'FinetuneRun/r'
