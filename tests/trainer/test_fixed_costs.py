"""What a run spends besides training, cut (issue 20): where the time goes (``timings`` in metrics.json),
one encoding of the evaluation data per evaluation, inference mode, checkpoints that match the backend
and are written in the background, and the metrics before fine-tuning cached per base model and data."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

from finetuner.api import layout
from finetuner.api.v1alpha1 import CallbackSpec, TrainerConfig
from finetuner.storage import LocalStore, S3Store, open_store
from finetuner_trainer import loop, progress, train
from finetuner_trainer.checkpointing import Checkpointer, CheckpointPolicy
from finetuner_trainer.evalcache import cache_key, tensor_fingerprint
from finetuner_trainer.evaluation import EmbeddingMemo
from finetuner_trainer.models import to_device
from finetuner_trainer.runner import build_context
from tests.support.tiny import labelled_texts, text_pairs
from tests.trainer.conftest import ConfigFactory


def _folder(uri: str) -> Path:
    return Path(urlparse(uri).path)


def _context(config: TrainerConfig) -> Any:
    return build_context(config, open_store(config.output_uri), logging.getLogger('finetuner_trainer'))


def _labelled(make_config: ConfigFactory, tiny_bert: Path, **spec: Any) -> TrainerConfig:
    spec = {'model': str(tiny_bert), 'batch_size': 8, 'num_items_per_class': 2, 'learning_rate': 1e-3, **spec}
    return make_config(labelled_texts(4, 6, seed=0), labelled_texts(4, 3, seed=1), **spec)


# --- evaluation: one encoding, the same numbers ----------------------------------------------------


@torch.no_grad()
def _forwarded_validation_loss(ctx: Any) -> float:
    """The validation loss as the loop computed it before: every evaluation batch forwarded through the model."""
    ctx.model.eval()
    values = [float(loop.compute_loss(ctx, to_device(batch, ctx.device))) for batch in ctx.eval_loader]
    ctx.model.train()
    return sum(values) / len(values)


@pytest.mark.parametrize('shape', ['labelled', 'pairs', 'scored pairs'])
def test_the_validation_loss_from_shared_embeddings_equals_forwarding_every_batch(
    make_config: ConfigFactory, tiny_bert: Path, shape: str
) -> None:
    if shape == 'labelled':
        config = _labelled(make_config, tiny_bert)
    else:
        scored = shape == 'scored pairs'
        config = make_config(
            text_pairs(n=24, seed=0, with_score=scored),
            text_pairs(n=12, seed=1, with_score=scored),
            model=str(tiny_bert),
            loss='CosineSimilarityLoss' if scored else 'MultipleNegativesRankingLoss',
            batch_size=4,
        )
    ctx = _context(config)
    assert ctx.eval_loader is not None and len(ctx.eval_loader) > 1
    shared = loop.validation_loss(ctx)
    assert shared == pytest.approx(_forwarded_validation_loss(ctx), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize('shape', ['labelled', 'pairs'])
def test_an_evaluation_encodes_each_evaluation_item_once(
    make_config: ConfigFactory, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    if shape == 'labelled':
        config = _labelled(make_config, tiny_bert)
        expected = 12  # the items are both the queries and the index
    else:
        config = make_config(
            text_pairs(n=24, seed=0),
            text_pairs(n=12, seed=1),
            model=str(tiny_bert),
            loss='MultipleNegativesRankingLoss',
            batch_size=4,
        )
        expected = 24  # queries and documents
    ctx = _context(config)
    encoded: list[int] = []
    inference: list[bool] = []
    real = ctx.model.embed

    def counting(values: list[Any], batch_size: int) -> torch.Tensor:
        encoded.append(len(values))
        inference.append(torch.is_inference_mode_enabled())
        return real(values, batch_size)

    monkeypatch.setattr(ctx.model, 'embed', counting)
    metrics = loop._evaluate(ctx)
    assert {'val_loss', 'mrr', 'ndcg_at_k'} <= set(metrics)
    assert sum(encoded) == expected
    assert all(inference)


def test_the_embedding_memo_embeds_new_items_only_and_keeps_the_order() -> None:
    calls: list[list[str]] = []

    def embed(values: list[str], batch_size: int) -> torch.Tensor:
        calls.append(list(values))
        return torch.tensor([[float(len(v)), float(batch_size)] for v in values]).reshape(len(values), 2)

    memo = EmbeddingMemo(embed)  # type: ignore[arg-type]
    a, bb, ccc = 'a', 'bb', 'ccc'
    first = memo([a, bb, a], 8)
    assert first[:, 0].tolist() == [1.0, 2.0, 1.0] and calls == [[a, bb]]
    second = memo([ccc, bb, a], 4)
    assert second[:, 0].tolist() == [3.0, 2.0, 1.0] and calls[-1] == [ccc]
    assert memo([], 4).shape == (0, 2)


# --- where the time goes ------------------------------------------------------------------------------


def test_phases_nest_and_add_up_to_the_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress.time, 'perf_counter', lambda: now[0])
    clock = progress.PhaseClock()
    clock.start_run()
    now[0] += 1.0  # unclaimed: other
    with clock.phase('training'):
        now[0] += 2.0
        with clock.phase('evaluation'):
            now[0] += 3.0
        now[0] += 4.0
        with clock.phase('checkpoints'):
            now[0] += 0.5
    summary = clock.summary()
    assert summary['training'] == 6.0 and summary['evaluation'] == 3.0 and summary['checkpoints'] == 0.5
    assert summary['other'] == 1.0 and summary['total'] == 10.5
    assert clock.sentence() == ('time: evaluation 3.0 s, training 6.0 s, checkpoints 0.5 s, other 1.0 s (total 10.5 s)')
    with pytest.raises(ValueError, match=r"unknown phase 'lunch'; the phases are start-up, data, model"):
        with clock.phase('lunch'):
            pass


def test_a_process_knows_its_age() -> None:
    age = progress.process_age()
    assert age is not None and 0 < age < 24 * 3600


def test_metrics_json_says_where_the_run_spent_its_time(
    make_config: ConfigFactory, tiny_bert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _labelled(make_config, tiny_bert, epochs=2)
    caplog.set_level('INFO', logger='finetuner_trainer')
    train(config)
    timings = json.loads((_folder(config.output_uri) / layout.METRICS).read_text())['timings']
    assert set(timings) == {*progress.PHASES, 'total'}
    assert timings['start-up'] == 0.0  # train() in this process: no process start of its own
    assert all(timings[p] > 0 for p in ('data', 'model', 'evaluation', 'training', 'artifact'))
    assert sum(timings[p] for p in progress.PHASES) == pytest.approx(timings['total'], abs=0.01)
    assert 'time: ' in caplog.text and ' training ' in caplog.text and '(total ' in caplog.text


# --- checkpoints ---------------------------------------------------------------------------------------


def test_the_checkpoint_policy_follows_the_output(tmp_path: Path) -> None:
    local = CheckpointPolicy.for_output(LocalStore(tmp_path))
    assert not local.after_last_epoch and not local.keep_when_done and local.background
    cluster = CheckpointPolicy.for_output(S3Store('bucket', 'runs/x'))
    assert cluster.after_last_epoch and cluster.keep_when_done and cluster.background
    asked = CheckpointPolicy.for_output(LocalStore(tmp_path), asked_to_keep=True)
    assert asked.after_last_epoch and asked.keep_when_done


def test_a_local_run_checkpoints_only_what_a_resume_needs(
    make_config: ConfigFactory, tiny_bert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _labelled(make_config, tiny_bert, epochs=3)
    caplog.set_level('INFO', logger='finetuner_trainer')
    train(config)
    saved = [line.split('checkpoint ')[1].split(' saved')[0] for line in caplog.messages if ' saved (epoch' in line]
    assert saved == ['checkpoints/epoch-0001', 'checkpoints/epoch-0002']  # none after the last epoch
    output = _folder(config.output_uri)
    assert (output / layout.ARTIFACT_MANIFEST).exists()
    assert not (output / layout.CHECKPOINTS).exists()  # a finished local run resumes nothing


def test_a_training_checkpoint_callback_keeps_every_epoch_locally_too(
    make_config: ConfigFactory, tiny_bert: Path
) -> None:
    callbacks = [CallbackSpec(name='TrainingCheckpoint', options={'last_k_epochs': 2})]
    config = _labelled(make_config, tiny_bert, epochs=2, callbacks=callbacks)
    train(config)
    output = _folder(config.output_uri)
    assert sorted(p.name for p in (output / layout.CHECKPOINTS).iterdir()) == [
        'epoch-0001',
        'epoch-0002',
        'latest.json',
    ]


class _SlowStore(LocalStore):
    """A local store whose uploads wait for ``release`` (or fail when ``fail`` is set)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.release = threading.Event()
        self.uploading = threading.Event()
        self.fail = False

    def upload_file(self, path: Path, key: str) -> None:
        self.uploading.set()
        assert self.release.wait(timeout=30)
        if self.fail:
            raise OSError('the object store went away')
        super().upload_file(path, key)


