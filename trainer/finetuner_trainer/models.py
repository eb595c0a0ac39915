"""Embedders by name: a spec's model (or a saved folder) turned into the right family's model.

The families themselves (timm CNNs, Hugging Face text encoders, CLIP, ...) are registered classes
under ``finetuner_trainer/families/`` (see :mod:`finetuner_trainer.embedder`); this module only
finds the family of a name and asks it to build or load:

- :func:`resolve_model`: a catalog name or alias, ``<prefix><name>`` (``timm:resnet18``), a local
  folder, an ``s3://``/``file://`` prefix or a Hugging Face id -> (family, source, catalog entry);
- :func:`build_embedder`: the run's model with its options, projection head and freezing;
- :func:`load_embedder`: a folder written by ``Embedder.save`` (an artifact) read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.catalog import MODEL_OPTIONS, Backbone, find_backbone, model_options_of
from finetuner.storage import StorageError, file_uri_path, open_store
from finetuner_trainer.embedder import (
    BATCH_OVERHEAD_TOKENS,
    FAMILIES,
    MANIFEST_NAME,
    PROJECTION_FILE,
    Embedder,
    as_item,
    decode_image,
    plan_batches,
    to_device,
)
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.families import ClipEmbedder, TextEmbedder, TimmEmbedder

# every option some family takes (finetuner.catalog.MODEL_OPTIONS is the one list)
MODEL_OPTION_KEYS = tuple(dict.fromkeys(option.name for options in MODEL_OPTIONS.values() for option in options))

__all__ = [
    'BATCH_OVERHEAD_TOKENS',
    'MODEL_OPTION_KEYS',
    'ClipEmbedder',
    'Embedder',
    'TextEmbedder',
    'TimmEmbedder',
    'as_item',
    'build_embedder',
    'decode_image',
    'family_metadata',
    'get_family',
    'load_embedder',
    'plan_batches',
    'resolve_model',
    'to_device',
]


def get_family(name: str) -> type[Embedder]:
    """The registered family ``name``."""
    family = FAMILIES.get(name)
    if family is None:
        raise ConfigError('model', f'unknown model family {name!r}; the trainer knows {", ".join(sorted(FAMILIES))}')
    return family


def family_for_config(config: dict[str, Any]) -> type[Embedder] | None:
    """The family whose ``claims`` accepts a model's config.json: a specific one first, else the fallback."""
    families = sorted(FAMILIES.values(), key=lambda family: family.fallback)
    return next((family for family in families if family.fallback or family.claims(config)), None)


def family_metadata() -> dict[str, dict[str, Any]]:
    """What the light SDK knows of each family (generated into ``finetuner/registered.py``)."""
    return {
        name: {'kinds': list(family.kinds), 'select_models': dict(family.select_models)}
        for name, family in sorted(FAMILIES.items())
    }


def model_cache_dir() -> Path:
    base = os.environ.get('FINETUNER_MODEL_CACHE') or os.environ.get('HF_HOME') or os.environ.get('FINETUNER_HOME')
    root = Path(base).expanduser() if base else Path.home() / '.cache' / 'finetuner'
    return root / 'finetuner-models'


def download_model(uri: str) -> Path:
    """Copy an s3:// (or file://) prefix holding a model into the local cache; return the folder."""
    target = model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / '.complete').exists():
        return target
    try:
        open_store(uri).download_dir('', target)
    except StorageError as e:
        raise ConfigError('model', f'cannot download {uri!r}: {e}') from e
    (target / '.complete').write_text(uri)
    return target


def _hub_family(name: str) -> str:
    from transformers import AutoConfig  # heavy: loaded only for a hub id

    family = family_for_config(AutoConfig.from_pretrained(name).to_dict())
    if family is None:
        raise ValueError(f'no model family takes the config of {name!r}')
    return family.family


