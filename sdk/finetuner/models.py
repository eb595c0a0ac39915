"""Backbones that can be fine-tuned (``describe_models``) and using a fine-tuned model (``get_model``, ``encode``).

The catalog is pure data and shows without torch. Loading and running a model needs the trainer's
stack (``pip install 'kube-finetuner[trainer]'``), imported only when ``get_model`` is called.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

from finetuner import pretrained
from finetuner.catalog import BACKBONES, CROSS_ENCODERS, FAMILY_NAMES, Backbone, Task, family_info, find_backbone
from finetuner.data import is_collection
from finetuner.errors import ArgumentError, FinetunerError

TASKS: tuple[str, ...] = get_args(Task)
# get_model(select_model=...): name -> (the family that has it, the one kind of content it keeps)
SELECT_MODELS: dict[str, tuple[str, str]] = {
    name: (family, kind) for family in FAMILY_NAMES for name, kind in family_info(family)['select_models'].items()
}


class MissingDependencyError(FinetunerError, ImportError):
    """A feature needs an optional part of the package that is not installed."""


def _backbones(task: str | None) -> list[Backbone]:
    if task is not None and task not in TASKS:
        raise ArgumentError('task', f'unknown task {task!r}; choose one of {", ".join(TASKS)}')
    return [b for b in BACKBONES if task is None or b.task == task]


def list_models(task: str | None = None) -> list[str]:
    """Names of the backbones in the catalog (any Hugging Face id or local folder also works)."""
    return [b.name for b in _backbones(task)]


def models_table(task: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title='Finetuner backbones')
    for column in ('model', 'task', 'output_dim', 'architecture', 'description'):
        table.add_column(column, justify='right', no_wrap=True)
    for b in _backbones(task):
        table.add_row(b.name, b.task, str(b.output_dim), b.architecture, b.description)
    return table


def cross_encoders_table() -> Any:
    """The cross-encoders of the catalog: for finetuner.synthesize and mine_hard_negatives(cross_encoder=...)."""
    from rich.table import Table

    table = Table(
        title='Cross-encoders (finetuner.synthesize, mine_hard_negatives)',
        caption='relation miners: any text-to-text backbone above; any sequence-classification model id or folder '
        'is a cross-encoder too',
    )
    for column in ('cross_encoder', 'alias', 'description'):
        table.add_column(column, no_wrap=column != 'description')
    for entry in CROSS_ENCODERS:
        table.add_row(entry.name, ', '.join(entry.aliases), entry.description)
    return table


def describe_models(task: str | None = None) -> None:
    """Print the backbones (model, task, output_dim, architecture, description) as a table, then (for
    text) the cross-encoders that synthesis runs and hard-negative mining take."""
    from finetuner.tables import print_whole

    tables = [models_table(task)]
    if task in (None, 'text-to-text'):
        tables.append(cross_encoders_table())
    for table in tables:
        print_whole(table)  # names are what users copy into fit()


def _trainer_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or 'torch'
        if missing.split('.')[0] in ('finetuner_trainer', 'torch', 'timm', 'transformers', 'onnxruntime', 'numpy'):
            raise MissingDependencyError(
                f"loading a model needs the trainer stack ({missing} is missing): pip install 'kube-finetuner[trainer]'"
            ) from e
        raise


def _artifact_directory(artifact: str | Path, token: str | None = None) -> Path:
    """A folder holding a model: the path itself, a Hugging Face model (downloaded into the hub's cache),
    or the artifact of a finished run (downloaded)."""
    path = Path(artifact).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ('manifest.json', 'finetuner.json', 'config.json')):
            raise ArgumentError(
                'artifact',
                f'folder {str(path)!r} holds no fine-tuned model (manifest.json) and no Hugging Face, '
                'sentence-transformers or timm model (config.json)',
            )
        return path
    artifact = str(artifact)
    repo_id = pretrained.hub_id(artifact)
    if repo_id is not None:
        return pretrained.download_hub_model(repo_id, token)
    if '/' in artifact or artifact.startswith('.'):
        raise ArgumentError(
            'artifact',
            f'no folder {artifact!r}; give the folder of run.save_model(), a run name or a Hugging Face id (org/name)',
        )
    from finetuner import get_run
    from finetuner.errors import RunNotFoundError

    try:
        run = get_run(artifact)
    except (RunNotFoundError, ArgumentError) as e:
        if find_backbone(artifact) is None:
            raise
        raise ArgumentError(
            'artifact',
            f'{artifact!r} is no fine-tuned run here but a backbone of the catalog: load it as it is with '
            f'finetuner.build_model({artifact!r})',
        ) from e
    target = Path(tempfile.mkdtemp(prefix=f'finetuner-{run.name}-'))
    run.save_model(target, overwrite=True)
    return target


class _Selected:
    """A model of several towers (CLIP) restricted to one (``select_model``): refuses content of the other kinds."""

    def __init__(self, model: Any, kind: str) -> None:
        self.model = model
        self.kind = kind
        self.default_batch_size = 32

    @property
    def output_dim(self) -> int | None:
        return _output_dim(self.model)

    def embed(self, records: list[Any], batch_size: int = 32) -> Any:
        for i, record in enumerate(records):
            kind = 'image' if record.content_kind == 'tensor' else record.content_kind  # a tensor is an image
            if kind != self.kind:
                raise ArgumentError(
                    f'data[{i}]', f'is {record.content_kind}, but this model only encodes {self.kind} (select_model)'
                )
        return _embed(self.model, records, batch_size)


def _output_dim(model: Any) -> int | None:
    """The embedding size of a torch embedder, an ONNX one (its preprocessor's) or a selected tower."""
    for candidate in (model, getattr(model, 'preprocessor', None)):
        dim = getattr(candidate, 'output_dim', None)
        if isinstance(dim, int):
            return dim
    return None


def _check_truncate_dim(truncate_dim: int | None, model: Any) -> int | None:
    """``truncate_dim`` checked against the model: a whole number from 1 to its embedding size."""
    if truncate_dim is None:
        return None
    dim = _output_dim(model)
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or truncate_dim < 1:
        raise ArgumentError('truncate_dim', f'must be a whole number of dimensions, at least 1 (got {truncate_dim!r})')
    if dim is not None and truncate_dim > dim:
        raise ArgumentError(
            'truncate_dim', f"{truncate_dim} is more than the model's {dim} dimensions; give at most {dim} (or None)"
        )
    return truncate_dim


def _embed(model: Any, records: list[Any], batch_size: int) -> Any:
    """torch embedders have ``embed``, ONNX ones ``encode``; both take records and a batch size."""
    if hasattr(model, 'embed'):
        return model.embed(records, batch_size=batch_size)
    return model.encode(records, batch_size=batch_size)


def get_model(
    artifact: str | Path,
    token: str | None = None,
    batch_size: int = 32,
    select_model: str | None = None,
    device: str | None = None,
    logging_level: str = 'WARNING',
    is_onnx: bool = False,
    quantized: bool | None = None,
    truncate_dim: int | None = None,
) -> Any:
    """Load a fine-tuned model for :func:`encode`. The arguments up to ``is_onnx`` are Finetuner's, in its order.

    ``artifact``: the folder given to ``run.save_model()``, the name of a finished run, a Hugging Face model
    id (``org/name`` or its huggingface.co URL: downloaded into the hub's cache, with ``token`` for a private
    one), or the folder of any Hugging Face, sentence-transformers or timm model.
    ``select_model``: keeps one tower's inputs of a model with several (CLIP: ``'clip-text'``,
    ``'clip-vision'``);
    ``is_onnx``: use the ONNX export (the run needs ``to_onnx=True``); ``device``: where torch runs it
    (``'cpu'``, ``'cuda'``, ``'cuda:1'``; default: ``'cuda'`` when torch sees a GPU, else ``'cpu'``).
    ``logging_level``: the level of the loading libraries' loggers (transformers, finetuner_trainer) while
    the model loads, as a name of :mod:`logging` (``'WARNING'``, ``'INFO'``, ...).
    ``quantized`` (with ``is_onnx``): None loads the int8 ONNX model when the run made one
    (``onnx_quantize``), else the float one; True insists on the int8 model, False loads the float one.
    The model's ``precision`` says which it is (``'int8'`` or ``'float32'``).
    ``truncate_dim``: :func:`encode` keeps the first ``truncate_dim`` dimensions of every embedding (a model
    trained with ``loss_options={'matryoshka_dims': [...]}`` is made for this; sentence-transformers'
    ``SentenceTransformer(folder, truncate_dim=...)`` gives the same vectors from the saved folder).
    A torch model is returned in eval mode (no dropout, BatchNorm with its running statistics).
    """
    if batch_size < 1:
        raise ArgumentError('batch_size', f'must be at least 1, got {batch_size}')
    _check_select_model(select_model)
    if quantized is not None and not is_onnx:
        raise ArgumentError('quantized', 'int8 models are ONNX graphs: pass is_onnx=True with quantized')
    level = _logging_level(logging_level)
    device = _device(device, is_onnx)
    directory = _artifact_directory(artifact, token)
    with _quiet_loaders(level):
        if is_onnx:
            onnx = _trainer_module('finetuner_trainer.inference_onnx')
            try:
                model: Any = onnx.OnnxEmbedder.load(directory, quantized=quantized)
            except FileNotFoundError as e:
                raise ArgumentError('quantized' if quantized and 'int8' in str(e) else 'is_onnx', str(e)) from e
        else:
            # In inference mode: a user calling model(batch) gets dropout off and BatchNorm's running
            # statistics, as encode() does (Embedder.embed switches to eval itself).
            model = pretrained.load_model_folder(directory, _trainer_module, device)
    if select_model is not None:
        model = _Selected(model, SELECT_MODELS[select_model][1])
    model.default_batch_size = batch_size
    model.truncate_dim = _check_truncate_dim(truncate_dim, model)
    return model


def build_model(
    name: str,
    model_options: dict[str, Any] | None = None,
    batch_size: int = 32,
    select_model: str | None = None,
    device: str | None = None,
    is_onnx: bool = False,
) -> Any:
    """A pretrained backbone, no run needed (zero-shot): a name of :func:`describe_models` or an alias,
    ``timm:<name>``, a Hugging Face id or a model folder, with ``model_options`` (see
    :func:`finetuner.list_model_options`). ``select_model`` keeps one tower of a CLIP model
    (``'clip-text'``, ``'clip-vision'``); ``is_onnx`` exports it to ONNX and runs it with ONNX Runtime.
    ``device`` as in :func:`get_model` (default: ``'cuda'`` when torch sees a GPU). Finetuner's arguments,
    in its order. Use it with :func:`encode` like a fine-tuned model."""
    if batch_size < 1:
        raise ArgumentError('batch_size', f'must be at least 1, got {batch_size}')
    if not isinstance(name, str) or not name.strip():
        raise ArgumentError('name', 'give a backbone name (see finetuner.describe_models())')
    from finetuner.model_names import check_model_name

    check_model_name(name, 'name')
    _check_select_model(select_model)
    device = _device(device, is_onnx)
    model = pretrained.build_model(name, _trainer_module, model_options, device, is_onnx)
    if select_model is not None:
        model = _Selected(model, SELECT_MODELS[select_model][1])
    model.default_batch_size = batch_size
    return model


# The loggers of the libraries that load a model (logging_level quiets or opens them while it loads).
LOADING_LOGGERS = ('finetuner_trainer', 'transformers', 'sentence_transformers', 'timm', 'huggingface_hub')


def _logging_level(name: Any) -> int:
    level = logging.getLevelName(name.upper()) if isinstance(name, str) else None
    if not isinstance(level, int):
        raise ArgumentError(
            'logging_level', f"{name!r} is no logging level; give 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"
        )
    return level


@contextlib.contextmanager
def _quiet_loaders(level: int) -> Iterator[None]:
    """The loading libraries' loggers at ``level`` while a model loads, then as they were."""
    loggers = [logging.getLogger(name) for name in LOADING_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def _device(device: str | None, is_onnx: bool) -> str:
    """Where torch runs the model: as given, or (None) ``'cuda'`` when torch sees a GPU, else ``'cpu'``, as
    Finetuner chooses. ONNX models run on the CPU (ONNX Runtime's default provider): a GPU asked for is
    not used, and a warning says so (Finetuner warns too)."""
    if device is not None and (not isinstance(device, str) or device.split(':')[0] not in ('cpu', 'cuda', 'mps')):
        raise ArgumentError('device', f"{device!r} is no torch device; give 'cpu', 'cuda' or 'cuda:N' (or None)")
    if is_onnx:
        if device is not None and device != 'cpu':
            warnings.warn(
                f'ONNX models run on the CPU here (ONNX Runtime); device={device!r} is not used', RuntimeWarning, 3
            )
        return 'cpu'
    if device is not None:
        return device
    torch = _trainer_module('torch')
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _check_select_model(select_model: str | None) -> None:
    if select_model is not None and select_model not in SELECT_MODELS:
        names = ' or '.join(repr(name) for name in SELECT_MODELS)
        families = ', '.join(sorted({family for family, _ in SELECT_MODELS.values()}))
        raise ArgumentError('select_model', f'unknown {select_model!r}; use {names} ({families} models only)')


def encode(model: Any, data: Any, batch_size: int | None = None, truncate_dim: int | None = None) -> Any:
    """Embed ``data`` with a model from :func:`get_model`.

    ``data``: one item or a list of them: texts; image paths or URLs (for a model that embeds images:
    a CLIP model takes a string ending in an image suffix as an image), image bytes, numpy arrays or torch
    tensors (a timm model's ``tensor`` input, or an HxWx3 uint8 image), PIL images, Records, or documents
    (docarray ``DocList`` included). Documents get their ``embedding`` set and are returned; otherwise a
    ``numpy`` array (one row per item) is returned.
    ``truncate_dim``: keep the first ``truncate_dim`` dimensions (default: the model's, from
    :func:`get_model`); vectors are cut, not normalised again, as sentence-transformers does.
    """
    if isinstance(model, (str, bytes, Path)) or not (hasattr(model, 'embed') or hasattr(model, 'encode')):
        raise ArgumentError('model', f'a {type(model).__name__} cannot encode; load one with finetuner.get_model()')
    items = list(data) if is_collection(data) else [data]
    records = pretrained.encoding_records(items, pretrained.model_kinds(model))
    size = batch_size or getattr(model, 'default_batch_size', 32)
    keep = _check_truncate_dim(truncate_dim, model) or getattr(model, 'truncate_dim', None)
    embeddings = _embed(model, records, size)
    if hasattr(embeddings, 'detach'):
        embeddings = embeddings.detach().cpu().numpy()
    if keep is not None:
        embeddings = embeddings[:, :keep]
    if is_collection(data) and not isinstance(items[0], (str, dict, bytes)) and hasattr(items[0], 'embedding'):
        for item, vector in zip(items, embeddings, strict=True):
            item.embedding = vector
        return data
    return embeddings


__all__ = ['MissingDependencyError', 'build_model', 'describe_models', 'encode', 'get_model', 'list_models']
