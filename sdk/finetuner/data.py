"""Turning what a user hands ``fit()`` into dataset records, and pushing datasets to the object store.

Accepted forms of ``train_data`` / ``eval_data`` (and of EvaluationCallback's data):

- documents: docarray 2.x ``DocList[LegacyDocument]`` (``text``, ``tensor``, ``blob``, ``url``,
  ``tags``, ``chunks``), ``ImageDoc`` (``url``, ``tensor``, ``bytes_``), any document type with those
  attributes, :class:`~finetuner.api.layout.Record` objects, dicts in the Record format, or plain
  strings (text items). Labels come from ``tags['finetuner_label']``, similarity scores from
  ``tags['finetuner_score']``, a chunk's modality from ``tags['modality']`` or, when absent, from
  which content field is set. A ``tensor`` is an image's pixels (numpy or torch; the layouts and
  scales of :mod:`finetuner.api.tensors`), stored as ``.npy`` bytes;
- a local CSV file (read with the run's ``csv_options``) or a local JSONL file of records;
- a local folder with one sub-folder of images per class (images anywhere below it);
- an ``s3://`` or ``file://`` URI, used as is (the trainer reads it);
- the name of a dataset pushed earlier with :func:`finetuner.push_data`.

Paths may be strings or any ``os.PathLike``. Everything local is converted here, before anything is
uploaded, so a bad item is an :class:`~finetuner.errors.ArgumentError` naming the argument and the
item: an image file that is empty or cut short, a tensor that is not an image, texts that are all
empty. What is probably not what the user meant (most texts empty, a class folder without images,
CSV pairs whose second column looks like labels) is a :class:`DataWarning`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetuner.api.csvformat import CSVFormatError, decode_csv, read_csv_text
from finetuner.api.datachecks import empty_texts, image_problem
from finetuner.api.layout import Record, dataset_key
from finetuner.api.tensors import TensorError, check_image_tensor, decode_tensor, encode_tensor, is_torch
from finetuner.api.v1alpha1 import CSVOptions, check_dns1123_name
from finetuner.errors import ArgumentError
from finetuner.storage import LocalStore, S3Store, StorageError, file_uri_path

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp', '.tif', '.tiff')
LABEL_TAG = 'finetuner_label'
SCORE_TAG = 'finetuner_score'
MODALITY_TAG = 'modality'

log = logging.getLogger(__name__)


class DataWarning(UserWarning):
    """Data that will train, but probably not as its owner meant (the message says why and the fix)."""


def warn(message: str) -> None:
    """A DataWarning pointing at the caller's line (the first frame outside this package)."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_globals.get('__name__', '').split('.')[0] == 'finetuner':
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DataWarning, stacklevel=level)


@dataclass(frozen=True)
class Modalities:
    """Names given to chunks whose modality is read from their content (CLIP's text/image)."""

    text: str = 'text'
    image: str = 'image'


@dataclass(frozen=True)
class DataRef:
    """What a data argument turned into: a reference the trainer can read, or records to upload."""

    reference: str | None  # a URI or a dataset name, when nothing has to be uploaded
    records: list[Record] | None  # local data, converted, to be uploaded under a dataset name

    @property
    def needs_upload(self) -> bool:
        return self.records is not None


def is_collection(data: Any) -> bool:
    """True for a list/tuple/DocList of items (a single docarray document is not a collection)."""
    if isinstance(data, (list, tuple)):
        return True
    return hasattr(data, 'doc_type') and hasattr(data, '__len__')


def resolve(
    data: Any,
    argument: str,
    *,
    csv_options: CSVOptions | None = None,
    modalities: Modalities = Modalities(),
) -> DataRef:
    """Classify and convert one data argument; raise ArgumentError naming ``argument``."""
    from finetuner import hf_datasets  # a Hugging Face Dataset, read by sentence-transformers' conventions

    if hf_datasets.is_hf_dataset(data):
        return DataRef(None, hf_datasets.to_records(data, argument, modalities.text, modalities.image))
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        if not data.strip():
            raise ArgumentError(
                argument, 'is an empty string; give documents, a file, a folder, a URI or a dataset name'
            )
        if data.startswith(('s3://', 'file://')):
            return DataRef(reference=data, records=None)
        if '://' in data:
            raise ArgumentError(argument, f'{data!r} uses an unsupported scheme; use s3://, file:// or a local path')
        path = Path(data).expanduser()
        if path.is_dir():
            return DataRef(reference=None, records=check_texts(read_image_folder(path, argument), argument))
        if path.is_file():
            if path.suffix.lower() == '.csv':
                records = read_csv(path, argument, csv_options or CSVOptions(), modalities)
                return DataRef(reference=None, records=check_texts(records, argument))
            if path.suffix.lower() in ('.jsonl', '.json'):
                return DataRef(reference=None, records=check_texts(read_jsonl(path, argument), argument))
            raise ArgumentError(
                argument, f'{data!r} is a file but neither .csv nor .jsonl; convert it or push documents'
            )
        if '/' in data or data.startswith('.') or data.lower().endswith(('.csv', '.jsonl')):
            raise ArgumentError(argument, f'no file or folder {data!r}; check the path')
        try:
            check_dns1123_name(data, 'dataset name', max_len=63)
        except ValueError as e:
            raise ArgumentError(argument, f'{data!r} is neither a local path nor a dataset name ({e})') from e
        return DataRef(reference=data, records=None)
    if is_collection(data) or _is_iterator(data):
        return DataRef(reference=None, records=check_texts(to_records(data, argument, modalities), argument))
    raise ArgumentError(
        argument,
        f'cannot use a {type(data).__name__} as data; give a list/DocList of documents, a CSV or JSONL path, '
        'a folder of images per class, an s3:// URI or the name of a pushed dataset',
    )


