"""What every benchmark shares: settings, the A/B alternation, result rows, machine and versions.

A benchmark alternates the two sides (ours, reference, ours, reference, ...) in one process so
that slow drifts of a shared machine hit both sides alike, and reports the median of each side and
their ratio (ours / reference for throughput, where larger is better).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal['full', 'quick', 'tiny']
MODES: tuple[str, ...] = ('full', 'quick', 'tiny')

VERSIONED_PACKAGES = (
    'torch',
    'timm',
    'transformers',
    'sentence-transformers',
    'pytorch-metric-learning',
    'onnxruntime',
    'onnx',
    'kopf',
    'kmock',
    'faiss-cpu',
)


class BenchmarkUnavailable(RuntimeError):
    """A benchmark cannot run here (a part of the project it measures is missing); its row says why."""


class Settings(BaseModel):
    """How hard to measure. ``tiny`` swaps every model for the random tiny ones of the test suite:
    it keeps the harness working in the smoke test and measures nothing worth publishing."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    mode: Mode = 'full'
    gpu: bool = False
    threads: int | None = Field(default=None, description='torch and ONNX Runtime intra-op threads (None: defaults).')
    workdir: Path = Field(description='Scratch folder for data, models and run outputs.')

    @property
    def device(self) -> str:
        return 'cuda' if self.gpu else 'cpu'

    def pick(self, full: int, quick: int, tiny: int) -> int:
        """The value of a size parameter for the current mode."""
        return {'full': full, 'quick': quick, 'tiny': tiny}[self.mode]


class Row(BaseModel):
    """One line of the published table."""

    benchmark: str = Field(description='Which benchmark produced the row (text_throughput, ...).')
    measure: str = Field(description='What is measured, with its setting (model, loss, batch).')
    unit: str = Field(description='Unit of ours and reference.')
    ours: float | None = Field(default=None, description='Median of this project.')
    reference: float | None = Field(default=None, description='Median of the reference.')
    reference_name: str = Field(default='', description='What the reference is.')
    ratio: float | None = Field(default=None, description='ours / reference (higher is better).')
    target: str = Field(default='', description='The target, in words (e.g. ">= 1.5x").')
    target_ratio: float | None = Field(default=None, description='Ratio the target asks for, when one applies.')
    met: bool | None = Field(default=None, description='Whether the target is met; None when not measured.')
    note: str = Field(default='', description='Why a target is missed, or why nothing was measured.')
    samples_ours: list[float] = Field(default_factory=list, description='Every round of ours, in order.')
    samples_reference: list[float] = Field(default_factory=list, description='Every round of the reference.')
    extra: dict[str, float | str] = Field(default_factory=dict, description='Other numbers (MFU, p99, ...).')
    date: str = Field(
        default='',
        description="When the row was measured ('YYYY-MM-DD HH:MM UTC'); empty in reports older than the field, "
        "whose rows all date from the report's own date.",
    )
    machine: str = Field(
        default='',
        description="Where the row was measured (the table's machine column); empty: the report's machine.",
    )

    @classmethod
    def compare(
        cls,
        *,
        benchmark: str,
        measure: str,
        unit: str,
        samples_ours: list[float],
        samples_reference: list[float],
        reference_name: str,
        target_ratio: float | None,
        target: str | None = None,
        note: str = '',
        extra: dict[str, float | str] | None = None,
    ) -> Row:
        """A row from the per-round samples of both sides: medians, ratio, target check."""
        ours = statistics.median(samples_ours)
        reference = statistics.median(samples_reference)
        ratio = ours / reference if reference else None
        met = None if target_ratio is None or ratio is None else ratio >= target_ratio
        return cls(
            benchmark=benchmark,
            measure=measure,
            unit=unit,
            ours=ours,
            reference=reference,
            reference_name=reference_name,
            ratio=ratio,
            target=target if target is not None else (f'>= {target_ratio:g}x' if target_ratio else ''),
            target_ratio=target_ratio,
            met=met,
            note=note,
            samples_ours=samples_ours,
            samples_reference=samples_reference,
            extra=extra or {},
        )

    @classmethod
    def not_measured(cls, *, benchmark: str, measure: str, reason: str, target: str = '') -> Row:
        return cls(benchmark=benchmark, measure=measure, unit='', target=target, note=f'not measured: {reason}')


class Machine(BaseModel):
    cpu: str
    cores: int
    torch_threads: int
    gpu: str | None
    python: str
    platform: str


class Report(BaseModel):
    date: str
    mode: Mode
    gpu: bool
    machine: Machine
    versions: dict[str, str]
    command: str
    runtime_s: float
    rows: list[Row]
    benchmark_runtimes_s: dict[str, float] = Field(default_factory=dict)
    load_average: dict[str, float] = Field(
        default_factory=dict, description='1-minute load average of the machine at the start and end of the run.'
    )
    notes: list[str] = Field(default_factory=list)
    benchmark_notes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Each benchmark's closing notes (its module's closing_notes), replaced with its rows by --update.",
    )
    updates: list[str] = Field(
        default_factory=list,
        description='Later runs (--update) whose rows replaced those of their benchmarks: command, date, load.',
    )


def alternate(
    ours: Callable[[], float], reference: Callable[[], float], rounds: int
) -> tuple[list[float], list[float]]:
    """Run ours, reference, ours, reference, ... ``rounds`` times each; the samples of both sides."""
    samples_ours: list[float] = []
    samples_reference: list[float] = []
    for _ in range(rounds):
        samples_ours.append(ours())
        samples_reference.append(reference())
    return samples_ours, samples_reference


def steady_rate(step_ends: list[float], items_per_step: int, warmup: int = 1) -> float:
    """Items per second between step ends, after ``warmup`` steps: the median step duration, so a
    one-off stall (a page fault, a neighbour's burst) does not decide the result."""
    durations = [b - a for a, b in zip(step_ends[warmup:-1], step_ends[warmup + 1 :], strict=True)]
    if not durations:
        raise ValueError(f'need at least {warmup + 2} step timestamps to measure a rate, got {len(step_ends)}')
    return items_per_step / statistics.median(durations)


def mean_rate(timestamps: list[float], items_per_step: int) -> float:
    """Items per second from the first timestamp (training began) to the last step's end: every step
    counts, the first one with its lazy initialisation included. The rate for batches of uneven cost
    (text batches of mixed lengths), where the median step would not be the epoch's throughput."""
    if len(timestamps) < 2:
        raise ValueError(f'need a start and at least one step end, got {len(timestamps)} timestamps')
    return items_per_step * (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` leaves the elapsed seconds in ``t[0]``."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(gpu: bool) -> Machine:
    import torch

    from finetuner_trainer.inference_onnx import available_cpus

    gpu_name = torch.cuda.get_device_name(0) if gpu and torch.cuda.is_available() else None
    return Machine(
        cpu=_cpu_model(),
        cores=available_cpus(),
        torch_threads=torch.get_num_threads(),
        gpu=gpu_name,
        python=platform.python_version(),
        platform=platform.platform(terse=True),
    )


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = 'not installed'
    return found


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux ``/proc``)."""
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    raise ValueError(f'no VmRSS for process {pid}')


def load_average() -> float:
    """The machine's 1-minute load average (runnable processes; above the core count means sharing)."""
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
