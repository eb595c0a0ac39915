"""The full local lifecycle with the real trainer (tiny random models, a few steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import finetuner
from finetuner.api.v1alpha1 import FinetuneRunStatus
from finetuner.backends.local import LocalBackend
from finetuner.data import to_legacy_documents
from finetuner.errors import ArgumentError, RunFailedError
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, labelled_texts, make_tiny_bert

pytest.importorskip('finetuner_trainer.runner')


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp('tiny-bert'))


@pytest.mark.slow
def test_fit_created_started_finished_save_get_encode(local: LocalBackend, tiny_bert: Path, tmp_path: Path) -> None:
    train = to_legacy_documents(labelled_texts(4, 8))
    run = finetuner.fit(
        model=str(tiny_bert),
        train_data=train,
        eval_data=to_legacy_documents(labelled_texts(4, 4, seed=1)),
        epochs=1,
        batch_size=16,
        cpu=True,
        num_workers=0,
        to_onnx=True,
        run_name='lifecycle',
    )
    assert run.status() == {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}
    phases: list[str] = []

    def observe(status: FinetuneRunStatus) -> None:
        if not phases or phases[-1] != status.phase:
            phases.append(str(status.phase))

    final = run.wait(timeout=240, poll=0.2, on_progress=observe)
    assert final['status'] == 'FINISHED', run.logs()
    assert phases[-1] == 'FINISHED'
    assert 'STARTED' in phases
    assert phases[0] in ('CREATED', 'STARTED')
    assert 'run lifecycle finished' in run.logs()
    metrics = run.metrics()
    assert metrics.before and metrics.after and set(metrics.before) == set(metrics.after)

    saved = run.save_model(tmp_path / 'model')
    model = finetuner.get_model(saved)
    texts = ['red green cat', 'blue dog fast']
    embeddings = finetuner.encode(model, texts)
    assert isinstance(embeddings, np.ndarray) and embeddings.shape[0] == 2

    from finetuner_trainer.models import load_embedder

    trainer_side = load_embedder(local.run_dir('lifecycle') / 'output' / 'artifact')
    expected = trainer_side.embed([finetuner.Record(text=t) for t in texts], batch_size=2).numpy()
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)

    onnx_model = finetuner.get_model(saved, is_onnx=True)
    np.testing.assert_allclose(finetuner.encode(onnx_model, texts), expected, rtol=1e-4, atol=1e-5)
    without_onnx = tmp_path / 'without-onnx'
    shutil.copytree(saved, without_onnx, ignore=shutil.ignore_patterns('onnx'))
    with pytest.raises(ArgumentError, match=r'is_onnx: .* has no ONNX model .*fine-tune with to_onnx=True'):
        finetuner.get_model(without_onnx, is_onnx=True)

    docs = to_legacy_documents([finetuner.Record(text=t) for t in texts])
    assert finetuner.encode(model, docs) is docs
    np.testing.assert_allclose(np.stack([np.asarray(d.embedding) for d in docs]), expected, rtol=1e-5, atol=1e-6)


def test_get_model_returns_the_torch_model_in_eval_mode(tmp_path: Path) -> None:
    """model(batch) on what get_model returns is inference (no dropout, BatchNorm's running statistics),
    the same embeddings as encode; a model fresh from load_embedder would still be in training mode."""
    import torch

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.models import build_embedder

    torch.manual_seed(0)
    spec = FinetuneRunSpec(model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS, train_data='x', output_dim=8)
    build_embedder(spec).save(tmp_path)
    (tmp_path / 'manifest.json').write_text('{}')  # what makes a folder an artifact for get_model
    model = finetuner.get_model(tmp_path)
    assert not model.training
    assert not any(module.training for module in model.modules())
    records = labelled_images(2, 2)
    with torch.no_grad():
        direct = model(model.collate(records)).numpy()
    np.testing.assert_allclose(direct, finetuner.encode(model, records), rtol=1e-5, atol=1e-6)
    assert not model.training  # encode leaves it as it found it


def test_bad_data_ends_failed_with_the_trainers_reason(local: LocalBackend, tiny_bert: Path, tmp_path: Path) -> None:
    same_label = [finetuner.Record(text=r.text, label='only') for r in labelled_texts(2, 4)]
    run = finetuner.fit(model=str(tiny_bert), train_data=same_label, epochs=1, cpu=True, num_workers=0)
    final = run.wait(timeout=240, poll=0.2)
    assert final['status'] == 'FAILED'
    assert "all items have the same label 'only'" in final['details']
    assert run.full_status().reason == 'ConfigurationError'
    with pytest.raises(RunFailedError, match='all items have the same label'):
        run.save_model(tmp_path / 'model')
