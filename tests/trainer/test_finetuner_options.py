"""Finetuner's remaining training options: layer-wise learning-rate decay
(``optimizer_options={'layer_wise_lr_decay': ...}``) and GeM pooling for text models
(``model_options={'pooler': 'GeM', 'pooler_options': {'p': ..., 'eps': ...}}``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import finetuner
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.storage import open_store
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.loop import run_training
from finetuner_trainer.models import build_embedder
from finetuner_trainer.optim import layer_depths
from finetuner_trainer.runner import build_context
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, labelled_texts, text_pairs

TEXTS = [r.text for r in labelled_texts(n_classes=3, per_class=3, seed=2)]


def _context(make_config: Any, records: list[Any], **spec: Any) -> Any:
    config = make_config(records, **spec)
    return build_context(config, open_store(config.output_uri), logging.getLogger('test'))


def test_layer_wise_decay_gives_each_layer_its_rate(tiny_bert: Path, make_config: Any) -> None:
    ctx = _context(
        make_config,
        text_pairs(n=16),
        model=str(tiny_bert),
        loss='MultipleNegativesRankingLoss',
        learning_rate=1e-3,
        output_dim=8,
        optimizer_options={'layer_wise_lr_decay': 0.5, 'weight_decay': 0.01},
    )
    rate = {id(p): group['lr'] for group in ctx.optimizer.param_groups for p in group['params']}
    named = dict(ctx.model.named_parameters())
    # two encoder layers: embeddings 3 steps below the top, layer 0 two, layer 1 one, the head at the top
    assert rate[id(named['backbone.embeddings.word_embeddings.weight'])] == pytest.approx(1e-3 * 0.5**3)
    assert rate[id(named['backbone.encoder.layer.0.attention.self.query.weight'])] == pytest.approx(1e-3 * 0.5**2)
    assert rate[id(named['backbone.encoder.layer.1.output.dense.bias'])] == pytest.approx(1e-3 * 0.5)
    assert rate[id(named['head.2.weight'])] == pytest.approx(1e-3)
    assert all(group['weight_decay'] == 0.01 for group in ctx.optimizer.param_groups)
    assert sum(len(g['params']) for g in ctx.optimizer.param_groups) == len(named)
    before = {name: p.detach().clone() for name, p in named.items()}
    run_training(ctx)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in named.items()}
    assert moved['backbone.embeddings.word_embeddings.weight'] > 0


def test_layer_wise_decay_on_a_cnn_puts_the_stem_at_the_bottom() -> None:
    import timm

    names = [
        'backbone.' + n for n, _ in timm.create_model('resnet18', pretrained=False, num_classes=0).named_parameters()
    ]
    depths = layer_depths(names)
    assert depths['backbone.conv1.weight'] == (0, 6)
    assert depths['backbone.layer1.0.conv1.weight'][0] < depths['backbone.layer4.1.bn2.bias'][0] < 6


@pytest.mark.parametrize('bad', [0, 1.5, -0.1, 'fast', True])
def test_a_bad_layer_wise_decay_names_the_option(tiny_bert: Path, make_config: Any, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r'optimizerOptions\.layer_wise_lr_decay: must be a number in \(0, 1\]'):
        _context(
            make_config,
            text_pairs(n=8),
            model=str(tiny_bert),
            loss='MultipleNegativesRankingLoss',
            optimizer_options={'layer_wise_lr_decay': bad},
        )


def _gem_spec(tiny_bert: Path, **options: Any) -> FinetuneRunSpec:
    return FinetuneRunSpec(
        model=str(tiny_bert), train_data='file:///x.jsonl', model_options={'pooler': 'GeM', **options}
    )


def test_gem_pooling_of_text_is_the_generalized_mean_over_the_mask(tiny_bert: Path) -> None:
    model = build_embedder(_gem_spec(tiny_bert, pooler_options={'p': 2.0, 'eps': 1e-4})).eval()
    assert model.pooler == 'gem' and float(model.gem.p.detach()) == 2.0
    batch = model.collate([Record(text=text) for text in TEXTS])
    ((_, inputs, _),) = batch['parts']
    with torch.no_grad():
        hidden = model.backbone(**inputs).last_hidden_state
        got = model(batch)
    for i, mask in enumerate(inputs['attention_mask']):
        tokens = hidden[i][mask.bool()].clamp(min=1e-4)
        expected = tokens.pow(2).mean(0).pow(0.5)
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


def test_gem_text_model_trains_saves_and_loads_in_sentence_transformers(
    tiny_bert: Path, make_config: Any, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    ctx = _context(
        make_config,
        text_pairs(n=16),
        model=str(tiny_bert),
        loss='MultipleNegativesRankingLoss',
        learning_rate=1e-2,
        model_options={'pooler': 'GeM'},
    )
    run_training(ctx)
    p = float(ctx.model.gem.p.detach())
    assert p != 3.0  # the exponent learns
    description = ctx.model.save(tmp_path / 'model')
    assert description['preprocessing']['pooler_options']['p'] == pytest.approx(p)
    (tmp_path / 'model' / 'manifest.json').write_text('{}')  # as a run's artifact folder has one
    ours = finetuner.encode(finetuner.get_model(tmp_path / 'model'), TEXTS)
    # GeM is this project's module: sentence-transformers imports it when trusted to
    folder = str(tmp_path / 'model')
    with pytest.raises(ValueError, match='trust_remote_code=True'):
        SentenceTransformer(folder, device='cpu')
    st = SentenceTransformer(folder, device='cpu', trust_remote_code=True).encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(st, ours, atol=1e-5)


@pytest.mark.parametrize(
    ('options', 'message'),
    [
        ({'pooler_options': {'p': 0}}, r'modelOptions\.pooler_options\.p: must be a positive number'),
        ({'pooler_options': {'q': 1}}, r'modelOptions\.pooler_options: GeM takes p and eps'),
        ({'pooler': 'mean', 'pooler_options': {'p': 2}}, r'modelOptions\.pooler_options: the mean pooler takes no'),
        ({'pooler': 'max'}, r'modelOptions\.pooler: .max. is not a pooler for text models; use mean, cls or GeM'),
    ],
)
def test_bad_pooler_options_name_the_field(tiny_bert: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_embedder(_gem_spec(tiny_bert, **options))


def test_gem_options_reach_image_models() -> None:
    spec = FinetuneRunSpec(
        model=TINY_TIMM,
        train_data='file:///x.jsonl',
        model_options={**TINY_TIMM_OPTIONS, 'pooler': 'GeM', 'pooler_options': {'p': 4, 'eps': 1e-3}},
    )
    model = build_embedder(spec)
    assert float(model.pool.p.detach()) == 4.0 and model.pool.eps == 1e-3
    assert model.embed(labelled_images(n_classes=2, per_class=2)).shape == (4, model.output_dim)


def _batch_norms(model: Any) -> list[torch.nn.Module]:
    return [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_batch_norm_is_frozen_while_training_by_default() -> None:
    spec = FinetuneRunSpec(model=TINY_TIMM, train_data='file:///x.jsonl', model_options=dict(TINY_TIMM_OPTIONS))
    model = build_embedder(spec)
    norms = _batch_norms(model)
    assert norms
    before = [m.running_mean.clone() for m in norms]
    model.train()
    assert model.training and model.backbone.training
    assert not any(m.training for m in norms)
    model.forward(model.collate(labelled_images(n_classes=2, per_class=4))).sum().backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    assert all(m.weight.grad is not None for m in norms)  # the affine weights still train
    model.embed(labelled_images(n_classes=2, per_class=1))  # eval mode for a moment, then back
    assert model.training and not any(m.training for m in norms)


def test_batch_norm_train_updates_the_statistics() -> None:
    options = {**TINY_TIMM_OPTIONS, 'batch_norm': 'train'}
    model = build_embedder(FinetuneRunSpec(model=TINY_TIMM, train_data='file:///x.jsonl', model_options=options))
    norms = _batch_norms(model)
    before = [m.running_mean.clone() for m in norms]
    model.train()
    assert all(m.training for m in norms)
    model.forward(model.collate(labelled_images(n_classes=2, per_class=4))).sum().backward()
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))


def test_a_bad_batch_norm_mode_names_the_option() -> None:
    options = {**TINY_TIMM_OPTIONS, 'batch_norm': 'sync'}
    with pytest.raises(
        ConfigError, match=r"modelOptions.batch_norm.*'sync' is not a batch_norm mode; use frozen or train"
    ):
        build_embedder(FinetuneRunSpec(model=TINY_TIMM, train_data='file:///x.jsonl', model_options=options))


def test_a_labelled_image_run_without_a_rate_trains_at_the_image_recipes_rate(make_config: Any) -> None:
    ctx = _context(
        make_config, labelled_images(n_classes=2, per_class=4), model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS
    )
    assert ctx.spec.loss == 'SupConLoss'
    assert ctx.optimizer.param_groups[0]['initial_lr'] == pytest.approx(3e-5)  # 0.3 x timm's default 1e-4
    norms = _batch_norms(ctx.model)
    run_training(ctx)
    assert not any(m.training for m in norms)  # trained with the pretrained statistics
