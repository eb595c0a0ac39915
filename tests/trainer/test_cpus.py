"""The CPUs a process may use: affinity capped by its cgroup's CPU quota (v1 and v2), in fake cgroup trees
laid out as the kernel does (the files and formats of Documentation/admin-guide/cgroup-v2.rst and of
cgroup v1's CFS bandwidth control)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetuner_trainer import cpus
from finetuner_trainer.cpus import available_cpus, cgroup_cpu_limit


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + '\n')


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'proc-self-cgroup'
    path.write_text(text + '\n')
    return path


def test_cgroup_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    root = tmp_path / 'cgroup'
    _write(root / 'cpu.max', 'max 100000')
    _write(root / 'kubepods' / 'pod1' / 'cpu.max', '150000 100000')
    proc = _proc(tmp_path, '0::/kubepods/pod1')
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)


def test_cgroup_v2_a_parent_limit_applies_to_its_children(tmp_path: Path) -> None:
    root = tmp_path / 'cgroup'
    _write(root / 'kubepods' / 'cpu.max', '300000 100000')
    _write(root / 'kubepods' / 'pod1' / 'cpu.max', 'max 100000')
    _write(root / 'kubepods' / 'pod1' / 'c1' / 'cpu.max', '800000 100000')
    proc = _proc(tmp_path, '0::/kubepods/pod1/c1')
    assert cgroup_cpu_limit(root, proc) == pytest.approx(3.0)


def test_cgroup_v2_namespace_root_and_no_limit(tmp_path: Path) -> None:
    root = tmp_path / 'cgroup'
    _write(root / 'cpu.max', '200000 100000')  # a container with its own cgroup namespace sees its limit at /
    assert cgroup_cpu_limit(root, _proc(tmp_path, '0::/')) == pytest.approx(2.0)
    _write(root / 'cpu.max', 'max 100000')
    assert cgroup_cpu_limit(root, _proc(tmp_path, '0::/')) is None


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / 'cgroup'
    base = root / 'cpu,cpuacct'
    _write(base / 'cpu.cfs_quota_us', '-1')
    _write(base / 'cpu.cfs_period_us', '100000')
    _write(base / 'docker' / 'abc' / 'cpu.cfs_quota_us', '50000')
    _write(base / 'docker' / 'abc' / 'cpu.cfs_period_us', '100000')
    proc = _proc(tmp_path, '12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/')
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    _write(base / 'docker' / 'abc' / 'cpu.cfs_quota_us', '-1')
    assert cgroup_cpu_limit(root, proc) is None


def test_available_cpus_is_the_affinity_capped_by_the_quota_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpus, 'affinity_cpus', lambda: 64)
    root = tmp_path / 'cgroup'
    proc = _proc(tmp_path, '0::/')
    _write(root / 'cpu.max', '150000 100000')
    assert available_cpus(root, proc) == 2
    _write(root / 'cpu.max', '20000 100000')  # a fifth of a CPU still gets one thread
    assert available_cpus(root, proc) == 1
    _write(root / 'cpu.max', 'max 100000')
    assert available_cpus(root, proc) == 64
    monkeypatch.setattr(cpus, 'affinity_cpus', lambda: 2)
    _write(root / 'cpu.max', '800000 100000')  # the affinity mask is the smaller one
    assert available_cpus(root, proc) == 2


def test_unreadable_or_malformed_files_mean_no_limit(tmp_path: Path) -> None:
    root = tmp_path / 'cgroup'
    _write(root / 'cpu.max', 'garbage')
    assert cgroup_cpu_limit(root, _proc(tmp_path, '0::/')) is None
    assert cgroup_cpu_limit(tmp_path / 'absent', tmp_path / 'absent-proc') is None


def test_onnx_sessions_get_the_quota_as_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    from onnx import TensorProto, helper

    from finetuner_trainer import onnx_export

    graph = helper.make_graph(
        [helper.make_node('Relu', ['x'], ['embeddings'])],
        'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info('embeddings', TensorProto.FLOAT, [None, 2])],
    )
    path = tmp_path / 'relu.onnx'
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), str(path))
    monkeypatch.setattr(onnx_export, 'available_cpus', lambda: 3)
    assert onnx_export.ort_session(path).get_session_options().intra_op_num_threads == 3
    assert onnx_export.ort_session(path, threads=1).get_session_options().intra_op_num_threads == 1


def test_openmp_waits_passively_unless_the_environment_chose() -> None:
    environ: dict[str, str] = {}
    cpus.passive_thread_pools(environ)
    assert environ == {'OMP_WAIT_POLICY': 'PASSIVE'}
    chosen = {'OMP_WAIT_POLICY': 'ACTIVE'}
    cpus.passive_thread_pools(chosen)
    assert chosen == {'OMP_WAIT_POLICY': 'ACTIVE'}


def test_the_trainer_program_sets_the_policy_before_torch_loads() -> None:
    import subprocess
    import sys

    # the program's module, imported as `python -m finetuner_trainer` imports it: the policy is in the
    # environment by the time torch (and its OpenMP) is loaded
    probe = (
        'import os, sys, runpy; os.environ.pop("OMP_WAIT_POLICY", None); '
        'import finetuner_trainer.cpus as c; real = c.passive_thread_pools; '
        'seen = {}; c.passive_thread_pools = lambda: (seen.setdefault("torch", "torch" in sys.modules), real()); '
        'sys.argv = ["x", "--help"]\n'
        'try:\n    runpy.run_module("finetuner_trainer", run_name="__main__")\n'
        'except SystemExit:\n    pass\n'
        'print(seen["torch"], os.environ["OMP_WAIT_POLICY"])'
    )
    done = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-2:] == ['False', 'PASSIVE']
