"""Models without a run, as Finetuner's client has them: ``build_model`` (a pretrained backbone, zero-shot,
``select_model`` for CLIP's towers, ``is_onnx``), ``get_model`` of a Hugging Face id or a plain model folder,
and ``encode`` of texts, image paths, bytes, arrays, PIL images and docarray documents. Oracles: transformers
with mean pooling written here, PIL's own decoding, the Hugging Face cache layout of huggingface_hub."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

import finetuner
from finetuner.errors import ArgumentError
from tests.support.tiny import PALETTE, TINY_TIMM, TINY_TIMM_OPTIONS, make_tiny_bert, make_tiny_clip, png_bytes

torch = pytest.importorskip('torch')
pytest.importorskip('finetuner_trainer.models')


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp('models') / 'bert')


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp('models') / 'clip')


TEXTS = ['red green blue', 'cat dog bird', 'fast slow happy sad warm']


def _mean_pooled(folder: Path, texts: list[str]) -> np.ndarray:
    """The oracle: transformers' model and tokenizer, mean pooling over the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors='pt')
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch['attention_mask'].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_build_model_is_the_pretrained_backbone_as_transformers_computes_it(tiny_bert: Path) -> None:
    model = finetuner.build_model(str(tiny_bert))
    assert not model.training
    embeddings = finetuner.encode(model, TEXTS)
    assert embeddings.shape == (3, 32)
    np.testing.assert_allclose(embeddings, _mean_pooled(tiny_bert, TEXTS), rtol=1e-4, atol=1e-5)
    cls = finetuner.encode(finetuner.build_model(str(tiny_bert), model_options={'pooler': 'cls'}), TEXTS)
    assert not np.allclose(cls, embeddings)


def test_build_model_exports_to_onnx(tiny_bert: Path) -> None:
    torch_model = finetuner.build_model(str(tiny_bert))
    onnx_model = finetuner.build_model(str(tiny_bert), is_onnx=True, batch_size=2)
    assert type(onnx_model).__name__ == 'OnnxEmbedder' and onnx_model.default_batch_size == 2
    np.testing.assert_allclose(
        finetuner.encode(onnx_model, TEXTS), finetuner.encode(torch_model, TEXTS), rtol=1e-4, atol=1e-5
    )


def test_build_model_refuses_what_the_family_does_not_take(tiny_bert: Path) -> None:
    with pytest.raises(ArgumentError, match="model_options: timm models take no 'max_length'; their options are"):
        finetuner.build_model(TINY_TIMM, model_options={**TINY_TIMM_OPTIONS, 'max_length': 8})
    with pytest.raises(ArgumentError, match="name: unknown backbone 'efficentnet_b0'; did you mean 'efficientnet_b0'"):
        finetuner.build_model('efficentnet_b0')
    with pytest.raises(ArgumentError, match="select_model: unknown 'clip'"):
        finetuner.build_model(str(tiny_bert), select_model='clip')


def test_encode_takes_image_bytes_paths_arrays_and_pil_images_alike(tmp_path: Path) -> None:
    from PIL import Image

    model = finetuner.build_model(TINY_TIMM, model_options=TINY_TIMM_OPTIONS)
    data = png_bytes(PALETTE[0])
    path = tmp_path / 'red.png'
    path.write_bytes(data)
    picture = Image.open(io.BytesIO(data)).convert('RGB')
    pixels = np.asarray(picture)  # HxWx3 uint8, as PIL decodes it
    embeddings = finetuner.encode(model, [data, str(path), path, picture, pixels])
    assert embeddings.shape == (5, 96)
    for row in embeddings[1:]:
        np.testing.assert_allclose(row, embeddings[0], rtol=1e-5, atol=1e-6)
    tensor = torch.rand(3, 32, 32)  # a timm model's 'tensor' input: preprocessed pixels
    assert finetuner.encode(model, [tensor]).shape == (1, 96)
    with pytest.raises(ArgumentError, match=r"data\[0\]: 'missing.png' is not an image file here"):
        finetuner.encode(model, ['missing.png'])
    with pytest.raises(ArgumentError, match=r'data\[0\]: an array of shape \(2, 2\) \(float64\) cannot be embedded'):
        finetuner.encode(finetuner.build_model(str(make_tiny_bert(tmp_path / 'b'))), [np.zeros((2, 2))])


