"""The benchmark harness (``python -m bench``): its pure parts, and one run of every benchmark with the
test suite's tiny models (``--tiny``) checking that the table and the JSON come out with every column.
Nothing here asserts a speed: timings on a shared machine are noise, and performance is never a unit
test's business."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, profiling, report
from bench.__main__ import BENCHMARKS, main
from bench.common import Row
from bench.operator_scale import _percentile


def test_alternate_runs_the_sides_in_turn() -> None:
    calls: list[str] = []

    def side(name: str, value: float):  # type: ignore[no-untyped-def]
        def run() -> float:
            calls.append(name)
            return value

        return run

    ours, reference = common.alternate(side('A', 2.0), side('B', 1.0), rounds=3)
    assert calls == ['A', 'B', 'A', 'B', 'A', 'B']
    assert ours == [2.0, 2.0, 2.0] and reference == [1.0, 1.0, 1.0]


def test_steady_rate_skips_warmup_and_takes_the_median_step() -> None:
    # step ends: a slow first step (warm-up), then steps of 1 s, 1 s and one stall of 5 s
    ends = [10.0, 11.0, 12.0, 17.0, 18.0]
    assert common.steady_rate(ends, 32, warmup=1) == pytest.approx(32.0)
    with pytest.raises(ValueError, match='need at least 3 step timestamps'):
        common.steady_rate([1.0, 2.0], 32, warmup=1)


def test_mean_rate_counts_every_step_from_the_start() -> None:
    # training began at 10 s; steps of uneven cost (length-grouped batches) end at 13, 14 and 18 s
    assert common.mean_rate([10.0, 13.0, 14.0, 18.0], 32) == pytest.approx(3 * 32 / 8)
    with pytest.raises(ValueError, match='need a start and at least one step end'):
        common.mean_rate([1.0], 32)


def test_row_compare_medians_ratio_and_target() -> None:
    row = Row.compare(
        benchmark='x',
        measure='m',
        unit='samples/s',
        samples_ours=[30.0, 10.0, 31.0],
        samples_reference=[20.0, 19.0, 50.0],
        reference_name='ref',
        target_ratio=1.5,
    )
    assert (row.ours, row.reference) == (30.0, 20.0)
    assert row.ratio == pytest.approx(1.5)
    assert row.met is True and row.target == '>= 1.5x'
    missed = row.model_copy(update={'met': False})
    assert '**MISSED**' in report.render_markdown(_report([missed]))


def test_not_measured_rows_say_why_in_the_table() -> None:
    row = Row.not_measured(benchmark='operator_scale', measure='operator scale', reason='no cluster here')
    text = report.render_markdown(_report([row]))
    assert 'not measured: no cluster here' in text
    assert '| operator scale | – | – | – |' in text


def test_percentile_interpolates() -> None:
    assert _percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert _percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


def _report(rows: list[Row]) -> common.Report:
    return common.Report(
        date='2026-01-01 00:00 UTC',
        mode='tiny',
        gpu=False,
        machine=common.Machine(cpu='cpu', cores=2, torch_threads=2, gpu=None, python='3.11', platform='linux'),
        versions={'torch': '2'},
        command='python -m bench --tiny',
        runtime_s=1.0,
        rows=rows,
    )


@pytest.mark.slow
def test_tiny_run_writes_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every benchmark end to end on tiny models: rows with numbers, the Markdown columns, raw JSON."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    doc = tmp_path / 'BENCHMARKS.md'
    results, workdir = tmp_path / 'results', tmp_path / 'w'
    code = main(['--tiny', '--strict', '--results-dir', str(results), '--doc', str(doc), '--workdir', str(workdir)])
    assert code == 0
    raw = json.loads((results / 'tiny.json').read_text())
    assert {r['benchmark'] for r in raw['rows']} == set(BENCHMARKS)
    for row in raw['rows']:
        assert row['ours'] is not None, row
        assert not row['note'].startswith('not measured'), row
    throughput = [r for r in raw['rows'] if r['benchmark'] in ('text_throughput', 'image_throughput', 'inference')]
    assert throughput and all(r['ratio'] is not None and r['samples_reference'] for r in throughput)
    assert raw['machine']['cores'] >= 1 and raw['versions']['torch'] != 'not installed'
    table = doc.read_text()
    header = '| ' + ' | '.join(report.TABLE_COLUMNS) + ' |'
    assert header in table
    assert table.count('\n| ') >= len(raw['rows'])  # one line per row, after the header


def test_summarize_stacks_reports_self_and_own_code_shares(tmp_path: Path) -> None:
    stacks = tmp_path / 'stacks.txt'
    stacks.write_text(
        '<module> (/work/main/operator/finetuner_operator/__main__.py:9);'
        'reconcile (/work/main/operator/finetuner_operator/reconcile.py:40);readinto (socket.py:700) 3\n'
        '<module> (/work/main/operator/finetuner_operator/__main__.py:9);deepcopy (copy.py:10) 1\n'
    )
    sentence = profiling.summarize_stacks(stacks, mine=('finetuner_operator/',))
    assert 'readinto (socket.py) 75%' in sentence and 'deepcopy (copy.py) 25%' in sentence
    assert 'reconcile (operator/finetuner_operator/reconcile.py) 75%' in sentence
    assert profiling.summarize_stacks(tmp_path / 'missing.txt') == 'py-spy recorded no samples'


def test_step_profiler_covers_the_steps_after_the_first() -> None:
    import torch

    profiler = profiling.StepProfiler(total_steps=3)
    for _ in range(3):
        torch.ones(64, 64) @ torch.ones(64, 64)
        profiler.step_end()
    assert profiler.result is not None
    assert profiler.result.wall_s > 0 and 'matmul' in profiler.result.shares


def test_bad_options_are_refused_with_the_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(['--tiny', '--threads', '0', '--results-dir', str(tmp_path)]) == 2
    assert '--threads must be at least 1, got 0' in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(['--gpu', '--out', str(tmp_path / 'gpu')]) == 2
        assert 'python -m bench --gpu needs CUDA' in capsys.readouterr().err
    assert main(['--tiny', '--gpu', '--results-dir', str(tmp_path)]) == 2
    assert '--tiny, --results-dir belong to the CPU benchmarks' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written by a refused run


def test_update_replaces_only_the_rows_of_the_benchmarks_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench.__main__ import updated

    assert main(['--tiny', '--update', '--only', 'inference', '--results-dir', str(tmp_path)]) == 2
    assert (
        f'--update needs an earlier run to update: {tmp_path / "tiny.json"} does not exist' in capsys.readouterr().err
    )

    def row(benchmark: str, value: float) -> Row:
        return Row.compare(
            benchmark=benchmark,
            measure=f'{benchmark} {value}',
            unit='items/s',
            samples_ours=[value],
            samples_reference=[1.0],
            reference_name='ref',
            target_ratio=None,
        )

    previous = _report([row('text_throughput', 2.0), row('inference', 3.0), row('operator_scale', 4.0)])
    previous = previous.model_copy(update={'notes': ['kept note'], 'benchmark_runtimes_s': {'inference': 9.0}})
    load = {'start': 3.5, 'end': 4.25}
    result = updated(
        previous,
        [row('inference', 5.0), row('inference', 6.0)],
        ['inference'],
        'cmd',
        120.0,
        {'inference': 7.0},
        [],
        load,
    )
    assert [r.measure for r in result.rows] == [
        'text_throughput 2.0', 'inference 5.0', 'inference 6.0', 'operator_scale 4.0'
    ]  # fmt: skip
    assert result.notes == ['kept note'] and result.benchmark_runtimes_s == {'inference': 7.0}
    assert result.date == previous.date and result.command == previous.command
    assert result.updates == [
        f'the rows of inference were replaced by `cmd` on {common.today()} in 2.0 minutes '
        '(1-minute load average at its start 3.5, end 4.2, on 2 cores)'
    ]
    again = updated(result, [row('inference', 8.0)], ['inference'], 'cmd2', 60.0, {}, [], load)
    assert len(again.updates) == 1 and '`cmd2`' in again.updates[0]  # the latest run of those rows only
    text = report.render_markdown(result)
    assert '(mode `tiny`). Then the rows of inference were replaced by `cmd`' in text
    assert '| inference 5.0 |' in text and '| inference 3.0 |' not in text


def test_rows_carry_the_date_and_machine_they_were_measured_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A row replaced by ``--update`` shows the day and the machine of that run; the rows it kept show their
    own day, and rows of a report older than the fields show the report's date and machine."""
    import sys
    import types

    from bench.__main__ import run_benchmark, updated

    fake = types.ModuleType('bench.fake_benchmark')
    fake.run = lambda settings: [Row(benchmark='inference', measure='fresh', unit='items/s', ours=1.0)]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, 'bench.fake_benchmark', fake)
    monkeypatch.setattr('bench.__main__.today', lambda: '2026-12-05 10:00 UTC')
    here = common.Machine(cpu='Xeon', cores=2, torch_threads=1, gpu=None, python='3.11', platform='linux')
    monkeypatch.setattr('bench.__main__.machine_info', lambda gpu: here)
    (fresh,) = run_benchmark('fake_benchmark', common.Settings(mode='tiny', workdir=tmp_path), strict=True)
    assert fresh.date == '2026-12-05 10:00 UTC' and fresh.machine == 'Xeon, 2 cores, 1 torch threads'
    kept = Row(benchmark='text_throughput', measure='kept', unit='items/s', ours=2.0, date='2026-12-03 01:57 UTC')
    undated = Row(benchmark='operator_scale', measure='undated', unit='MB', ours=3.0)
    previous = _report([kept, Row(benchmark='inference', measure='old', unit='items/s', ours=0.5), undated])
    result = updated(previous, [fresh], ['inference'], 'cmd', 1.0, {}, [], {'start': 0.0, 'end': 0.0})
    lines = {
        line.split(' | ')[0]: line for line in report.render_markdown(result).splitlines() if line.startswith('| ')
    }
    assert '| Xeon, 2 cores, 1 torch threads |' in lines['| fresh'] and lines['| fresh'].endswith('| 2026-12-05 |')
    assert '| cpu, 2 cores, 2 torch threads |' in lines['| kept']  # the report's machine
    assert lines['| kept'].endswith('| 2026-12-03 |')
    assert lines['| undated'].endswith('| 2026-01-01 |')  # the report's own date


