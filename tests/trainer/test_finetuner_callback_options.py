"""The options Finetuner 0.8.1's EvaluationCallback and WandBLogger document, doing what its docs say:

- EvaluationCallback: ``caption`` ("attached as prefix to the names of the retrieval metrics ... required
  to prevent callbacks from overwriting the metrics of each other"), ``query_sample_size`` ("a number of
  samples to draw from the query set"), ``steps_per_interval`` ("a number of batches after which an
  evaluation should be performed"), ``model`` / ``index_model`` ("the model used for encoding the data in
  query_data / index_data": CLIP's towers), ``num_workers`` ("workers to use when matching query and index");
- WandBLogger: ``wandb_args`` ("keyword arguments that are passed to wandb.init"), ``metrics_logger_step``
  ("whether to log metrics per batch or per epoch"), ``log_zero_shot`` ("whether to include the results of
  evaluation before training").
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from finetuner.api.v1alpha1 import CallbackSpec, FinetuneRunSpec
from finetuner_trainer import evaluation, train
from finetuner_trainer.callbacks import BestModelCheckpoint, EvaluationCallback, build_callbacks, resolve_mode
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.evaluation import EvalSet, Evaluator, example_queries
from finetuner_trainer.hooks import Control, TrainState
from tests.support.tiny import labelled_images, text_image_pairs, write_jsonl
from tests.trainer.conftest import TIMM_SPEC, ConfigFactory

# --- caption ----------------------------------------------------------------------------------------


def test_caption_prefixes_the_metrics_and_best_model_checkpoint_follows_it(make_config: ConfigFactory) -> None:
    records = labelled_images(n_classes=2, per_class=6)
    config = make_config(
        records,
        **TIMM_SPEC,
        val_split=0.34,
        batch_size=8,
        callbacks=[
            CallbackSpec(name='EvaluationCallback', options={'caption': 'held-out'}),
            CallbackSpec(name='BestModelCheckpoint', options={'monitor': 'held-out_mrr'}),
        ],
    )
    result = train(config)
    assert {'held-out_mrr', 'held-out_ndcg_at_k', 'held-out_map'} <= set(result.metrics['after'])
    assert 'mrr' not in result.metrics['after']
    assert resolve_mode('held-out_mrr', 'auto') == 'max'  # a captioned metric is still higher-is-better
    assert BestModelCheckpoint(monitor='held-out_mrr').mode == 'max'
    assert resolve_mode('val_loss', 'auto') == 'min'


def test_two_evaluation_callbacks_need_their_own_captions() -> None:
    with pytest.raises(ConfigError) as caught:
        build_callbacks([CallbackSpec(name='EvaluationCallback'), CallbackSpec(name='EvaluationCallback')])
    assert str(caught.value).startswith('spec.callbacks[1].options.caption: EvaluationCallback 1 has the caption None')
    assert 'give each EvaluationCallback its own caption' in str(caught.value)
    build_callbacks(
        [
            CallbackSpec(name='EvaluationCallback', options={'caption': 'a'}),
            CallbackSpec(name='EvaluationCallback', options={'caption': 'b'}),
        ]
    )


# --- query_sample_size and num_workers: on fixed embeddings, against a brute-force oracle -----------


def _fixed_eval_set(n: int = 12, seed: int = 0) -> tuple[EvalSet, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    vectors = torch.tensor(rng.normal(size=(n, 4)) + np.eye(3, 4)[labels] * 2.0, dtype=torch.float32)
    items = [SimpleNamespace(position=i) for i in range(n)]
    return EvalSet(items, items, labels, labels, same_items=True), vectors


def _brute_force_mrr(vectors: np.ndarray, labels: list[int], queries: list[int]) -> float:
    """Reciprocal rank of the first same-label item, the query itself left out (cosine)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    ranks = []
    for q in queries:
        others = [j for j in range(len(labels)) if j != q]
        order = sorted(others, key=lambda j: (-float(unit[q] @ unit[j]), j))
        first = next(pos for pos, j in enumerate(order, 1) if labels[j] == labels[q])
        ranks.append(1.0 / first)
    return float(np.mean(ranks))