def test_clip_towers_and_strings_that_name_images(tiny_clip: Path, tmp_path: Path) -> None:
    path = tmp_path / 'red.png'
    path.write_bytes(png_bytes(PALETTE[0]))
    model = finetuner.build_model(str(tiny_clip))
    both = finetuner.encode(model, ['a red picture', str(path)])
    text_tower = finetuner.build_model(str(tiny_clip), select_model='clip-text')
    vision_tower = finetuner.build_model(str(tiny_clip), select_model='clip-vision')
    np.testing.assert_allclose(finetuner.encode(text_tower, ['a red picture'])[0], both[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(finetuner.encode(vision_tower, [str(path)])[0], both[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ArgumentError, match=r'data\[0\]: is image, but this model only encodes text'):
        finetuner.encode(text_tower, [path.read_bytes()])


def test_encode_writes_embeddings_into_documents(tiny_bert: Path) -> None:
    pytest.importorskip('docarray')
    from docarray import DocList
    from docarray.documents.legacy import LegacyDocument

    docs = DocList[LegacyDocument]([LegacyDocument(text=text) for text in TEXTS])
    returned = finetuner.encode(finetuner.build_model(str(tiny_bert)), docs)
    assert returned is docs
    np.testing.assert_allclose(np.stack([d.embedding for d in docs]), _mean_pooled(tiny_bert, TEXTS), atol=1e-5)


# --- get_model: a model folder, a Hugging Face id ------------------------------------------------------


def _hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """``folder`` laid out as huggingface_hub caches a download of ``repo_id`` (refs/main -> a snapshot)."""
    revision = 'a' * 40
    repo = root / ('models--' + repo_id.replace('/', '--'))
    shutil.copytree(folder, repo / 'snapshots' / revision)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    return root


def test_get_model_loads_plain_folders_and_hub_ids_from_the_cache(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    expected = _mean_pooled(tiny_bert, TEXTS)
    np.testing.assert_allclose(finetuner.encode(finetuner.get_model(tiny_bert), TEXTS), expected, atol=1e-5)

    monkeypatch.setattr(
        huggingface_hub.constants, 'HF_HUB_CACHE', str(_hub_cache(tmp_path / 'hub', 'org/tiny', tiny_bert))
    )
    for artifact in ('org/tiny', 'https://huggingface.co/org/tiny'):
        np.testing.assert_allclose(finetuner.encode(finetuner.get_model(artifact), TEXTS), expected, atol=1e-5)
    with pytest.raises(ArgumentError, match=r"artifact: the Hugging Face model 'org/absent' is not in the local cache"):
        finetuner.get_model('org/absent')


def test_get_model_of_a_backbone_name_points_to_build_model(local: object) -> None:
    with pytest.raises(ArgumentError) as caught:
        finetuner.get_model('efficientnet_b0')
    assert str(caught.value) == (
        "artifact: 'efficientnet_b0' is no fine-tuned run here but a backbone of the catalog: load it as it is "
        "with finetuner.build_model('efficientnet_b0')"
    )


def test_clip_folder_from_get_model(tiny_clip: Path) -> None:
    model = finetuner.get_model(tiny_clip, select_model='clip-text')
    assert finetuner.encode(model, ['a red picture']).shape == (1, 32)


# Finetuner 0.8.1 (finetuner/__init__.py): get_model(artifact, token=None, batch_size=32, select_model=None,
# device=None, logging_level='WARNING', is_onnx=False); build_model(name, model_options=None, batch_size=32,
# select_model=None, device=None, is_onnx=False); device None: 'cuda' if torch.cuda.is_available() else 'cpu'.


def test_get_model_takes_finetuners_arguments_in_its_order(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    given: dict[str, object] = {}

    def snapshot_download(repo_id: str, token: str | None = None) -> str:
        given.update(repo_id=repo_id, token=token)
        return str(tiny_bert)

    monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
    model = finetuner.get_model('org/private', 'hf_secret', 2)  # the token second, as Finetuner's
    assert given == {'repo_id': 'org/private', 'token': 'hf_secret'}
    assert model.default_batch_size == 2
    np.testing.assert_allclose(finetuner.encode(model, TEXTS), _mean_pooled(tiny_bert, TEXTS), atol=1e-5)
    zero_shot = finetuner.build_model(str(tiny_bert), {'pooler': 'cls'}, 3)
    assert zero_shot.default_batch_size == 3
    assert not np.allclose(finetuner.encode(zero_shot, TEXTS), finetuner.encode(model, TEXTS))


def test_device_defaults_to_the_gpu_when_torch_sees_one(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetuner.models import _device

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    model = finetuner.get_model(tiny_bert)
    assert {p.device.type for p in model.parameters()} == {'cpu'}
    assert {p.device.type for p in finetuner.build_model(str(tiny_bert)).parameters()} == {'cpu'}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert _device(None, is_onnx=False) == 'cuda'
    assert _device('cuda:1', is_onnx=False) == 'cuda:1'
    assert _device(None, is_onnx=True) == 'cpu', 'ONNX Runtime runs on the CPU here'
    with pytest.raises(ArgumentError, match="device: 'gpu' is no torch device; give 'cpu', 'cuda' or 'cuda:N'"):
        finetuner.get_model(tiny_bert, device='gpu')
    with pytest.warns(RuntimeWarning, match=r"ONNX models run on the CPU here \(ONNX Runtime\); device='cuda'"):
        onnx = finetuner.build_model(str(tiny_bert), device='cuda', is_onnx=True)
    assert type(onnx).__name__ == 'OnnxEmbedder'


def test_logging_level_applies_while_the_model_loads(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from finetuner import pretrained

    seen: list[int] = []
    load = pretrained.load_model_folder

    def watched(*args: object) -> object:
        seen.append(logging.getLogger('transformers').getEffectiveLevel())
        return load(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pretrained, 'load_model_folder', watched)
    before = logging.getLogger('transformers').level
    finetuner.get_model(tiny_bert, logging_level='DEBUG')
    finetuner.get_model(tiny_bert, logging_level='error')
    assert seen == [logging.DEBUG, logging.ERROR]
    assert logging.getLogger('transformers').level == before, 'the level is put back once loaded'
    with pytest.raises(ArgumentError, match="logging_level: 'LOUD' is no logging level; give 'DEBUG', 'INFO'"):
        finetuner.get_model(tiny_bert, logging_level='LOUD')