def test_operator_scale_still_measures_accumulation_when_the_burst_times_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bench import operator_scale

    def burst(settings: common.Settings) -> list[Row]:
        raise TimeoutError("'paced runs' not reached in 60s (last value: False)")

    result = {'total': 40, 'active': 6, 'startup_s': 1.0, 'rss_mb': 90.0, 'resync_cpu_ms_per_round': 3.0,
              'resync_requests_per_round': 0.0}  # fmt: skip
    monkeypatch.setattr(operator_scale, '_burst_rows', burst)
    monkeypatch.setattr(operator_scale, 'measure_accumulation', lambda sizes, active, workdir: [result])
    rows = operator_scale.run(common.Settings(mode='tiny', workdir=tmp_path))
    assert rows[0].note == "not measured: 'paced runs' not reached in 60s (last value: False)"
    assert [r.ours for r in rows[1:]] == [90.0, 1.0, 3.0]


def _row(benchmark: str, value: float) -> Row:
    return Row(benchmark=benchmark, measure=f'{benchmark} {value}', unit='items/s', ours=value)


def test_an_update_keeps_the_rows_another_update_wrote_meanwhile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two ``--update`` runs of different benchmarks at once: each reads the results file when it writes it, so
    the one that ends last keeps what the other wrote meanwhile."""

    path = tmp_path / 'tiny.json'
    path.write_text(_report([_row('text_throughput', 2.0), _row('inference', 3.0)]).model_dump_json())

    def run_benchmark(name: str, settings: common.Settings, strict: bool) -> list[Row]:
        other = common.Report.model_validate_json(path.read_text())  # another run ends and writes its rows
        kept = [r for r in other.rows if r.benchmark != 'text_throughput']
        path.write_text(other.model_copy(update={'rows': [_row('text_throughput', 9.0), *kept]}).model_dump_json())
        return [_row(name, 5.0)]

    monkeypatch.setattr('bench.__main__.run_benchmark', run_benchmark)
    assert main(['--tiny', '--update', '--only', 'inference', '--results-dir', str(tmp_path)]) == 0
    written = common.Report.model_validate_json(path.read_text())
    assert [r.measure for r in written.rows] == ['text_throughput 9.0', 'inference 5.0']


def test_an_update_replaces_the_closing_notes_of_the_benchmarks_run_whatever_their_wording(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A benchmark's closing notes go with its rows: an --update drops the old ones even when the module now
    words them differently, and keeps the other benchmarks' notes, in the order of BENCHMARKS."""
    from bench.__main__ import updated

    monkeypatch.setattr(
        'bench.__main__._closing_notes',
        lambda name, rows: [f'{name}: new wording over {len(rows)} rows'] if name == 'inference' else [],
    )
    previous = _report([_row('inference', 3.0), _row('operator_scale', 4.0)]).model_copy(
        update={'benchmark_notes': {'operator_scale': ['operator note'], 'inference': ['inference: old wording']}}
    )
    load = {'start': 1.0, 'end': 1.0}
    result = updated(previous, [_row('inference', 5.0)], ['inference'], 'cmd', 60.0, {}, [], load)
    assert result.benchmark_notes == {
        'inference': ['inference: new wording over 1 rows'],
        'operator_scale': ['operator note'],
    }
    assert list(result.benchmark_notes) == ['inference', 'operator_scale']
    text = report.render_markdown(result)
    assert '- inference: new wording over 1 rows' in text and '- operator note' in text
    assert 'old wording' not in text
