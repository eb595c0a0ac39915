"""The float inference row's ceiling: the FLOPs torch's profiler counts, the CPU's fp32 matrix-product peak,
and the note that compares the target with what fp32 allows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bench.inference import roofline_note, weighted_gflop
from bench.profiling import PEAK_SHAPES, fp32_matmul_peak, fp32_roofline


def test_weighted_gflop_counts_linear_and_convolution_products_as_two_flops_per_multiply_add() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as recorded:
        model(torch.randn(4, 3, 16, 16))
    conv = 2 * 4 * 16 * 16 * 8 * 3 * 3 * 3  # batch x output positions x output channels x kernel volume
    linear = 2 * 4 * (8 * 16 * 16) * 10
    # The elementwise adds (the biases) are not weight products and stay out of the count.
    assert weighted_gflop(recorded) == pytest.approx((conv + linear) / 1e9, rel=1e-6)


def test_fp32_matmul_peak_measures_both_engines_and_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    peak = fp32_matmul_peak(threads=1, repeats=2)
    assert set(peak) == {'onnxruntime', 'torch', 'best'}
    assert peak['best'] == max(peak['onnxruntime'], peak['torch'])
    # Any CPU that runs this suite does well over a GFLOPS in fp32 on one thread; a broken timing gives 0 or inf.
    assert all(1.0 < value < 1e5 for value in peak.values())
    assert torch.get_num_threads() == before
    assert all(len(shape) == 3 for shape in PEAK_SHAPES)


def test_fp32_roofline_is_the_reference_time_over_the_least_time_of_the_products() -> None:
    # all-MiniLM-L6-v2's measured pass: 35.0 GFLOP of products, 111 GFLOPS at best, torch eager 0.473 s.
    assert fp32_roofline(35.0, 111.0, 0.473) == pytest.approx(0.473 / (35.0 / 111.0))
    with pytest.raises(ValueError, match='need positive GFLOP and GFLOPS, got 0 and 111'):
        fp32_roofline(0, 111, 0.5)


def test_the_roofline_note_says_when_the_target_is_above_the_ceiling_and_how_much_padding_was_counted() -> None:
    profile = {'eager_weighted_gflop': 35.0, 'padding_share': 0.113}
    peak = {'onnxruntime': 111.0, 'torch': 100.0, 'best': 111.0}
    below = roofline_note(profile, peak, eager_pass_s=0.40, target=1.5)
    assert 'counts 35.0 GFLOP' in below and '(111 GFLOPS; ONNX Runtime MatMul 111, torch linear 100' in below
    assert 'they alone take 315 ms' in below and "torch eager's whole pass took 400 ms" in below
    assert 'at most 1.27x faster than torch eager, below the target of 1.5x.' in below
    assert '(11.3% of their token positions are padding)' in below
    above = roofline_note({'eager_weighted_gflop': 10.0}, peak, eager_pass_s=0.40, target=2.0)
    assert (
        'at most 4.44x faster than torch eager, so the target of 2x needs those products at 45% of that rate' in above
    )
    assert 'padding' not in above