def test_query_sample_size_scores_a_seeded_sample_of_the_queries_against_the_whole_index() -> None:
    eval_set, vectors = _fixed_eval_set()

    def embed(items: list[Any], batch_size: int) -> torch.Tensor:
        return vectors[[item.position for item in items]]

    sampled = eval_set.sample_queries(5, seed=7)
    chosen = [item.position for item in sampled.queries]
    assert len(chosen) == 5 and chosen == sorted(chosen) and len(sampled.index) == 12
    assert eval_set.sample_queries(5, seed=7).query_ids == sampled.query_ids  # the same draw for a seed
    metrics = Evaluator(sampled, limit=20).evaluate(embed)
    labels = eval_set.query_labels
    assert metrics['mrr'] == pytest.approx(_brute_force_mrr(vectors.numpy(), labels, chosen))
    everything = Evaluator(eval_set, limit=20).evaluate(embed)
    assert everything['mrr'] == pytest.approx(_brute_force_mrr(vectors.numpy(), labels, list(range(12))))
    assert eval_set.sample_queries(50, seed=7) is eval_set  # more than there are: all of them


def test_num_workers_sets_the_threads_that_match_queries_and_index(monkeypatch: pytest.MonkeyPatch) -> None:
    eval_set, vectors = _fixed_eval_set()
    seen: list[int] = []
    real = evaluation.pairwise_distances

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, 'pairwise_distances', recording)
    before = torch.get_num_threads()
    Evaluator(eval_set, num_workers=1).evaluate(lambda items, size: vectors[[i.position for i in items]])
    Evaluator(eval_set, num_workers=10_000).evaluate(lambda items, size: vectors[[i.position for i in items]])
    assert seen == [1, os.cpu_count()]  # at most the CPUs there are
    assert torch.get_num_threads() == before  # restored


# --- steps_per_interval ---------------------------------------------------------------------------


def test_steps_per_interval_evaluates_inside_the_epoch_too(make_config: ConfigFactory) -> None:
    records = labelled_images(n_classes=2, per_class=16)
    config = make_config(
        records,
        **TIMM_SPEC,
        val_split=0.25,
        batch_size=8,
        epochs=1,
        callbacks=[CallbackSpec(name='EvaluationCallback', options={'steps_per_interval': 1})],
    )
    result = train(config)
    metrics = json.loads((Path(urlparse(config.output_uri).path) / 'metrics.json').read_text())
    steps = result.steps  # batches of the one epoch; the last one is the epoch's own evaluation
    assert steps >= 3
    assert [entry['step'] for entry in metrics['intervals']] == list(range(1, steps))
    assert all('mrr' in entry and entry['epoch'] == 1 for entry in metrics['intervals'])


# --- model / index_model: CLIP's towers -------------------------------------------------------------


def test_model_and_index_model_pick_clip_towers(make_config: ConfigFactory, tiny_clip: Path, tmp_path: Path) -> None:
    pairs = text_image_pairs(n=8)
    queries = write_jsonl(pairs, tmp_path / 'queries.jsonl')

    def run(options: dict[str, Any]) -> dict[str, Any]:
        config = make_config(
            pairs,
            model=str(tiny_clip),
            multi_modal=True,
            loss='CLIPLoss',
            batch_size=4,
            callbacks=[CallbackSpec(name='EvaluationCallback', options={'query_data': str(queries), **options})],
        )
        output = tmp_path / f'output-{len(list(tmp_path.glob("output-*")))}'  # a run of its own, no resuming
        return train(config.model_copy(update={'output_uri': output.as_uri()})).metrics

    metrics = run({'model': 'clip-text', 'index_model': 'clip-vision'})
    assert 'mrr' in metrics['after']
    with pytest.raises(ConfigError, match=r'index_model: clip-text embeds text, but index_data\[0\] is image'):
        run({'model': 'clip-text', 'index_model': 'clip-text'})
    with pytest.raises(ConfigError, match=r"model: unknown model 'clip'; .* has 'clip-text' and 'clip-vision'"):
        run({'model': 'clip'})


def test_model_of_a_single_model_run_is_refused(make_config: ConfigFactory) -> None:
    config = make_config(
        labelled_images(2, 8),
        **TIMM_SPEC,
        val_split=0.5,
        batch_size=8,
        callbacks=[CallbackSpec(name='EvaluationCallback', options={'model': 'clip-vision'})],
    )
    with pytest.raises(ConfigError, match=r'callbacks\.EvaluationCallback\.model: timm:test_resnet is a single model'):
        train(config)


# --- WandBLogger ----------------------------------------------------------------------------------


