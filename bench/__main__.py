"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, write the table.

Writes ``bench/results/<mode>.json`` (every round of both sides) and, for a full run,
``docs/BENCHMARKS.md``. ``--quick`` (under 3 minutes on 2 cores) writes its table to
``bench/results/quick.md`` so that a quick run never overwrites the published numbers.
``python -m bench --gpu [--dry-run] [--out DIR] [--budget SECONDS]`` runs the GPU tiers instead
(``bench.gpu``; ``python -m bench --gpu --help``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import (
    BenchmarkUnavailable,
    Report,
    Row,
    Settings,
    load_average,
    machine_info,
    today,
    versions,
)
from bench.report import machine_text, write

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS: tuple[str, ...] = (
    'text_throughput',
    'image_throughput',
    'quality',
    'grad_cache',
    'inference',
    'operator_scale',
    'mining',
    'mining_search',
    'ttq',
)
CPU_ONLY_OPTIONS = frozenset(
    {'--quick', '--tiny', '--only', '--threads', '--results-dir', '--doc', '--strict', '--update'}
)
CLOSING_NOTES = [
    'A throughput ratio is the median samples/s of this project over the median of the reference, the '
    'medians taken over alternating rounds. An image round times steady-state steps (its first step, which '
    'pays for lazy initialisation and worker start-up, is left out); a text round is one whole epoch of a '
    'subset timed from the start of training, first step included, because batches differ in cost with '
    'the lengths of their texts (bench/text_throughput.py says how the subsets are drawn).',
    'The machine is shared: its other work slows both sides of a round alike, which is why the sides '
    'alternate; the spread of the rounds is in the raw JSON.',
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m bench', description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--quick', action='store_true', help='smaller settings, under 3 minutes on 2 CPU cores')
    size.add_argument(
        '--tiny',
        action='store_true',
        help="the test suite's tiny random models: checks the harness, measures nothing worth publishing",
    )
    parser.add_argument(
        '--gpu',
        action='store_true',
        help='the GPU tiers on a CUDA machine, each with its own timeout, results as files '
        '(python -m bench --gpu --help lists their options)',
    )
    parser.add_argument(
        '--only', nargs='+', choices=BENCHMARKS, metavar='NAME', help=f'run only these: {", ".join(BENCHMARKS)}'
    )
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='intra-op threads of torch and ONNX Runtime (default: their own, one per core); on a machine '
        'shared with other work, 1 avoids the collapse of spinning thread pools',
    )
    parser.add_argument('--results-dir', type=Path, default=ROOT / 'bench' / 'results', help='where the JSON goes')
    parser.add_argument('--doc', type=Path, default=None, help='where the Markdown table goes')
    parser.add_argument('--workdir', type=Path, default=None, help='scratch folder (default: a temporary one)')
    parser.add_argument(
        '--strict', action='store_true', help='stop at the first failing benchmark instead of reporting it in the table'
    )
    parser.add_argument(
        '--update',
        action='store_true',
        help="replace only the rows of the benchmarks run (--only) in this mode's existing results JSON and "
        'table, keeping every other row; the table says which rows came from which run',
    )
    return parser.parse_args(argv)


