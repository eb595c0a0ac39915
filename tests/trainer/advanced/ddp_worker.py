"""Run by test_distributed.py, once as one process and once under ``torchrun --nproc-per-node 2``.

Trains a tiny MLP with TripletMarginLoss + miner (class-balanced global batches, sharded over ranks),
one with ArcFaceLoss (a loss with parameters) and a tiny two-tower model
with the global CLIP loss, and writes the per-step losses of rank 0 as JSON.
"""

from __future__ import annotations

import json
import sys

import torch

from finetuner_trainer import distributed as D


class Balanced:
    """Deterministic class-balanced global batches: 2 items of each of 4 classes, classes adjacent."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 4

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.epoch)
        by_class = {c: [i for i, lab in enumerate(self.labels) if lab == c] for c in sorted(set(self.labels))}
        for _ in range(len(self)):
            batch = []
            for items in by_class.values():
                pick = torch.randperm(len(items), generator=g)[:2].tolist()
                batch += [items[p] for p in pick]
            yield batch


def main(out: str) -> None:
    info = D.init_distributed('cpu')
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    labels = [i % 4 for i in range(32)]
    y = torch.tensor(labels)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    ddp = D.wrap_model(model, info)
    from pytorch_metric_learning.losses import ArcFaceLoss, TripletMarginLoss
    from pytorch_metric_learning.miners import TripletMarginMiner

    from finetuner_trainer.losses import LabelObjective

    objective = LabelObjective(TripletMarginLoss(margin=0.5), TripletMarginMiner(margin=0.5))
    loss_fn = D.wrap_objective(objective)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    sampler = D.shard(Balanced(labels), info)
    metric_losses = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in sampler:
            if info.enabled:
                idx = batch
            else:
                idx = D.global_batch_order(batch, 2)  # the order the gathered ranks' shares have
            loss = loss_fn(ddp(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            metric_losses.append(loss.item())

    # A loss with parameters of its own (ArcFace class weights): they must stay in step on every rank.
    torch.manual_seed(2)
    arc_model = torch.nn.Linear(6, 8)
    arc_ddp = D.wrap_model(arc_model, info)
    arc = D.wrap_objective(LabelObjective(ArcFaceLoss(num_classes=4, embedding_size=8)))
    arc_optimizer = torch.optim.SGD([*arc_ddp.parameters(), *arc.parameters()], lr=0.1)
    arc_losses = []
    sampler.set_epoch(0)
    for batch in sampler:
        idx = batch if info.enabled else D.global_batch_order(batch, 2)
        loss = arc(arc_ddp(x[idx]), y[idx])
        arc_optimizer.zero_grad()
        loss.backward()
        arc_optimizer.step()
        arc_losses.append(loss.item())

    # Two towers trained with the global CLIP loss: text i belongs with image i.
    torch.manual_seed(1)
    texts, images = torch.randn(16, 5), torch.randn(16, 7)
    towers = torch.nn.ModuleDict({'text': torch.nn.Linear(5, 4), 'image': torch.nn.Linear(7, 4)})
    towers.register_parameter('logit_scale', torch.nn.Parameter(torch.tensor(1.0)))
    optimizer = torch.optim.SGD(towers.parameters(), lr=0.5)
    clip_losses = []
    for step in range(4):
        batch = list(range(step * 4, step * 4 + 8)) if step < 2 else list(range(8))
        share = batch[D.rank() :: D.world_size()] if info.enabled else D.global_batch_order(batch, 2)
        text_emb = towers['text'](texts[share])
        image_emb = towers['image'](images[share])
        loss = D.global_clip_loss(text_emb, image_emb, towers.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        if info.enabled:  # what DistributedDataParallel does after backward: average gradients
            for p in towers.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= D.world_size()
        optimizer.step()
        clip_losses.append(loss.item())

    stop = D.agree(D.rank() == 1)
    params = [*model.parameters(), *towers.parameters(), *arc_model.parameters(), *arc.parameters()]
    checksum = [float(p.detach().abs().sum()) for p in params]
    if D.is_main_process():
        with open(out, 'w') as f:
            result = {'metric': metric_losses, 'clip': clip_losses, 'arc': arc_losses, 'weights': checksum}
            json.dump({**result, 'agree': stop, 'world': D.world_size()}, f)
    D.shutdown()


if __name__ == '__main__':
    main(sys.argv[1])
