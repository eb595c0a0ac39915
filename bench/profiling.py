"""Profiles that explain a missed target: where the time of a step goes (``torch.profiler``) and
where a process spends its time (``py-spy``). Summaries are short sentences for the table's notes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::matmul', 'aten::linear')
CONV_OPS = ('aten::mkldnn_convolution', 'aten::convolution_backward', 'aten::_convolution', 'aten::conv2d')
ATTENTION_OPS = ('aten::_scaled_dot_product_flash_attention_for_cpu', 'aten::_scaled_dot_product_attention_math')


@dataclass
class TorchProfile:
    """Shares of the wall time of a call: in torch operators (by kind) and outside them."""

    wall_s: float
    op_s: float  # self CPU time of every torch operator, summed, in seconds
    shares: dict[str, float] = field(default_factory=dict)  # 'matmul', 'convolution', 'attention', 'other ops'
    top: list[tuple[str, float]] = field(default_factory=list)  # operator, share of wall

    @property
    def outside_share(self) -> float:
        """Share of the wall time not inside a torch operator of this thread's process (Python,
        tokenisation, image decoding, waiting for loader workers, optimizer bookkeeping)."""
        return max(0.0, 1.0 - self.op_s / self.wall_s) if self.wall_s else 0.0

    def sentence(self) -> str:
        parts = [f'{name} {share:.0%}' for name, share in self.shares.items() if share >= 0.01]
        top = ', '.join(f'{name} {share:.0%}' for name, share in self.top[:4])
        return (
            f'{self.wall_s:.1f} s wall: ' + ', '.join(parts) + f', outside torch ops {self.outside_share:.0%}'
            f' (top operators: {top})'
        )


def _kind(name: str) -> str:
    if name in MATMUL_OPS:
        return 'matmul'
    if name in CONV_OPS or 'convolution' in name:
        return 'convolution'
    if name in ATTENTION_OPS or 'scaled_dot_product' in name:
        return 'attention'
    return 'other ops'


def _profiler() -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities)


def summarize(prof: Any, wall: float) -> TorchProfile:
    """Shares of ``wall`` seconds spent in each kind of torch operator, from a finished profiler."""
    self_us: Counter[str] = Counter()
    for event in prof.key_averages():
        if event.key.startswith(('ProfilerStep', '## ', 'enumerate(DataLoader)')):
            continue
        self_us[event.key] += event.self_cpu_time_total
    total_s = sum(self_us.values()) / 1e6
    shares: Counter[str] = Counter()
    for name, us in self_us.items():
        shares[_kind(name)] += us / 1e6 / wall
    top = [(name, us / 1e6 / wall) for name, us in self_us.most_common(6)]
    return TorchProfile(wall_s=wall, op_s=total_s, shares=dict(shares.most_common()), top=top)


class StepProfiler:
    """Profiles the steady-state steps of a training loop: started at the end of the first step,
    stopped at the end of the last. Each side calls :meth:`step_end` from its own step hook."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.seen = 0
        self.began = 0.0
        self.prof: Any = None
        self.result: TorchProfile | None = None

    def step_end(self) -> None:
        self.seen += 1
        if self.seen == 1 and self.total_steps > 1:
            self.prof = _profiler()
            self.prof.start()
            self.began = time.perf_counter()
        elif self.seen == self.total_steps and self.prof is not None:
            self.prof.stop()
            self.result = summarize(self.prof, time.perf_counter() - self.began)


def pyspy_available() -> bool:
    return shutil.which('py-spy') is not None or (Path(sys.executable).parent / 'py-spy').exists()


