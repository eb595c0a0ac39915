"""Peak memory of one training step at a large batch: GradCache against the uncached loss.

One optimizer step of all-MiniLM-L6-v2 on 256 chatterbot-corpus question-answer pairs (max length 64,
MultipleNegativesRankingLoss: 255 in-batch negatives per query) runs through the trainer's own forward
(``finetuner_trainer.loop.forward_loss``) twice, each in a fresh process: the uncached loss embeds the
whole batch with one graph; ``CachedMultipleNegativesRankingLoss`` with ``mini_batch_size: 32`` holds one
mini-batch's graph at a time. Memory is what the step adds to the process at its peak: on a CPU the
resident set's high-water mark (``/proc/self/clear_refs`` resets it after the model, its gradients and the
batch are in memory), on a GPU ``torch.cuda.max_memory_allocated``. Both steps must give the same loss
(dropout is off, so both see the same network; the graph and its memory are built as in training).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import Row, Settings

BENCHMARK = 'grad_cache'
TARGET = 0.40


def _peak_rss_mb() -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('no VmHWM in /proc/self/status')


def _rss_mb() -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('no VmRSS in /proc/self/status')


def measure(arguments: dict[str, Any]) -> dict[str, float]:
    """In this (fresh) process: one step of the batch through the loss; the step's peak memory (MB) and loss."""
    import torch

    from bench.data import chatterbot_pairs, pair_records, repeat_to_pairs
    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.data import Example, Shape, to_item
    from finetuner_trainer.loop import forward_loss
    from finetuner_trainer.losses import build_objective
    from finetuner_trainer.models import build_embedder, to_device
    from finetuner_trainer.runner import Collator

    torch.manual_seed(0)
    device = torch.device(arguments['device'])
    spec = FinetuneRunSpec(model=arguments['model'], train_data='file:///x', model_options={'max_length': 64})
    model = build_embedder(spec).to(device).eval()  # no dropout: both losses see the same network
    options = {'mini_batch_size': arguments['mini_batch_size']} if arguments['mini_batch_size'] else {}
    loss = build_objective('MultipleNegativesRankingLoss', options, None, {}, model.output_dim, 0).to(device)
    records = pair_records(repeat_to_pairs(chatterbot_pairs(), arguments['batch'], seed=0))
    examples = [Example(tuple(to_item(c, 'pair', 'data') for c in r.chunks)) for r in records]
    collator = Collator(model, Shape.PAIRS, mini_batch_size=arguments['mini_batch_size'] or None)
    forward_loss(model, loss, to_device(collator(examples[:4]), device)).backward()  # gradients allocated
    batch = to_device(collator(examples), device)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        Path('/proc/self/clear_refs').write_text('5')  # the high-water mark starts again from here
        before = _rss_mb()
    value = forward_loss(model, loss, batch)
    value.backward()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb()
    return {'peak_mb': peak - before, 'loss': float(value.detach())}


def _run_side(model: str, batch: int, mini_batch_size: int | None, device: str) -> dict[str, float]:
    arguments = {'model': model, 'batch': batch, 'mini_batch_size': mini_batch_size, 'device': device}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, '-m', 'bench.grad_cache', json.dumps(arguments)],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f'the measuring process failed: {done.stderr[-2000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(settings: Settings) -> list[Row]:
    from bench.text_throughput import text_model

    batch, mini = (256, 32) if settings.mode != 'tiny' else (32, 4)
    model = str(text_model(settings))
    name = Path(model).name if settings.mode == 'tiny' else 'all-MiniLM-L6-v2'  # the package's folder is 'model'
    uncached = _run_side(model, batch, None, settings.device)
    cached = _run_side(model, batch, mini, settings.device)
    where = 'GPU memory allocated' if settings.gpu else 'resident memory (CPU)'
    row = Row.compare(
        benchmark=BENCHMARK,
        measure=f'peak {where} added by one training step, {name}, MultipleNegativesRankingLoss, '
        f'batch of {batch} pairs, max length 64: CachedMultipleNegativesRankingLoss (mini-batches of {mini}) '
        'vs the uncached loss (lower is better)',
        unit='MB',
        samples_ours=[cached['peak_mb']],
        samples_reference=[uncached['peak_mb']],
        reference_name='uncached loss, same batch',
        target_ratio=None,
        target=f'< {TARGET:.0%} of the uncached, same loss',
        extra={'loss_cached': cached['loss'], 'loss_uncached': uncached['loss']},
    )
    same_loss = abs(cached['loss'] - uncached['loss']) <= 1e-4 * max(1.0, abs(uncached['loss']))
    row.met = row.ratio is not None and row.ratio < TARGET and same_loss
    return [row]


if __name__ == '__main__':
    print(json.dumps(measure(json.loads(sys.argv[1]))))
