"""Every form an image comes in, as users hand it: files of every Pillow mode, pixel tensors in
docarray's and torch's layouts and scales, paths, URIs and bytes. Each is read as the same 8-bit RGB
image (checked against Pillow's own conversions and docarray's loaders, which we did not write), trains
a step on an image backbone and on CLIP, and survives push_data / pull_data bit for bit."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import finetuner
from finetuner.api.layout import Record
from finetuner.api.tensors import decode_tensor
from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig
from finetuner.data import records_to_jsonl, resolve
from finetuner.errors import ArgumentError
from finetuner_trainer import train
from finetuner_trainer.data import to_item
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.images import decode_image
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS

SIZE = 32
FORMS = 26  # forms of document_forms()


def reference(seed: int = 0, size: int = SIZE) -> np.ndarray:
    """An 8-bit RGB image (height x width x 3) with gradients in every channel and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), (x + y) * 255 // (2 * size - 2)], axis=-1)
    noise = rng.integers(-30, 31, size=base.shape)
    return np.clip(np.roll(base, seed * 3, axis=1) + noise, 0, 255).astype(np.uint8)


def encoded(image: Image.Image, fmt: str = 'PNG', **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey: height x width; RGB: height x width x 3, uint16), written here by hand, so
    the test does not depend on how Pillow writes one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in pixels)
    header = struct.pack('>IIBBBBB', width, height, 16, colour, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b'')


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


def same_statistics(ours: np.ndarray, theirs: np.ndarray, tolerance: float = 0.0, what: str = '') -> None:
    """Per-channel mean and standard deviation agree (and the pixels, to ``tolerance``)."""
    assert ours.shape == theirs.shape and ours.dtype == np.uint8, what
    for channel in range(3):
        a, b = ours[..., channel].astype(float), theirs[..., channel].astype(float)
        assert abs(a.mean() - b.mean()) <= tolerance + 1e-9, (what, channel, a.mean(), b.mean())
        assert abs(a.std() - b.std()) <= tolerance + 1e-9, (what, channel, a.std(), b.std())
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= tolerance, what


# --- image modes, against Pillow's own conversions ---------------------------------------------------


def test_a_16_bit_grey_png_reads_as_its_8_bit_image_not_white() -> None:
    grey = np.asarray(Image.fromarray(reference()).convert('L'))
    data = png16(grey.astype(np.uint16) * 257)  # 8 bits widened to 16 as image tools do (v * 257)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == 'I;16'
        assert np.asarray(image.convert('RGB')).mean() > 250  # Pillow's own convert('RGB') clips: white
    same_statistics(pixels_of(data), np.asarray(Image.fromarray(grey).convert('RGB')))


def test_a_16_bit_rgb_png_reads_as_its_8_bit_image() -> None:
    rgb = reference(1)
    same_statistics(pixels_of(png16(rgb.astype(np.uint16) * 257)), rgb)


@pytest.mark.parametrize(
    ('scale', 'mode', 'fmt'),
    [(257, 'I', 'TIFF'), (1, 'I', 'TIFF'), (1 / 255, 'F', 'TIFF'), (1, 'F', 'TIFF')],
    ids=['I-16-bit-range', 'I-8-bit-range', 'F-0-1', 'F-0-255'],
)
def test_integer_and_float_images_are_scaled_to_8_bits(scale: float, mode: str, fmt: str) -> None:
    grey = np.asarray(Image.fromarray(reference(2)).convert('L'))
    values = grey.astype(np.float32 if mode == 'F' else np.int32) * (np.float32(scale) if mode == 'F' else scale)
    image = Image.fromarray(values.astype(np.float32 if mode == 'F' else np.int32))
    assert image.mode == mode
    data = encoded(image, fmt)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == mode
    same_statistics(pixels_of(data), np.asarray(Image.fromarray(grey).convert('RGB')))


