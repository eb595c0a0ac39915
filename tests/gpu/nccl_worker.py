"""Run by test_cuda.py in its own process: NCCL with one process, and the trainer's text embedder in
DistributedDataParallel the way ``distributed.setup_loop`` wraps it for pair data (static graph, two
forward passes a step), against the same step without DDP. Prints one JSON line.

``python tests/gpu/nccl_worker.py MODEL_DIR PORT``
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(model_dir: str, port: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.losses import build_objective
    from finetuner_trainer.models import build_embedder, to_device
    from tests.support.tiny import text_pairs

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=port, RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
    torch.cuda.set_device(0)
    dist.init_process_group('nccl', rank=0, world_size=1)
    one = torch.ones(3, device='cuda')
    dist.all_reduce(one)
    spec = FinetuneRunSpec(model=model_dir, train_data='unused.jsonl', loss='MultipleNegativesRankingLoss')
    torch.manual_seed(0)
    embedder = build_embedder(spec)
    plain = copy.deepcopy(embedder).cuda()
    wrapped = DistributedDataParallel(copy.deepcopy(embedder).cuda(), device_ids=[0])
    wrapped._set_static_graph()
    objective = build_objective('MultipleNegativesRankingLoss', {}, None, {}, embedder.output_dim, 0).cuda()
    pairs = text_pairs(n=16)
    queries = to_device(embedder.collate([p.chunks[0] for p in pairs]), 'cuda')
    documents = to_device(embedder.collate([p.chunks[1] for p in pairs]), 'cuda')
    losses = []
    for model in (plain, wrapped):
        torch.manual_seed(1)  # the same dropout masks on both sides
        for _ in range(2):  # two steps: DDP's static graph is built on the first
            model.zero_grad(set_to_none=True)
            value = objective(model(queries), model(documents))
            value.backward()
        losses.append(float(value.detach()))
    worst = max(
        float((a.grad - b.grad).abs().max())
        for a, b in zip(plain.parameters(), wrapped.module.parameters(), strict=True)
        if a.grad is not None
    )
    print(json.dumps({'backend': dist.get_backend(), 'all_reduce': one.tolist(), 'losses': losses, 'grad_diff': worst}))
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