def _is_iterator(data: Any) -> bool:
    return hasattr(data, '__next__') and hasattr(data, '__iter__')


def to_records(items: Iterable[Any], argument: str, modalities: Modalities = Modalities()) -> list[Record]:
    """Convert documents (or Records, dicts, strings) to Records; never returns an empty list."""
    records = [_to_record(item, f'{argument}[{i}]', modalities, top=True) for i, item in enumerate(items)]
    if not records:
        raise ArgumentError(argument, 'is empty; give at least one document')
    return records


def _to_record(item: Any, where: str, modalities: Modalities, top: bool) -> Record:
    if isinstance(item, Record):
        return check_content(item, where)
    if isinstance(item, str):
        return Record(text=item)
    if isinstance(item, dict):
        try:
            record = Record.model_validate(item)
        except ValidationError as e:
            raise ArgumentError(where, _first_error(e)) from e
        return check_content(record, where)
    return _document_to_record(item, where, modalities, top)


def check_content(record: Record, where: str) -> Record:
    """``record`` when its images are whole and its tensors are images (chunks too); ArgumentError
    naming ``where`` otherwise. Cheap: image headers and sizes, tensor shapes and value ranges."""
    for j, chunk in enumerate(record.chunks):
        check_content(chunk, f'{where}.chunks[{j}]')
    if record.blob is not None:
        try:
            data = base64.b64decode(record.blob, validate=True)
        except ValueError as e:
            raise ArgumentError(where, f'blob is not base64 ({e}); give the encoded image bytes') from e
        _check_image_bytes(data, where, 'blob')
    if record.tensor is not None:
        try:
            check_image_tensor(decode_tensor(record.tensor))
        except TensorError as e:
            raise ArgumentError(where, f'tensor: {e}') from e
    return record


def _check_image_bytes(data: bytes, where: str, what: str) -> None:
    problem = image_problem(data)
    if problem is not None:
        raise ArgumentError(where, f'{what}: {problem}; replace or remove it')


def _document_to_record(doc: Any, where: str, modalities: Modalities, top: bool) -> Record:
    tags = dict(getattr(doc, 'tags', None) or {})
    label = tags.pop(LABEL_TAG, None)
    score = tags.pop(SCORE_TAG, None)
    modality = tags.pop(MODALITY_TAG, None) or getattr(doc, 'modality', None)
    chunks_in = getattr(doc, 'chunks', None) or []
    fields: dict[str, Any] = {}
    text = getattr(doc, 'text', None)
    blob = getattr(doc, 'blob', None)
    if blob is None:
        blob = getattr(doc, 'bytes_', None)  # docarray's ImageDoc
    tensor = getattr(doc, 'tensor', None)
    url = getattr(doc, 'url', None) or getattr(doc, 'uri', None)
    if text is not None:
        fields['text'] = str(text)
    elif blob is not None:
        fields['blob'] = _blob_field(blob, where)
    elif tensor is not None:
        fields['tensor'] = _tensor_field(tensor, where)
    elif url is not None:
        fields.update(_url_content(str(url), where))
    if chunks_in:
        if fields:
            raise ArgumentError(where, 'has both content and chunks; a pair is a parent whose chunks hold the content')
        fields['chunks'] = [
            _to_record(chunk, f'{where}.chunks[{j}]', modalities, top=False) for j, chunk in enumerate(chunks_in)
        ]
    if not fields:
        raise ArgumentError(where, 'has no content: set text, blob, tensor or url (or chunks of a pair)')
    if not top and modality is None:
        modality = modalities.text if 'text' in fields else modalities.image
    if label is not None and not isinstance(label, (str, int)):
        label = str(label)
    if score is not None:
        try:
            score = float(score)
        except (TypeError, ValueError) as e:
            raise ArgumentError(where, f"tags['{SCORE_TAG}'] must be a number, got {score!r}") from e
    try:
        return Record(label=label, score=score, modality=modality, tags=_jsonable_tags(tags), **fields)
    except ValidationError as e:
        raise ArgumentError(where, _first_error(e)) from e


