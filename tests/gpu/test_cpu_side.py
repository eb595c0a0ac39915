"""The parts of the GPU path a CPU can check (default suite): text models run SDPA attention, the
automatic batch size's probe order and search, the CPU default, and the float32 reference of the ONNX
parity check. test_cuda.py checks the rest on a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from finetuner.api.layout import Record
from tests.gpu.conftest import ContextFactory
from tests.support.tiny import WORDS, labelled_images, text_pairs


def test_text_models_attend_through_sdpa_once_per_layer(
    make_context: ContextFactory, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' SDPA attention is what picks flash / memory-efficient kernels on a GPU."""
    ctx = make_context(text_pairs(n=8), model=str(tiny_bert), loss='MultipleNegativesRankingLoss', device='cpu')
    assert ctx.model.backbone.config._attn_implementation == 'sdpa'
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counting)
    ctx.model(ctx.model.collate([p.chunks[0] for p in text_pairs(n=4)]))
    assert len(calls) == ctx.model.backbone.config.num_hidden_layers


def test_the_batch_size_probe_takes_the_longest_examples_first(make_context: ContextFactory, tiny_bert: Path) -> None:
    from finetuner_trainer.runner import probe_order

    short, long, middle = 'red', 'red green blue yellow black white cat dog', 'red green blue'
    records = [
        Record(chunks=[Record(text=q), Record(text=d)]) for q, d in zip((short, long, middle), WORDS[-3:], strict=True)
    ]
    ctx = make_context(records, model=str(tiny_bert), loss='MultipleNegativesRankingLoss', device='cpu')
    assert probe_order(ctx.train_records) == [1, 2, 0]


def test_images_are_probed_in_their_order(make_context: ContextFactory) -> None:
    from finetuner_trainer.runner import probe_order
    from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS

    ctx = make_context(
        labelled_images(n_classes=2, per_class=3),
        model=TINY_TIMM,
        model_options=TINY_TIMM_OPTIONS,
        loss='TripletMarginLoss',
        batch_size=4,
        num_items_per_class=2,
        device='cpu',
    )
    assert probe_order(ctx.train_records) == list(range(6))


def test_largest_fitting_doubles_until_the_limit_or_the_first_failure() -> None:
    from finetuner_trainer.errors import ConfigError
    from finetuner_trainer.runner import largest_fitting

    tried: list[int] = []

    def fits_up_to(limit: int):  # type: ignore[no-untyped-def]
        def fits(size: int) -> bool:
            tried.append(size)
            return size <= limit

        return fits

    assert largest_fitting(fits_up_to(100), 8, 1024) == 64
    assert tried == [8, 16, 32, 64, 128]
    assert largest_fitting(fits_up_to(10**6), 8, 300) == 256
    with pytest.raises(ConfigError, match=r'batchSize.*not even a batch of 8 fits in memory; set a smaller batchSize'):
        largest_fitting(fits_up_to(4), 8, 1024)


def test_without_cuda_the_batch_size_is_the_family_default(
    make_context: ContextFactory, tiny_bert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger='gpu-test'):
        ctx = make_context(text_pairs(n=64), model=str(tiny_bert), loss='MultipleNegativesRankingLoss', device='cpu')
    assert ctx.batch_size == 32
    assert 'batchSize not set: 32 (the CPU default for text models)' in caplog.text


def test_the_onnx_reference_is_computed_without_tf32_and_the_setting_comes_back() -> None:
    from finetuner_trainer.onnx_export import _full_float32

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with _full_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError, match='inside'), _full_float32():
            raise RuntimeError('inside')
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