def test_a_background_checkpoint_is_a_snapshot_and_latest_json_comes_after_it(tmp_path: Path) -> None:
    store = _SlowStore(tmp_path)
    checkpointer = Checkpointer(store, policy=CheckpointPolicy())
    weights = torch.nn.Linear(3, 2)
    before = weights.weight.detach().clone()
    path = checkpointer.save(epoch=1, step=4, components={'model': weights})
    assert path == 'checkpoints/epoch-0001'
    assert store.uploading.wait(timeout=30)
    with torch.no_grad():
        weights.weight.add_(1.0)  # training goes on while the checkpoint is written
    assert checkpointer.latest_pointer() is None  # not complete yet: nothing points at it
    store.release.set()
    checkpointer.wait()
    assert checkpointer.latest_pointer()['path'] == path
    restored = torch.nn.Linear(3, 2)
    checkpoint = checkpointer.load_latest()
    assert checkpoint is not None
    checkpoint.restore({'model': restored})
    assert torch.equal(restored.weight, before)  # the weights of the moment it was taken


def test_a_failed_background_checkpoint_fails_the_run_at_the_next_wait(tmp_path: Path) -> None:
    store = _SlowStore(tmp_path)
    store.fail = True
    store.release.set()
    checkpointer = Checkpointer(store, policy=CheckpointPolicy())
    checkpointer.save(epoch=1, step=4, components={'model': torch.nn.Linear(3, 2)})
    with pytest.raises(OSError, match='the object store went away'):
        checkpointer.wait()
    assert checkpointer.latest_pointer() is None
    checkpointer.wait()  # raised once


