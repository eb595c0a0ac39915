"""Models without a run: a pretrained backbone (``build_model``), a Hugging Face id or a model folder
(``get_model``), and what ``encode`` accepts (texts, image paths, bytes, arrays, documents).

Everything here that runs a model needs the trainer's stack (``pip install 'kube-finetuner[trainer]'``),
imported only when called; :func:`cos_sim` needs numpy only.
"""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path
from typing import Any

from finetuner.api.layout import Record
from finetuner.data import IMAGE_SUFFIXES, Modalities, _to_record
from finetuner.errors import ArgumentError

HF_URL_PREFIX = 'https://huggingface.co/'


# --- cos_sim ------------------------------------------------------------------------------------


def cos_sim(a: Any, b: Any) -> Any:
    """Cosine similarity: a float for two vectors, as Finetuner's ``cos_sim``; for matrices (one row
    per embedding, e.g. what :func:`finetuner.encode` returns) the (len(a), len(b)) matrix of every pair.

    Raises ArgumentError for vectors of different lengths or a zero vector (its similarity is undefined).
    """
    import numpy as np

    left, right = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, value in (('a', left), ('b', right)):
        if value.ndim not in (1, 2) or value.size == 0:
            raise ArgumentError(name, f'must be a vector or a matrix of embeddings, got shape {value.shape}')
    if left.shape[-1] != right.shape[-1]:
        raise ArgumentError('b', f'has {right.shape[-1]} dimensions but a has {left.shape[-1]}; embed both alike')
    rows_a, rows_b = np.atleast_2d(left), np.atleast_2d(right)
    norms_a, norms_b = np.linalg.norm(rows_a, axis=1), np.linalg.norm(rows_b, axis=1)
    for name, norms in (('a', norms_a), ('b', norms_b)):
        if (norms == 0).any():
            where = '' if norms.size == 1 else f' (row {int(np.flatnonzero(norms == 0)[0])})'
            raise ArgumentError(name, f'is a zero vector{where}; its cosine similarity is undefined')
    similarity = (rows_a / norms_a[:, None]) @ (rows_b / norms_b[:, None]).T
    if left.ndim == 1 and right.ndim == 1:
        return float(similarity[0, 0])
    return similarity


# --- models without a run -----------------------------------------------------------------------


def hub_id(artifact: str) -> str | None:
    """The Hugging Face id an artifact string names (``org/name`` or a huggingface.co URL), else None.
    A run name never holds a ``/``; a local path is checked before this is asked."""
    if artifact.startswith(HF_URL_PREFIX):
        return artifact.removeprefix(HF_URL_PREFIX).strip('/') or None
    if artifact.startswith(('.', '/', '~')) or '://' in artifact:
        return None
    parts = artifact.split('/')
    return artifact if len(parts) == 2 and all(parts) else None