def _blob_field(blob: Any, where: str) -> str:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        data = bytes(blob)
        _check_image_bytes(data, where, 'blob')
        return base64.b64encode(data).decode()
    return str(blob)


def _tensor_field(tensor: Any, where: str) -> str:
    """The tensor, checked to be an image, as a ``.npy`` data URI (compact, and bit-identical when pulled)."""
    if not (hasattr(tensor, 'shape') or isinstance(tensor, (list, tuple))):
        raise ArgumentError(where, f'tensor of type {type(tensor).__name__} is not an array; use numpy or torch')
    try:
        check_image_tensor(tensor)
        return encode_tensor(tensor)
    except TensorError as e:
        raise ArgumentError(where, f'tensor: {e}') from e


def _url_content(url: str, where: str) -> dict[str, Any]:
    """Local images are read into the record (a cluster cannot see this machine's files)."""
    if url.startswith(('http://', 'https://', 's3://', 'data:')):
        return {'uri': url}
    path = file_uri_path(url) if url.startswith('file://') else Path(url).expanduser()
    if not path.is_file():
        raise ArgumentError(where, f'url {url!r} is not a readable file here; fix the path or give a URL')
    return {'blob': read_image_file(path, where)}


def read_image_file(path: Path, where: str) -> str:
    """A local image file's bytes, base64, once its header and size show a whole image."""
    data = path.read_bytes()
    _check_image_bytes(data, where, f'image file {str(path)!r}')
    return base64.b64encode(data).decode()


def check_texts(records: list[Record], argument: str) -> list[Record]:
    """``records`` unless every text in them is empty (ArgumentError); a DataWarning when most are."""
    texts = [r.text for record in records for r in (record.chunks or [record]) if r.text is not None]
    report = empty_texts(texts)
    if report is None:
        return records
    if report.all_empty:
        raise ArgumentError(argument, f'all {report.total} texts are empty (or only spaces); give each item its text')
    warn(
        f'{argument}: {report.empty} of {report.total} texts are empty (or only spaces); empty texts all embed '
        'alike and teach the model nothing: fill them in or leave those items out'
    )
    return records


def _jsonable_tags(tags: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for key, value in tags.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # tags such as arrays stay on the user's documents; the trainer needs none
        kept[str(key)] = value
    return kept


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = '.'.join(str(p) for p in first['loc'])
    message = first['msg'].removeprefix('Value error, ')
    return f'{loc}: {message}' if loc else message


# --- files and folders ------------------------------------------------------------------------


def read_jsonl(path: Path, argument: str) -> list[Record]:
    records = []
    with path.open(encoding='utf-8-sig') as f:  # a byte-order mark (Windows editors) is skipped
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = Record.model_validate_json(line)
            except ValidationError as e:
                raise ArgumentError(argument, f'{path}:{number}: {_first_error(e)}') from e
            records.append(check_content(record, f'{argument}: {path}:{number}'))
    if not records:
        raise ArgumentError(argument, f'{path} holds no records')
    return records


def read_image_folder(path: Path, argument: str) -> list[Record]:
    """One sub-folder per class, its name the label; images anywhere below it (nested folders too)
    read into the records. A class folder without images, files that are not images and images
    outside any class folder are left out with a DataWarning naming them."""
    records = []
    skipped: list[Path] = []
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith('.')):
        files = sorted(f for f in class_dir.rglob('*') if f.is_file() and not _hidden(f.relative_to(class_dir)))
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            warn(
                f'{argument}: class folder {str(class_dir)!r} holds no images ({", ".join(IMAGE_SUFFIXES)}), so '
                f'class {class_dir.name!r} is left out'
            )
        for image in images:
            records.append(Record(blob=read_image_file(image, argument), label=class_dir.name))
    loose = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not records:
        raise ArgumentError(
            argument,
            f'folder {str(path)!r} has no images in class sub-folders; lay it out as {path}/<label>/<image>.png',
        )
    if loose:
        warn(f'{argument}: {len(loose)} images directly in {str(path)!r} belong to no class folder and are left out')
    if skipped:
        kinds = Counter(f.suffix.lower() or '(none)' for f in skipped)
        shown = ', '.join(f'{count} {suffix}' for suffix, count in kinds.most_common())
        warn(f'{argument}: {len(skipped)} files that are not images are left out ({shown}; first: {skipped[0]})')
    return records