# --- the metrics before fine-tuning, cached ----------------------------------------------------------------


def _with_data_home(config: TrainerConfig, home: Path, output: Path) -> TrainerConfig:
    return config.model_copy(update={'data_uri': home.as_uri(), 'output_uri': output.as_uri()})


def test_the_metrics_before_fine_tuning_are_measured_once_per_base_model_and_data(
    make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = _labelled(make_config, tiny_bert, epochs=1)
    home = tmp_path / 'home'
    caplog.set_level('INFO', logger='finetuner_trainer')
    first = train(_with_data_home(base, home, tmp_path / 'first'))
    entries = list((home / 'cache' / 'evaluations').glob('*.json'))
    assert len(entries) == 1
    assert 'from the evaluation cache' not in caplog.text
    caplog.clear()
    other_lr = base.model_copy(update={'spec': base.spec.model_copy(update={'learning_rate': 5e-4})})
    second = train(_with_data_home(other_lr, home, tmp_path / 'second'))
    assert 'metrics before fine-tuning: from the evaluation cache (run test-run)' in caplog.text
    before = [json.loads((tmp_path / run / layout.METRICS).read_text())['before'] for run in ('first', 'second')]
    assert before[0] == before[1] and 'val_loss' in before[0] and 'mrr' in before[0]
    examples = json.loads((tmp_path / 'second' / layout.EXAMPLES).read_text())
    assert (
        examples['before']
        and examples['before'] == json.loads((tmp_path / 'first' / layout.EXAMPLES).read_text())['before']
    )
    assert first.metrics['after'] != second.metrics['after']  # trained differently, measured after each


def test_other_data_another_seed_or_another_model_miss_the_cache(
    make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path
) -> None:
    base = _labelled(make_config, tiny_bert)
    key = cache_key(_context(base))
    assert key is not None and key == cache_key(_context(base))  # the same run twice: the same key
    reseeded = base.model_copy(update={'spec': base.spec.model_copy(update={'seed': 7})})
    assert cache_key(_context(reseeded)) != key  # the validation batches depend on the seed
    projected = base.model_copy(update={'spec': base.spec.model_copy(update={'output_dim': 16})})
    assert cache_key(_context(projected)) != key  # a projection head: other starting weights
    other_data = make_config(labelled_texts(4, 6, seed=0), labelled_texts(4, 3, seed=2), **_spec_of(base))
    assert cache_key(_context(other_data)) != key
    explicit = base.spec.model_copy(
        update={'callbacks': [CallbackSpec(name='EvaluationCallback', options={'query_data': 'file:///q.jsonl'})]}
    )
    assert cache_key(_context(base.model_copy(update={'spec': explicit}))) is None  # named data: not cached


def _spec_of(config: TrainerConfig) -> dict[str, Any]:
    return config.spec.model_dump(exclude={'train_data', 'eval_data'})


def test_the_evaluation_cache_can_be_switched_off(
    make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv('FINETUNER_EVALUATION_CACHE', 'off')
    home = tmp_path / 'home'
    train(_with_data_home(_labelled(make_config, tiny_bert), home, tmp_path / 'run'))
    assert not (home / 'cache').exists()


def test_the_weight_fingerprint_sees_any_change() -> None:
    weights = {'a': torch.arange(6, dtype=torch.float32).reshape(2, 3), 'b': torch.tensor([1, 2, 3])}
    first = tensor_fingerprint(weights)
    assert first == tensor_fingerprint({k: v.clone() for k, v in weights.items()})
    nudged = weights['a'].clone()
    nudged[0, 0] += 1e-6
    changed = dict(weights, a=nudged)
    assert tensor_fingerprint(changed) != first
    assert tensor_fingerprint(dict(weights, b=weights['b'].reshape(3, 1))) != first  # shape
