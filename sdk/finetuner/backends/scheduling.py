"""The local queue's rules: which waiting runs start now, and what a waiting run says while it waits.

Pure functions over what the queue observed (no files, no processes); :mod:`finetuner.backends._scheduler`
applies them under the queue's lock. The rules:

- A run trains on a **GPU** when it asks for one (``resources.gpus`` > 0, ``device`` not ``cpu``) and the
  queue has GPUs; otherwise it takes a **CPU slot**. The local trainer is one process, so a GPU run takes
  one GPU (``resources.gpus`` > 1 and ``nodes`` apply on a cluster).
- One training at a time per GPU; ``cpu_runs`` trainings at once on the CPU (default 1).
- Each line (GPU, CPU) is first in, first out, by submission: a run never overtakes an older run waiting
  for the same resource. A suspended run keeps its place but waits until it is resumed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from finetuner.api import reasons
from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import FinetuneRunSpec


class Pool(str, Enum):
    GPU = 'gpu'
    CPU = 'cpu'

    @property
    def words(self) -> str:
        return 'a GPU' if self is Pool.GPU else 'a CPU slot'


class QueueSettings(BaseModel):
    """``queue/settings.json`` in the local backend's home: shared by every process using that home."""

    model_config = ConfigDict(extra='forbid')

    cpu_runs: int = Field(default=1, ge=1, le=256, description='Trainings at once on the CPU.')
    gpus: list[int] | None = Field(
        default=None, description='GPU indices (nvidia-smi order) the queue gives out; None: every GPU found.'
    )


@dataclass(frozen=True)
class Capacity:
    gpu_ids: tuple[int, ...]
    cpu_runs: int


@dataclass(frozen=True)
class Waiting:
    """A run in the queue that holds nothing yet."""

    name: str
    seq: int  # submission order
    pool: Pool
    suspended: bool = False


@dataclass(frozen=True)
class Holding:
    """A run whose current attempt holds resources (admitted, not ended)."""

    name: str
    pool: Pool
    gpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Admission:
    name: str
    pool: Pool
    gpu_ids: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    """Why a queued run is still CREATED: a reason of :class:`Reason`, details, and its place (1 = next)."""

    reason: str
    details: str
    position: int | None = None


@dataclass
class Plan:
    admit: list[Admission] = field(default_factory=list)
    waits: dict[str, Wait] = field(default_factory=dict)


def pool_of(spec: FinetuneRunSpec, gpus_available: int) -> Pool:
    wants_gpu = spec.device != 'cpu' and spec.resources.gpus > 0
    return Pool.GPU if wants_gpu and gpus_available > 0 else Pool.CPU


def plan(line: list[Waiting], holding: list[Holding], capacity: Capacity) -> Plan:
    """Which of ``line`` start now (oldest first, while their resource is free) and why the others wait."""
    busy = {gpu for h in holding for gpu in h.gpu_ids}
    free_gpus = [gpu for gpu in capacity.gpu_ids if gpu not in busy]
    free_cpu = capacity.cpu_runs - sum(1 for h in holding if h.pool is Pool.CPU)
    ahead = {Pool.GPU: 0, Pool.CPU: 0}
    result = Plan()
    for run in sorted(line, key=lambda w: (w.seq, w.name)):
        if run.suspended:
            result.waits[run.name] = Wait(Reason.SUSPENDED.value, reasons.SUSPENDED)
            continue
        pool = run.pool
        if ahead[pool] == 0 and pool is Pool.GPU and free_gpus:
            result.admit.append(Admission(run.name, pool, (free_gpus.pop(0),)))
            continue
        if ahead[pool] == 0 and pool is Pool.CPU and free_cpu > 0:
            free_cpu -= 1
            result.admit.append(Admission(run.name, pool, ()))
            continue
        if ahead[pool]:
            details = reasons.waiting_in_line(ahead[pool], pool.words)
        elif pool is Pool.GPU:
            details = reasons.waiting_for_gpu(len(capacity.gpu_ids))
        else:
            details = reasons.waiting_for_cpu(capacity.cpu_runs)
        ahead[pool] += 1
        result.waits[run.name] = Wait(Reason.WAITING.value, details, position=ahead[pool])
    return result


def capacity(settings: QueueSettings) -> Capacity:
    gpus = tuple(settings.gpus) if settings.gpus is not None else tuple(range(count_gpus()))
    return Capacity(gpu_ids=gpus, cpu_runs=settings.cpu_runs)


@cache
def count_gpus() -> int:
    """NVIDIA GPUs of this machine, without importing torch: the driver's /proc entries, else nvidia-smi."""
    proc = Path('/proc/driver/nvidia/gpus')
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    smi = shutil.which('nvidia-smi')
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, '-L'], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith('GPU '))


def trainer_environment(pool: Pool, gpu_ids: tuple[int, ...]) -> dict[str, str]:
    """What pins an attempt to what it was given: its GPUs (nvidia-smi numbering), or none on a CPU slot."""
    visible = ','.join(str(g) for g in gpu_ids) if pool is Pool.GPU else ''
    return {'CUDA_DEVICE_ORDER': 'PCI_BUS_ID', 'CUDA_VISIBLE_DEVICES': visible}