def test_a_float_image_in_another_range_is_stretched() -> None:
    values = np.linspace(-5.0, 5.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    ours = pixels_of(encoded(Image.fromarray(values), 'TIFF'))
    assert (ours.min(), ours.max()) == (0, 255) and np.all(np.diff(ours[..., 0].reshape(-1).astype(int)) >= 0)


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(reference(3)).quantize(colors=32)
    image.info['transparency'] = 0
    return image


@pytest.mark.parametrize(
    ('make', 'fmt', 'theirs'),
    [
        (lambda rgb: Image.fromarray(rgb).convert('CMYK'), 'TIFF', lambda image: image.convert('RGB')),
        (lambda rgb: Image.fromarray(rgb).convert('CMYK'), 'JPEG', lambda image: image.convert('RGB')),
        (lambda rgb: _palette_with_transparency(), 'PNG', lambda image: image.convert('RGBA').convert('RGB')),
        (lambda rgb: Image.fromarray(rgb).quantize(colors=16), 'PNG', lambda image: image.convert('RGB')),
        (lambda rgb: Image.fromarray(rgb).convert('LA'), 'PNG', lambda image: image.convert('RGB')),
        (lambda rgb: Image.fromarray(rgb).convert('RGBA'), 'PNG', lambda image: image.convert('RGB')),
        (lambda rgb: Image.fromarray(rgb).convert('L'), 'JPEG', lambda image: image.convert('RGB')),
        (lambda rgb: Image.fromarray(rgb).convert('1'), 'BMP', lambda image: image.convert('RGB')),
    ],
    ids=['CMYK-tiff', 'CMYK-jpeg', 'P-transparency', 'P', 'LA', 'RGBA', 'L-jpeg', '1-bmp'],
)
def test_other_modes_read_as_pillow_converts_them(
    make: Callable[[np.ndarray], Image.Image], fmt: str, theirs: Callable[[Image.Image], Image.Image]
) -> None:
    rgb = reference(4)
    data = encoded(make(rgb), fmt)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(theirs(image))
    same_statistics(pixels_of(data), expected)
    if fmt == 'TIFF':  # CMYK stored losslessly: Pillow's RGB -> CMYK -> RGB gives the pixels back
        same_statistics(pixels_of(data), rgb)


# --- pixel tensors -----------------------------------------------------------------------------------


def _image_path(tmp_path: Path, seed: int) -> Path:
    path = tmp_path / f'image-{seed}.png'
    if not path.exists():
        path.write_bytes(encoded(Image.fromarray(reference(seed))))
    return path


def tensor_forms(tmp_path: Path, seed: int) -> dict[str, tuple[Any, int]]:
    """Tensor forms of one reference image: (tensor, how far its pixels may be from the reference)."""
    import torch
    from docarray.documents import ImageDoc
    from docarray.typing.bytes import ImageBytes
    from torchvision.transforms.functional import pil_to_tensor, to_tensor

    rgb = reference(seed)
    pil = Image.fromarray(rgb)
    doc = ImageDoc(url=str(_image_path(tmp_path, seed)))
    return {
        'docarray HWC uint8 (url.load)': (doc.url.load(), 0),  # docarray's convention
        'docarray CHW uint8': (doc.url.load(axis_layout=('C', 'H', 'W')), 0),
        'docarray bytes HWC': (ImageBytes(encoded(pil)).load(), 0),
        'numpy HWC float 0-1': (rgb.astype(np.float32) / 255, 0),
        'numpy CHW float 0-1': (np.moveaxis(rgb, -1, 0).astype(np.float64) / 255, 0),
        'numpy HWC float 0-255': (rgb.astype(np.float32), 0),
        'numpy HWC uint16': (rgb.astype(np.uint16) * 257, 0),
        'numpy RGBA HWC': (np.asarray(pil.convert('RGBA')), 0),
        'numpy grey HW': (np.asarray(pil.convert('L')), -1),  # -1: compared with the grey image
        'numpy grey HW1': (np.asarray(pil.convert('L'))[:, :, None], -1),
        'torch CHW float (to_tensor)': (to_tensor(pil), 0),
        'torch CHW uint8 (pil_to_tensor)': (pil_to_tensor(pil), 0),
        'torch HWC uint8': (torch.from_numpy(rgb.copy()), 0),
    }


def test_every_tensor_form_reads_as_its_image(tmp_path: Path) -> None:
    rgb = reference(5)
    grey = np.asarray(Image.fromarray(rgb).convert('L').convert('RGB'))
    for name, (tensor, tolerance) in tensor_forms(tmp_path, 5).items():
        (record,) = resolve([{'tensor': tensor}], 'train_data').records or []  # as fit() stores it
        if not isinstance(tensor, np.ndarray):
            tensor = tensor.numpy() if hasattr(tensor, 'numpy') else np.asarray(tensor)
        stored = decode_tensor(record.tensor)
        assert stored.dtype == np.asarray(tensor).dtype and np.array_equal(stored, tensor), name
        item = to_item(record, '[0]', 'trainData')
        same_statistics(pixels_of(item.image), grey if tolerance < 0 else rgb, max(tolerance, 0), name)


@pytest.mark.parametrize(
    ('tensor', 'message'),
    [
        (np.zeros((3, 32, 4), dtype=np.uint8), 'a tensor of shape (3, 32, 4) could be channels first or channels last'),
        (np.zeros((512,), dtype=np.float32), 'a tensor of shape (512,) is not an image'),
        (np.zeros((2, 32, 32), dtype=np.uint8), 'a tensor of shape (2, 32, 32) is not an image'),
        (np.full((32, 32, 3), -1.5, dtype=np.float32), 'the tensor values run from -1.5 to -1.5, not pixels'),
        (np.full((32, 32, 3), np.nan, dtype=np.float32), 'the tensor holds NaN or infinite values'),
    ],
    ids=['ambiguous', 'vector', 'two-channels', 'normalised', 'nan'],
)
def test_a_tensor_that_is_not_an_image_is_refused_naming_the_item(tensor: np.ndarray, message: str) -> None:
    from docarray.documents.legacy import LegacyDocument

    good = LegacyDocument(tensor=reference(), tags={'finetuner_label': 'a'})
    with pytest.raises(ArgumentError) as caught:  # the SDK, before anything is uploaded
        resolve([good, LegacyDocument(tensor=tensor, tags={'finetuner_label': 'b'})], 'train_data')
    assert str(caught.value).startswith(f'train_data[1]: tensor: {message}')
    if 'layouts' in str(caught.value):
        assert 'height x width x channels (docarray, PIL, numpy) or channels x height x width' in str(caught.value)
    # the trainer, for JSONL written by hand
    with pytest.raises(ConfigError) as refused:
        to_item(Record(tensor=tensor.tolist()), '[2]', 'trainData')
    assert refused.value.field == 'trainData[2]' and refused.value.problem.startswith(f'tensor: {message}')


# --- every form trains a step: an image backbone and CLIP --------------------------------------------


def document_forms(tmp_path: Path, seed: int, s3: str) -> dict[str, Any]:
    """One image in every form a document can hold it (docarray's documents, Records, dicts)."""
    from docarray.documents import ImageDoc
    from docarray.documents.legacy import LegacyDocument

    rgb = reference(seed)
    path = _image_path(tmp_path, seed)
    forms: dict[str, Any] = {name: LegacyDocument(tensor=t) for name, (t, _) in tensor_forms(tmp_path, seed).items()}
    forms.update(
        {
            'blob PNG': LegacyDocument(blob=path.read_bytes()),
            'blob JPEG': LegacyDocument(blob=encoded(Image.fromarray(rgb), 'JPEG', quality=95)),
            'blob palette': LegacyDocument(blob=encoded(Image.fromarray(rgb).quantize(colors=64))),
            'blob 16-bit PNG': LegacyDocument(blob=png16(rgb.astype(np.uint16) * 257)),
            'blob CMYK JPEG': LegacyDocument(blob=encoded(Image.fromarray(rgb).convert('CMYK'), 'JPEG')),
            'url path': LegacyDocument(url=str(path)),
            'url file://': LegacyDocument(url=path.as_uri()),
            'url s3://': LegacyDocument(url=f'{s3}/image-{seed}.png'),
            'ImageDoc url': ImageDoc(url=str(path)),
            'ImageDoc bytes_': ImageDoc(bytes_=path.read_bytes()),
            'ImageDoc tensor': ImageDoc(tensor=ImageDoc(url=str(path)).url.load()),
            'Record uri': Record(uri=str(path)),
            'dict blob': {'blob': base64.b64encode(path.read_bytes()).decode()},
        }
    )
    assert len(forms) == FORMS
    return forms


@pytest.fixture
def s3_images(s3_bucket: str, tmp_path: Path) -> str:
    from finetuner.storage import open_store

    store = open_store(f's3://{s3_bucket}/pictures')
    for seed in range(FORMS):
        store.write_bytes(f'image-{seed}.png', _image_path(tmp_path, seed).read_bytes())
    return f's3://{s3_bucket}/pictures'


def _labelled(doc: Any, label: str) -> Any:
    if isinstance(doc, dict):
        return {**doc, 'label': label}
    if isinstance(doc, Record):
        return doc.model_copy(update={'label': label})
    if hasattr(doc, 'tags'):
        doc.tags = {'finetuner_label': label}
        return doc
    return Record.model_validate({**resolve([doc], 'd').records[0].model_dump(exclude_none=True), 'label': label})


def _train(tmp_path: Path, records: list[Record], **spec: Any) -> Any:
    data = tmp_path / 'train.jsonl'
    data.write_bytes(records_to_jsonl(records))
    config = TrainerConfig(
        run_name='image-forms',
        spec=FinetuneRunSpec(train_data=str(data), epochs=1, num_workers=0, device='cpu', **spec),
        output_uri=(tmp_path / 'out').as_uri(),
        termination_log=str(tmp_path / 'termination-log'),
    )
    return train(config)


def test_every_form_trains_a_step_on_an_image_backbone(tmp_path: Path, s3_images: str) -> None:
    docs = []
    for seed, label in ((0, 'warm'), (1, 'cool')):
        docs += [_labelled(doc, label) for doc in document_forms(tmp_path, seed, s3_images).values()]
    records = resolve(docs, 'train_data').records or []
    per_class = len(records) // 2
    result = _train(
        tmp_path,
        records,
        model=TINY_TIMM,
        model_options=TINY_TIMM_OPTIONS,
        loss='TripletMarginLoss',
        batch_size=len(records),
        num_items_per_class=per_class,
    )
    assert result.steps == 1 and result.history[0]['train_loss'] >= 0  # one batch held every form


def test_every_form_trains_a_step_on_clip_chunks(tmp_path: Path, s3_images: str, tiny_clip: Path) -> None:
    from docarray import DocList
    from docarray.documents.legacy import LegacyDocument

    words = 'red green blue yellow black white cat dog bird fish car bus train plane apple pear'.split()
    pairs = []
    for i in range(FORMS):  # form i of image i: no two pairs share an image (in-batch negatives)
        doc = list(document_forms(tmp_path, i, s3_images).values())[i]
        if not isinstance(doc, LegacyDocument):  # ImageDoc, Record, dict: as an image chunk's content
            doc = LegacyDocument(**_content(doc))
        caption = LegacyDocument(text=f'{words[i % 16]} {words[(i * 7) % 16]} {words[(i * 3) % 16]} {i}')
        pairs.append(LegacyDocument(chunks=DocList[LegacyDocument]([caption, doc])))
    records = resolve(DocList[LegacyDocument](pairs), 'train_data').records or []
    assert {c.modality for r in records for c in r.chunks} == {'text', 'image'}
    result = _train(tmp_path, records, model=str(tiny_clip), loss='CLIPLoss', multi_modal=True, batch_size=64)
    assert result.steps == 1  # one batch held every form


def _content(doc: Any) -> dict[str, Any]:
    """A LegacyDocument's content fields for an ImageDoc, a Record or a dict."""
    record = resolve([doc], 'd').records[0]  # type: ignore[index]
    if record.blob is not None:
        return {'blob': base64.b64decode(record.blob)}
    if record.tensor is not None:
        return {'tensor': decode_tensor(record.tensor)}
    return {'url': record.uri}


# --- push_data / pull_data: compact and bit-identical ------------------------------------------------


def test_every_form_round_trips_through_push_and_pull_bit_identically(tmp_path: Path, s3_images: str) -> None:
    import torch
    from docarray.documents.legacy import LegacyDocument

    finetuner.login(backend='local', home=tmp_path / 'home')
    forms = [
        (name, doc) for name, doc in document_forms(tmp_path, 1, s3_images).items() if isinstance(doc, LegacyDocument)
    ]
    finetuner.push_data('image-forms', [doc for _, doc in forms])
    pulled = finetuner.pull_data('image-forms', as_documents=True)
    assert len(pulled) == len(forms)
    for (name, given), back in zip(forms, pulled, strict=True):
        if given.tensor is not None:
            assert isinstance(back.tensor, torch.Tensor) == isinstance(given.tensor, torch.Tensor), name
            ours, theirs = np.asarray(back.tensor), np.asarray(given.tensor)
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape) and np.array_equal(ours, theirs), name
        elif given.blob is not None:
            assert back.blob == given.blob, name
        elif given.url.startswith('s3://'):
            assert back.url == given.url, name
        else:  # a local file is read into the dataset: a cluster cannot see this machine's files
            assert back.blob == Path(given.url.removeprefix('file://')).read_bytes(), name