def run_benchmark(name: str, settings: Settings, strict: bool) -> list[Row]:
    """The rows of one benchmark, each with the date and the machine it was measured on (a later ``--update``
    keeps those of the rows it does not replace, and the table shows each row's own)."""
    module = importlib.import_module(f'bench.{name}')
    try:
        rows: list[Row] = module.run(settings)
    except BenchmarkUnavailable as e:
        rows = [Row.not_measured(benchmark=name, measure=name.replace('_', ' '), reason=str(e))]
    except Exception as e:
        if strict:
            raise
        traceback.print_exc()
        reason = f'the benchmark failed: {type(e).__name__}: {e}'
        rows = [Row.not_measured(benchmark=name, measure=name.replace('_', ' '), reason=reason)]
    stamp = {'date': today(), 'machine': machine_text(machine_info(settings.gpu))}
    return [row.model_copy(update=stamp) for row in rows]


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if '--gpu' in arguments:
        mixed = [a for a in arguments if a.split('=')[0] in CPU_ONLY_OPTIONS]
        if mixed:
            print(
                f'--gpu runs the GPU tiers (python -m bench --gpu --help lists their options); {", ".join(mixed)} '
                'belong to the CPU benchmarks',
                file=sys.stderr,
            )
            return 2
        from bench.gpu import main as gpu_main

        return gpu_main([a for a in arguments if a != '--gpu'])
    args = parse_args(argv)
    mode = 'quick' if args.quick else 'tiny' if args.tiny else 'full'
    if args.threads is not None:
        if args.threads < 1:
            print(f'--threads must be at least 1, got {args.threads}', file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s %(message)s')
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tiny mode borrows tests.support.tiny
    doc = args.doc if args.doc is not None else (ROOT / 'docs' / 'BENCHMARKS.md' if mode == 'full' else None)
    if doc is None and mode == 'quick':
        doc = args.results_dir / 'quick.md'
    names = args.only or list(BENCHMARKS)
    previous_path = args.results_dir / f'{mode}.json'
    if args.update and not previous_path.is_file():
        print(f'--update needs an earlier run to update: {previous_path} does not exist', file=sys.stderr)
        return 2
    started = time.perf_counter()
    load_at_start = load_average()
    command = 'python -m bench' + ''.join(f' {shlex.quote(a)}' for a in (argv if argv is not None else sys.argv[1:]))
    rows: list[Row] = []
    runtimes: dict[str, float] = {}

    def report(done: list[str]) -> Report:
        pending = [name for name in names if name not in done]
        progress = [f'Incomplete run: {", ".join(pending)} not run yet when this was written.'] if pending else []
        if args.update:
            # Read when written, not when started: another ``--update`` run that finished meanwhile keeps its rows.
            previous = Report.model_validate_json(previous_path.read_text())
            load = {'start': load_at_start, 'end': load_average()}
            return updated(previous, rows, done, command, time.perf_counter() - started, runtimes, progress, load)
        return Report(
            date=today(),
            mode=mode,  # type: ignore[arg-type]
            gpu=args.gpu,
            machine=machine_info(args.gpu),
            versions=versions(),
            command=command,
            runtime_s=time.perf_counter() - started,
            rows=rows,
            benchmark_runtimes_s=runtimes,
            load_average={'start': load_at_start, 'end': load_average()},
            notes=progress + CLOSING_NOTES,
            benchmark_notes={name: notes for name in done if (notes := _closing_notes(name, rows))},
        )

    with tempfile.TemporaryDirectory(prefix='finetuner-bench-') as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        settings = Settings(mode=mode, gpu=args.gpu, threads=args.threads, workdir=workdir)
        for index, name in enumerate(names):
            print(f'[bench] {name} ({mode}) ...', file=sys.stderr, flush=True)
            began = time.perf_counter()
            new_rows = run_benchmark(name, settings, args.strict)
            runtimes[name] = time.perf_counter() - began
            for row in new_rows:
                ratio = f'{row.ratio:.2f}x' if row.ratio is not None else row.note
                print(f'[bench]   {row.measure}: {ratio}', file=sys.stderr, flush=True)
            rows += new_rows
            # Written after every benchmark: a run stopped half-way still leaves what it measured.
            json_path, doc_path = write(report(names[: index + 1]), args.results_dir, doc)
    print(f'[bench] wrote {json_path}' + (f' and {doc_path}' if doc_path else ''), file=sys.stderr)
    return 0


def updated(
    previous: Report,
    rows: list[Row],
    done: list[str],
    command: str,
    runtime_s: float,
    runtimes: dict[str, float],
    progress: list[str],
    load: dict[str, float],
) -> Report:
    """``previous`` with the rows (and closing notes) of the benchmarks in ``done`` replaced by ``rows``,
    in the order of ``BENCHMARKS``, and a line saying which run they came from and under what load."""
    kept = [row for row in previous.rows if row.benchmark not in done]
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    merged = sorted(kept + rows, key=lambda row: order.get(row.benchmark, len(order)))
    # Reports written before benchmark_notes kept closing notes in ``notes``: those of the benchmarks run are
    # recognised by what their module writes for the old rows (a note whose wording changed since stays).
    old_notes = {note for name in done for note in _closing_notes(name, previous.rows)}
    notes = progress + [n for n in previous.notes if n not in old_notes and not n.startswith('Incomplete run')]
    benchmark_notes = {name: theirs for name, theirs in previous.benchmark_notes.items() if name not in done}
    benchmark_notes |= {name: new for name in done if (new := _closing_notes(name, rows))}
    update = (
        f'the rows of {", ".join(done)} were replaced by `{command}` on {today()} in {runtime_s / 60:.1f} minutes '
        f'(1-minute load average at its start {load["start"]:.1f}, end {load["end"]:.1f}, on '
        f'{previous.machine.cores} cores)'
    )
    return previous.model_copy(
        update={
            'rows': merged,
            'notes': notes,
            'benchmark_notes': {
                name: benchmark_notes[name] for name in sorted(benchmark_notes, key=lambda n: order.get(n, len(order)))
            },
            'updates': [u for u in previous.updates if not u.startswith(f'the rows of {", ".join(done)} ')] + [update],
            'benchmark_runtimes_s': {**previous.benchmark_runtimes_s, **runtimes},
        }
    )


def _closing_notes(name: str, rows: list[Row]) -> list[str]:
    """A benchmark module may explain its misses (``closing_notes(rows) -> list[str]``)."""
    module = importlib.import_module(f'bench.{name}')
    explain = getattr(module, 'closing_notes', None)
    return list(explain([r for r in rows if r.benchmark == name])) if explain else []


if __name__ == '__main__':
    raise SystemExit(main())
