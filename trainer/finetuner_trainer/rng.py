"""The random number generators of a run: capture, restore and seed Python's, NumPy's and torch's.

Checkpoints keep these states (as tensors and plain values, so ``torch.load(weights_only=True)``
reads them back); distributed ranks seed their own streams from the run's seed.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        'python': [py_version, torch.tensor(py_internal, dtype=torch.int64), py_gauss],
        'numpy': [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py_version, py_internal, py_gauss = state['python']
    random.setstate((py_version, tuple(int(x) for x in py_internal.tolist()), py_gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream: rank 0 keeps the run's seed, so a single process
    and rank 0 draw alike; the other ranks get streams of their own (dropout masks, augmentations
    must differ between the ranks' shares of a batch, or every share is perturbed the same way)."""
    return seed + 1_000_003 * rank


def reseed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seeded_rng_state(seed: int) -> dict[str, Any]:
    """The generator states :func:`reseed` would set, without changing the current ones."""
    current = capture_rng()
    reseed(seed)
    state = capture_rng()
    restore_rng(current)
    return state
