"""Image throughput: samples per second while fine-tuning efficientnet_b0 and resnet50 at 224 px,
batch 32 (8 classes x 4 images), ``TripletMarginLoss``, Adam, against a plain PyTorch + timm loop
with the same loss, sampler, transform, worker count and images. Weights are random: they do not
change the speed."""

from __future__ import annotations

import os
from typing import Any

from bench import data, ours, plain_loop
from bench.common import Row, Settings, alternate, steady_rate
from bench.profiling import StepProfiler, explain_throughput

BENCHMARK = 'image_throughput'
BATCH = 32
PER_CLASS = 4
# Issue 24 asks for >= 1.5x on the CPU; the last published run measured 1.44x (efficientnet_b0) and 1.30x
# (resnet50) on a 2-core AMD EPYC. Held to that target, so that a run that misses it says so and profiles.
CPU_TARGET = 1.5
GPU_TARGET = 1.5


def _models(settings: Settings) -> list[tuple[str, str, int]]:
    """(spec model name, timm architecture, image size) per model measured in this mode."""
    if settings.mode == 'tiny':
        return [('timm:test_resnet', 'test_resnet', 32)]
    if settings.mode == 'quick':  # a smoke-sized run of the real model: smaller images
        return [('efficientnet_b0', 'efficientnet_b0', 128)]
    return [('efficientnet_b0', 'efficientnet_b0', 224), ('resnet50', 'resnet50', 224)]


def _workers(dataset_size: int) -> int:
    """The trainer's own rule for its default of 4 loader workers (capped by cores; none for a
    dataset of at most 4 batches), applied to the reference too so both decode alike."""
    return 0 if dataset_size <= 4 * BATCH else min(4, os.cpu_count() or 1)


def run(settings: Settings) -> list[Row]:
    rounds = settings.pick(full=3, quick=2, tiny=1)
    rows = []
    for name, architecture, size in _models(settings):
        steps = settings.pick(full=3 if architecture != 'resnet50' else 2, quick=2, tiny=2)
        records = data.labelled_images((steps + 2) * BATCH, size, n_classes=BATCH // PER_CLASS)
        spec = ours.spec_for(
            name,
            records,
            settings.workdir,
            f'images-{architecture}',
            loss='TripletMarginLoss',
            batch_size=BATCH,
            num_items_per_class=PER_CLASS,
            epochs=1,
            learning_rate=1e-4,
            model_options={'pretrained': False, 'image_size': size},
            device=settings.device,
        )

        def ours_round(
            profiler: StepProfiler | None = None, spec: Any = spec, architecture: str = architecture, steps: int = steps
        ) -> float:
            ends = ours.train_steps(spec, steps + 1, settings.workdir, f'images-{architecture}', profiler=profiler)
            return steady_rate(ends[1:], BATCH, warmup=1)  # ends[0] is when training began

        def reference_round(
            profiler: StepProfiler | None = None,
            records: list = records,  # type: ignore[type-arg]
            architecture: str = architecture,
            size: int = size,
            steps: int = steps,
        ) -> float:
            ends = plain_loop.train_steps(
                architecture,
                records,
                image_size=size,
                batch_size=BATCH,
                steps=steps + 1,
                per_class=PER_CLASS,
                num_workers=_workers(len(records)),
                device=settings.device,
                profiler=profiler,
            )
            return steady_rate(ends, BATCH, warmup=1)

        samples_ours, samples_reference = alternate(ours_round, reference_round, rounds)
        row = Row.compare(
            benchmark=BENCHMARK,
            measure=f'image training: {architecture} {size} px, TripletMarginLoss, batch {BATCH}',
            unit='samples/s',
            samples_ours=samples_ours,
            samples_reference=samples_reference,
            reference_name='plain PyTorch + timm loop',
            target_ratio=GPU_TARGET if settings.gpu else CPU_TARGET,
        )
        if row.met is False:
            row.note = explain_throughput(ours_round, reference_round, steps + 1)
        rows.append(row)
    return rows
