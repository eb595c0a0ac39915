"""Training data: reading (JSONL, CSV, docarray), shape detection, checks, splits and batching.

Everything a dataset can be is reduced to :class:`Example` objects holding one item (a labelled
item) or two (a query-document pair or a text-image pair). Images are fetched and checked here,
before training starts, so a broken file is a configuration error and not a crash at step 500; a
pixel tensor becomes an image here too (:mod:`finetuner_trainer.images`), so every model family gets
the same kind of image from any form of data.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import io
import json
import logging
import math
import random
import tempfile
import urllib.request
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from finetuner.api.csvformat import CSVFormatError, decode_csv, read_csv_text
from finetuner.api.datachecks import empty_texts
from finetuner.api.layout import DATASET_FILE, Record, resolve_data
from finetuner.api.tensors import TensorError, decode_tensor, encode_tensor
from finetuner.api.v1alpha1 import CSVOptions, FinetuneRunSpec
from finetuner.storage import StorageError, open_store
from finetuner_trainer.errors import ConfigError

log = logging.getLogger(__name__)

LABEL_TAG = 'finetuner_label'
SCORE_TAG = 'finetuner_score'
MODALITY_TAG = 'modality'
JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
CSV_SUFFIXES = ('.csv', '.tsv', '.txt')


class Shape(str, Enum):
    """What one training example is; decides which losses fit."""

    LABELLED = 'labelled'  # one item + a class label
    PAIRS = 'pairs'  # (query, document)
    SCORED_PAIRS = 'scored-pairs'  # (query, document) + a similarity score
    TEXT_IMAGE = 'text-image'  # (text, image)


@dataclass(frozen=True)
class Item:
    """One piece of content ready for a model: text, encoded image bytes, or a tensor."""

    text: str | None = None
    image: bytes | None = None
    tensor: Any = None

    @property
    def kind(self) -> str:
        if self.text is not None:
            return 'text'
        if self.image is not None:
            return 'image'
        return 'tensor'


@dataclass(frozen=True)
class Example:
    items: tuple[Item, ...]
    label: int | None = None  # index into Dataset.classes
    score: float | None = None


@dataclass
class Dataset:
    shape: Shape
    examples: list[Example]
    classes: list[str] = field(default_factory=list)
    source: str = ''
    from_pairs: bool = False  # labelled data made of pairs: each query and its document a class of two

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def kinds(self) -> set[str]:
        return {item.kind for example in self.examples for item in example.items}

    def subset(self, indices: Sequence[int]) -> Dataset:
        examples = [self.examples[i] for i in indices]
        return Dataset(self.shape, examples, self.classes, self.source, self.from_pairs)


def pairs_as_classes(dataset: Dataset) -> Dataset:
    """Pairs for a label loss (Finetuner's semantics): a query and its document form a class of two."""
    examples = [Example((item,), label=i) for i, pair in enumerate(dataset.examples) for item in pair.items]
    return Dataset(Shape.LABELLED, examples, [str(i) for i in range(len(dataset))], dataset.source, from_pairs=True)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_source(reference: str, data_uri: str | None, field_name: str) -> tuple[bytes, str, Any, str]:
    """Fetch a data file: (bytes, file name, the store holding it, the key of the file in it)."""
    try:
        location, key = resolve_data(reference, data_uri)
    except ValueError as e:
        raise ConfigError(field_name, str(e)) from e
    try:
        store = open_store(location)
    except StorageError as e:
        raise ConfigError(field_name, str(e)) from e
    key = key or ''
    if not key and not _is_file(store):
        key = DATASET_FILE if store.exists(DATASET_FILE) else ''  # a dataset folder
    try:
        data = store.read_bytes(key)
    except StorageError as e:
        raise ConfigError(field_name, f'cannot read {reference!r}: {e}') from e
    name = key or urlparse(store.uri).path
    return data, name, store, key


def _is_file(store: Any) -> bool:
    root = getattr(store, 'root', None)
    return root is None or Path(root).is_file()


@dataclass(frozen=True)
class ImageBase:
    """Where relative image paths of a data file are resolved: the file's folder in its store."""

    store: Any = None
    directory: str = ''


def load_records(
    reference: str, data_uri: str | None, csv_options: CSVOptions, field_name: str
) -> tuple[list[Record], ImageBase]:
    """Read a dataset reference (URI or pushed dataset name) into Records, by format."""
    data, name, store, key = read_source(reference, data_uri, field_name)
    suffix = Path(name).suffix.lower()
    if not data.strip():
        raise ConfigError(field_name, f'{reference!r} is empty: it holds no records')
    if suffix in CSV_SUFFIXES:
        records = parse_csv(data, csv_options, field_name)
    elif suffix in JSONL_SUFFIXES or data.lstrip()[:1] in (b'{', b'['):
        records = parse_jsonl(data, field_name)
    else:
        records = parse_docarray(data, field_name)
    if not records:
        raise ConfigError(field_name, f'{reference!r} holds no records')
    if key:
        return records, ImageBase(store, key.rsplit('/', 1)[0] if '/' in key else '')
    # The reference named the file itself: relative image paths are resolved in its folder.
    return records, ImageBase(open_store(store.uri.rsplit('/', 1)[0]), '')


def parse_jsonl(data: bytes, field_name: str) -> list[Record]:
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise ConfigError(
            field_name, f'the JSON data is not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8'
        ) from e
    if text.lstrip().startswith('['):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(field_name, f'not valid JSON: {e}') from e
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(field_name, f'line {number} is not valid JSON: {e.msg}') from e
    records = []
    for position, row in enumerate(rows):
        try:
            records.append(Record.model_validate(row))
        except Exception as e:  # pydantic's ValidationError, reworded to one line
            first = e.errors()[0] if hasattr(e, 'errors') else {'msg': str(e)}
            raise ConfigError(f'{field_name}[{position}]', f'is not a valid record: {first["msg"]}') from e
    return records


def parse_csv(data: bytes, options: CSVOptions, field_name: str) -> list[Record]:
    """Finetuner's CSV semantics (:mod:`finetuner.api.csvformat`, shared with the SDK). Cells that
    look like image paths or URIs become images. What was decided (delimiter, header) is logged, what
    looks wrong is a warning in the log."""
    try:
        text = decode_csv(data, options.encoding)
    except (UnicodeDecodeError, LookupError) as e:
        raise ConfigError('csvOptions.encoding', f'the CSV file is not {options.encoding!r} text: {e}') from e
    try:
        read = read_csv_text(text, options, _csv_content)
    except CSVFormatError as e:
        raise ConfigError(field_name, str(e)) from e
    for note in read.notes:
        log.info('%s: %s', field_name, note)
    for warning in read.warnings:
        log.warning('%s: %s', field_name, warning)
    return read.records


def _csv_content(cell: str) -> dict[str, str]:
    value = cell.strip()
    looks_like_image = value.lower().endswith(('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp', '.tif', '.tiff'))
    return {'uri': value} if looks_like_image and ' ' not in value else {'text': value}


def parse_docarray(data: bytes, field_name: str) -> list[Record]:
    """A docarray 0.4x ``DocList[LegacyDocument]`` saved with ``save_binary`` (protobuf)."""
    try:
        from docarray import DocList  # optional (the docarray extra): only docarray files need it
        from docarray.documents.legacy import LegacyDocument
    except ImportError as e:
        raise ConfigError(field_name, 'a docarray file needs the docarray package (pip install docarray)') from e

    with tempfile.NamedTemporaryFile(suffix='.bin') as tmp:
        tmp.write(data)
        tmp.flush()
        docs = None
        for compress in (None, 'lz4', 'gzip', 'bz2', 'lzma', 'zlib'):
            try:
                docs = DocList[LegacyDocument].load_binary(tmp.name, protocol='protobuf', compress=compress)
                break
            except Exception:  # the wrong compression or protocol: try the next one
                continue
    if docs is None:
        raise ConfigError(
            field_name, 'not JSONL, CSV or a docarray DocList[LegacyDocument] binary file (save_binary, protobuf)'
        )
    return [_record_from_doc(doc) for doc in docs]


def _record_from_doc(doc: Any) -> Record:
    tags = dict(doc.tags or {})
    label = tags.pop(LABEL_TAG, None)
    score = tags.pop(SCORE_TAG, None)
    modality = tags.pop(MODALITY_TAG, None)
    if doc.chunks:
        return Record(
            chunks=[_record_from_doc(c) for c in doc.chunks], label=label, score=score, modality=modality, tags=tags
        )
    content: dict[str, Any] = {}
    if doc.text is not None:
        content['text'] = doc.text
    elif doc.blob is not None:
        content['blob'] = base64.b64encode(doc.blob).decode()
    elif doc.url is not None:
        content['uri'] = str(doc.url)
    elif doc.tensor is not None:
        content['tensor'] = encode_tensor(doc.tensor)
    return Record(**content, label=label, score=score, modality=modality, tags=tags)


# ---------------------------------------------------------------------------------------------
# Records -> examples
# ---------------------------------------------------------------------------------------------


def load_image_bytes(record: Record, base: ImageBase | None = None) -> bytes:
    """The encoded bytes of an image record (blob, local path, file:// or s3:// URI, http(s) URL)."""
    if record.blob is not None:
        return base64.b64decode(record.blob)
    uri = record.uri or ''
    parsed = urlparse(uri)
    if parsed.scheme in ('http', 'https'):
        with urllib.request.urlopen(uri, timeout=30) as response:  # the user's own data URL
            return response.read()
    if parsed.scheme == 's3':
        bucket_and_prefix, _, name = uri.rpartition('/')
        return open_store(bucket_and_prefix).read_bytes(name)
    if parsed.scheme == 'file' or Path(uri).is_absolute():
        return Path(parsed.path if parsed.scheme == 'file' else uri).read_bytes()
    if base is None or base.store is None:
        return Path(uri).read_bytes()
    return base.store.read_bytes(f'{base.directory}/{uri}' if base.directory else uri)


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than PIL's decompression-bomb limit."""


def check_image(data: bytes) -> None:
    from PIL import Image  # Pillow is loaded where images are checked: text-only data never needs it

    with warnings.catch_warnings():
        # Over the limit PIL only warns (over twice the limit it raises): refuse both, before decoding.
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(str(e)) from e


def tensor_item(record: Record, where: str, field_name: str) -> Item:
    """A pixel tensor as the image it holds (PNG bytes); ConfigError naming the record otherwise."""
    from finetuner_trainer.images import tensor_png  # numpy and Pillow: loaded when a tensor is met

    try:
        return Item(image=tensor_png(decode_tensor(record.tensor)))
    except TensorError as e:
        raise ConfigError(f'{field_name}{where}', f'tensor: {e}') from e


def to_item(record: Record, where: str, field_name: str, base: ImageBase | None = None) -> Item:
    """The model's input of a record. ``where`` is the record's place after ``field_name`` (``'[6]'``): an
    error names ``trainData[6]``, counted from 0 as the SDK counts ``train_data[6]``."""
    kind = record.content_kind
    if kind == 'text':
        return Item(text=record.text)
    if kind == 'tensor':
        return tensor_item(record, where, field_name)
    place = f'{field_name}{where}'
    name = record.uri or 'blob'
    try:
        data = load_image_bytes(record, base)
    except (OSError, StorageError, ValueError) as e:
        raise ConfigError(place, f'cannot read image {name!r}: {e}') from e
    try:
        check_image(data)
    except ImageTooLarge as e:
        problem = f'image {name!r} is too large to decode safely ({e}); resize it before training'
        raise ConfigError(place, problem) from e
    except Exception as e:  # PIL raises many types for broken files
        raise ConfigError(place, f'image {name!r} is corrupt or not an image ({e})') from e
    return Item(image=data)


def _label_of(record: Record) -> str | int | None:
    return record.label if record.label is not None else record.tags.get(LABEL_TAG)


def _score_of(record: Record) -> float | None:
    value = record.score if record.score is not None else record.tags.get(SCORE_TAG)
    return None if value is None else float(value)


def detect_shape(records: list[Record], spec: FinetuneRunSpec, field_name: str) -> Shape:
    with_chunks = sum(1 for r in records if r.chunks)
    if with_chunks and with_chunks != len(records):
        raise ConfigError(
            field_name, f'{with_chunks} of {len(records)} records have chunks (pairs) and the rest do not: mixed data'
        )
    if not with_chunks:
        missing = [i for i, r in enumerate(records) if _label_of(r) is None]
        if missing:
            raise ConfigError(
                field_name,
                f'{len(missing)} of {len(records)} records have no label (first: {field_name}[{missing[0]}]); labelled '
                f'items need "label" (or tags.{LABEL_TAG}), or give pairs as a parent with two chunks',
            )
        return Shape.LABELLED
    wrong = [i for i, r in enumerate(records) if len(r.chunks) != 2]
    if wrong:
        raise ConfigError(
            f'{field_name}[{wrong[0]}]',
            f'has {len(records[wrong[0]].chunks)} chunks; a pair has exactly two '
            '(query then document, or a text and an image)',
        )
    if spec.multi_modal:
        return Shape.TEXT_IMAGE
    scored = sum(1 for r in records if _score_of(r) is not None)
    if scored and scored != len(records):
        raise ConfigError(field_name, f'{scored} of {len(records)} pairs have a score and the rest do not')
    return Shape.SCORED_PAIRS if scored else Shape.PAIRS


def _text_image_items(
    record: Record, position: int, spec: FinetuneRunSpec, field_name: str, base: ImageBase | None
) -> tuple[Item, Item]:
    text_name = spec.text_modality or 'text'
    image_name = spec.image_modality or 'image'
    place = f'{field_name}[{position}]'
    modalities = [c.modality or c.tags.get(MODALITY_TAG) for c in record.chunks]
    if all(m is not None for m in modalities):
        if text_name not in modalities or image_name not in modalities:
            raise ConfigError(
                'textModality' if text_name not in modalities else 'imageModality',
                f'{place} has chunks with modalities {modalities}, not {text_name!r} and {image_name!r}; '
                'set textModality and imageModality to the names your data uses',
            )
        text_chunk = record.chunks[modalities.index(text_name)]
        image_chunk = record.chunks[modalities.index(image_name)]
    else:
        kinds = ['image' if c.content_kind == 'tensor' else c.content_kind for c in record.chunks]
        if sorted(kinds) != ['image', 'text']:
            raise ConfigError(place, 'a text-image pair needs one text and one image chunk')
        text_chunk = record.chunks[kinds.index('text')]
        image_chunk = record.chunks[kinds.index('image')]
    where = f'[{position}]'
    text_item = to_item(text_chunk, where, field_name, base)
    image_item = to_item(image_chunk, where, field_name, base)
    if text_item.kind != 'text' or image_item.kind != 'image':
        raise ConfigError(place, f'the {text_name!r} chunk must hold text and the {image_name!r} chunk an image')
    return text_item, image_item


def to_dataset(
    records: list[Record],
    spec: FinetuneRunSpec,
    field_name: str,
    base: ImageBase | None = None,
    classes: list[str] | None = None,
) -> Dataset:
    """Turn records into examples of one shape, reading and checking every image."""
    if not records:
        raise ConfigError(field_name, 'the data holds no records')
    shape = detect_shape(records, spec, field_name)
    examples: list[Example] = []
    class_names: list[str] = list(classes or [])
    index = {name: i for i, name in enumerate(class_names)}
    for position, record in enumerate(records):
        where = f'[{position}]'  # counted from 0, as the SDK counts train_data[i]
        if shape == Shape.LABELLED:
            name = str(_label_of(record))
            if name not in index:
                index[name] = len(class_names)
                class_names.append(name)
            examples.append(Example((to_item(record, where, field_name, base),), label=index[name]))
        elif shape == Shape.TEXT_IMAGE:
            examples.append(Example(_text_image_items(record, position, spec, field_name, base)))
        else:
            query, document = (to_item(chunk, where, field_name, base) for chunk in record.chunks)
            examples.append(Example((query, document), score=_score_of(record)))
    check_texts(examples, field_name)
    return Dataset(shape, examples, class_names, source=field_name)


def check_texts(examples: list[Example], field_name: str) -> None:
    """ConfigError when every text is empty; a warning in the log when most are."""
    texts = [item.text for example in examples for item in example.items if item.text is not None]
    report = empty_texts(texts)
    if report is None:
        return
    if report.all_empty:
        raise ConfigError(field_name, f'all {report.total} texts are empty (or only spaces); give each item its text')
    log.warning(
        '%s: %d of %d texts are empty (or only spaces); empty texts all embed alike and teach the model nothing',
        field_name,
        report.empty,
        report.total,
    )


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``fraction`` of the examples (per class for labelled data, so every class stays)."""
    if not fraction:
        return dataset, None
    rng = random.Random(seed)
    if dataset.shape == Shape.LABELLED:
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, example in enumerate(dataset.examples):
            by_class[example.label or 0].append(i)
        held: list[int] = []
        for indices in by_class.values():
            rng.shuffle(indices)
            held.extend(indices[: round(len(indices) * fraction)])
    else:
        indices = list(range(len(dataset)))
        rng.shuffle(indices)
        held = indices[: round(len(indices) * fraction)]
    held_set = set(held)
    kept = [i for i in range(len(dataset)) if i not in held_set]
    if not held or not kept:
        raise ConfigError(
            'valSplit', f'valSplit {fraction} of {len(dataset)} examples leaves an empty training or validation set'
        )
    return dataset.subset(kept), dataset.subset(sorted(held))


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


ONE_PASS = 'pass'  # an epoch is one pass over the data
LARGEST_CLASS = 'largest-class'  # an epoch is as long as the largest class needs (the older behaviour)


class ClassBalancedBatches:
    """Batches of ``classes_per_batch`` class groups of ``per_class`` items each.

    A class's items are shuffled and cut into groups of ``per_class`` (the last group topped up with
    other items of the class; a class smaller than ``per_class`` repeats its items). Every item is in
    a batch of every epoch. Deterministic per (seed, epoch). Two ways to size an epoch:

    - ``epoch='pass'`` (the default): one pass over the data. The epoch has
      ``ceil(groups / classes_per_batch)`` batches, so it holds each item once plus the few repeats
      that fill groups and batches. A class's groups are spread over the epoch's batches, one per batch
      while it has no more groups than there are batches; a class larger than that (one that holds
      more than a batch's share of the data) puts a group in every batch and a second one in some. The
      epoch is lengthened only so that no class fills a whole batch: every batch holds at least two
      classes. Batch places left over are filled with groups of other classes (repeats).
    - ``epoch='largest-class'``: every batch holds ``classes_per_batch`` distinct classes, and the epoch
      lasts until the largest class has given all its groups: max(largest class's groups,
      ceil(all groups / classes_per_batch)) batches. Small classes repeat across batches to fill the
      places the large ones leave; on unbalanced data an epoch is then several passes (262 sentences in
      10 classes: 24 batches of 32, where one pass is 9).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        per_class: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        epoch: str = ONE_PASS,
    ):
        if lengths is not None and len(lengths) != len(labels):
            raise ValueError(f'{len(lengths)} lengths for {len(labels)} examples')
        if epoch not in (ONE_PASS, LARGEST_CLASS):
            raise ValueError(f'epoch must be {ONE_PASS!r} or {LARGEST_CLASS!r}, got {epoch!r}')
        self.lengths = list(lengths) if lengths is not None else None
        self.by_class: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            self.by_class[label].append(i)
        self.per_class = max(1, min(per_class, batch_size))
        self.classes_per_batch = max(1, min(batch_size // self.per_class, len(self.by_class)))
        self.num_items = len(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.mode = epoch
        groups = [math.ceil(len(indices) / self.per_class) for indices in self.by_class.values()]
        largest, spread = max(groups, default=1), math.ceil(sum(groups) / self.classes_per_batch)
        if epoch == LARGEST_CLASS:
            self.length = max(largest, spread, 1)
        else:  # no class may fill a whole batch: at most classes_per_batch - 1 of its groups per batch
            others = self.classes_per_batch - 1 if len(groups) > 1 and self.classes_per_batch > 1 else 0
            self.length = max(spread, math.ceil(largest / others) if others else 1, 1)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _group(self, indices: list[int], rng: random.Random) -> list[int]:
        if len(indices) >= self.per_class:
            return rng.sample(indices, self.per_class)
        return indices + rng.choices(indices, k=self.per_class - len(indices))

    def _queues(self, rng: random.Random) -> dict[int, list[list[int]]]:
        """Every class's items, shuffled, in groups of ``per_class`` (the last one topped up)."""
        queues: dict[int, list[list[int]]] = {}
        for label, indices in self.by_class.items():
            pool = indices[:]
            rng.shuffle(pool)
            short = -len(pool) % self.per_class
            if short:
                last = set(pool[-(len(pool) % self.per_class) :])
                others = [i for i in indices if i not in last]
                pool += rng.sample(others, short) if len(others) >= short else rng.choices(indices, k=short)
            queues[label] = [pool[i : i + self.per_class] for i in range(0, len(pool), self.per_class)]
        return queues

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        queues = self._queues(rng)
        if self.mode == LARGEST_CLASS:
            batches = self._largest_class_batches(queues, rng)
        else:
            batches = self._one_pass_batches(queues, rng)
        rng.shuffle(batches)
        if self.lengths is not None:
            yield from self._length_grouped(batches, rng, self.lengths)
            return
        for batch in batches:
            yield [i for _, group in batch for i in group]

    def _one_pass_batches(
        self, queues: dict[int, list[list[int]]], rng: random.Random
    ) -> list[list[tuple[int, list[int]]]]:
        """Every group in one of ``length`` batches: classes largest first, each putting its groups in
        the batches with the most room (random among equals). That keeps the batches within one group of
        each other, so none overflows, and a class's groups land in distinct batches while it has no
        more groups than batches. The room left is filled with groups of classes not yet in the batch."""
        count = self.length
        batches: list[list[tuple[int, list[int]]]] = [[] for _ in range(count)]
        load = [0] * count
        by_load: dict[int, list[int]] = {0: list(range(count))}
        for label in sorted(queues, key=lambda label: (-len(queues[label]), rng.random())):
            groups = queues[label]
            full, rest = divmod(len(groups), count)
            if full:  # a class with more groups than batches: some in every batch
                load = [n + full for n in load]
                by_load = defaultdict(list)
                for b, n in enumerate(load):
                    by_load[n].append(b)
            chosen = [b for _ in range(full) for b in range(count)] + _least_loaded(by_load, load, rest, rng)
            for b, group in zip(chosen, groups, strict=True):
                batches[b].append((label, group))
        for batch in batches:
            present = {label for label, _ in batch}
            spare = [label for label in self.by_class if label not in present]
            room = max(0, self.classes_per_batch - len(batch))
            for label in rng.sample(spare, min(room, len(spare))):
                batch.append((label, self._group(self.by_class[label], rng)))
        return batches

    def _largest_class_batches(
        self, queues: dict[int, list[list[int]]], rng: random.Random
    ) -> list[list[tuple[int, list[int]]]]:
        """Each batch takes one group from each of the classes with the most groups left, which uses all
        groups in the fewest batches of distinct classes; when fewer classes than a batch needs have
        groups left, the free places get extra groups drawn from other classes."""
        # A max-heap on groups left; the random second key breaks ties differently every epoch.
        heap = [(-len(groups), rng.random(), label) for label, groups in queues.items()]
        heapq.heapify(heap)
        batches: list[list[tuple[int, list[int]]]] = []  # per batch: (class, its group)
        while heap:
            taken = [heapq.heappop(heap) for _ in range(min(self.classes_per_batch, len(heap)))]
            chosen = {label for _, _, label in taken}
            batch = [(label, queues[label].pop()) for _, _, label in taken]
            spare = [label for label in self.by_class if label not in chosen]
            for label in rng.sample(spare, self.classes_per_batch - len(taken)):
                batch.append((label, self._group(self.by_class[label], rng)))
            batches.append(batch)
            for left, tie, label in taken:
                if left + 1 < 0:
                    heapq.heappush(heap, (left + 1, tie, label))
        return batches

    def _length_grouped(
        self, batches: list[list[tuple[int, list[int]]]], rng: random.Random, lengths: list[int]
    ) -> Iterator[list[int]]:
        """The same batches (same classes, same items per class over the epoch) with every class's
        items dealt out longest first along the batch order, so every class puts its long items in
        the early batches and its short ones in the late batches and a batch pads to a length close
        to its own texts'. A random jitter of +-25% on the length key changes which items share a
        group from epoch to epoch. The batch with the longest item goes first, the rest shuffled."""
        slots: dict[int, list[list[int]]] = defaultdict(list)
        for batch in batches:
            for label, group in batch:
                slots[label].append(group)
        for groups in slots.values():
            items = sorted((i for group in groups for i in group), key=lambda i: -lengths[i] * rng.uniform(0.75, 1.25))
            for group in groups:
                group[:] = items[: len(group)]
                items = items[len(group) :]
        flat = [[i for _, group in batch for i in group] for batch in batches]
        if len(flat) > 1:
            first = flat.pop(max(range(len(flat)), key=lambda b: max(lengths[i] for i in flat[b])))
            rng.shuffle(flat)
            flat.insert(0, first)
        yield from flat


def _least_loaded(by_load: dict[int, list[int]], load: list[int], count: int, rng: random.Random) -> list[int]:
    """``count`` distinct batches of the lowest load (random among equals), their load then raised by one.
    ``by_load`` maps a load to its batches and is kept up to date."""
    picked: list[int] = []
    for level in sorted(by_load):
        bucket = by_load[level]
        while bucket and len(picked) < count:
            i = rng.randrange(len(bucket))
            bucket[i], bucket[-1] = bucket[-1], bucket[i]
            picked.append(bucket.pop())
        if len(picked) == count:
            break
    for b in picked:
        load[b] += 1
        by_load.setdefault(load[b], []).append(b)
    return picked


class RandomBatches:
    """Shuffled batches; a last batch of one example is dropped (in-batch negatives need two).

    With ``lengths`` (one per example, e.g. characters of text) batches are *length-grouped*: the
    shuffled order is cut into windows of ``window`` batches, each window sorted by length and cut into
    batches, and the batch order shuffled, so a batch pads to a length close to its own texts' (the
    idea of Hugging Face's ``group_by_length``). The batch holding the longest example goes first, so a
    batch that does not fit in memory fails at step one, not hours in. Every example is still in
    exactly one batch per epoch; which examples share a batch still changes every epoch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        window: int = 50,
        keys: Sequence[frozenset[Any]] | None = None,
        multiple: int = 1,
    ):
        """``multiple``: the world size under DDP. A batch made smaller by a clash (``keys``) keeps a
        multiple of it where it can (its last examples move on to the next batch), because every
        process takes an equal share of a global batch and the rest would be left out of the epoch."""
        for name, values in (('lengths', lengths), ('keys', keys)):
            if values is not None and len(values) != size:
                raise ValueError(f'{len(values)} {name} for {size} examples')
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.keys = list(keys) if keys is not None else None
        self.window = max(1, window)
        self.multiple = max(1, multiple)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.keys is not None:  # clashes can add batches: count this epoch's
            return sum(1 for _ in self) or 1
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest >= 2 else 0) or 1

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.size))
        rng = random.Random(self.seed * 100003 + self.epoch)
        rng.shuffle(order)
        if self.lengths is not None:
            batches = list(self._grouped(order, rng, self.lengths))
        else:
            batches = [order[start : start + self.batch_size] for start in range(0, self.size, self.batch_size)]
        if self.keys is not None:
            batches = self._without_duplicates(batches, self.keys)
        for batch in batches:
            if len(batch) >= 2 or self.size < 2:
                yield batch

    def _without_duplicates(self, batches: list[list[int]], keys: list[frozenset[Any]]) -> list[list[int]]:
        """The batches with no content twice in a batch (``keys``: what each example holds). A clash is
        a false negative for in-batch-negative losses: the same question paired with two answers would
        be pushed away from itself. An example that clashes moves to the next batch it fits in (so the
        batches keep their order and, when length-grouped, their lengths); what fits nowhere forms
        extra batches at the end, without clashes either."""
        out: list[list[int]] = []
        carried: list[int] = []
        for batch in batches:
            placed, carried = self._fill(carried + batch, keys)
            out.append(placed)
        while carried:
            placed, carried = self._fill(carried, keys)
            out.append(placed)
        if len(out) > 1 and len(out[-1]) == 1:  # a lone example joins a batch with room, if one fits it
            lone = out[-1][0]
            home = next(
                (b for b in out[:-1] if len(b) < self.batch_size and all(keys[lone].isdisjoint(keys[i]) for i in b)),
                None,
            )
            if home is not None:
                home.append(out.pop()[0])
        return out

    def _fill(self, candidates: list[int], keys: list[frozenset[Any]]) -> tuple[list[int], list[int]]:
        """(a batch of the first candidates that clash with nothing before them, the rest in order)."""
        placed: list[int] = []
        seen: set[Any] = set()
        waiting: list[int] = []
        for i in candidates:
            if len(placed) < self.batch_size and keys[i].isdisjoint(seen):
                placed.append(i)
                seen |= keys[i]
            else:
                waiting.append(i)
        extra = len(placed) % self.multiple
        if extra and waiting and len(placed) > extra:  # the rest would be cut from an uneven global batch
            placed, waiting = placed[:-extra], placed[-extra:] + waiting
        return placed, waiting

    def _grouped(self, order: list[int], rng: random.Random, lengths: list[int]) -> Iterator[list[int]]:
        span = self.window * self.batch_size
        ranked: list[int] = []
        for start in range(0, len(order), span):
            ranked += sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches = [ranked[start : start + self.batch_size] for start in range(0, len(ranked), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches.pop()
        if len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
            first = batches.pop(longest)
            rng.shuffle(batches)
            batches.insert(0, first)
        yield from batches


def content_keys(dataset: Dataset) -> list[frozenset[Any]] | None:
    """What each example of pairs or text-image data holds (its texts, and a digest of its images and
    tensors), for batches without the same content twice; None for other shapes."""
    if dataset.shape not in (Shape.PAIRS, Shape.TEXT_IMAGE):
        return None

    def key(item: Item) -> Any:
        if item.text is not None:
            return ('text', item.text)
        if item.image is not None:
            return ('image', hashlib.sha1(item.image).digest())
        return ('tensor', id(item.tensor))

    return [frozenset(key(item) for item in example.items) for example in dataset.examples]


def text_lengths(dataset: Dataset) -> list[int] | None:
    """Characters of text per example (all its text items together), or None when no example holds
    text: the key for length-grouped batches."""
    lengths = [sum(len(item.text) for item in example.items if item.text is not None) for example in dataset.examples]
    return lengths if any(lengths) else None
