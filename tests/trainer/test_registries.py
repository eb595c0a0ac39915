"""Every name of the catalog builds and trains one step; the CRD's enums are the registries' names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from finetuner.api.v1alpha1 import SchedulerOptions
from finetuner.catalog import LOSS_NAMES, MINER_NAMES, OPTIMIZER_NAMES, PAIR_LOSS_NAMES, PML_LOSS_NAMES, SCHEDULER_NAMES
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.losses import LabelObjective, build_objective, loss_registry, miner_registry
from finetuner_trainer.optim import build_optimizer, build_scheduler, optimizer_registry

ROOT = Path(__file__).resolve().parents[2]
DIM, CLASSES, PER_CLASS = 8, 4, 4


def _spec_schema() -> dict:
    crd = yaml.safe_load((ROOT / 'crds' / 'finetuneruns.finetuner.dev.yaml').read_text())
    return crd['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']['properties']


def test_registries_hold_exactly_the_catalog_names() -> None:
    assert set(loss_registry()) == set(LOSS_NAMES)
    assert set(miner_registry()) == set(MINER_NAMES)
    assert set(optimizer_registry()) == set(OPTIMIZER_NAMES)


def test_crd_enums_equal_the_registries() -> None:
    spec = _spec_schema()
    assert spec['loss']['enum'] == list(loss_registry())
    assert set(spec['miner']['enum']) == set(miner_registry())
    assert set(spec['optimizer']['enum']) == set(optimizer_registry())
    assert spec['scheduler']['enum'] == list(SCHEDULER_NAMES)


def _labelled_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    embeddings = torch.randn(CLASSES * PER_CLASS, DIM, requires_grad=True)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    return embeddings, labels


@pytest.mark.parametrize('name', PML_LOSS_NAMES)
def test_every_metric_learning_loss_trains_one_step(name: str) -> None:
    objective = build_objective(name, {}, None, {}, DIM, CLASSES)
    assert isinstance(objective, LabelObjective)
    embeddings, labels = _labelled_batch()
    parameters = [embeddings, *objective.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    loss = objective(embeddings, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert embeddings.grad is not None
    optimizer.step()


@pytest.mark.parametrize('name', PAIR_LOSS_NAMES)
def test_every_pair_loss_trains_one_step(name: str) -> None:
    objective = build_objective(name, {}, None, {}, DIM, 0)
    torch.manual_seed(0)
    queries = torch.randn(6, DIM, requires_grad=True)
    documents = torch.randn(6, DIM, requires_grad=True)
    scores = torch.rand(6)
    loss = objective(queries, documents, scores)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert queries.grad is not None and documents.grad is not None


@pytest.mark.parametrize('name', MINER_NAMES)
def test_every_miner_mines_for_a_loss(name: str) -> None:
    objective = build_objective('TripletMarginLoss', {'margin': 0.5}, name, {}, DIM, CLASSES)
    embeddings, labels = _labelled_batch()
    loss = objective(embeddings, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert objective.miner is not None


def test_clip_loss_matches_the_symmetric_infonce_of_transformers(tiny_clip: Path) -> None:
    from transformers import CLIPModel

    from finetuner_trainer.losses import CLIPLoss

    model = CLIPModel.from_pretrained(tiny_clip)
    torch.manual_seed(0)
    input_ids = torch.randint(5, 30, (4, 6))
    pixels = torch.randn(4, 3, 32, 32)
    expected = model(input_ids=input_ids, pixel_values=pixels, return_loss=True).loss
    text = model.text_projection(model.text_model(input_ids=input_ids).pooler_output)
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    ours = CLIPLoss(float(model.logit_scale))(text, image)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert CLIPLoss().logit_scale.requires_grad


def test_wrong_loss_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r'lossOptions: TripletMarginLoss does not accept .*bogus'):
        build_objective('TripletMarginLoss', {'bogus': 1}, None, {}, DIM, CLASSES)
    with pytest.raises(ConfigError, match=r'minerOptions: TripletMarginMiner does not accept'):
        build_objective('TripletMarginLoss', {}, 'TripletMarginMiner', {'bogus': 1}, DIM, CLASSES)


@pytest.mark.parametrize('name', OPTIMIZER_NAMES)
def test_every_optimizer_steps_or_says_why_not(name: str) -> None:
    weight = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    if name == 'SparseAdam':
        with pytest.raises(ConfigError, match='optimizer: SparseAdam only updates sparse gradients'):
            build_optimizer(name, [weight], 0.1, {})
        return
    optimizer = build_optimizer(name, [weight], 0.1, {})

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = (weight**2).sum()
        value.backward()
        return value

    before = float((weight**2).sum())
    for _ in range(3):
        optimizer.step(closure)
    assert float((weight**2).sum()) < before


@pytest.mark.parametrize('name', ['Adam', 'AdamW', 'SGD', 'Adagrad'])
def test_fused_kernels_are_the_default_and_step_like_the_per_op_ones(name: str) -> None:
    torch.manual_seed(0)
    start = torch.randn(64)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    fused = build_optimizer(name, [weights[0]], 0.1, {'weight_decay': 0.01})
    per_op = build_optimizer(name, [weights[1]], 0.1, {'weight_decay': 0.01, 'foreach': False})
    assert fused.param_groups[0]['fused'] is True
    assert not per_op.param_groups[0].get('fused')  # the user's choice of implementation wins
    for _ in range(3):
        for weight, optimizer in zip(weights, (fused, per_op), strict=True):
            optimizer.zero_grad()
            ((weight - 1) ** 2).sum().backward()
            optimizer.step()
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_fused_is_not_forced_where_it_cannot_run() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    assert not build_optimizer('RMSprop', [weight], 0.1, {}).param_groups[0].get('fused')  # no fused kernel
    assert not build_optimizer('Adam', [weight], 0.1, {'differentiable': True}).param_groups[0].get('fused')
    groups = [{'params': [weight]}]
    assert build_optimizer('AdamW', groups, 0.1, {}).param_groups[0]['fused'] is True


def test_optimizer_options_are_passed_and_checked() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer('Adam', [weight], 0.1, {'weight_decay': 0.01})
    assert optimizer.param_groups[0]['weight_decay'] == 0.01
    with pytest.raises(ConfigError, match='optimizerOptions: Adam does not accept'):
        build_optimizer('Adam', [weight], 0.1, {'nonsense': 1})


@pytest.mark.parametrize('name', SCHEDULER_NAMES)
def test_every_scheduler_warms_up_and_ends_where_it_should(name: str) -> None:
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = build_scheduler(name, optimizer, SchedulerOptions(num_warmup_steps=2), 10, 1.0)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    if name == 'constant':
        assert rates == [1.0] * 10
        return
    assert rates[0] == 0.0 and rates[1] == 0.5 and rates[2] == 1.0  # linear warm-up over 2 steps
    if name in ('linear', 'cosine', 'polynomial'):
        assert rates[2] > rates[5] > rates[9] >= 0
    if name == 'constant_with_warmup':
        assert rates[2:] == [1.0] * 8


def test_warmup_longer_than_training_is_a_config_error() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ConfigError, match=r'schedulerOptions\.numWarmupSteps: 20 warm-up steps but only 10'):
        build_scheduler('linear', optimizer, SchedulerOptions(num_warmup_steps=20), 10, 1.0)