def download_hub_model(repo_id: str, token: str | None) -> Path:
    """The local folder of the hub model ``repo_id`` (the Hugging Face cache, downloading what is missing)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # a dependency of transformers: absent means no trainer stack either
        raise ArgumentError(
            'artifact', f'loading {repo_id!r} needs huggingface_hub (pip install huggingface_hub)'
        ) from e
    try:
        return Path(snapshot_download(repo_id=repo_id, token=token))
    except LocalEntryNotFoundError as e:
        raise ArgumentError(
            'artifact',
            f'the Hugging Face model {repo_id!r} is not in the local cache and cannot be downloaded (offline, or '
            'HF_HUB_OFFLINE is set); download it where the hub is reachable, or give its local folder',
        ) from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise ArgumentError(
            'artifact',
            f'the Hugging Face hub has no model {repo_id!r} you can read ({type(e).__name__}); check the id '
            'and, for a private model, give token=...',
        ) from e


def load_model_folder(directory: Path, trainer_module: Any, device: str) -> Any:
    """A folder of a fine-tuned model (``finetuner.json``) or of a plain Hugging Face / sentence-transformers
    / timm model (``config.json``), as an embedder in eval mode."""
    models = trainer_module('finetuner_trainer.models')
    errors = trainer_module('finetuner_trainer.errors')
    try:
        if (directory / 'finetuner.json').is_file():
            model = models.load_embedder(directory)
        else:
            model = models.pretrained_embedder(str(directory), {})
    except errors.ConfigError as e:
        raise ArgumentError('artifact', f'{directory} holds no model this package can load: {e.problem}') from e
    return model.to(device).eval()


def build_model(
    name: str,
    trainer_module: Any,
    model_options: dict[str, Any] | None,
    device: str,
    is_onnx: bool,
) -> Any:
    """The pretrained backbone ``name`` as an embedder in eval mode (or its ONNX export)."""
    models = trainer_module('finetuner_trainer.models')
    errors = trainer_module('finetuner_trainer.errors')
    try:
        embedder = models.pretrained_embedder(name, dict(model_options or {}))
    except errors.ConfigError as e:
        argument = 'model_options' if e.field.startswith('modelOptions') else 'name'
        raise ArgumentError(argument, e.problem) from e
    embedder = embedder.eval()
    if not is_onnx:
        return embedder.to(device)
    onnx_export = trainer_module('finetuner_trainer.onnx_export')
    inference = trainer_module('finetuner_trainer.inference_onnx')
    with tempfile.TemporaryDirectory(prefix='finetuner-onnx-') as folder:
        embedder.save(folder)
        try:
            onnx_export.export_for_artifact(embedder, folder)
        except errors.ConfigError as e:
            raise ArgumentError('is_onnx', f'{name!r} cannot be exported to ONNX: {e.problem}') from e
        return inference.OnnxEmbedder.load(folder)  # the sessions and the tokenizer are in memory now


# --- what encode() accepts ------------------------------------------------------------------------


def model_kinds(model: Any) -> tuple[str, ...]:
    """The content a loaded model embeds: text, image, tensor (a CLIP tower restricted by select_model: one)."""
    kind = getattr(model, 'kind', None)
    if isinstance(kind, str):
        return (kind,)
    kinds = getattr(model, 'kinds', None)
    if kinds is None:
        kinds = getattr(getattr(model, 'model', None), 'kinds', ('text',))
    return tuple(kinds)


def _looks_like_image(value: str) -> bool:
    return value.lower().split('?')[0].endswith(IMAGE_SUFFIXES)


def _image_record(data: bytes) -> Record:
    return Record(blob=base64.b64encode(data).decode())


def _string_record(value: str, kinds: tuple[str, ...], where: str) -> Record:
    """A text, or an image path/URL: for a model that embeds no text, or (CLIP) for what names an image."""
    wants_image = 'image' in kinds and ('text' not in kinds or _looks_like_image(value))
    if not wants_image:
        return Record(text=value)
    if value.startswith(('http://', 'https://', 's3://', 'data:')):
        return Record(uri=value)
    path = Path(value.removeprefix('file://')).expanduser()
    if not path.is_file():
        raise ArgumentError(where, f'{value!r} is not an image file here; this model embeds {" and ".join(kinds)}')
    return _image_record(path.read_bytes())


def _array_record(value: Any, kinds: tuple[str, ...], where: str) -> Record:
    array = value.detach().cpu().numpy() if hasattr(value, 'detach') else value
    if 'image' in kinds and array.ndim == 3 and array.shape[-1] in (3, 4) and str(array.dtype) == 'uint8':
        from PIL import Image  # a decoded picture (HxWx3 uint8): encoded losslessly, preprocessed as images are

        out = io.BytesIO()
        Image.fromarray(array).save(out, format='PNG')
        return _image_record(out.getvalue())
    if 'tensor' in kinds:
        return Record(tensor=array.tolist())
    raise ArgumentError(
        where,
        f'an array of shape {tuple(array.shape)} ({array.dtype}) cannot be embedded by this model '
        f'({" and ".join(kinds)}); give a HxWx3 uint8 image, image bytes or a path',
    )


def encoding_records(items: list[Any], kinds: tuple[str, ...], argument: str = 'data') -> list[Record]:
    """Records of what ``encode`` was given: strings (texts, or image paths/URLs for image models), bytes
    (encoded images), numpy arrays or torch tensors, PIL images, Records, dicts, or documents."""
    records = []
    for i, item in enumerate(items):
        where = f'{argument}[{i}]'
        if isinstance(item, str):
            records.append(_string_record(item, kinds, where))
        elif isinstance(item, Path):
            records.append(_string_record(str(item), tuple(k for k in kinds if k != 'text') or kinds, where))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            records.append(_image_record(bytes(item)))
        elif hasattr(item, 'ndim') and hasattr(item, 'shape') and not hasattr(item, 'doc_type'):
            records.append(_array_record(item, kinds, where))
        elif type(item).__module__.startswith('PIL.'):
            out = io.BytesIO()
            item.convert('RGB').save(out, format='PNG')
            records.append(_image_record(out.getvalue()))
        else:
            records.append(_to_record(item, where, Modalities(), top=True))
    if not records:
        raise ArgumentError(argument, 'is empty; give at least one item to encode')
    return records
