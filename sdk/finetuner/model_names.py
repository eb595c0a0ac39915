"""Checking a backbone name in the SDK, before anything is uploaded: a misspelt catalog name is
refused with "did you mean", every Hugging Face id, ``timm:<name>``, URI and local folder goes through.

The trainer takes a name that is not in the catalog as a Hugging Face id; without this check a typo
(``efficentnet_b0``) is only found once the run has started, as a failed download.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from finetuner.catalog import close_backbones, find_backbone, is_bare_name, misspelt_backbone
from finetuner.errors import ArgumentError


class ModelNameWarning(UserWarning):
    """A model name outside the catalog that is close to a catalog name (taken as a hub id)."""


def check_model_name(name: str, argument: str = 'model') -> None:
    """ArgumentError for a name that can only be a misspelt catalog name; a warning for a hub-style
    name that is close to one (``resnet-bse``: it is tried as a Hugging Face id, which may be meant)."""
    if find_backbone(name) is not None or Path(name).expanduser().exists():
        return
    close = misspelt_backbone(name)
    if close is not None:
        hint = f'did you mean {close[0]!r}?' if close else 'see finetuner.describe_models() for the catalog'
        raise ArgumentError(
            argument,
            f'unknown backbone {name!r}; {hint} (a timm model outside the catalog is written "timm:{name}", '
            'a Hugging Face model by its id "org/name", a model folder by its path)',
        )
    near = close_backbones(name) if is_bare_name(name) else []
    if near:
        warnings.warn(
            f'{argument} {name!r} is not in the catalog and is taken as a Hugging Face model id; '
            f'did you mean {near[0]!r}?',
            ModelNameWarning,
            stacklevel=3,
        )
