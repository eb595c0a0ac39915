"""Multi-GPU and multi-node training under ``torchrun``.

``torchrun --nproc-per-node N --nnodes M --rdzv-endpoint HOST:PORT -m finetuner_trainer ...`` sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them and joins the process group (NCCL on GPUs, gloo on CPU). Without them the trainer is a
single process and every helper here is a no-op.

How the pieces keep one process and N processes equivalent:

- every rank walks the same sequence of *global* batches (the samplers are deterministic per seed and
  epoch) and takes its share with :class:`ShardedBatches`, so a class-balanced global batch stays
  class-balanced on every rank and all ranks run the same number of steps;
- the objective is wrapped in :class:`DistributedObjective`, which gathers embeddings (and labels)
  across ranks first: miners mine the global batch, CLIP and other in-batch-negative losses get
  negatives from every rank, and the gradients equal one process's (see :func:`gather_for_loss`);
- only rank 0 writes (artifact, checkpoints, metrics); every rank takes part in the collectives of
  evaluation and early stopping (:func:`agree`), so all stop at the same step.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from finetuner_trainer.rng import rank_seed, reseed

if TYPE_CHECKING:
    from finetuner_trainer.context import TrainContext

log = logging.getLogger(__name__)

ModuleT = TypeVar('ModuleT', bound=torch.nn.Module)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size as torchrun set them (a single process when unset)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    return DistInfo(
        rank=int(os.environ.get('RANK', '0')),
        local_rank=int(os.environ.get('LOCAL_RANK', '0')),
        world_size=world,
    )


def init_distributed(device: str = 'auto', timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when started by torchrun; pick NCCL for CUDA, gloo otherwise.

    ``device`` is the spec's device (auto, cuda, cpu). Returns the rank information; on CUDA the
    current device becomes ``cuda:LOCAL_RANK``."""
    info = env_info()
    if not info.enabled:
        return info
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size(), dist.get_backend())
    use_cuda = device != 'cpu' and torch.cuda.is_available()
    backend = 'nccl' if use_cuda else 'gloo'
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size(), backend)
    log.info('distributed: rank %d of %d (local rank %d, %s)', info.rank, info.world_size, info.local_rank, backend)
    return info


