"""GradCache (cached in-batch-negative losses) and gradient accumulation (``lossOptions.mini_batch_size``).

The cached losses must give the loss value and the gradients of the uncached loss on the same batch
(to 1e-5), dropout included: each mini-batch's second forward pass replays the random state of its first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner_trainer.data import Example, Shape, to_item
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.loop import run_training
from finetuner_trainer.losses import build_objective, forward_objective
from finetuner_trainer.models import build_embedder
from finetuner_trainer.runner import Collator, build_context
from tests.support.tiny import text_image_pairs, text_pairs

TOLERANCE = 1e-5


def _examples(records: list[Any]) -> list[Example]:
    return [
        Example(tuple(to_item(chunk, f'record {i}', 'data') for chunk in record.chunks), score=record.score)
        for i, record in enumerate(records)
    ]


def _model(path: Path, **options: Any) -> torch.nn.Module:
    spec = FinetuneRunSpec(model=str(path), train_data='file:///unused.jsonl', model_options=options)
    return build_embedder(spec).double()


def _loss_and_grads(
    model: torch.nn.Module, loss: torch.nn.Module, batch: dict[str, Any], seed: int = 0
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = forward_objective(model, loss, batch)
    value.backward()
    grads = {
        name: p.grad.clone() for name, p in [*model.named_parameters(), *loss.named_parameters()] if p.grad is not None
    }
    return float(value.detach()), grads


def _assert_same(left: tuple[float, dict[str, torch.Tensor]], right: tuple[float, dict[str, torch.Tensor]]) -> None:
    assert left[0] == pytest.approx(right[0], abs=TOLERANCE)
    assert left[1].keys() == right[1].keys()
    assert len(left[1]) > 10
    for name, grad in left[1].items():
        assert torch.allclose(grad, right[1][name], atol=TOLERANCE, rtol=0), name


def _double(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _double(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_double(v) for v in batch)
    return batch


@pytest.mark.parametrize('mini', [1, 3, 4, 16])
def test_cached_mnrl_gives_the_loss_and_gradients_of_the_whole_batch(tiny_bert: Path, mini: int) -> None:
    model = _model(tiny_bert).eval()  # eval: both sides see the same network (dropout is tested below)
    examples = _examples(text_pairs(n=16, seed=3))
    whole = Collator(model, Shape.PAIRS)(examples)
    chunked = Collator(model, Shape.PAIRS, mini_batch_size=mini)(examples)
    assert len(chunked['groups'][0]) == -(-16 // mini)
    plain = build_objective('MultipleNegativesRankingLoss', {}, None, {}, 32, 0).double()
    cached = build_objective('CachedMultipleNegativesRankingLoss', {'mini_batch_size': mini}, None, {}, 32, 0)
    _assert_same(_loss_and_grads(model, plain, whole), _loss_and_grads(model, cached.double(), chunked))


def test_mini_batch_size_on_the_plain_loss_is_the_cached_loss(tiny_bert: Path) -> None:
    model = _model(tiny_bert).eval()
    examples = _examples(text_pairs(n=12, seed=4))
    plain = build_objective('MultipleNegativesRankingLoss', {'symmetric': True}, None, {}, 32, 0).double()
    option = build_objective('MultipleNegativesRankingLoss', {'symmetric': True, 'mini_batch_size': 5}, None, {}, 32, 0)
    assert option.mini_batch_size == 5 and option.symmetric
    whole = Collator(model, Shape.PAIRS)(examples)
    chunked = Collator(model, Shape.PAIRS, mini_batch_size=5)(examples)
    _assert_same(_loss_and_grads(model, plain, whole), _loss_and_grads(model, option.double(), chunked))


def test_dropout_masks_are_replayed(tiny_bert: Path) -> None:
    """In training mode (dropout on), the cached gradients equal those of one graph over the same
    mini-batches: the second pass of each mini-batch drew the same dropout masks as its first."""
    model = _model(tiny_bert).train()
    examples = _examples(text_pairs(n=12, seed=5))
    chunked = Collator(model, Shape.PAIRS, mini_batch_size=4)(examples)
    plain = build_objective('MultipleNegativesRankingLoss', {}, None, {}, 32, 0).double()
    cached = build_objective('CachedMultipleNegativesRankingLoss', {'mini_batch_size': 4}, None, {}, 32, 0).double()
    plain.mini_batch_size = None  # the same chunks, embedded in one graph
    with_graph = _loss_and_grads(model, plain, chunked, seed=7)
    replayed = _loss_and_grads(model, cached, chunked, seed=7)
    _assert_same(with_graph, replayed)
    other_masks = _loss_and_grads(model, plain, chunked, seed=8)
    assert abs(other_masks[0] - with_graph[0]) > 1e-6  # dropout is really on: another seed, another loss


def test_cached_clip_loss_gives_the_loss_and_gradients_of_clip_loss(tiny_clip: Path) -> None:
    spec = FinetuneRunSpec(model=str(tiny_clip), train_data='file:///x.jsonl', loss='CLIPLoss', multi_modal=True)
    model = build_embedder(spec).double().eval()
    examples = _examples(text_image_pairs(n=10, seed=2))
    whole = _double(Collator(model, Shape.TEXT_IMAGE)(examples))
    chunked = _double(Collator(model, Shape.TEXT_IMAGE, mini_batch_size=3)(examples))
    plain = build_objective('CLIPLoss', {}, None, {}, 32, 0, model).double()
    cached = build_objective('CachedCLIPLoss', {'mini_batch_size': 3}, None, {}, 32, 0, model).double()
    left, right = _loss_and_grads(model, plain, whole), _loss_and_grads(model, cached, chunked)
    _assert_same(left, right)
    assert 'logit_scale' in right[1]  # the temperature learns too


def test_accumulation_averages_the_mini_batches(tiny_bert: Path) -> None:
    """A loss without in-batch negatives accumulates: for a per-pair loss (the mean over pairs) that is
    the whole batch's loss and gradients."""
    model = _model(tiny_bert).eval()
    examples = _examples(text_pairs(n=10, seed=6, with_score=True))
    plain = build_objective('CosineSimilarityLoss', {}, None, {}, 32, 0)
    accumulated = build_objective('CosineSimilarityLoss', {'mini_batch_size': 4}, None, {}, 32, 0)
    whole = _double(Collator(model, Shape.SCORED_PAIRS)(examples))
    chunked = _double(Collator(model, Shape.SCORED_PAIRS, mini_batch_size=4)(examples))
    _assert_same(_loss_and_grads(model, plain, whole), _loss_and_grads(model, accumulated, chunked))


