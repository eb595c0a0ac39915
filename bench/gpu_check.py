"""Tier ``check``: what the machine is (GPU, driver, libraries), its two ceilings measured (a bf16
matrix product and a device-to-device copy), and the GPU tests (``pytest -m gpu tests/gpu``).

The ceilings are what MFU and bandwidth figures are judged against besides the datasheet: METHOD.md
of the device tool asks for them to be measured on the machine (random data, warm-up first, device
events around the timed region)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench.common import Row

ROOT = Path(__file__).resolve().parents[1]
SMI_FIELDS = 'name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu'
TEST_MEASURE = 'GPU tests (pytest -m gpu tests/gpu)'
PER_TEST_TIMEOUT = 100


def nvidia_smi() -> dict[str, str]:
    """nvidia-smi's reading of the GPU (read-only queries: never a setting)."""
    if shutil.which('nvidia-smi') is None:
        return {'nvidia-smi': 'not found'}
    facts = {}
    for key, command in (
        ('gpus', ['nvidia-smi', '-L']),
        ('query', ['nvidia-smi', f'--query-gpu={SMI_FIELDS}', '--format=csv']),
    ):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            facts[key] = (done.stdout or done.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            facts[key] = f'{type(e).__name__}: {e}'
    return facts


def torch_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        'torch': torch.__version__,
        'cuda_runtime': torch.version.cuda,
        'cuda_available': torch.cuda.is_available(),
        'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device=props.name,
            capability=f'{props.major}.{props.minor}',
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            device_count=torch.cuda.device_count(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            nccl=torch.cuda.nccl.version() if hasattr(torch.cuda, 'nccl') else None,
        )
    try:
        import onnxruntime

        facts['onnxruntime_providers'] = onnxruntime.get_available_providers()
    except ImportError:
        facts['onnxruntime_providers'] = 'onnxruntime not installed'
    return facts


def _timed(run: Any, repeats: int, device: str) -> float:
    """Seconds of one call of ``run`` (mean of ``repeats`` after three warm-ups), device events on CUDA."""
    import time

    import torch

    for _ in range(3):
        run()
    if device == 'cuda':
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - began) / repeats


def matmul_rate(n: int, device: str, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data (2 n^3 FLOPs a product)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _timed(lambda: a @ b, repeats, device)


def copy_bandwidth(nbytes: int, device: str, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    import torch

    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / _timed(lambda: target.copy_(source), repeats, device)


def parse_junit(path: Path) -> dict[str, Any]:
    """Outcome of every test in a JUnit XML report: counts, and each test's outcome and message."""
    tests = []
    for case in ET.parse(path).getroot().iter('testcase'):
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in ('failure', 'error', 'skipped'):
                outcome = {'failure': 'failed', 'error': 'error', 'skipped': 'skipped'}[child.tag]
                message = (child.get('message') or child.text or '').strip()
                break
        name = f'{case.get("classname", "")}.{case.get("name", "")}'.removeprefix('.')
        tests.append(
            {'test': name, 'outcome': outcome, 'seconds': float(case.get('time') or 0), 'message': message[:500]}
        )
    counts = {key: sum(t['outcome'] == key for t in tests) for key in ('passed', 'skipped', 'failed', 'error')}
    return {'counts': counts, 'tests': tests}


def tests_row(report: dict[str, Any], exit_code: int | None) -> Row:
    counts = report['counts']
    bad = [t for t in report['tests'] if t['outcome'] in ('failed', 'error')]
    skipped = [t for t in report['tests'] if t['outcome'] == 'skipped']
    note = f'{counts["passed"]} passed, {counts["skipped"]} skipped, {counts["failed"] + counts["error"]} failed'
    if exit_code is None:
        note += '; pytest was stopped at its timeout'
    if bad:
        note += '. Failed: ' + '; '.join(f'{t["test"].rsplit(".", 1)[-1]}: {t["message"][:200]}' for t in bad)
    reasons: dict[str, list[str]] = {}
    for test in skipped:
        reasons.setdefault(test['message'][:200], []).append(test['test'].rsplit('.', 1)[-1])
    for reason, names in reasons.items():
        note += f'. Skipped ({reason}): ' + ', '.join(names)
    return Row(
        benchmark='gpu_check',
        measure=TEST_MEASURE,
        unit='passed',
        ours=float(counts['passed']),
        target='no failure',
        met=not bad and exit_code == 0,
        note=note,
    )


def run_tests(ctx: Any) -> None:
    report_path = ctx.workdir / 'gpu-tests.xml'
    report_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        '-m',
        'pytest',
        '-q',
        '-p',
        'no:cacheprovider',
        '-m',
        'gpu',
        'tests/gpu',
        f'--junitxml={report_path}',
        '-rs',
    ]
    if importlib.util.find_spec('pytest_timeout') is not None:
        command.append(f'--timeout={PER_TEST_TIMEOUT}')  # a hung test fails alone; the report still gets written
    timeout = max(10.0, ctx.seconds_left() - 10)
    print(f'[gpu:check] {" ".join(command[2:])} (up to {timeout:.0f} s)', flush=True)
    try:
        exit_code: int | None = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        exit_code = None
    if not report_path.exists():
        ctx.add_row(
            Row.not_measured(
                benchmark='gpu_check',
                measure=TEST_MEASURE,
                reason=f'pytest wrote no report (exit code {exit_code})',
                target='no failure',
            )
        )
        return
    report = parse_junit(report_path)
    ctx.fact('tests', report['tests'])
    ctx.fact('pytest_exit_code', exit_code)
    ctx.add_row(tests_row(report, exit_code))


def run(ctx: Any) -> None:
    ctx.fact('nvidia_smi', nvidia_smi())
    ctx.fact('torch', torch_facts())
    n, nbytes = ctx.scale.pick(gpu=(8192, 2**30), dry=(256, 2**22))
    ctx.fact(
        'ceilings',
        {
            'matmul_bf16_tflops': round(matmul_rate(n, ctx.scale.device) / 1e12, 3),
            'matmul_size': n,
            'copy_gb_per_s': round(copy_bandwidth(nbytes, ctx.scale.device) / 1e9, 1),
            'copy_bytes': nbytes,
            'method': 'mean of 10 timed calls after 3 warm-ups, random data; copy counts bytes read plus written',
        },
    )
    run_tests(ctx)
