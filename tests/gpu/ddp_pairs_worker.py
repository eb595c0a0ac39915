"""Run by test_cuda.py (NCCL on a GPU) and test_cpu_side.py (gloo on the CPU) in a process of its own:
one process joins a process group, and the trainer's text embedder, wrapped in DistributedDataParallel
by the trainer's own ``distributed.ddp_wrapper`` the way ``setup_loop`` wraps it for pair data (static
graph, two forward passes a step), takes two steps against the same steps without DDP. Prints one JSON
line: the losses of both sides and the largest gradient difference, or the error of the DDP side.

``python tests/gpu/ddp_pairs_worker.py MODEL_DIR PORT [--backend gloo] [--wrapper trainer|plain]
[--unpreserved-buffer-versions]``

- ``--wrapper plain``: ``DistributedDataParallel(model)`` with its defaults (buffers broadcast before
  every forward) instead of the trainer's wrapper;
- ``--unpreserved-buffer-versions``: DDP's buffer broadcast bumps the buffers' version counters, as it
  does in torch 2.11 (the GPU machine's); newer torch wraps the broadcast in
  ``torch.autograd._unsafe_preserve_version_counter``, which this switches off.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def two_steps(model: Any, objective: Any, queries: Any, documents: Any) -> float:
    import torch

    torch.manual_seed(1)  # the same dropout masks on both sides
    value = None
    for _ in range(2):  # two steps: DDP's static graph is built on the first
        model.zero_grad(set_to_none=True)
        value = objective(model(queries), model(documents))
        value.backward()
    return float(value.detach())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('model_dir')
    parser.add_argument('port')
    parser.add_argument('--backend', choices=('nccl', 'gloo'), default='nccl')
    parser.add_argument('--wrapper', choices=('trainer', 'plain'), default='trainer')
    parser.add_argument('--unpreserved-buffer-versions', action='store_true')
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.distributed import DistInfo, ddp_wrapper
    from finetuner_trainer.losses import build_objective
    from finetuner_trainer.models import build_embedder, to_device
    from tests.support.tiny import text_pairs

    if args.unpreserved_buffer_versions:
        torch.autograd._unsafe_preserve_version_counter = lambda *a, **k: contextlib.nullcontext()
    device = 'cuda' if args.backend == 'nccl' else 'cpu'
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=args.port, RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
    if device == 'cuda':
        torch.cuda.set_device(0)
    dist.init_process_group(args.backend, rank=0, world_size=1)
    one = torch.ones(3, device=device)
    dist.all_reduce(one)
    spec = FinetuneRunSpec(model=args.model_dir, train_data='unused.jsonl', loss='MultipleNegativesRankingLoss')
    torch.manual_seed(0)
    embedder = build_embedder(spec)
    plain = copy.deepcopy(embedder).to(device)
    if args.wrapper == 'trainer':
        wrapped = ddp_wrapper(copy.deepcopy(embedder).to(device), DistInfo(0, 0, 1, args.backend), static_graph=True)
    else:
        wrapped = DistributedDataParallel(copy.deepcopy(embedder).to(device), static_graph=True)
    objective = build_objective('MultipleNegativesRankingLoss', {}, None, {}, embedder.output_dim, 0).to(device)
    pairs = text_pairs(n=16)
    queries = to_device(embedder.collate([p.chunks[0] for p in pairs]), device)
    documents = to_device(embedder.collate([p.chunks[1] for p in pairs]), device)
    result: dict[str, Any] = {
        'backend': dist.get_backend(),
        'all_reduce': one.tolist(),
        'broadcast_buffers': wrapped.broadcast_buffers,
    }
    losses = [two_steps(plain, objective, queries, documents)]
    try:
        losses.append(two_steps(wrapped, objective, queries, documents))
    except RuntimeError as e:
        result['error'] = str(e).splitlines()[0]
    else:
        result['losses'] = losses
        result['grad_diff'] = max(
            float((a.grad - b.grad).abs().max())
            for a, b in zip(plain.parameters(), wrapped.module.parameters(), strict=True)
            if a.grad is not None
        )
    print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