def _local_family(path: Path, name: str) -> str:
    if (path / MANIFEST_NAME).exists():
        return str(json.loads((path / MANIFEST_NAME).read_text())['family'])
    config_file = path / 'config.json'
    if not config_file.exists():
        raise ConfigError('model', f'{name!r} holds no config.json: not a Hugging Face or timm model folder')
    family = family_for_config(json.loads(config_file.read_text()))
    if family is None:
        raise ConfigError('model', f'{name!r}: no model family ({", ".join(sorted(FAMILIES))}) takes its config.json')
    return family.family


def resolve_model(spec: FinetuneRunSpec) -> tuple[str, str, Backbone | None]:
    """(family, source, catalog entry) for a model name: catalog name or alias, ``<prefix><name>``
    (``timm:<name>``), a local directory, an s3:// prefix, or a Hugging Face id. Raises ConfigError
    when it is none."""
    name = spec.model
    backbone = find_backbone(name)
    if backbone is not None:
        return backbone.family, get_family(backbone.family).offline_source(backbone.source), backbone
    prefixed = next((f for f in FAMILIES.values() if f.name_prefix and name.startswith(f.name_prefix)), None)
    if prefixed is not None:
        return prefixed.family, name.removeprefix(prefixed.name_prefix or ''), None
    if name.startswith(('s3://', 'file://')):
        path = download_model(name) if name.startswith('s3://') else file_uri_path(name)
        return _local_family(path, name), str(path), None
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_family(path, name), str(path), None
    if path.is_absolute() or name.startswith('.'):
        raise ConfigError('model', f'{name!r} is not a directory')
    try:
        return _hub_family(name), name, None
    except Exception as e:  # OSError, RepositoryNotFoundError, ValueError from transformers
        raise ConfigError(
            'model',
            f'unknown model {name!r}: not a catalog name or alias (see `finetuner models`), not "timm:<name>", '
            f'not a local directory, and not a loadable Hugging Face model id ({type(e).__name__})',
        ) from e


def build_embedder(spec: FinetuneRunSpec) -> Embedder:
    """The embedder for a run spec: backbone, model options, projection head and freezing."""
    unknown = sorted(set(spec.model_options) - set(MODEL_OPTION_KEYS))
    if unknown:
        raise ConfigError(
            'modelOptions', f'unknown option {unknown[0]!r}; model options are {", ".join(MODEL_OPTION_KEYS)}'
        )
    family, source, _ = resolve_model(spec)
    check_family_options(family, spec.model_options)
    path = Path(source)
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        embedder = load_embedder(path)
    else:
        embedder = get_family(family).build(spec.model, source, dict(spec.model_options))
    if spec.output_dim is not None:
        embedder.add_projection(spec.output_dim)
    if spec.freeze:
        if spec.output_dim is None:
            raise ConfigError('freeze', 'freeze: true trains only the projection head; also set outputDim')
        embedder.freeze_backbone()
    return embedder


def pretrained_embedder(name: str, options: dict[str, Any]) -> Embedder:
    """A backbone as it is, without a run: a catalog name or alias, ``timm:<name>``, a model folder or a
    Hugging Face id, with ``options`` (``finetuner.build_model``, and ``get_model`` of a plain model folder)."""
    spec = FinetuneRunSpec.model_validate({'model': name, 'trainData': 'unused', 'modelOptions': options})
    return build_embedder(spec)


def check_family_options(family: str, options: dict[str, Any]) -> None:
    """ConfigError for an option the family does not take (``finetuner.catalog.MODEL_OPTIONS``, which
    ``finetuner.list_model_options()`` shows): a timm model has no max_length, a text model no image_size."""
    declared = [option.name for option in model_options_of(family)]
    wrong = sorted(set(options) - set(declared))
    if declared and wrong:
        raise ConfigError(
            f'modelOptions.{wrong[0]}',
            f'{family} models take no {wrong[0]!r}; their options are {", ".join(declared)}',
        )


def load_embedder(directory: Path | str) -> Embedder:
    """Read back a folder written by :meth:`Embedder.save` (an artifact, or a checkpoint's model)."""
    directory = Path(directory)
    description = json.loads((directory / MANIFEST_NAME).read_text())
    embedder = get_family(description['family']).load(directory, description)
    if (directory / PROJECTION_FILE).exists():
        embedder.load_projection(directory)
    return embedder
