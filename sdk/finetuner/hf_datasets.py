"""Hugging Face ``datasets`` as training data: ``fit(train_data=load_dataset(...))``.

Columns are read as sentence-transformers reads them (its "Dataset Format"): a column named ``label``
or ``score`` is the label, every other column is an input, in column order (names do not matter):

| input columns | label column | becomes |
|---|---|---|
| 1 (``sentence``) | ``label`` (class) | labelled items (``ClassLabel`` names kept) |
| 2 (``anchor``, ``positive``) | none | query-document pairs |
| 2 (``sentence1``, ``sentence2``) | ``score`` / ``label`` (a number) | scored pairs |
| 3 or more (``anchor``, ``positive``, ``negative``) | none | pairs of the first two (the rest: a warning) |

An input is a text, or an image (a ``datasets.Image`` column: PIL images or ``{'bytes', 'path'}``): a text
and an image make a text-image pair (CLIP). A ``DatasetDict`` gives its ``train`` split (or its only one).
``datasets`` is imported by the caller who built the dataset; this module only reads it.
"""

from __future__ import annotations

import base64
import io
import warnings
from typing import Any

from finetuner.api.layout import Record
from finetuner.errors import ArgumentError

LABEL_COLUMNS = ('label', 'score')


def is_hf_dataset(data: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (checked by type, without importing datasets)."""
    kind = type(data)
    return kind.__module__.split('.')[0] == 'datasets' and kind.__name__ in ('Dataset', 'DatasetDict')


def _one_split(data: Any, argument: str) -> Any:
    if type(data).__name__ != 'DatasetDict':
        return data
    splits = list(data)
    if 'train' in data:
        return data['train']
    if len(splits) == 1:
        return data[splits[0]]
    raise ArgumentError(
        argument,
        f'is a DatasetDict with the splits {", ".join(splits)} and no "train"; give one split, e.g. '
        f'{argument}=dataset[{splits[0]!r}]',
    )


def to_records(data: Any, argument: str, text_modality: str = 'text', image_modality: str = 'image') -> list[Record]:
    """Records of a Dataset (or DatasetDict) by sentence-transformers' column conventions."""
    dataset = _one_split(data, argument)
    columns = list(dataset.column_names)
    labels = [c for c in columns if c in LABEL_COLUMNS]
    inputs = [c for c in columns if c not in LABEL_COLUMNS]
    if len(labels) > 1:
        raise ArgumentError(argument, 'has both a "label" and a "score" column; keep the one that is the target')
    if not inputs:
        raise ArgumentError(argument, f'has no input column (columns: {", ".join(columns)}); add a text column')
    if len(dataset) == 0:
        raise ArgumentError(argument, 'is an empty dataset; give at least one row')
    label = labels[0] if labels else None
    if len(inputs) > 2:
        warnings.warn(
            f'{argument}: the columns {", ".join(inputs[2:])} are left out: training uses pairs of the first two '
            f'({inputs[0]}, {inputs[1]}), with the other pairs of a batch as negatives',
            UserWarning,
            stacklevel=4,
        )
    names = _class_names(dataset, label)
    modalities = {'text': text_modality, 'image': image_modality}
    records = []
    for position, row in enumerate(dataset):
        where = f'{argument}[{position}]'
        contents = [_content(row[column], f'{where}.{column}') for column in inputs[:2]]
        target = row[label] if label is not None else None
        records.append(_record(contents, target, names, label, where, modalities))
    return records


def _class_names(dataset: Any, label: str | None) -> list[str] | None:
    """The names of a ClassLabel column (``features['label'].names``), else None."""
    if label is None:
        return None
    feature = dataset.features.get(label)
    names = getattr(feature, 'names', None)
    return list(names) if names else None


def _content(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {'text': value}
    if type(value).__module__.startswith('PIL.'):
        out = io.BytesIO()
        value.save(out, format=value.format or 'PNG')
        return {'blob': base64.b64encode(out.getvalue()).decode()}
    if isinstance(value, dict) and (value.get('bytes') or value.get('path')):  # datasets.Image(decode=False)
        if value.get('bytes'):
            return {'blob': base64.b64encode(value['bytes']).decode()}
        return {'uri': str(value['path'])}
    if isinstance(value, (bytes, bytearray)):
        return {'blob': base64.b64encode(bytes(value)).decode()}
    raise ArgumentError(where, f'is a {type(value).__name__}; an input column holds texts or images')


def _record(
    contents: list[dict[str, Any]],
    target: Any,
    names: list[str] | None,
    label: str | None,
    where: str,
    modalities: dict[str, str],
) -> Record:
    if len(contents) == 1:
        if target is None:
            raise ArgumentError(
                where, 'has one input column and no "label": labelled items need a label column, pairs two inputs'
            )
        if isinstance(target, float) and not target.is_integer():
            raise ArgumentError(f'{where}.{label}', f'{target!r} is a score; a single input column needs a class')
        name = names[int(target)] if names is not None and isinstance(target, int) else target
        return Record(**contents[0], label=name if isinstance(name, (str, int)) else str(name))
    chunks = [Record(**content, modality=_modality(content, modalities)) for content in contents]
    if target is None:
        return Record(chunks=chunks)
    try:
        score = float(target)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f'{where}.{label}', f'{target!r} is not a number; pairs take a similarity score') from e
    return Record(chunks=chunks, score=score)


def _modality(content: dict[str, Any], modalities: dict[str, str]) -> str | None:
    """Chunks of a text-image pair are named (CLIP); two texts need no names."""
    return modalities['text'] if 'text' in content else modalities['image']
