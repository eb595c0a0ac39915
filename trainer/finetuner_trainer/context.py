"""What one training run shares between the loop, the callbacks and the checkpoints: :class:`TrainContext`.

Every piece the loop, the checkpointer and the callbacks read or write is a typed field here (after
Hugging Face's ``TrainerState``: no string-keyed bag). The runner builds the context
(``finetuner_trainer.runner.build_context``), the loop trains it (``finetuner_trainer.loop``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig
from finetuner.storage import LocalStore, S3Store
from finetuner_trainer.callbacks import RetrievalEvaluation
from finetuner_trainer.checkpointing import Checkpointer
from finetuner_trainer.data import Dataset
from finetuner_trainer.embedder import Embedder
from finetuner_trainer.hooks import Callback, Control, TrainState
from finetuner_trainer.progress import ProgressReporter


@dataclass
class RunMetrics:
    """The parts of ``metrics.json`` that are not one epoch's."""

    before: dict[str, float] = field(default_factory=dict)  # before fine-tuning (kept by checkpoints)
    after: dict[str, float] | None = None  # re-measured when a callback replaced the weights at the end
    examples: list[dict[str, Any]] = field(default_factory=list)  # top matches of a few queries, latest weights
    # the same before fine-tuning (kept by checkpoints)
    examples_before: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ResumePoint:
    """Where an attempt resumed from a step checkpoint continues inside its epoch: the batches of
    that epoch already trained, and the RNG state to restore once they are skipped."""

    skip_batches: int = 0
    rng: dict[str, Any] | None = None


@dataclass
class TrainContext:
    config: TrainerConfig
    spec: FinetuneRunSpec
    model: Embedder  # the embedder itself (what is saved)
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    loss: nn.Module  # a LabelObjective or a PairObjective (or a DistributedObjective around one)
    loss_optimizer: torch.optim.Optimizer | None
    device: torch.device
    store: LocalStore | S3Store  # the run's output
    train_records: Dataset
    eval_records: Dataset | None
    logger: logging.Logger
    train_loader: DataLoader[Any]
    eval_loader: DataLoader[Any] | None
    batch_size: int
    reporter: ProgressReporter
    checkpointer: Checkpointer
    callbacks: list[Callback] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA, None on CPU
    module: nn.Module | None = None  # what forward() runs: the model, or its DDP wrapper
    state: TrainState = field(default_factory=TrainState)
    control: Control = field(default_factory=Control)
    metrics: RunMetrics = field(default_factory=RunMetrics)
    resume: ResumePoint = field(default_factory=ResumePoint)
    evaluation: RetrievalEvaluation = field(default_factory=RetrievalEvaluation)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def runner(self) -> nn.Module:
        return self.module if self.module is not None else self.model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
