"""Tier ``image``: image training samples/s on the GPU, the trainer's loop against a plain timm loop
that is tuned the way a careful person tunes one for a GPU: channels_last memory format, bf16 autocast,
``cudnn.benchmark``, pinned memory and non-blocking copies.

Both sides train efficientnet_b0 and resnet50 (random weights: they do not change the speed) at 224 px
on the same generated JPEGs, batch 128 (32 classes x 4 images), ``TripletMarginLoss``, Adam, with the
same number of loader processes decoding (12, or the cores less two). A round times steady-state steps
(its first step, with cuDNN's autotuning and the workers' start, is left out).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from bench import data, ours
from bench.common import Row, alternate, steady_rate
from bench.plain_loop import _ClassBatches, _ImageDataset
from finetuner.api.layout import Record

TARGET = 1.0
PER_CLASS = 4


@dataclass(frozen=True)
class ImageCase:
    model: str  # the spec's model name
    architecture: str  # timm's
    size: int
    batch: int
    steps: int


def image_cases(ctx: Any) -> list[ImageCase]:
    if ctx.scale.dry:
        return [ImageCase('timm:test_resnet', 'test_resnet', 32, 8, 2)]
    batch, steps = ctx.scale.pick(gpu=(128, 8), dry=(8, 2))
    return [
        ImageCase('efficientnet_b0', 'efficientnet_b0', 224, batch, steps),
        ImageCase('resnet50', 'resnet50', 224, batch, steps),
    ]


def loader_workers(ctx: Any) -> int:
    return 0 if ctx.scale.dry else max(1, min(12, (os.cpu_count() or 2) - 2))


def plain_gpu_loop(
    architecture: str,
    records: list[Record],
    *,
    image_size: int,
    batch_size: int,
    steps: int,
    num_workers: int,
    device: str,
    learning_rate: float = 1e-4,
    seed: int = 42,
) -> list[float]:
    """``steps`` optimizer steps of a plain timm + pytorch-metric-learning loop with the GPU habits;
    the time of every step's end."""
    import timm
    import torch
    from pytorch_metric_learning.losses import TripletMarginLoss
    from timm.data import create_transform, resolve_model_data_config

    torch.manual_seed(seed)
    cuda = device == 'cuda'
    torch.backends.cudnn.benchmark = cuda
    model = timm.create_model(architecture, pretrained=False, num_classes=0).to(device)
    model = model.to(memory_format=torch.channels_last)
    config = resolve_model_data_config(model)
    config['input_size'] = (3, image_size, image_size)
    transform = create_transform(**config, is_training=False)
    label_ids: dict[object, int] = {}
    for record in records:
        label_ids.setdefault(record.label, len(label_ids))
    dataset = _ImageDataset(records, transform, label_ids)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_ClassBatches(dataset.labels, batch_size, PER_CLASS, steps, seed),
        num_workers=num_workers,
        pin_memory=cuda,
        persistent_workers=num_workers > 0,
    )
    loss_fn = TripletMarginLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    step_ends: list[float] = []
    for pixels, labels in loader:
        pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
    return step_ends


def _image_row(ctx: Any, case: ImageCase) -> list[Row]:
    workers = loader_workers(ctx)
    records = data.labelled_images((case.steps + 2) * case.batch, case.size, n_classes=case.batch // PER_CLASS)
    spec = ours.spec_for(
        case.model,
        records,
        ctx.workdir,
        f'gpu-images-{case.architecture}',
        loss='TripletMarginLoss',
        batch_size=case.batch,
        num_items_per_class=PER_CLASS,
        epochs=1,
        learning_rate=1e-4,
        model_options={'pretrained': False, 'image_size': case.size},
        device=ctx.scale.device,
        num_workers=workers,
    )

    def ours_round() -> float:
        ends = ours.train_steps(spec, case.steps + 1, ctx.workdir, f'gpu-images-{case.architecture}')
        from bench.gpu_text import _clean_runs

        _clean_runs(ctx.workdir)
        return steady_rate(ends[1:], case.batch, warmup=1)  # ends[0] is when training began

    def reference_round() -> float:
        ends = plain_gpu_loop(
            case.architecture,
            records,
            image_size=case.size,
            batch_size=case.batch,
            steps=case.steps + 1,
            num_workers=workers,
            device=ctx.scale.device,
        )
        return steady_rate(ends, case.batch, warmup=1)

    rounds = ctx.scale.pick(gpu=2, dry=1)
    samples_ours, samples_reference = alternate(ours_round, reference_round, rounds)
    return [
        Row.compare(
            benchmark='gpu_image',
            measure=f'image training on the GPU: {case.architecture} {case.size} px, TripletMarginLoss, '
            f'batch {case.batch}, {workers} loader processes',
            unit='samples/s',
            samples_ours=samples_ours,
            samples_reference=samples_reference,
            reference_name='plain timm loop, channels_last + bf16 autocast',
            target_ratio=TARGET,
            extra={'steps_per_round': float(case.steps), 'loader_workers': float(workers)},
        )
    ]


def run(ctx: Any) -> None:
    for case in image_cases(ctx):
        if ctx.seconds_left() < 30:
            ctx.result.notes.append(f'{case.architecture} not run: {ctx.seconds_left():.0f} s left of the tier')
            ctx.save()
            continue
        ctx.measure(
            f'image training on the GPU: {case.architecture}',
            lambda case=case: _image_row(ctx, case),
            target=f'>= {TARGET:g}x',
        )
