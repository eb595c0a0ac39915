"""``python -m bench --gpu``: the GPU benchmarks, in tiers, each in its own process with its own timeout.

Tiers, in order (``--tiers`` picks some):

- ``check``: the GPU, driver and library facts, the measured bf16 matrix-multiply rate and copy
  bandwidth (the ceilings), then the GPU tests (``pytest -m gpu tests/gpu``);
- ``text``: the trainer's text training samples/s against sentence-transformers' own trainer with
  ``bf16=True`` (target >= 1.5x);
- ``mfu``: model FLOPs utilisation of the trainer on the MiniLM-L6 and BERT-base architectures, bf16
  autocast (target >= 40% for BERT-base), with a kernel-time profile;
- ``image``: the trainer's image training samples/s against a plain timm loop with channels_last and
  bf16 autocast;
- ``quality``: wall time from a fresh process to a saved fine-tuned model and that model's nDCG@10,
  against sentence-transformers' idiomatic script (load, train, save), real all-MiniLM-L6-v2 weights.

Every tier rewrites its JSON after each measurement (``bench.gpu_results``) and the Markdown fragment
``gpu.md`` is rendered after every tier, so a run stopped half-way still brings back numbers.
``--budget`` is the wall time for all tiers: each gets at most its own cap and leaves the later ones
their minimum. ``--dry-run`` runs every tier on the CPU with tiny models and sizes (under about a
minute): it checks the harness and measures nothing worth publishing; the test suite runs it.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = ROOT / '.whl' / 'assets'
# (cap, floor) seconds of each tier on the GPU: a tier gets at most its cap, and at least its floor
# while the budget lasts (earlier tiers first).
GPU_BUDGETS: dict[str, tuple[float, float]] = {
    'check': (150.0, 45.0),
    'text': (150.0, 60.0),
    'mfu': (120.0, 45.0),
    'image': (150.0, 60.0),
    'quality': (150.0, 60.0),
}
DRY_BUDGETS: dict[str, tuple[float, float]] = {tier: (300.0, 30.0) for tier in GPU_BUDGETS}  # a shared CPU is slow
REHEARSAL_BUDGETS: dict[str, tuple[float, float]] = {tier: (600.0, 30.0) for tier in GPU_BUDGETS}
TIER_FUNCTIONS = {
    'check': 'bench.gpu_check:run',
    'text': 'bench.gpu_text:run_text',
    'mfu': 'bench.gpu_text:run_mfu',
    'image': 'bench.gpu_image:run',
    'quality': 'bench.gpu_quality:run',
}
LAST_SECONDS = 15.0  # a tier is not started with less than this left


@dataclass(frozen=True)
class Scale:
    """Sizes of a GPU run; of a dry run (the test suite's tiny models and data, on the CPU); or of a
    rehearsal (the GPU run's models, data and code paths, on the CPU with the dry run's small sizes:
    what a device run will do, checked before spending device time)."""

    dry: bool
    rehearsal: bool = False

    @property
    def device(self) -> str:
        return 'cpu' if self.dry or self.rehearsal else 'cuda'

    @property
    def cuda(self) -> bool:
        return self.device == 'cuda'

    def pick(self, gpu: Any, dry: Any) -> Any:
        return dry if self.dry or self.rehearsal else gpu


@dataclass
class TierContext:
    """What a tier function gets: its sizes, folders, deadline, and the result it fills in."""

    scale: Scale
    out: Path
    workdir: Path
    assets: Path | None
    deadline: float  # time.monotonic() value by which the tier must be done
    result: Any  # bench.gpu_results.TierResult
    began: float = field(default_factory=time.monotonic)

    @property
    def benchmark(self) -> str:
        return f'gpu_{self.result.tier}'

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        from bench.gpu_results import save

        self.result.seconds = time.monotonic() - self.began
        save(self.result, self.out)

    def add_row(self, row: Any) -> None:
        self.result.rows.append(row)
        self.save()
        shown = f'{row.ratio:.2f}x' if row.ratio is not None else row.note or f'{row.ours} {row.unit}'
        print(f'[gpu:{self.result.tier}] {row.measure}: {shown}', flush=True)

    def fact(self, key: str, value: Any) -> None:
        self.result.facts[key] = value
        self.save()

    def measure(self, measure: str, produce: Callable[[], list[Any]], target: str = '') -> None:
        """Rows from ``produce``; a failure becomes a not-measured row saying why, and the tier goes on."""
        try:
            rows = produce()
        except Exception as e:
            traceback.print_exc()
            from bench.common import Row

            reason = f'{type(e).__name__}: {" ".join(str(e).split())[:400]}'
            rows = [Row.not_measured(benchmark=self.benchmark, measure=measure, reason=reason, target=target)]
        for row in rows:
            self.add_row(row)


def tier_timeout(
    tier: str, remaining: float, later: list[str], budgets: dict[str, tuple[float, float]]
) -> float | None:
    """Seconds for ``tier`` out of ``remaining``: its cap, less what the later tiers' floors need, but at
    least its own floor while time lasts; None when too little is left to start it."""
    cap, floor = budgets[tier]
    reserve = sum(budgets[name][1] for name in later)
    seconds = min(cap, remaining - reserve)
    if seconds < floor:
        seconds = min(floor, remaining)
    return seconds if seconds >= LAST_SECONDS else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.gpu_results import TIERS

    parser = argparse.ArgumentParser(
        prog='python -m bench --gpu', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--dry-run', action='store_true', help='every tier on the CPU with tiny sizes (a harness check)'
    )
    parser.add_argument(
        '--out', type=Path, default=ROOT / 'bench' / 'results' / 'gpu-run', help='where the result files go'
    )
    parser.add_argument('--budget', type=float, default=480.0, help='wall-clock seconds for all tiers together')
    parser.add_argument(
        '--tiers',
        nargs='+',
        choices=TIERS,
        default=list(TIERS),
        metavar='TIER',
        help=f'run only these: {", ".join(TIERS)}',
    )
    parser.add_argument(
        '--assets', type=Path, default=None, help=f'carried models (default: {DEFAULT_ASSETS} when present)'
    )
    parser.add_argument(
        '--rehearse',
        action='store_true',
        help="the GPU run's models, data and code paths on this CPU with small sizes (needs the carried assets)",
    )
    parser.add_argument('--workdir', type=Path, default=None, help='scratch folder (default: a temporary one)')
    parser.add_argument('--tier', choices=TIERS, default=None, help=argparse.SUPPRESS)  # one tier, in-process
    parser.add_argument('--timeout', type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f'--budget must be a positive number of seconds, got {args.budget:g}')
    if args.assets is None and DEFAULT_ASSETS.is_dir():
        args.assets = DEFAULT_ASSETS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.tier is not None:
        return run_tier(args)
    if not args.dry_run and not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            print(
                'python -m bench --gpu needs CUDA and torch.cuda.is_available() is False here; '
                'run it with --dry-run to check the harness on the CPU',
                file=sys.stderr,
            )
            return 2
    with tempfile.TemporaryDirectory(prefix='finetuner-gpu-') as tmp:
        return orchestrate(args, args.workdir or Path(tmp))


def orchestrate(args: argparse.Namespace, workdir: Path) -> int:
    """Run the tiers one after the other, each in a child process stopped at its timeout."""
    from bench.gpu_report import write_fragment
    from bench.gpu_results import TITLES, TierResult, load, now, save

    args.out.mkdir(parents=True, exist_ok=True)
    budgets = DRY_BUDGETS if args.dry_run else REHEARSAL_BUDGETS if args.rehearse else GPU_BUDGETS
    started = time.monotonic()
    failures = 0
    for index, tier in enumerate(args.tiers):
        remaining = args.budget - (time.monotonic() - started)
        timeout = tier_timeout(tier, remaining, args.tiers[index + 1 :], budgets)
        if timeout is None:
            save(
                TierResult(
                    tier=tier,
                    title=TITLES[tier],
                    status='skipped',
                    dry_run=args.dry_run,
                    started=now(),
                    error=f'not started: {remaining:.0f} s of the {args.budget:.0f} s budget left',
                ),
                args.out,
            )
            failures += 1
            write_fragment(args.out)
            continue
        print(f'[gpu] tier {tier}: up to {timeout:.0f} s ({remaining:.0f} s of the budget left)', flush=True)
        began = time.monotonic()
        code, tail = _run_child(tier, args, workdir, timeout)
        wall = time.monotonic() - began
        result = load(args.out, tier) or TierResult(tier=tier, title=TITLES[tier], dry_run=args.dry_run, started=now())
        result.timeout_s = timeout
        result.seconds = wall
        if code is None:
            result.status = 'timeout'
            result.error = f'stopped at its timeout of {timeout:.0f} s; last output:\n' + tail
        elif code != 0 and result.status != 'failed':
            result.status = 'failed'
            result.error = f'exit code {code}; last output:\n' + tail
        elif code == 0 and result.status == 'running':
            result.status = 'ok'
        save(result, args.out)
        failures += result.status != 'ok'
        write_fragment(args.out)
        print(f'[gpu] tier {tier}: {result.status} in {result.seconds:.0f} s', flush=True)
    from bench.gpu_report import summary_lines

    for line in summary_lines(args.out):
        print(line, flush=True)
    return 0 if failures == 0 else 1


def _run_child(tier: str, args: argparse.Namespace, workdir: Path, timeout: float) -> tuple[int | None, str]:
    """Run one tier in a child process (its own process group, so its loader workers die with it);
    (exit code or None on timeout, its last lines of output)."""
    command = [
        sys.executable,
        '-m',
        'bench.gpu',
        '--tier',
        tier,
        '--out',
        str(args.out),
        '--workdir',
        str(workdir),
        '--timeout',
        f'{timeout:.1f}',
    ]
    if args.dry_run:
        command.append('--dry-run')
    if args.rehearse:
        command.append('--rehearse')
    if args.assets is not None:
        command += ['--assets', str(args.assets)]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    tail: collections.deque[str] = collections.deque(maxlen=40)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors='replace',
        start_new_session=True,
    )

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            print(line, end='', flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
        _stop_group(process)
    reader.join(timeout=10)
    return code, '\n'.join(tail)


def _stop_group(process: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_tier(args: argparse.Namespace) -> int:
    """One tier in this process: its function fills a TierResult, saved after every measurement."""
    from bench.common import machine_info, versions
    from bench.gpu_results import TITLES, TierResult, now

    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s %(message)s')
    scale = Scale(dry=args.dry_run, rehearsal=args.rehearse)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix='finetuner-gpu-'))
    workdir.mkdir(parents=True, exist_ok=True)
    result = TierResult(
        tier=args.tier,
        title=TITLES[args.tier],
        dry_run=args.dry_run,
        started=now(),
        timeout_s=args.timeout,
        versions=versions(),
    )
    timeout = args.timeout if args.timeout is not None else GPU_BUDGETS[args.tier][0]
    ctx = TierContext(
        scale=scale,
        out=args.out,
        workdir=workdir,
        assets=args.assets,
        deadline=time.monotonic() + timeout,
        result=result,
    )
    ctx.save()
    module_name, function_name = TIER_FUNCTIONS[args.tier].split(':')
    try:
        result.machine = machine_info(scale.cuda)
        getattr(importlib.import_module(module_name), function_name)(ctx)
    except Exception as e:
        traceback.print_exc()
        result.status = 'failed'
        result.error = f'{type(e).__name__}: {e}\n' + ''.join(traceback.format_exc().splitlines(True)[-12:])
        ctx.save()
        return 1
    result.status = 'ok'
    ctx.save()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
