"""Each backbone family trains end to end; the artifact loads with the plain libraries."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetuner.api import layout
from finetuner.api.layout import Record
from finetuner_trainer import train
from finetuner_trainer.models import load_embedder
from tests.support.tiny import labelled_images, labelled_texts, text_image_pairs, text_pairs
from tests.trainer.conftest import TIMM_SPEC, ConfigFactory


def _artifact(result_uri: str) -> Path:
    return Path(urlparse(result_uri).path)


def _decreasing(history: list[dict]) -> bool:
    return history[-1]['train_loss'] < history[0]['train_loss']


def test_timm_cnn_overfits_a_batch_and_loads_with_plain_timm(make_config: ConfigFactory) -> None:
    import timm

    records = labelled_images(n_classes=3, per_class=4)
    config = make_config(
        records, **TIMM_SPEC, loss='ArcFaceLoss', epochs=4, batch_size=12, learning_rate=0.01, output_dim=16
    )
    result = train(config)
    assert _decreasing(result.history)
    folder = _artifact(result.artifact_uri)
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert manifest['format'] == 'timm' and manifest['output_dim'] == 16
    assert set(manifest['files']) >= {'model.safetensors', 'config.json', 'projection.safetensors'}
    assert torch.__version__.startswith(manifest['library_versions']['torch'])

    ours = load_embedder(folder).embed(records[:4])
    cfg = json.loads((folder / 'config.json').read_text())['pretrained_cfg']
    plain = timm.create_model(
        'test_resnet',
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(cfg, file=str(folder / 'model.safetensors')),
    ).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(plain))

    head = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.ReLU(), torch.nn.Linear(96, 16))
    head.load_state_dict(load_file(folder / 'projection.safetensors'))
    pixels = torch.stack(
        [transform(Image.open(io.BytesIO(base64.b64decode(r.blob))).convert('RGB')) for r in records[:4]]
    )
    with torch.no_grad():
        reference = head(plain(pixels))
    assert torch.allclose(ours, reference, atol=1e-4)


def test_text_model_overfits_and_loads_with_sentence_transformers(make_config: ConfigFactory, tiny_bert: Path) -> None:
    from sentence_transformers import SentenceTransformer

    records = labelled_texts(n_classes=4, per_class=4)
    config = make_config(records, model=str(tiny_bert), epochs=4, batch_size=16, learning_rate=0.005, output_dim=8)
    result = train(config)
    assert _decreasing(result.history)
    folder = _artifact(result.artifact_uri)
    assert json.loads((folder / 'manifest.json').read_text())['format'] == 'sentence-transformers'
    ours = load_embedder(folder).embed(records)
    plain = SentenceTransformer(str(folder), device='cpu').encode([r.text for r in records])
    assert plain.shape == (16, 8)
    assert np.allclose(ours.numpy(), plain, atol=1e-5)


def test_query_document_pairs_train_with_in_batch_negatives(make_config: ConfigFactory, tiny_bert: Path) -> None:
    config = make_config(
        text_pairs(8),
        model=str(tiny_bert),
        loss='MultipleNegativesRankingLoss',
        epochs=4,
        batch_size=8,
        learning_rate=0.005,
    )
    result = train(config)
    assert _decreasing(result.history)


def test_scored_pairs_train_with_cosine_similarity_loss(make_config: ConfigFactory, tiny_bert: Path) -> None:
    config = make_config(
        text_pairs(8, with_score=True),
        model=str(tiny_bert),
        loss='CosineSimilarityLoss',
        epochs=4,
        batch_size=8,
        learning_rate=0.005,
    )
    assert _decreasing(train(config).history)


def test_clip_overfits_text_image_pairs_and_loads_with_transformers(
    make_config: ConfigFactory, tiny_clip: Path
) -> None:
    from transformers import CLIPModel, CLIPProcessor

    records = text_image_pairs(6)
    config = make_config(
        records, model=str(tiny_clip), loss='CLIPLoss', multi_modal=True, epochs=4, batch_size=6, learning_rate=0.005
    )
    result = train(config)
    assert _decreasing(result.history)
    folder = _artifact(result.artifact_uri)
    ours = load_embedder(folder)
    texts = [r.chunks[0].text for r in records]
    plain = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    tokens = processor.tokenizer(texts, padding=True, return_tensors='pt')
    with torch.no_grad():
        reference = plain.text_projection(plain.text_model(**tokens).pooler_output)
    assert torch.allclose(ours.embed([r.chunks[0] for r in records]), reference, atol=1e-5)


def test_outputs_progress_metrics_and_validation(make_config: ConfigFactory) -> None:
    config = make_config(labelled_images(3, 8), **TIMM_SPEC, epochs=2, batch_size=12, val_split=0.25)
    result = train(config)
    out = Path(urlparse(config.output_uri).path)
    progress = json.loads((out / layout.PROGRESS).read_text())
    assert progress['epoch'] == 2 and progress['percent'] == 100.0 and progress['step'] == result.steps
    metrics = json.loads((out / layout.METRICS).read_text())
    assert [e['epoch'] for e in metrics['epochs']] == [1, 2]
    assert 'val_loss' in metrics['after'] and 'val_loss' in metrics['before']
    assert json.loads((out / layout.CONFIG).read_text())['runName'] == 'test-run'
    assert (out / layout.ARTIFACT_MANIFEST).exists()


def test_frozen_backbone_trains_only_the_projection(make_config: ConfigFactory, tiny_bert: Path) -> None:
    from finetuner_trainer.models import build_embedder

    config = make_config(labelled_texts(2, 4), model=str(tiny_bert), freeze=True, output_dim=4)
    model = build_embedder(config.spec)
    trainable = {name.split('.')[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'head'}


@pytest.mark.parametrize('pooler', ['cls', 'mean'])
def test_text_pooler_option(make_config: ConfigFactory, tiny_bert: Path, pooler: str) -> None:
    from finetuner_trainer.models import build_embedder

    config = make_config(labelled_texts(2, 4), model=str(tiny_bert), model_options={'pooler': pooler, 'max_length': 8})
    model = build_embedder(config.spec)
    batch = model.collate(labelled_texts(2, 2))
    assert model.pooler == pooler and batch['parts'][0][1]['input_ids'].shape[1] <= 8


def test_embed_sorts_by_length_and_returns_the_given_order(make_config: ConfigFactory, tiny_bert: Path) -> None:
    from finetuner_trainer.models import build_embedder

    config = make_config(labelled_texts(2, 4), model=str(tiny_bert))
    model = build_embedder(config.spec)
    texts = ['red', 'red green blue yellow black white red green', 'blue', 'green yellow', 'white black white']
    records = [Record(text=t) for t in texts]
    together = model.embed(records, batch_size=2)
    one_by_one = torch.cat([model.embed([r], batch_size=1) for r in records])
    assert together.shape == (5, model.output_dim)
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # rows really differ: order is checked


def test_a_model_folder_given_as_a_file_uri_with_a_space(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.models import resolve_model

    folder = tmp_path / 'my models' / 'bert+v2'
    shutil.copytree(tiny_bert, folder)
    family, source, _ = resolve_model(FinetuneRunSpec(model=folder.as_uri(), train_data='file:///x.jsonl'))
    assert (family, Path(source)) == ('text', folder)
