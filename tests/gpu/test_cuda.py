"""The trainer's GPU path on a CUDA machine: bf16 autocast, TF32, fused AdamW, SDPA attention kernels,
NCCL with DistributedDataParallel (one process on one GPU), ONNX export from a model on the GPU and ONNX
Runtime's CUDA provider, the automatic batch size. Marker ``gpu``; every test is skipped without CUDA.
``scripts/gpu-check.sh`` runs them with ``pytest -m gpu tests/gpu`` (test_cpu_side.py holds the parts a
CPU can check)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertModel

# The trainer's names are imported here, not in the tests: a renamed one fails collection in the default
# suite (where these tests are skipped) instead of surfacing only on a GPU machine.
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.loop import _train_step, compute_loss
from finetuner_trainer.models import build_embedder, to_device
from finetuner_trainer.onnx_export import export_onnx
from finetuner_trainer.optim import build_optimizer
from finetuner_trainer.runner import pick_device
from tests.gpu.conftest import ContextFactory
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, WORDS, labelled_images, make_tiny_bert, text_pairs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (torch.cuda.is_available() is False)'),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tf32_off() -> object:
    """TF32 off before the test (so the test sees the trainer switch it on), restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield saved
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def test_bf16_autocast_step_keeps_float32_weights_and_learns(make_context: ContextFactory, tiny_bert: Path) -> None:
    from finetuner_trainer.models import to_device

    ctx = make_context(
        text_pairs(n=32),
        model=str(tiny_bert),
        loss='MultipleNegativesRankingLoss',
        batch_size=16,
        device='cuda',
        optimizer='AdamW',
        learning_rate=1e-3,
    )
    assert ctx.device.type == 'cuda' and ctx.autocast_dtype == torch.bfloat16
    assert ctx.optimizer.param_groups[0]['fused'] is True  # fused AdamW on CUDA by default
    batch = next(iter(ctx.train_loader))
    ctx.model.eval()  # no dropout: the two losses see the same network
    with torch.no_grad():
        full = float(compute_loss(ctx, to_device(batch, ctx.device)))
        with ctx.autocast():
            half = float(compute_loss(ctx, to_device(batch, ctx.device)))
    ctx.model.train()
    outputs: list[torch.dtype] = []
    linear = next(m for m in ctx.model.backbone.modules() if isinstance(m, nn.Linear))
    handle = linear.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    first = _train_step(ctx, batch)
    handle.remove()
    assert outputs and set(outputs) == {torch.bfloat16}  # the matrix multiplies ran in bf16
    assert all(p.dtype == torch.float32 for p in ctx.model.parameters())  # master weights stay float32
    assert abs(half - full) <= 0.05 * abs(full) + 1e-2  # bf16 and float32 agree on the loss
    losses = [_train_step(ctx, batch) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * first  # it overfits one batch


def test_the_trainer_switches_tf32_on_and_matmuls_use_it(tf32_off: object, tiny_bert: Path) -> None:

    a = torch.randn(2048, 2048, device='cuda')
    b = torch.randn(2048, 2048, device='cuda')
    reference = a.double() @ b.double()
    before = _relative_error(a @ b, reference)
    device = pick_device(FinetuneRunSpec(model=str(tiny_bert), train_data='x.jsonl', device='cuda'))
    assert device.type == 'cuda'
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    after = _relative_error(a @ b, reference)
    # float32 products land near 1e-6 of a float64 reference; TF32's 10-bit mantissa near 3e-4.
    assert before < 1e-5
    assert 1e-5 < after < 5e-3


def test_fused_adamw_on_cuda_steps_like_the_per_tensor_kernels() -> None:

    torch.manual_seed(0)
    weights = [torch.randn(64, 64, device='cuda', requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        weights[1].copy_(weights[0])
    fused = build_optimizer('AdamW', [weights[0]], 1e-2, {'weight_decay': 0.01})
    foreach = build_optimizer('AdamW', [weights[1]], 1e-2, {'weight_decay': 0.01, 'foreach': True})
    assert fused.param_groups[0]['fused'] is True and not foreach.param_groups[0].get('fused')
    for _ in range(5):
        gradient = torch.randn(64, 64, device='cuda')
        for weight, optimizer in ((weights[0], fused), (weights[1], foreach)):
            weight.grad = gradient.clone()
            optimizer.step()
    assert torch.allclose(weights[0], weights[1], atol=1e-6, rtol=1e-5)


def test_text_model_runs_fused_sdpa_kernels_matching_eager_attention(
    make_context: ContextFactory, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    ctx = make_context(
        text_pairs(n=16), model=str(tiny_bert), loss='MultipleNegativesRankingLoss', batch_size=8, device='cuda'
    )
    model = ctx.model
    assert model.backbone.config._attn_implementation == 'sdpa'
    calls: list[torch.dtype] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(query.dtype)
        return original(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counting)
    texts = [p.chunks[1] for p in text_pairs(n=8)]  # mixed lengths: a padding mask reaches the kernel
    batch = to_device(model.collate(texts), 'cuda')
    model.eval()
    fused_only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused_only), torch.autocast('cuda', dtype=torch.bfloat16):
        fused = model(batch)
        fused.float().sum().backward()  # the fused kernels' backward too
    assert calls == [torch.bfloat16] * model.backbone.config.num_hidden_layers
    model.backbone.set_attn_implementation('eager')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        eager = model(batch)
    assert _relative_error(fused.detach().float(), eager.float()) < 2e-2


def test_images_train_channels_last_in_bf16(make_context: ContextFactory) -> None:

    ctx = make_context(
        labelled_images(n_classes=4, per_class=4),
        model=TINY_TIMM,
        model_options=TINY_TIMM_OPTIONS,
        loss='TripletMarginLoss',
        batch_size=16,
        device='cuda',
    )
    conv = next(m for m in ctx.model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    outputs: list[torch.dtype] = []
    handle = conv.register_forward_hook(lambda module, inputs, output: outputs.append(output.dtype))
    losses = [_train_step(ctx, batch) for batch in ctx.train_loader]
    handle.remove()
    assert outputs and set(outputs) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses)))


def test_nccl_ddp_with_one_process_gives_the_plain_gradients(tiny_bert: Path) -> None:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, str(ROOT / 'tests' / 'gpu' / 'nccl_worker.py'), str(tiny_bert), str(port)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['backend'] == 'nccl'
    assert result['all_reduce'] == [1.0, 1.0, 1.0]
    assert result['losses'][0] == pytest.approx(result['losses'][1], rel=1e-5)
    assert result['grad_diff'] <= 1e-6


def test_onnx_export_from_a_model_on_the_gpu_passes_its_parity_check(
    tf32_off: object, tiny_bert: Path, tmp_path: Path
) -> None:
    """The trainer exports at the end of a CUDA run, with TF32 on: the torch reference must still be
    full float32, or ONNX Runtime's float32 graph is refused."""
    from finetuner_trainer.runner import pick_device

    spec = FinetuneRunSpec(model=str(tiny_bert), train_data='x.jsonl', device='cuda')
    embedder = build_embedder(spec).to(pick_device(spec))
    description = export_onnx(embedder, tmp_path / 'onnx')
    assert description['graphs']['text']['max_abs_diff'] <= description['graphs']['text']['tolerance']
    assert (tmp_path / 'onnx' / 'model.onnx').exists()
    assert torch.backends.cuda.matmul.allow_tf32  # the export put the trainer's setting back


def test_onnx_runtime_cuda_provider_matches_torch(tiny_bert: Path, tmp_path: Path) -> None:

    providers = ort.get_available_providers()
    if 'CUDAExecutionProvider' not in providers:
        pytest.skip(
            f'onnxruntime {ort.__version__} here has no CUDAExecutionProvider (providers: {providers}); '
            'onnxruntime-gpu is not installed'
        )
    embedder = build_embedder(FinetuneRunSpec(model=str(tiny_bert), train_data='x.jsonl')).eval()
    export_onnx(embedder, tmp_path / 'onnx')
    session = ort.InferenceSession(str(tmp_path / 'onnx' / 'model.onnx'), providers=['CUDAExecutionProvider'])
    assert session.get_providers()[0] == 'CUDAExecutionProvider'
    texts = [p.chunks[1] for p in text_pairs(n=8)]
    inputs = embedder.collate(texts)['parts'][0][1]
    names = [i.name for i in session.get_inputs()]
    (actual,) = session.run(None, {name: inputs[name].numpy() for name in names})
    with torch.no_grad():
        expected = embedder(embedder.collate(texts)).numpy()
    assert np.abs(actual - expected).max() <= 1e-3 + 1e-2 * np.abs(expected).max()  # ORT's CUDA may use TF32


def test_automatic_batch_size_probes_the_gpu_and_the_choice_trains(
    make_context: ContextFactory, tmp_path: Path
) -> None:
    """batchSize empty on CUDA: with the memory capped at 6 GiB, a 4-layer BERT of width 1024 on texts of
    512 tokens cannot take the whole data in a batch; the probe finds the largest power of two that fits,
    and that batch then trains, optimizer state included."""

    folder = make_tiny_bert(tmp_path / 'wide-bert', hidden_size=1024)
    config = json.loads((folder / 'config.json').read_text())
    config.update(num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512)

    BertModel(BertConfig(**config), add_pooling_layer=False).save_pretrained(folder)
    tokenizer_config = json.loads((folder / 'tokenizer_config.json').read_text())
    tokenizer_config['model_max_length'] = 512
    (folder / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
    long_text = ' '.join(WORDS * 20)  # far over 512 tokens: every text is truncated to 512
    records = [  # every query and document distinct: no batch is cut short by a clash
        Record(chunks=[Record(text=f'query {i} {long_text}'), Record(text=f'document {i} {long_text}')])
        for i in range(64)
    ]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * 2**30 / total))
    try:
        ctx = make_context(
            records,
            model=str(folder),
            loss='MultipleNegativesRankingLoss',
            model_options={'max_length': 512},
            device='cuda',
            optimizer='AdamW',
        )
        size = ctx.batch_size
        assert 8 <= size < 64 and size & (size - 1) == 0  # a power of two, smaller than the data
        batch = next(iter(ctx.train_loader))
        assert batch['groups'][0]['size'] == size
        assert torch.isfinite(torch.tensor(_train_step(ctx, batch)))  # the chosen batch trains
        assert torch.isfinite(torch.tensor(_train_step(ctx, batch)))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
