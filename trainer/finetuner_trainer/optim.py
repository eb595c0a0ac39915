"""Optimizers (``torch.optim`` by name) and learning-rate schedules (by name, with warm-up)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from finetuner.api.v1alpha1 import SchedulerOptions
from finetuner.catalog import OPTIMIZER_NAMES, SCHEDULER_NAMES
from finetuner_trainer.errors import ConfigError


def optimizer_registry() -> dict[str, type[torch.optim.Optimizer]]:
    return {name: getattr(torch.optim, name) for name in OPTIMIZER_NAMES}


def build_optimizer(
    name: str, params: Iterable[Any], learning_rate: float, options: dict[str, Any], field: str = 'optimizer'
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad] if not _is_groups(params) else list(params)
    if not params:
        raise ConfigError(field, 'there are no trainable parameters (is everything frozen?)')
    if name == 'SparseAdam':
        raise ConfigError(
            field,
            'SparseAdam only updates sparse gradients, and these embedding models produce dense ones; '
            'use Adam or AdamW',
        )
    cls = optimizer_registry()[name]
    try:
        return cls(params, **{'lr': learning_rate, **_fused_default(name, params, options), **options})
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{field}Options', f'{name} does not accept {options}: {e}') from e


# Optimizers with a fused kernel for CPU and CUDA: one pass over each parameter instead of a chain of
# per-op passes (AdamW on all-MiniLM-L6-v2's 22.7M parameters, 1 CPU thread: 47 ms vs 284 ms a step).
FUSED_OPTIMIZERS = {'Adam': {'cpu', 'cuda'}, 'AdamW': {'cpu', 'cuda'}, 'SGD': {'cpu', 'cuda'}, 'Adagrad': {'cpu'}}


def _fused_default(name: str, params: list[Any], options: dict[str, Any]) -> dict[str, Any]:
    """``fused=True`` when ``name`` has a fused kernel for the parameters' device, every parameter is a
    floating-point tensor, and the options choose no implementation (``foreach``/``fused``) and ask for
    nothing the fused kernels lack (``differentiable``)."""
    if name not in FUSED_OPTIMIZERS or {'fused', 'foreach', 'differentiable'} & set(options):
        return {}
    tensors = [t for group in params for t in group['params']] if _is_groups(params) else params
    devices = {t.device.type for t in tensors}
    if len(devices) != 1 or devices - FUSED_OPTIMIZERS[name] or not all(t.is_floating_point() for t in tensors):
        return {}
    return {'fused': True}


def _is_groups(params: Any) -> bool:
    return isinstance(params, list) and bool(params) and isinstance(params[0], dict)


def schedule(name: str, warmup: int, total: int, options: SchedulerOptions) -> Any:
    """The multiplier of the base learning rate at step ``s`` (transformers' schedules)."""
    total = max(total, 1)
    cycles = options.num_cycles
    power = options.power or 1.0

    def warm(step: int) -> float | None:
        return step / max(1, warmup) if step < warmup else None

    def factor(step: int) -> float:
        if name == 'constant':
            return 1.0
        early = warm(step)
        if early is not None:
            return early
        if name == 'constant_with_warmup':
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == 'linear':
            return max(0.0, 1.0 - progress)
        if name == 'cosine':
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (cycles or 0.5) * 2.0 * progress)))
        if name == 'cosine_with_restarts':
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles or 1.0) * progress) % 1.0))))
        if name == 'polynomial':
            return max(0.0, (1.0 - min(progress, 1.0))) ** power
        raise ConfigError('scheduler', f'unknown scheduler {name!r}; choose one of {", ".join(SCHEDULER_NAMES)}')

    return factor


def build_scheduler(
    name: str | None, optimizer: torch.optim.Optimizer, options: SchedulerOptions, total_steps: int, lr: float
) -> LambdaLR | None:
    """A LambdaLR stepping per batch or per epoch (``total_steps`` counts the same unit)."""
    if name is None:
        return None
    if options.num_warmup_steps >= max(total_steps, 1) and name != 'constant':
        raise ConfigError(
            'schedulerOptions.numWarmupSteps',
            f'{options.num_warmup_steps} warm-up steps but only {total_steps} {options.scheduler_step} steps in all',
        )
    factor = schedule(name, options.num_warmup_steps, total_steps, options)
    if name == 'polynomial' and options.lr_end is not None:
        base = factor
        end = options.lr_end / lr

        def factor(step: int) -> float:
            return end + (1.0 - end) * base(step) if step >= options.num_warmup_steps else base(step)

    return LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (optimizerOptions.layer_wise_lr_decay, as Finetuner named it)
# ---------------------------------------------------------------------------------------------

LLRD_OPTION = 'layer_wise_lr_decay'
# A numbered layer in a parameter's name: transformers' encoder.layer.N / layers.N, timm's blocks.N / stages.N.
# (ResNets: layer1..layer4.)
_LAYER = re.compile(r'^(?P<tower>.*?)(?:^|\.)(?:(?:layer|layers|blocks|stages|block|h)\.|layer)(?P<index>\d+)\.')
_EMBEDDING_WORDS = (
    *('embeddings', 'embed_tokens', 'patch_embed', 'pos_embed', 'wte', 'wpe'),  # transformers, ViTs
    *('conv_stem', 'stem', 'conv1', 'bn1'),  # CNN stems (outside the numbered stages)
)


def layer_depths(names: list[str]) -> dict[str, tuple[int, int]]:
    """Each parameter's (depth, depth of its tower's top) for layer-wise decay: embeddings and stems at 0,
    numbered layers at 1 + their number, everything above them (final norms, pooling, projection head) at
    the top. Two towers (CLIP's text and vision models) are counted apart."""
    found: dict[str, int | None] = {}
    towers: dict[str, int] = {}
    for name in names:
        match = _LAYER.match(name)
        if match is None:
            found[name] = 0 if any(word in name.split('.') for word in _EMBEDDING_WORDS) else None
            continue
        found[name] = int(match['index']) + 1
        towers[match['tower']] = max(towers.get(match['tower'], 0), found[name] or 0)
    top = max(towers.values(), default=0) + 1
    depths: dict[str, tuple[int, int]] = {}
    for name, depth in found.items():
        tower = next((t for t in sorted(towers, key=len, reverse=True) if t and name.startswith(t)), '')
        tower_top = towers.get(tower, top - 1) + 1 if tower else top
        depths[name] = (tower_top if depth is None else depth, tower_top)
    return depths


def layer_wise_groups(named: list[tuple[str, Any]], learning_rate: float, decay: Any) -> list[dict[str, Any]]:
    """Parameter groups whose learning rate is ``learning_rate * decay ** (top - depth)``: the top layer
    trains at the full rate, each layer below at ``decay`` times the one above (Clark et al., 2020;
    Finetuner's ``optimizer_options={'layer_wise_lr_decay': ...}``)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ConfigError(
            f'optimizerOptions.{LLRD_OPTION}',
            f'must be a number in (0, 1], e.g. 0.9 (each layer down trains at 0.9x the rate above); got {decay!r}',
        )
    trainable = [(name, p) for name, p in named if p.requires_grad]
    depths = layer_depths([name for name, _ in trainable])
    groups: dict[float, list[Any]] = {}
    for name, parameter in trainable:
        depth, top = depths[name]
        groups.setdefault(learning_rate * float(decay) ** (top - depth), []).append(parameter)
    return [{'params': params, 'lr': lr} for lr, params in sorted(groups.items())]