def test_a_pushed_tensor_is_stored_as_npy_bytes_not_json_numbers(tmp_path: Path) -> None:
    """A 64 x 64 RGB uint8 tensor (docarray's layout) took ~64 KB as JSON lists; as .npy it is the 12 KB of
    its pixels, base64 (16.5 KB)."""
    from docarray.documents.legacy import LegacyDocument

    backend = finetuner.login(backend='local', home=tmp_path / 'home')
    pixels = reference(6, size=64)
    finetuner.push_data('one-tensor', [LegacyDocument(tensor=pixels, tags={'finetuner_label': 'a'})])
    (line,) = backend.data_store().read_bytes('datasets/one-tensor/data.jsonl').decode().splitlines()
    stored = json.loads(line)['tensor']
    assert stored.startswith('data:application/x-npy;base64,')
    assert len(line) < 17_000 < 60_000 < len(json.dumps(pixels.tolist()))
    assert np.array_equal(finetuner.pull_data('one-tensor', as_documents=True)[0].tensor, pixels)


def test_an_item_made_with_a_tensor_gets_the_image_preprocessing() -> None:
    """A timm model collates a tensor Item as the image it holds: the same pixels as its PNG, no raw path."""
    import torch

    from finetuner_trainer.data import Item
    from finetuner_trainer.models import build_embedder

    model = build_embedder(FinetuneRunSpec(model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS, train_data='file:///d'))
    rgb = reference(8)
    from_tensor = model.collate_kind('tensor', [Item(tensor=np.moveaxis(rgb, -1, 0).astype(np.float32) / 255)])
    from_png = model.collate_kind('image', [Item(image=encoded(Image.fromarray(rgb)))])
    assert torch.equal(from_tensor['pixel_values'], from_png['pixel_values'])


def test_a_clip_vision_model_encodes_a_tensor_as_an_image(tiny_clip: Path) -> None:
    """encode() with select_model='clip-vision' takes pixel tensors (docarray's layout) like image bytes."""
    from docarray.documents.legacy import LegacyDocument

    from finetuner.models import _Selected
    from finetuner_trainer.models import build_embedder

    clip = build_embedder(
        FinetuneRunSpec(model=str(tiny_clip), train_data='file:///d', multi_modal=True, loss='CLIPLoss')
    )
    vision = _Selected(clip.eval(), 'image')
    rgb = reference(9)
    from_tensor = finetuner.encode(vision, [LegacyDocument(tensor=rgb)])
    from_bytes = finetuner.encode(vision, [LegacyDocument(blob=encoded(Image.fromarray(rgb)))])
    assert np.allclose(from_tensor[0].embedding, from_bytes[0].embedding, atol=1e-6)
    with pytest.raises(ArgumentError, match=r"data\[0\]: 'a caption' is not an image file here; this model embeds image"):
        finetuner.encode(vision, ['a caption'])
