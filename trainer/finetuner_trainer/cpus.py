"""How many CPUs this process may really use: its affinity mask and its container's CPU quota.

A container limited to 2 CPUs on a 64-core node sees 64 cores (``os.cpu_count()``), and usually all 64
in its affinity mask too: only the CFS quota of its cgroup says 2. Thread pools sized to the node's
cores then run 32 threads per allowed CPU and the kernel throttles them in turns, which is slower than
running 2. So the count here is the smaller of

- the affinity mask (``os.sched_getaffinity``: a cpuset, ``taskset``), and
- the CPU quota of the process's cgroup, rounded up: cgroup v2 ``cpu.max`` (``"200000 100000"``, or
  ``"max 100000"`` for none), cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 for
  none), the smallest limit of the cgroup and its ancestors (a limit on a parent applies to its children).

The process's cgroup comes from ``/proc/self/cgroup``; inside a container with its own cgroup namespace
that path is ``/`` and the limit is read at the mount's root.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_ROOT = Path('/sys/fs/cgroup')
PROC_CGROUP = Path('/proc/self/cgroup')


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> the process's cgroup path ('' is cgroup v2's unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or '').splitlines():
        parts = line.split(':', 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(',') if controllers else ['']:
            paths[controller] = path
    return paths


def _walk_up(base: Path, cgroup_path: str) -> list[Path]:
    """The cgroup's folder under ``base`` and those of its ancestors, up to ``base`` (those that exist)."""
    parts = [p for p in cgroup_path.split('/') if p]
    folders = [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _v2_quota(folder: Path) -> float | None:
    text = _read(folder / 'cpu.max')
    if not text:
        return None
    quota, _, period = text.partition(' ')
    if quota == 'max' or not period:
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read(folder / 'cpu.cfs_quota_us'), _read(folder / 'cpu.cfs_period_us')
    try:
        if quota is None or period is None or int(quota) <= 0:
            return None
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 = one and a half), or None without a limit."""
    own = _own_cgroups(proc_cgroup)
    limits: list[float] = []
    if '' in own:  # cgroup v2 (or the unified part of a hybrid setup)
        limits += [q for folder in _walk_up(root, own['']) if (q := _v2_quota(folder)) is not None]
    for name in ('cpu', 'cpu,cpuacct', 'cpuacct,cpu'):  # cgroup v1: the cpu controller's mount
        base = root / name
        if base.is_dir():
            path = own.get('cpu', '/')
            limits += [q for folder in _walk_up(base, path) if (q := _v1_quota(folder)) is not None]
            break
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs worth a thread each: the affinity mask, capped by the cgroup's CPU quota (rounded up)."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit - 1e-9)))
    return max(1, cpus)


def passive_thread_pools(environ: MutableMapping[str, str] = os.environ) -> None:
    """OpenMP threads that sleep while they wait for work (``OMP_WAIT_POLICY=PASSIVE``) unless the
    environment already chose a policy. Call it before torch is imported: OpenMP reads it once, when it loads.

    By default OpenMP's idle threads spin. On CPUs shared with other work (a laptop, a node packed with
    pods, 2 cores under a load of 5) a spinning thread holds a core the thread it waits for needs, and a
    training step of all-MiniLM-L6-v2 (batch 32, 2 threads) took 1-21 s instead of 0.4-1.7 s (measured
    alternately on the same machine, docs/BENCHMARKS.md "Time to a better model")."""
    environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