class FakeWandb(types.ModuleType):
    """Records what the logger hands to wandb (wandb is not installed here; its API is init(**kw) -> run
    with log(values, step=) and finish())."""

    def __init__(self) -> None:
        super().__init__('wandb')
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, float], int]] = []

    def init(self, **kwargs: Any) -> Any:
        self.inits.append(kwargs)
        return SimpleNamespace(log=lambda values, step: self.logged.append((dict(values), step)), finish=lambda: None)


def _drive(options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    (logger,) = build_callbacks([CallbackSpec(name='WandBLogger', options=options)])
    spec = FinetuneRunSpec(model='m', train_data='x')
    before = SimpleNamespace(before={'mrr': 0.25})
    ctx = SimpleNamespace(spec=spec, config=SimpleNamespace(run_name='r'), metrics=before)
    state, control = TrainState(epochs=1), Control()
    logger.on_train_begin(ctx, state, control)
    state.epoch = 1
    for step, loss in enumerate([0.9, 0.7], start=1):
        state.step = step
        logger.on_batch_end(ctx, state, control, loss)
    state.train_loss, state.metrics = 0.8, {'mrr': 0.5}
    logger.on_epoch_end(ctx, state, control)
    logger.on_train_end(ctx, state, control)
    return fake


def test_wandb_logger_passes_wandb_args_and_logs_per_epoch_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _drive({'project': 'p', 'wandb_args': {'tags': ['ft'], 'project': 'from-args', 'group': 'g'}}, monkeypatch)
    (init,) = fake.inits
    assert init['project'] == 'from-args' and init['tags'] == ['ft'] and init['group'] == 'g'
    assert init['name'] == 'r' and init['config']['model'] == 'm'
    assert fake.logged[0] == ({'eval/mrr': 0.25}, 0), 'zero-shot metrics at step 0 (log_zero_shot default True)'
    assert not any('train/loss' in values for values, _ in fake.logged), "metrics_logger_step='epoch'"
    assert fake.logged[-1][0] == {'eval/mrr': 0.5, 'epoch/train_loss': 0.8, 'epoch': 1.0}


def test_wandb_logger_per_batch_and_without_zero_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _drive({'metrics_logger_step': 'batch', 'log_zero_shot': False}, monkeypatch)
    assert [(values, step) for values, step in fake.logged if 'train/loss' in values] == [
        ({'train/loss': 0.9}, 1),
        ({'train/loss': 0.7}, 2),
    ]
    assert all(step > 0 for _, step in fake.logged), 'no step-0 metrics without log_zero_shot'


def test_the_sdk_classes_take_the_same_options() -> None:
    from finetuner.callbacks import EvaluationCallback as SdkEvaluation
    from finetuner.callbacks import WandBLogger as SdkWandB

    spec = SdkEvaluation(caption='test', query_sample_size=100, steps_per_interval=50, model='clip-text').to_spec()
    assert spec.options == {'caption': 'test', 'query_sample_size': 100, 'steps_per_interval': 50, 'model': 'clip-text'}
    EvaluationCallback(**spec.options)
    assert SdkWandB(wandb_args={'group': 'g'}, metrics_logger_step='batch').to_spec().options['wandb_args'] == {
        'group': 'g'
    }
    with pytest.raises(ValueError, match="Input should be 'batch' or 'epoch'"):
        SdkWandB(metrics_logger_step='step')
    with pytest.raises(ValueError, match='String should match pattern'):
        SdkEvaluation(caption='two words')


def test_example_queries_are_drawn_one_label_at_a_time() -> None:
    rng = np.random.default_rng(0)
    labels = sorted(i % 3 for i in range(12))  # sorted by class, as most labelled data is
    vectors = torch.tensor(rng.normal(size=(12, 4)) + np.eye(3, 4)[labels] * 2.0, dtype=torch.float32)
    items = [SimpleNamespace(position=i, text=f'item {i}') for i in range(12)]
    evaluator = Evaluator(
        EvalSet(items, items, labels, labels, same_items=True), gather_examples=True, num_example_queries=4
    )
    evaluator.evaluate(lambda batch, size: vectors[[item.position for item in batch]])
    assert [example['label'] for example in evaluator.examples] == [0, 1, 2, 0]
    assert example_queries(labels, 4) == [0, 4, 8, 1]
    assert example_queries(list(range(7)), 5) == [0, 1, 2, 3, 4], 'pairs: every query its own label'
    assert example_queries(['a', 'a', 'b'], 10) == [0, 2, 1], 'at most the queries there are'
