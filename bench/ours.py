"""This project's side: the trainer's real loop (``finetuner_trainer.runner.build_context`` +
``finetuner_trainer.loop.run_training``), timed by a callback.

The callback only reads the clock at every ``on_batch_end`` and flips ``Control.should_stop`` after
the planned number of steps (the hooks' contract: a callback never owns a loop). Everything the
trainer does per step is inside the measured interval: the data loader, collation and dynamic
padding, forward, loss, backward, optimizer step, progress reporting.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

from bench.data import write_records
from bench.profiling import StepProfiler
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig

_RUN_NUMBERS = itertools.count()


class StepClock:
    """A trainer callback (``finetuner_trainer.hooks.Callback`` protocol) recording step ends."""

    def __init__(self, stop_after: int, synchronize_cuda: bool = False, profiler: StepProfiler | None = None):
        self.stop_after = stop_after
        self.synchronize_cuda = synchronize_cuda
        self.profiler = profiler
        self.step_ends: list[float] = []
        self.began = 0.0

    def on_train_begin(self, ctx: Any, state: Any, control: Any) -> None:
        self.began = time.perf_counter()

    def on_epoch_begin(self, ctx: Any, state: Any, control: Any) -> None: ...
    def on_evaluate(self, ctx: Any, state: Any, control: Any, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, ctx: Any, state: Any, control: Any) -> None: ...
    def on_train_end(self, ctx: Any, state: Any, control: Any) -> None: ...

    def on_batch_end(self, ctx: Any, state: Any, control: Any, loss: float) -> None:
        if self.synchronize_cuda:
            import torch

            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.step_end()
        if len(self.step_ends) >= self.stop_after:
            control.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _config(spec: FinetuneRunSpec, workdir: Path, run_name: str) -> TrainerConfig:
    output = workdir / 'runs' / run_name
    output.mkdir(parents=True, exist_ok=True)
    return TrainerConfig(run_name=run_name, namespace='local', spec=spec, output_uri=output.as_uri())


def spec_for(
    model: str,
    records: list[Record],
    workdir: Path,
    name: str,
    **fields: Any,
) -> FinetuneRunSpec:
    """A run spec training on ``records`` (written as JSONL under ``workdir``)."""
    data = write_records(records, workdir / 'data' / f'{name}.jsonl')
    return FinetuneRunSpec(model=model, train_data=data.as_uri(), **fields)


def train_steps(
    spec: FinetuneRunSpec, steps: int, workdir: Path, run_prefix: str, profiler: StepProfiler | None = None
) -> list[float]:
    """Build the trainer's context for ``spec`` and run its loop for ``steps`` optimizer steps; the
    time training began followed by the time of every step's end. Every call gets its own output
    folder (``<run_prefix>-<n>``)."""
    run_name = f'{run_prefix}-{next(_RUN_NUMBERS)}'
    from finetuner.storage import open_store
    from finetuner_trainer.loop import run_training
    from finetuner_trainer.runner import build_context

    config = _config(spec, workdir, run_name)
    log = logging.getLogger('bench.ours')
    ctx = build_context(config, open_store(config.output_uri), log)
    clock = StepClock(steps, synchronize_cuda=ctx.device.type == 'cuda', profiler=profiler)
    ctx.callbacks.append(clock)
    run_training(ctx)
    if len(clock.step_ends) < steps:
        raise RuntimeError(f'the trainer ran {len(clock.step_ends)} steps, the benchmark planned {steps}')
    return [clock.began, *clock.step_ends]


def train_run(spec: FinetuneRunSpec, workdir: Path, run_name: str) -> Any:
    """A whole run through ``finetuner_trainer.train`` (artifact included); its ``TrainResult``."""
    import finetuner_trainer

    config = _config(spec, workdir, run_name)
    return finetuner_trainer.train(config, logging.getLogger('bench.ours'))