def _hidden(relative: Path) -> bool:
    return any(part.startswith('.') for part in relative.parts)


def _cell_content(cell: str, convert_to_blob: bool, base: Path, where: str) -> dict[str, Any]:
    value = cell.strip()
    if value.lower().endswith(IMAGE_SUFFIXES):
        if value.startswith(('http://', 'https://', 's3://')):
            return {'uri': value}
        local = Path(value).expanduser()
        local = local if local.is_absolute() else base / local
        if convert_to_blob and local.is_file():
            return {'blob': read_image_file(local, where)}
        return {'uri': str(local)}
    return {'text': value}


def sdk_option(key: str) -> str:
    return f'csv_options.{key}'


def read_csv(path: Path, argument: str, options: CSVOptions, modalities: Modalities = Modalities()) -> list[Record]:
    """Records of a local CSV file, read as the trainer reads one (:mod:`finetuner.api.csvformat`);
    what was decided (delimiter, header) is logged, what looks wrong is a DataWarning."""
    try:
        text = decode_csv(path.read_bytes(), options.encoding)
    except (UnicodeDecodeError, LookupError) as e:
        raise ArgumentError('csv_options', f'{path} is not {options.encoding!r} text; set csv_options.encoding') from e
    try:
        read = read_csv_text(
            text,
            options,
            lambda cell: _cell_content(cell, options.convert_to_blob, path.parent, f'{argument}: {path}'),
            text_modality=modalities.text,
            image_modality=modalities.image,
            option=sdk_option,
        )
    except CSVFormatError as e:
        raise ArgumentError(argument, f'{path}: {e}') from e
    for note in read.notes:
        log.info('%s: %s: %s', argument, path, note)
    for warning in read.warnings:
        warn(f'{argument}: {path}: {warning}')
    if not read.records:
        raise ArgumentError(argument, f'{path} has no rows')
    return read.records


# --- datasets in the object store -------------------------------------------------------------


def records_to_jsonl(records: Iterable[Record]) -> bytes:
    lines = (json.dumps(r.model_dump(exclude_none=True, exclude_defaults=True)) for r in records)
    return ('\n'.join(lines) + '\n').encode('utf-8')


def push_records(store: LocalStore | S3Store, name: str, records: list[Record]) -> str:
    """Write ``datasets/<name>/data.jsonl`` below the store; return the dataset name."""
    check_dns1123_name(name, 'dataset name', max_len=63)
    store.write_bytes(dataset_key(name), records_to_jsonl(records))
    return name


def pull_records(store: LocalStore | S3Store, name: str) -> list[Record]:
    check_dns1123_name(name, 'dataset name', max_len=63)
    try:
        raw = store.read_bytes(dataset_key(name)).decode('utf-8')
    except StorageError as e:
        raise ArgumentError(
            'name', f'no dataset {name!r} in {store.uri}; push it first with finetuner.push_data'
        ) from e
    return [Record.model_validate_json(line) for line in raw.splitlines() if line.strip()]


def dataset_exists(store: LocalStore | S3Store, name: str) -> bool:
    return store.exists(dataset_key(name))


def to_legacy_documents(records: list[Record]) -> Any:
    """Records as a docarray ``DocList[LegacyDocument]`` (labels and scores back in tags)."""
    from docarray import DocList
    from docarray.documents.legacy import LegacyDocument

    def convert(record: Record) -> Any:
        tags = dict(record.tags)
        if record.label is not None:
            tags[LABEL_TAG] = record.label
        if record.score is not None:
            tags[SCORE_TAG] = record.score
        if record.modality is not None:
            tags[MODALITY_TAG] = record.modality
        chunks = DocList[LegacyDocument]([convert(c) for c in record.chunks]) if record.chunks else None
        blob = base64.b64decode(record.blob) if record.blob is not None else None
        tensor = _tensor_value(record.tensor) if record.tensor is not None else None
        return LegacyDocument(text=record.text, url=record.uri, blob=blob, tensor=tensor, tags=tags, chunks=chunks)

    return DocList[LegacyDocument]([convert(r) for r in records])


def _tensor_value(value: list[Any] | str) -> Any:
    """A stored tensor as the array it was: numpy, or torch when it was pushed as a torch tensor."""
    array = decode_tensor(value)
    if is_torch(value):
        try:
            import torch
        except ImportError:  # no torch here: the numpy array holds the same values
            return array
        return torch.from_numpy(array)
    return array
