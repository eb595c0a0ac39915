"""``finetuner.mine_hard_negatives``: explicit negatives for (query, document) pairs, on this machine.

::

    tuples = finetuner.mine_hard_negatives(pairs, model='sentence-transformers/all-MiniLM-L6-v2', num_negatives=3)
    run = finetuner.fit(model='sentence-transformers/all-MiniLM-L6-v2', train_data=tuples,
                        loss='MultipleNegativesRankingLoss')

The options and their meaning are sentence-transformers' ``util.mine_hard_negatives`` (the contract's
:class:`~finetuner.api.mining.HardNegativeOptions`). The result is a list of
:class:`~finetuner.api.layout.Record` n-tuples (a parent whose chunks are the query, its document and
the negatives, closest first; with ``output_scores`` each document chunk carries its score), which
``fit()``, ``push_data()`` and ``to_legacy_documents`` take as they are.

This runs here, with the trainer's code (``pip install 'kube-finetuner[trainer]'``). To mine on the
cluster's GPUs instead, give the pairs to ``fit(..., hard_negatives={...})``: the trainer pod mines
with the pretrained model before training.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from finetuner.api.layout import Record
from finetuner.api.mining import HardNegativeOptions
from finetuner.data import Modalities, resolve, to_records
from finetuner.errors import ArgumentError
from finetuner.models import _trainer_module


def snake(name: str) -> str:
    """camelCase (the contract's field names) as snake_case (the SDK's arguments)."""
    return re.sub(r'([A-Z])', lambda m: f'_{m.group(1).lower()}', name)


def options_from_arguments(arguments: dict[str, Any]) -> HardNegativeOptions:
    """The contract's options from keyword arguments; an ArgumentError naming the first bad one."""
    try:
        return HardNegativeOptions.model_validate({k: v for k, v in arguments.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = [snake(str(part)) for part in first['loc']]
        message = first['msg'].removeprefix('Value error, ').replace('Input should be', 'must be')
        words = re.findall(r'\b[a-z]+[A-Z]\w*\b', message)
        argument = '.'.join(loc) if loc else snake(words[0]) if words else 'num_negatives'
        for word in words:
            message = message.replace(word, snake(word))
        return _raise(
            argument, message if loc or first['type'] == 'value_error' else f'{message} (got {first["input"]!r})'
        )


def _raise(argument: str, message: str) -> Any:
    raise ArgumentError(argument, message)


def pair_records(pairs: Any) -> list[Record]:
    """The (query, document) pairs given in any form fit() takes; ArgumentError naming ``pairs``."""
    ref = resolve(pairs, 'pairs')
    if not ref.needs_upload:
        raise ArgumentError(
            'pairs',
            f'{ref.reference!r} is a reference the trainer reads; mine local data (finetuner.pull_data(name) gives a '
            "pushed dataset's records), or pass hard_negatives={...} to fit() to mine on the cluster",
        )
    records = ref.records or []
    for i, record in enumerate(records):
        if len(record.chunks) != 2:
            what = f'{len(record.chunks)} chunks' if record.chunks else 'no chunks (a single item)'
            raise ArgumentError(
                f'pairs[{i}]', f'has {what}; mining takes (query, document) pairs: a record with two chunks'
            )
    return records


def corpus_records(corpus: Any) -> list[Record] | None:
    """Extra candidate documents: strings, records or documents (not pairs)."""
    if corpus is None:
        return None
    if isinstance(corpus, (str, bytes)) or not hasattr(corpus, '__iter__'):
        raise ArgumentError(
            'corpus', f'must be a list of documents (strings, Records or docarray documents), got {corpus!r}'[:200]
        )
    records = to_records(list(corpus), 'corpus', Modalities())
    for i, record in enumerate(records):
        if record.chunks:
            raise ArgumentError(f'corpus[{i}]', 'has chunks; the corpus holds single documents (text or an image)')
    return records


@contextmanager
def progress_bar(show: bool) -> Iterator[Any]:
    """A rich progress bar fed by the trainer's (stage, done, total) reports."""
    if not show:
        yield lambda stage, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield report


def load_model(model: Any, device: str) -> Any:
    """The embedding model: a catalog name, a Hugging Face id or folder (any os.PathLike), or a model
    from finetuner.get_model()."""
    if hasattr(model, 'embed') and hasattr(model, 'output_dim'):
        return model
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ArgumentError(
            'model',
            'give a backbone name (see finetuner.describe_models()), a model folder, or a '
            'model from finetuner.get_model()',
        )
    from finetuner.api.v1alpha1 import FinetuneRunSpec

    models = _trainer_module('finetuner_trainer.models')
    errors = _trainer_module('finetuner_trainer.errors')
    try:
        embedder = models.build_embedder(FinetuneRunSpec(model=model, train_data='mining'))
    except errors.ConfigError as e:
        raise ArgumentError('model', e.problem) from e
    return embedder.to(device)


def mine_hard_negatives(
    pairs: Any,
    corpus: Any = None,
    *,
    model: Any,
    num_negatives: int = 3,
    range_min: int = 0,
    range_max: int | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    sampling_strategy: str = 'top',
    cross_encoder: str | os.PathLike[str] | None = None,
    output_format: str = 'n-tuple',
    output_scores: bool = False,
    search: str = 'auto',
    batch_size: int = 64,
    seed: int = 0,
    device: str = 'cpu',
    show_progress: bool = True,
) -> list[Record]:
    """Add hard negatives to (query, document) pairs: n-tuples (or triplets) for ``fit()``.

    Args:
        pairs: (query, document) pairs in any form fit() takes: docarray documents with two chunks, Records or
            dicts (sentence-transformers columns too: ``{"anchor": ..., "positive": ...}``), a CSV or JSONL file.
        corpus: more candidate documents besides the pairs' own (strings, Records, documents).
        model: the embedding model that ranks candidates: a backbone name, a Hugging Face id or folder, or a model
            from finetuner.get_model().
        num_negatives: negatives per pair.
        range_min: skip this many of the closest candidates (they may be unlabelled positives).
        range_max: consider only this many of the closest candidates (default: room for num_negatives, more when a
            margin or score bound filters candidates).
        absolute_margin: keep a candidate only when its score is below the positive's minus this (``margin`` is
            sentence-transformers' older name of it).
        relative_margin: keep a candidate only when its score is below positive - abs(positive) x this.
        max_score: skip candidates scoring above this. min_score: skip those below this.
        sampling_strategy: 'top' (the closest candidates left) or 'random' (drawn among them, with ``seed``).
        cross_encoder: a cross-encoder (Hugging Face id or folder) that rescores candidates and positives.
        output_format: 'n-tuple' (one record per pair with all its negatives; pairs without enough are left out) or
            'triplet' (one record per negative found).
        output_scores: give each document chunk its score (scored tuples, for MarginMSELoss).
        search: 'exact', 'faiss' (an approximate HNSW index) or 'auto' (faiss past ``finetuner.api.mining.EXACT_LIMIT``
            documents).
        batch_size: texts embedded or pairs scored per batch. device: where the models run ('cpu', 'cuda').
        show_progress: draw a progress bar.

    Returns:
        A list of :class:`~finetuner.Record`: parents whose chunks are (query, document, negative_1, ...).

    Raises:
        ArgumentError: a bad argument, named (empty pairs, records that are not pairs, a window that cannot hold
            num_negatives, a model that is not a cross-encoder, ...).
    """
    if margin is not None and absolute_margin is not None:
        raise ArgumentError('margin', 'is the older name of absolute_margin; give only absolute_margin')
    options = options_from_arguments(
        {
            'num_negatives': num_negatives,
            'range_min': range_min,
            'range_max': range_max,
            'absolute_margin': absolute_margin if margin is None else margin,
            'relative_margin': relative_margin,
            'max_score': max_score,
            'min_score': min_score,
            'sampling_strategy': sampling_strategy,
            'cross_encoder': os.fspath(cross_encoder) if cross_encoder is not None else None,
            'output_format': output_format,
            'output_scores': output_scores,
            'search': search,
            'batch_size': batch_size,
            'seed': seed,
        }
    )
    records = pair_records(pairs)
    extra = corpus_records(corpus)
    return _mine(records, extra, load_model(model, device), options, device, show_progress)


def _mine(
    records: list[Record],
    corpus: list[Record] | None,
    embedder: Any,
    options: HardNegativeOptions,
    device: str,
    show_progress: bool,
) -> list[Record]:
    mining = _trainer_module('finetuner_trainer.mining')
    data = _trainer_module('finetuner_trainer.data')
    errors = _trainer_module('finetuner_trainer.errors')
    cross_encoders = _trainer_module('finetuner_trainer.cross_encoder')
    try:
        queries = [data.to_item(r.chunks[0], f'pairs[{i}].chunks[0]', 'pairs') for i, r in enumerate(records)]
        positives = [data.to_item(r.chunks[1], f'pairs[{i}].chunks[1]', 'pairs') for i, r in enumerate(records)]
        documents = [data.to_item(r, f'corpus[{i}]', 'corpus') for i, r in enumerate(corpus)] if corpus else None
        scorer = None
        if options.cross_encoder is not None:
            scorer = cross_encoders.CrossEncoderScorer.load(options.cross_encoder, 'crossEncoder', device)
        with progress_bar(show_progress) as report:
            rows, _ = mining.mine_hard_negatives(embedder, queries, positives, options, documents, scorer, report)
    except errors.ConfigError as e:
        raise ArgumentError(snake(e.field), e.problem) from e
    return [_record(row, options.output_scores) for row in rows]


def _record(row: Any, scores: bool) -> Record:
    chunks = [item_record(row.query)]
    for position, item in enumerate([row.positive, *row.negatives]):
        chunk = item_record(item)
        chunks.append(chunk.model_copy(update={'score': row.scores[position]}) if scores else chunk)
    return Record(chunks=chunks)


def item_record(item: Any) -> Record:
    """A trainer Item (text, image bytes or tensor) as a Record."""
    import base64

    if item.text is not None:
        return Record(text=item.text)
    if item.image is not None:
        return Record(blob=base64.b64encode(item.image).decode())
    tensor = item.tensor
    return Record(tensor=tensor.tolist() if hasattr(tensor, 'tolist') else list(tensor))