def test_accumulation_of_a_label_loss_sums_the_mini_batches_losses(tiny_bert: Path) -> None:
    from tests.support.tiny import labelled_texts

    model = _model(tiny_bert).eval()
    records = labelled_texts(n_classes=2, per_class=6, seed=1)
    labels = {label: i for i, label in enumerate(sorted({r.label for r in records}))}
    examples = [Example((to_item(r, 'r', 'data'),), label=labels[r.label]) for r in records]
    accumulated = build_objective('ContrastiveLoss', {'mini_batch_size': 6}, None, {}, 32, 2)
    chunked = _double(Collator(model, Shape.LABELLED, mini_batch_size=6)(examples))
    value, _ = _loss_and_grads(model, accumulated, chunked)
    plain = build_objective('ContrastiveLoss', {}, None, {}, 32, 2)
    halves = [
        float(plain(model(chunk).float(), chunked['labels'][i * 6 : i * 6 + 6]))
        for i, chunk in enumerate(chunked['groups'][0])
    ]
    assert value == pytest.approx(sum(halves) / 2, abs=TOLERANCE)


@pytest.mark.parametrize('bad', [0, -2, 2.5, 'big', True])
def test_a_bad_mini_batch_size_names_the_option(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r'lossOptions\.mini_batch_size: must be a whole number'):
        build_objective('MultipleNegativesRankingLoss', {'mini_batch_size': bad}, None, {}, 32, 0)


def test_a_run_with_the_cached_loss_trains(tiny_bert: Path, make_config: Any) -> None:
    import logging

    from finetuner.storage import open_store

    config = make_config(
        text_pairs(n=24, seed=1),
        model=str(tiny_bert),
        loss='CachedMultipleNegativesRankingLoss',
        loss_options={'mini_batch_size': 4},
        batch_size=12,
    )
    ctx = build_context(config, open_store(config.output_uri), logging.getLogger('test'))
    assert ctx.loss.mini_batch_size == 4
    batch = next(iter(ctx.train_loader))
    assert [len(group) for group in batch['groups']] == [3, 3]
    before = [p.detach().clone() for p in ctx.model.parameters()]
    state = run_training(ctx)
    assert state.step == len(ctx.train_loader) and state.train_loss is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters(), strict=True))