def device_for(info: DistInfo, device: str = 'auto') -> torch.device:
    """The torch device this rank trains on."""
    if device != 'cpu' and torch.cuda.is_available():
        return torch.device('cuda', info.local_rank if info.enabled else torch.cuda.current_device())
    if device == 'cuda':
        raise RuntimeError('device: cuda was requested but no CUDA device is visible to this process')
    return torch.device('cpu')


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while another still talks to it
    can abort the pair ("terminate called without an active exception", SIGABRT at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Agreement between ranks
# ---------------------------------------------------------------------------------------------


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def agree(flag: bool) -> bool:
    """True on every rank when any rank says True (early stopping, a failed export): all ranks stop
    at the same step, so no rank waits forever in a collective the others left."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_across(value: float) -> float:
    """The mean of a number over ranks (training loss for logs and progress)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (e.g. metrics computed on rank 0)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's Python object, in rank order, on rank 0 (None on the other ranks); ``[obj]``
    when not distributed. A collective: every rank must call it."""
    if not is_distributed():
        return [obj]
    holder: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, holder, dst=0)
    return holder


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class BatchSampler(Protocol):
    def __iter__(self) -> Iterator[list[int]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


class ShardedBatches:
    """This rank's share of every global batch of ``batches``.

    Rank r takes positions r, r + N, r + 2N, ... of each global batch. A class-balanced sampler puts
    a class's items next to each other, so every rank gets items of every class in the batch and its
    positives stay in its share. Shares have equal sizes (the loss wrappers gather equal-sized
    tensors): a global batch is cut to a multiple of the world size, and one smaller than the world
    size is skipped on every rank alike.
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is outside a world of {world_size}')
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            usable = len(batch) - len(batch) % self.world_size
            if usable == 0:
                continue
            yield list(batch[self.rank : usable : self.world_size])


def shard(batches: BatchSampler, info: DistInfo | None = None) -> BatchSampler | ShardedBatches:
    info = info or env_info()
    return ShardedBatches(batches, info.rank, info.world_size) if info.enabled else batches


def global_batch_order(batch: Sequence[int], world: int) -> list[int]:
    """The order in which a global batch's items appear after gathering the ranks' shares
    (rank 0's share, then rank 1's, ...): what a single process must use to reproduce a DDP step."""
    usable = len(batch) - len(batch) % world
    return [batch[i] for r in range(world) for i in range(r, usable, world)]


# ---------------------------------------------------------------------------------------------
# Models and losses
# ---------------------------------------------------------------------------------------------


def sync_batch_norm(model: ModuleT, info: DistInfo) -> ModuleT:
    """BatchNorm layers that normalise over the global batch, as one process would: SyncBatchNorm
    on NCCL. PyTorch has no SyncBatchNorm for CPU tensors, so under gloo each rank normalises its own
    share (said once in the log: the run then differs slightly from one process on the same batch).
    The parameters and buffers keep their names, so checkpoints and the saved model are unchanged."""
    if not info.enabled or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if info.backend == 'nccl':
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[return-value]  # the same module
    log.warning(
        'the model has BatchNorm layers: on %s each of the %d processes normalises its own share of the batch '
        '(SyncBatchNorm needs GPUs)',
        info.backend,
        info.world_size,
    )
    return model


def unwrap(module: Any) -> Any:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while isinstance(module, torch.nn.Module):
        inner = getattr(module, 'module', None)
        if inner is None:
            inner = getattr(module, '_orig_mod', None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
    return module


def wrap_model(model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (already on its device) when distributed."""
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if info.backend == 'nccl' else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def gather_for_loss(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's (equal-sized) ``tensor`` concatenated in rank order, for a loss over the global batch.

    Every rank then computes the same global loss L. The other ranks' parts carry no gradient; this
    rank's part carries ``world_size`` times dL/d(part), so that DistributedDataParallel's averaging
    of model gradients gives exactly the single-process gradient of L. Parameters of the loss itself
    (a CLIP temperature, ArcFace class weights) see plain dL/dW, the same on every rank: they stay in
    step without being wrapped. Identity when not distributed."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = _ScaleGrad.apply(tensor, float(world))
    return torch.cat(parts, dim=0)


def gather_labels(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's labels or scores in rank order (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class DistributedObjective(torch.nn.Module):
    """Runs a training objective on the global batch: embeddings (and labels or scores) of all ranks
    are gathered first, so miners mine globally, in-batch negatives come from every rank and the loss
    equals the one-process loss on the same global batch.

    Works for label objectives ``(embeddings, labels)`` and pair objectives
    ``(queries, documents, scores)``. pytorch-metric-learning's DistributedLossWrapper is not used:
    it multiplies the loss by the world size, which would also multiply the gradients of loss
    parameters (ArcFace, ProxyAnchor) that DDP does not average."""

    def __init__(self, objective: torch.nn.Module):
        super().__init__()
        self.objective = objective

    def forward(self, first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():  # validation: every rank scores the same batch itself
            return self.objective(first, second, scores) if scores is not None else self.objective(first, second)
        if second.is_floating_point() and second.ndim == 2:  # (queries, documents, scores)
            gathered_scores = gather_labels(scores) if scores is not None else None
            return self.objective(gather_for_loss(first), gather_for_loss(second), gathered_scores)
        return self.objective(gather_for_loss(first), gather_labels(second))


def wrap_objective(objective: torch.nn.Module) -> torch.nn.Module:
    """:class:`DistributedObjective` around the objective when distributed; the objective itself otherwise."""
    return DistributedObjective(objective) if is_distributed() else objective


def global_clip_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the *global* batch (in-batch negatives from every rank), see
    :func:`gather_for_loss` for why the gradients equal one process's on the whole batch."""
    all_text = gather_for_loss(text_emb)
    all_image = gather_for_loss(image_emb)
    all_text = torch.nn.functional.normalize(all_text, dim=-1)
    all_image = torch.nn.functional.normalize(all_image, dim=-1)
    logits = logit_scale.exp() * all_text @ all_image.T
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    return loss


def setup_loop(ctx: TrainContext) -> DistInfo:
    """Make the loop's context distributed when started by torchrun: join the process group, wrap
    the model in DDP (``ctx.module``), the objective in :class:`DistributedObjective` and the
    batches in :class:`ShardedBatches`. A no-op for a single process."""
    info = env_info()
    if not info.enabled:
        return info
    info = init_distributed(str(getattr(ctx.spec.device, 'value', ctx.spec.device)))
    if ctx.state.resumed_from is None and info.rank > 0:
        # Every rank built the model from the same seed (identical initial weights, also of loss
        # parameters DDP does not broadcast); from here on each draws its own random stream. A
        # resumed rank continues the stream its checkpoint saved for it (checkpointing.resume_from_latest).
        reseed(rank_seed(ctx.spec.seed, info.rank))

    # Pair data runs the model twice per step (queries, documents): DDP's static graph mode
    # supports that; label data runs it once.
    pairs = not hasattr(ctx.loss, 'miner')
    if ctx.module is None:
        # A model with towers for several kinds of content (CLIP) leaves the other towers unused on label data.
        find_unused = ctx.model.find_unused_parameters and not pairs
        ctx.model = sync_batch_norm(ctx.model, info)
        ctx.module = wrap_model(ctx.model, info, find_unused_parameters=find_unused)
        if pairs and isinstance(ctx.module, DistributedDataParallel):
            ctx.module._set_static_graph()
    ctx.loss = wrap_objective(ctx.loss)
    loader = ctx.train_loader
    ctx.train_loader = DataLoader(
        loader.dataset,
        batch_sampler=ShardedBatches(loader.batch_sampler, info.rank, info.world_size),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.num_workers > 0,
    )
    ctx.rank, ctx.world_size, ctx.local_rank = info.rank, info.world_size, info.local_rank
    ctx.state.is_world_process_zero = info.is_main
    ctx.logger.info(
        'distributed training: %d processes (%s), global batch %d = %d per process',
        info.world_size,
        info.backend,
        ctx.batch_size,
        ctx.batch_size // info.world_size,
    )
    return info
