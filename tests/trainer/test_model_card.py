"""Every artifact has a model card (README.md) the Hugging Face hub reads: its YAML metadata parsed with
huggingface_hub's own ModelCard, its body with the run's facts, metrics before and after and how to load it.
A text model's card is sentence-transformers' own, generated from its model-card data."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
from huggingface_hub import ModelCard

from finetuner_trainer import train
from finetuner_trainer.model_card import base_model_of, data_name_of_reference
from tests.support.tiny import labelled_images, labelled_texts, text_image_pairs
from tests.trainer.conftest import TIMM_SPEC, ConfigFactory


def _card(result_uri: str) -> tuple[ModelCard, str]:
    path = Path(urlparse(result_uri).path) / 'README.md'
    assert path.is_file(), 'every artifact has a model card'
    return ModelCard.load(path), path.read_text()


def _metrics_rows(text: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r'^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| [+-][\d.]+ \|$', text, flags=re.MULTILINE)
    return {name: (float(before), float(after)) for name, before, after in rows}


def test_text_card_is_sentence_transformers_own_with_the_runs_facts(
    make_config: ConfigFactory, tiny_bert: Path
) -> None:
    records = labelled_texts(n_classes=3, per_class=6)
    spec = {'loss': 'TripletMarginLoss', 'val_split': 0.34, 'epochs': 2, 'batch_size': 8, 'learning_rate': 1e-3}
    config = make_config(records, model=str(tiny_bert), **spec)
    result = train(config)
    card, text = _card(result.artifact_uri)

    data = card.data.to_dict()
    assert data['library_name'] == 'sentence-transformers'
    assert data['pipeline_tag'] == 'sentence-similarity'
    assert {'kube-finetuner', 'text-to-text', 'loss:TripletMarginLoss', 'sentence-transformers'} <= set(data['tags'])
    assert 'base_model' not in data, 'a local folder is no hub id: no base_model the hub would refuse'
    # sentence-transformers' own template, filled from its model-card data:
    assert 'This is a [sentence-transformers](https://www.SBERT.net) model trained on the train.jsonl dataset' in text
    assert '* Size: 12 training samples' in text
    assert 'pytorch_metric_learning.losses.TripletMarginLoss' in text
    assert '#### All Hyperparameters' in text and '- `epochs`: 2' in text
    assert '### Training Logs' in text
    # the kube-finetuner section: the facts, the metrics before and after, how to load it
    assert (
        '- **Training data:** 12 labelled items in 3 classes (train.jsonl); evaluated on 6 held-out examples '
        '(train.jsonl, val_split 0.34)'
    ) in text
    assert '- **Base model:** `bert` (a local model folder)' in text and str(tiny_bert) not in text
    assert '- **Loss:** TripletMarginLoss' in text
    rows = _metrics_rows(text)
    assert rows['mrr'] == (round(result.metrics['before']['mrr'], 4), round(result.metrics['after']['mrr'], 4))
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results['mrr'] == round(result.metrics['after']['mrr'], 4)
    assert "model = finetuner.get_model('<this folder or repo id>')" in text


def test_timm_card_names_the_hub_base_and_the_metrics(make_config: ConfigFactory) -> None:
    records = labelled_images(n_classes=2, per_class=6)
    config = make_config(records, **TIMM_SPEC, val_split=0.34, epochs=1, batch_size=8)
    result = train(config)
    card, text = _card(result.artifact_uri)

    data = card.data.to_dict()
    assert data['library_name'] == 'timm'
    assert data['pipeline_tag'] == 'image-feature-extraction'
    assert 'base_model' not in data, 'random weights (pretrained: false) have no base model'
    assert 'from random weights (pretrained: false)' in text
    assert text.count('# timm:test_resnet fine-tuned with kube-finetuner (test-run)') == 1
    assert '8 labelled items in 2 classes' in text
    assert set(_metrics_rows(text)) >= {'mrr', 'map', 'ndcg_at_k', 'val_loss'}
    assert "timm.create_model(config['architecture'], pretrained=False, num_classes=0)" in text


def test_clip_card(make_config: ConfigFactory, tiny_clip: Path) -> None:
    pairs = text_image_pairs(n=8)
    config = make_config(
        pairs, model=str(tiny_clip), multi_modal=True, loss='CLIPLoss', val_split=0.25, batch_size=4, epochs=1
    )
    result = train(config)
    card, text = _card(result.artifact_uri)
    assert card.data.library_name == 'transformers'
    assert card.data.pipeline_tag == 'zero-shot-image-classification'
    assert '6 text-image pairs' in text
    assert 'CLIPModel.from_pretrained' in text


@pytest.mark.parametrize(
    ('reference', 'name'),
    [
        ('s3://bucket/prefix/datasets/my-set/data.jsonl', 'my-set'),
        ('file:///home/me/train.csv', 'train.csv'),
        ('my-set', 'my-set'),
    ],
)
def test_data_names_never_show_buckets_or_local_paths(reference: str, name: str) -> None:
    assert data_name_of_reference(reference) == name


def test_the_base_model_is_a_hub_id_or_nothing(tmp_path: Path) -> None:
    class Timm:
        backbone = type('Net', (), {'pretrained_cfg': {'hf_hub_id': 'timm/efficientnet_b0.ra_in1k'}})()

    assert base_model_of('efficientnet_b0', 'efficientnet_b0', 'timm', Timm()) == 'timm/efficientnet_b0.ra_in1k'
    assert base_model_of('bert-base-en', 'bert-base-cased', 'text', None) == 'bert-base-cased'  # catalog: a hub id
    assert base_model_of('minilm-en', '/pkg/model', 'text', None) == 'sentence-transformers/all-MiniLM-L6-v2'
    assert base_model_of('BAAI/bge-small-en-v1.5', 'BAAI/bge-small-en-v1.5', 'text', None) == 'BAAI/bge-small-en-v1.5'
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'README.md').write_text('---\nbase_model: org/started-from\n---\n# mine\n')
    assert base_model_of(str(folder), str(folder), 'text', None) == 'org/started-from'
    (folder / 'README.md').write_text('# no front matter\n')
    assert base_model_of(str(folder), str(folder), 'text', None) is None