def pyspy_record(
    pid: int, output: Path, duration_s: int, rate: int = 100, gil: bool = False
) -> subprocess.Popen[bytes]:
    """Start sampling process ``pid`` (collapsed stacks into ``output``); wait on the returned process.

    ``gil``: sample only the thread holding the GIL, i.e. where a multi-threaded Python process spends
    its CPU (threads waiting on sockets or locks are left out)."""
    executable = shutil.which('py-spy') or str(Path(sys.executable).parent / 'py-spy')
    return subprocess.Popen(
        [
            executable,
            'record',
            '--format',
            'raw',
            '--output',
            str(output),
            '--pid',
            str(pid),
            '--duration',
            str(duration_s),
            '--rate',
            str(rate),
            '--nonblocking',
            *(['--gil'] if gil else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_stacks(path: Path, top: int = 5, mine: tuple[str, ...] = ()) -> str:
    """Self time by leaf function, and (when given) time inside frames whose file contains one of
    ``mine`` (inclusive), from py-spy's collapsed stacks; one sentence."""
    if not path.exists() or not path.read_text().strip():
        return 'py-spy recorded no samples'
    leaves: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    idle = 0
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(' ')
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(';')
        leaf = frames[-1]
        if any(word in leaf for word in ('select (', 'epoll', '_run_once', 'wait (threading', 'poll (')):
            idle += count
        leaves[_short(leaf)] += count
        seen = {_short(f) for f in frames if any(m in f for m in mine)}
        for frame in seen:
            inside[frame] += count
    if not total:
        return 'py-spy recorded no samples'
    text = ', '.join(f'{name} {n / total:.0%}' for name, n in leaves.most_common(top))
    sentence = f'py-spy, {total} samples: self time by function: {text}'
    if inside:
        own = ', '.join(f'{name} {n / total:.0%}' for name, n in inside.most_common(top))
        sentence += f"; inclusive time in the project's code: {own}"
    return sentence


def _short(frame: str) -> str:
    """'handle (kopf/_core/x.py:12)' -> 'handle (kopf/_core/x.py)'."""
    name, _, where = frame.partition(' (')
    where = where.rstrip(')').rsplit(':', 1)[0]
    for marker in ('site-packages/', 'lib/python3'):
        if marker in where:
            where = where.split(marker, 1)[1]
    where = where.split('/work/main/', 1)[-1]
    return f'{name} ({where})' if where else name


def explain_throughput(
    ours_round: Callable[[StepProfiler], Any], reference_round: Callable[[StepProfiler], Any], steps: int
) -> str:
    """One more round of each side with its steady steps profiled; a note comparing where time goes."""
    profiles = []
    for side in (ours_round, reference_round):
        profiler = StepProfiler(steps)
        side(profiler)
        profiles.append(profiler.result)
    ours, reference = profiles
    if ours is None or reference is None:
        return 'target missed; the profile captured no steady-state step'
    return (
        f'target missed. Profile of {steps - 1} steady-state steps per side (torch.profiler, self CPU time as a '
        f'share of wall time): this project: {ours.sentence()}; reference: {reference.sentence()}.'
    )


# Matrix-product shapes (rows, inner, outer) at which the fp32 peak is measured: a transformer layer's over a
# padded batch (the feed-forward's two products, the attention's projections) and a square one.
PEAK_SHAPES = ((2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384), (1024, 1024, 1024))


def fp32_matmul_peak(threads: int | None, repeats: int = 5) -> dict[str, float]:
    """The best fp32 matrix-product rate this CPU reaches with ``threads`` intra-op threads, in GFLOPS (2 per
    multiply-add): ONNX Runtime's MatMul (MLAS) and torch's ``linear`` (oneDNN/MKL) at each of
    ``PEAK_SHAPES``, the fastest of ``repeats`` calls each after a warm-up. Keys: 'onnxruntime', 'torch' and
    'best'. No engine runs fp32 products much faster than this on the same threads, so it bounds how fast
    any fp32 graph of a known number of FLOPs can be."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    best = {'onnxruntime': 0.0, 'torch': 0.0}
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for rows, inner, outer in PEAK_SHAPES:
            x = rng.standard_normal((rows, inner), dtype=np.float32)
            w = rng.standard_normal((inner, outer), dtype=np.float32)
            graph = helper.make_graph(
                [helper.make_node('MatMul', ['x', 'w'], ['y'])],
                'peak',
                [helper.make_tensor_value_info('x', TensorProto.FLOAT, [rows, inner])],
                [helper.make_tensor_value_info('y', TensorProto.FLOAT, [rows, outer])],
                [numpy_helper.from_array(w, 'w')],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 0
            session = ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
            tx, tw = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))
            flop = 2.0 * rows * inner * outer
            calls: dict[str, Callable[[], Any]] = {
                'onnxruntime': lambda session=session, x=x: session.run(None, {'x': x}),
                'torch': lambda tx=tx, tw=tw: torch.nn.functional.linear(tx, tw),
            }
            with torch.inference_mode():
                for engine, call in calls.items():
                    call()
                    fastest = float('inf')
                    for _ in range(repeats):
                        start = time.perf_counter()
                        call()
                        fastest = min(fastest, time.perf_counter() - start)
                    best[engine] = max(best[engine], flop / fastest / 1e9)
    finally:
        torch.set_num_threads(previous_threads)
    return {**best, 'best': max(best.values())}


def fp32_roofline(gflop: float, peak_gflops: float, reference_s: float) -> float:
    """How many times faster than a reference pass of ``reference_s`` seconds any fp32 engine could run a
    pass whose weight products are ``gflop`` GFLOP, if they ran at ``peak_gflops`` and nothing else took
    time: the ceiling of a float speed-up on this CPU."""
    if gflop <= 0 or peak_gflops <= 0:
        raise ValueError(f'need positive GFLOP and GFLOPS, got {gflop} and {peak_gflops}')
    return reference_s / (gflop / peak_gflops)
