"""Tiers ``text`` and ``mfu``: text training on the GPU.

``text``: samples/s of the trainer's loop (``bench.ours``: ``build_context`` + ``run_training``, bf16
autocast, TF32, fused AdamW, SDPA attention) against sentence-transformers' ``SentenceTransformerTrainer``
with ``bf16=True`` (``bench.st_reference``), on all-MiniLM-L6-v2 and chatterbot-corpus as the CPU
table measures, plus a GPU-sized batch. The sides alternate, a discarded two-step round of each first;
a round is one whole epoch of a subset, timed from the start of training (``bench.text_throughput``
says why). TF32 is on for both sides (the trainer switches it on for the process).

``mfu``: model FLOPs utilisation of the trainer's loop on random-weight MiniLM-L6 and BERT-base
encoders, texts of exactly ``s`` tokens (no padding), ``MultipleNegativesRankingLoss`` on pairs; FLOPs
by the formula of ``bench.gpu_models`` (checked against ``torch.utils.flop_counter`` on one step), over
the median step time of the steady steps, against the datasheet's dense bf16 peak (and against the
matrix-multiply rate measured by the ``check`` tier). A few more steps run under ``torch.profiler``
afterwards: where the GPU time goes.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import data, ours, st_reference
from bench.common import Row, alternate, mean_rate
from bench.gpu_models import (
    BERT_BASE_CONFIG,
    MINILM_ASSET,
    MINILM_CONFIG,
    describe_backbone,
    fixed_length_texts,
    minilm_from_asset,
    peak_bf16,
    random_text_model,
    tokenizer_source,
    train_flops_per_sequence,
)
from bench.gpu_results import load
from finetuner.api.layout import Record

TEXT_TARGET = 1.5
MFU_TARGET = 0.40
TINY_CONFIG: dict[str, Any] = {
    'hidden_size': 32,
    'num_hidden_layers': 2,
    'num_attention_heads': 2,
    'intermediate_size': 64,
    'max_position_embeddings': 64,
}


@dataclass(frozen=True)
class TextCase:
    task: str  # 'pairs' (MultipleNegativesRankingLoss) or 'triplet' (labelled sentences)
    batch: int
    max_length: int
    steps: int


@dataclass(frozen=True)
class MfuCase:
    name: str
    config: dict[str, Any]
    batch: int  # pairs per step (two sequences each)
    tokens: int  # every sequence is exactly this long
    target: float | None


def _clean_runs(workdir: Path) -> None:
    """Rounds leave checkpoints (BERT-base with AdamW state: 1.3 GB); the benchmark needs none."""
    shutil.rmtree(workdir / 'runs', ignore_errors=True)


def minilm(ctx: Any) -> tuple[Path, str]:
    """all-MiniLM-L6-v2 with its real weights when carried; else its architecture with random weights."""
    if ctx.assets is not None and (ctx.assets / MINILM_ASSET).is_dir() and not ctx.scale.dry:
        return minilm_from_asset(ctx.assets / MINILM_ASSET, ctx.workdir / 'all-MiniLM-L6-v2'), 'all-MiniLM-L6-v2'
    source, _ = tokenizer_source(ctx.assets, ctx.workdir)
    config = TINY_CONFIG if ctx.scale.dry else MINILM_CONFIG
    name = 'tiny BERT (random weights)' if ctx.scale.dry else 'all-MiniLM-L6-v2 architecture (random weights)'
    return random_text_model(ctx.workdir / 'minilm-random', config, source), name


def text_records(ctx: Any) -> dict[str, list[Record]]:
    if ctx.scale.dry:
        from tests.support.tiny import labelled_texts, text_pairs

        return {'triplet': labelled_texts(n_classes=8, per_class=16), 'pairs': text_pairs(n=96)}
    pairs = data.chatterbot_pairs()
    return {'triplet': data.labelled_sentences(pairs), 'pairs': data.pair_records(pairs)}


def text_cases(ctx: Any) -> list[TextCase]:
    if ctx.scale.dry:
        return [TextCase('pairs', 8, 16, 3), TextCase('triplet', 32, 16, 2)]
    pick = ctx.scale.pick
    return [
        TextCase('pairs', pick(32, 8), 64, pick(48, 3)),
        TextCase('triplet', 32, 64, pick(48, 2)),
        TextCase('pairs', pick(128, 16), 64, pick(12, 2)),
    ]


def _text_row(ctx: Any, model_dir: Path, model_name: str, records: list[Record], case: TextCase) -> list[Row]:
    from bench.text_throughput import balanced_subset

    steps = case.steps
    if case.task == 'pairs':
        records = data.repeat_to(records, steps * case.batch, seed=0)
    else:
        records, steps = balanced_subset(records, steps)  # batches of 32: the trainer's class-balanced epoch
    loss = 'TripletMarginLoss' if case.task == 'triplet' else 'MultipleNegativesRankingLoss'
    spec = ours.spec_for(
        str(model_dir),
        records,
        ctx.workdir,
        f'gpu-text-{case.task}-{case.batch}',
        loss=loss,
        batch_size=case.batch,
        epochs=1,
        learning_rate=2e-5,
        model_options={'max_length': case.max_length},
        device=ctx.scale.device,
    )

    def ours_round(profiler: Any = None, steps: int = steps) -> float:
        ends = ours.train_steps(spec, steps, ctx.workdir, f'gpu-text-{case.task}', profiler=profiler)
        _clean_runs(ctx.workdir)
        return mean_rate(ends, case.batch)

    def reference_round(profiler: Any = None, steps: int = steps) -> float:
        _, ends = st_reference.train(
            model_dir,
            records,
            case.task,  # type: ignore[arg-type]
            batch_size=case.batch,
            max_length=case.max_length,
            max_steps=steps,
            learning_rate=2e-5,
            device=ctx.scale.device,
            output_dir=ctx.workdir / 'st-output',
            bf16=ctx.scale.cuda,
            profiler=profiler,
        )
        return mean_rate(ends, case.batch)

    if not ctx.scale.dry:  # a discarded two-step round of each side: one-off costs fall on neither
        ours_round(steps=2)
        reference_round(steps=2)
    rounds = ctx.scale.pick(gpu=3, dry=1)
    samples_ours, samples_reference = alternate(ours_round, reference_round, rounds)
    words = (
        'TripletMarginLoss vs BatchAllTripletLoss, labelled sentences'
        if case.task == 'triplet'
        else ('MultipleNegativesRankingLoss, question-answer pairs')
    )
    row = Row.compare(
        benchmark='gpu_text',
        measure=f'text training on the GPU: {model_name}, {words}, batch {case.batch}, max length {case.max_length}',
        unit='samples/s',
        samples_ours=samples_ours,
        samples_reference=samples_reference,
        reference_name='SentenceTransformerTrainer, bf16=True',
        target_ratio=TEXT_TARGET,
        extra={'steps_per_round': float(steps), 'rounds': float(rounds)},
    )
    if row.met is False and ctx.seconds_left() > 60:
        from bench.profiling import explain_throughput

        try:
            row.note = explain_throughput(ours_round, reference_round, steps)
        except Exception as e:
            row.note = f'target missed; the profile failed: {type(e).__name__}: {e}'[:300]
    return [row]


def run_text(ctx: Any) -> None:
    model_dir, model_name = minilm(ctx)
    ctx.fact('model', model_name)
    datasets = text_records(ctx)
    for case in text_cases(ctx):
        if ctx.seconds_left() < 30:
            ctx.result.notes.append(f'{case} not run: {ctx.seconds_left():.0f} s left of the tier')
            ctx.save()
            continue
        ctx.measure(
            f'text training on the GPU: {case.task}, batch {case.batch}',
            lambda case=case: _text_row(ctx, model_dir, model_name, datasets[case.task], case),
            target=f'>= {TEXT_TARGET:g}x',
        )


# --- MFU ------------------------------------------------------------------------------------------


# First match wins: attention kernels are often CUTLASS kernels too (fmha_cutlassF_...).
KERNEL_KINDS = (
    ('attention', ('flash', 'fmha', 'attention', 'attn')),
    ('matrix multiply', ('gemm', 'xmma', 'cutlass', 'nvjet', 'wgmma', 'matmul')),
    ('optimizer', ('adam', 'multi_tensor')),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), 'other')


class KernelProfile:
    """Profiles steps ``start`` (exclusive) to ``stop`` of a loop (``step_end()`` after each step), then
    sums the GPU kernels' time by kind: the share of the wall time the GPU was busy, and what with."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.seen = 0
        self.began = 0.0
        self.prof: Any = None
        self.summary: dict[str, Any] = {}

    def step_end(self) -> None:
        """Never raises: a profiler that cannot run (no CUPTI, say) costs the profile, not the measurement."""
        self.seen += 1
        try:
            self._step_end()
        except Exception as e:
            self.prof = None
            self.summary = {'error': f'the profiler failed: {type(e).__name__}: {e}'[:300]}

    def _step_end(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.seen == self.start:
            cuda = torch.cuda.is_available()
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.start()
            self.began = time.perf_counter()
        elif self.seen == self.stop and self.prof is not None:
            self.prof.stop()
            self.summary = summarize_kernels(self.prof, time.perf_counter() - self.began, self.stop - self.start)


def summarize_kernels(prof: Any, wall: float, steps: int) -> dict[str, Any]:
    """GPU kernel time by kind (CPU operator self time when no kernel ran: a CPU dry run)."""
    import torch

    by_kind: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    for event in prof.key_averages():
        if getattr(event, 'device_type', None) != torch.autograd.DeviceType.CUDA:
            continue
        us = float(getattr(event, 'self_device_time_total', 0) or getattr(event, 'self_cuda_time_total', 0) or 0)
        by_kind[kernel_kind(event.key)] += us
        by_name[event.key] += us
    if not by_kind:
        from bench.profiling import summarize

        return {'steps': steps, 'wall_s': wall, 'cpu_profile': summarize(prof, wall).sentence()}
    busy = sum(by_kind.values()) / 1e6
    return {
        'steps': steps,
        'wall_s': wall,
        'gpu_busy_share': busy / wall,
        'kernel_shares': {kind: us / 1e6 / busy for kind, us in by_kind.most_common()},
        'top_kernels': [(name[:80], us / 1e6 / busy) for name, us in by_name.most_common(5)],
    }


def profile_sentence(summary: dict[str, Any]) -> str:
    if not summary:
        return 'the profiler captured nothing'
    if 'error' in summary:
        return summary['error']
    if 'cpu_profile' in summary:
        return f'no GPU kernels (CPU run): {summary["cpu_profile"]}'
    shares = ', '.join(f'{kind} {share:.0%}' for kind, share in summary['kernel_shares'].items())
    top = ', '.join(f'{name} {share:.0%}' for name, share in summary['top_kernels'][:3])
    return (
        f'torch.profiler over {summary["steps"]} steps: the GPU ran kernels {summary["gpu_busy_share"]:.0%} of the '
        f'wall time; of its kernel time: {shares} (top kernels: {top})'
    )


def counted_flops(folder: Path, texts: list[str], tokens: int, device: str) -> float:
    """FLOPs of forward + backward of one group of texts counted by ``torch.utils.flop_counter`` on the
    plain transformers encoder (matrix multiplies and attention, as the formula counts)."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), add_pooling_layer=False).to(device)
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=tokens, return_tensors='pt').to(device)
    if int(inputs['attention_mask'].sum()) != len(texts) * tokens:
        raise ValueError(f'the texts are not all {tokens} tokens long: padding would be counted')
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device == 'cuda' else contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        model(**inputs).last_hidden_state.float().mean().backward()
    return float(counter.get_total_flops())


def mfu_cases(ctx: Any) -> list[MfuCase]:
    if ctx.scale.dry:
        return [MfuCase('tiny BERT', TINY_CONFIG, batch=8, tokens=16, target=MFU_TARGET)]
    pick = ctx.scale.pick
    return [
        MfuCase('MiniLM-L6 (all-MiniLM-L6-v2 architecture)', MINILM_CONFIG, pick(512, 4), pick(128, 32), target=None),
        MfuCase('BERT-base', BERT_BASE_CONFIG, batch=pick(256, 4), tokens=pick(128, 32), target=MFU_TARGET),
        MfuCase('BERT-base', BERT_BASE_CONFIG, batch=pick(64, 2), tokens=pick(512, 64), target=MFU_TARGET),
    ]


def _peak(ctx: Any) -> tuple[float, str]:
    """The peak MFU is measured against: the datasheet's, else the matrix-multiply rate measured here."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = peak_bf16(name)
        if peak is not None:
            return peak, f'{name} datasheet dense bf16 peak {peak / 1e12:.0f} TFLOP/s'
    from bench.gpu_check import matmul_rate

    measured = matmul_rate(ctx.scale.pick(gpu=8192, dry=256), ctx.scale.device)
    return measured, f'the bf16 matrix-multiply rate measured in this process ({measured / 1e12:.3g} TFLOP/s)'


def _mfu_row(ctx: Any, case: MfuCase, source: Path) -> list[Row]:
    from transformers import AutoTokenizer

    warm, measured, profiled = ctx.scale.pick(gpu=(3, 10, 3), dry=(1, 2, 2))
    slug = case.name.split(' ')[0].lower()
    folder = random_text_model(ctx.workdir / f'mfu-{slug}', case.config, source)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    total = warm + measured + profiled
    texts = fixed_length_texts(tokenizer, case.tokens, 2 * (total + 1) * case.batch, seed=0)
    records = [Record(chunks=[Record(text=q), Record(text=d)]) for q, d in zip(texts[::2], texts[1::2], strict=True)]
    spec = ours.spec_for(
        str(folder),
        records,
        ctx.workdir,
        f'gpu-mfu-{slug}',
        loss='MultipleNegativesRankingLoss',
        batch_size=case.batch,
        epochs=1,
        learning_rate=1e-5,
        model_options={'max_length': case.tokens},
        device=ctx.scale.device,
    )
    profiler = KernelProfile(start=warm + measured, stop=total)
    ends = ours.train_steps(spec, total, ctx.workdir, f'gpu-mfu-{slug}', profiler=profiler)
    _clean_runs(ctx.workdir)
    step_ends = ends[1:]
    durations = [
        b - a for a, b in zip(step_ends[warm - 1 : warm + measured - 1], step_ends[warm : warm + measured], strict=True)
    ]
    step_s = statistics.median(durations)
    shape = describe_backbone(folder)
    per_sequence = train_flops_per_sequence(shape['parameters'], shape['layers'], shape['hidden'], case.tokens)
    flops_step = 2 * case.batch * per_sequence
    try:  # a cross-check only: its failure must not cost the measurement
        counted: float | None = 2 * counted_flops(folder, texts[: case.batch], case.tokens, ctx.scale.device)
    except Exception as e:
        counted = None
        ctx.result.notes.append(f'{case.name}: torch.utils.flop_counter failed ({type(e).__name__}: {e})'[:300])
    peak, peak_words = _peak(ctx)
    mfu = flops_step / step_s / peak
    extra: dict[str, float | str] = {
        'step_s_median': step_s,
        'pairs_per_s': case.batch / step_s,
        'tokens_per_s': 2 * case.batch * case.tokens / step_s,
        'model_tflops_per_s': flops_step / step_s / 1e12,
        'flops_per_step_formula': flops_step,
        **({'flops_per_step_counted': counted, 'counted_over_formula': counted / flops_step} if counted else {}),
        'nonembedding_parameters': float(shape['parameters']),
        'peak': peak_words,
    }
    check = load(ctx.out, 'check')
    ceiling = (check.facts.get('ceilings') or {}).get('matmul_bf16_tflops') if check is not None else None
    if ceiling and ctx.scale.cuda:
        extra['mfu_vs_measured_matmul_pct'] = 100 * flops_step / step_s / (ceiling * 1e12)
    summary = profiler.summary
    if summary.get('kernel_shares'):
        extra['gpu_busy_pct'] = 100 * summary['gpu_busy_share']
        extra.update({f'kernel_{k.replace(" ", "_")}_pct': 100 * v for k, v in summary['kernel_shares'].items()})
    met = None if case.target is None else mfu >= case.target
    note = '' if met is not False else f'target missed. {profile_sentence(summary)}.'
    if met is not False and summary:
        note = profile_sentence(summary)
    return [
        Row(
            benchmark='gpu_mfu',
            measure=f"MFU, the trainer's loop: {case.name} (random weights), bf16 autocast, "
            f'MultipleNegativesRankingLoss, batch {case.batch} pairs of {case.tokens} tokens',
            unit='% of peak',
            ours=100 * mfu,
            target=f'>= {case.target:.0%}' if case.target is not None else '–',
            met=met,
            note=note,
            samples_ours=[100 * flops_step / d / peak for d in durations],
            extra=extra,
        )
    ]


def run_mfu(ctx: Any) -> None:
    source, words = tokenizer_source(ctx.assets, ctx.workdir)
    ctx.fact('tokenizer', words)
    ctx.fact(
        'formula',
        'model FLOPs per step = 2 groups x batch x (6 N s + 12 L s^2 d), N non-embedding '
        'parameters, L layers, d hidden size, s tokens per sequence; MFU = model FLOPs per step / '
        'median step time / peak',
    )
    for case in mfu_cases(ctx):
        target = f'>= {case.target:.0%}' if case.target is not None else ''
        ctx.measure(f'MFU: {case.name}', lambda case=case: _mfu_row(ctx, case, source), target=target)
