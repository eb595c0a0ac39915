"""Rows in sentence-transformers' column conventions, read as dataset records.

sentence-transformers gives a training example as named columns whose *order* says what each is:
(anchor, positive), (anchor, positive, negative) triplets, (anchor, positive, negative_1, ...,
negative_n) n-tuples, plus a label column (``label`` or ``score``, or ``scores`` as its
``mine_hard_negatives(output_scores=True)`` writes them). This module turns such a row (a JSON
object, or a CSV row under a header row) into a :class:`~finetuner.api.layout.Record`: a parent whose
chunks are the columns in order, the first the query.

- two text columns and a number: a scored pair (``score`` on the parent);
- three or more text columns: an n-tuple (query, document, negatives); ``scores`` (one per document)
  sets each document chunk's ``score``; a ``label``/``score`` margin (MarginMSE's label, one per
  negative) sets the positive's score to 0 and each negative's to minus its margin, which keeps every
  margin ``score(positive) - score(negative)`` as given.

Both the SDK (before upload) and the trainer read rows with these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from finetuner.api.layout import Record

RECORD_KEYS = frozenset({'text', 'uri', 'blob', 'tensor', 'chunks'})  # a JSON object with one is a Record
LABEL_COLUMNS = ('label', 'score')  # a pair's score, or MarginMSE's margin(s)
SCORES_COLUMN = 'scores'  # a score per document: [positive, negative_1, ...]
TUPLE_HEADER_WORDS = ('negative', 'neg', 'hard_negative')  # a CSV header naming a negative column makes tuple rows


class ColumnError(ValueError):
    """A row that does not fit the column conventions; the message says what is expected."""


def is_column_row(row: Any) -> bool:
    """Whether a JSON object is a row of named columns (not a Record): no Record content key and at
    least two text columns."""
    if not isinstance(row, dict) or RECORD_KEYS & set(row):
        return False
    return sum(1 for key, value in row.items() if isinstance(value, str) and key not in LABEL_COLUMNS) >= 2


def _number(value: Any, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ColumnError(f'column {column!r} must be a number, got {value!r}')
    try:
        return float(value)
    except ValueError as e:
        raise ColumnError(f'column {column!r} must be a number, got {value!r}') from e


def _numbers(value: Any, column: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [_number(v, column) for v in value]
    return [_number(value, column)]


def document_scores(texts: int, label: Any = None, scores: Any = None) -> list[float] | None:
    """The score of each document (every column after the first) from a ``scores`` list or a margin
    ``label``; None when the row gives neither."""
    documents = texts - 1
    if scores is not None:
        values = _numbers(scores, SCORES_COLUMN)
        if len(values) != documents:
            raise ColumnError(
                f'{SCORES_COLUMN!r} has {len(values)} values for {documents} documents; give one score per column '
                'after the first (positive, then each negative)'
            )
        return values
    if label is None:
        return None
    margins = _numbers(label, 'label')
    if len(margins) != documents - 1:
        raise ColumnError(
            f'the label has {len(margins)} margin(s) for {documents - 1} negative(s); MarginMSE labels are '
            'score(query, positive) - score(query, negative), one per negative column'
        )
    return [0.0, *(-m for m in margins)]


def row_to_record(
    columns: Sequence[tuple[str, Any]], content: Callable[[str], dict[str, Any]] = lambda cell: {'text': cell}
) -> Record:
    """A Record from (column name, value) in column order; ``content(cell)`` gives a text cell's Record
    fields (CSV cells may be image paths)."""
    texts = [(name, value) for name, value in columns if name not in (*LABEL_COLUMNS, SCORES_COLUMN)]
    named = dict(columns)
    bad = [name for name, value in texts if not isinstance(value, str)]
    if bad:
        raise ColumnError(f'column {bad[0]!r} must hold text, got {named[bad[0]]!r}')
    if len(texts) < 2:
        raise ColumnError(f'{len(texts)} text column(s); a row needs at least two (anchor, positive[, negative, ...])')
    label = next((named[c] for c in LABEL_COLUMNS if named.get(c) not in (None, '')), None)
    scores_value = named.get(SCORES_COLUMN)
    chunks = [Record(**content(value)) for _, value in texts]
    if len(texts) == 2:
        if scores_value not in (None, ''):
            raise ColumnError(f'{SCORES_COLUMN!r} belongs to tuples with negatives; a pair takes "score" or "label"')
        return Record(chunks=chunks, score=None if label is None else _number(label, 'score'))
    scores = document_scores(len(texts), label, None if scores_value in (None, '') else scores_value)
    if scores is not None:
        chunks = [chunks[0], *(c.model_copy(update={'score': s}) for c, s in zip(chunks[1:], scores, strict=True))]
    return Record(chunks=chunks)


def json_row_to_record(row: dict[str, Any]) -> Record:
    """A JSON object in column form (see :func:`is_column_row`) as a Record."""
    return row_to_record(list(row.items()))


def is_tuple_header(header: Sequence[str]) -> bool:
    """Whether a CSV header row names a negative column (anchor,positive,negative[_1,...])."""
    names = [cell.strip().lower() for cell in header]
    return len(names) >= 3 and any(name.startswith(TUPLE_HEADER_WORDS) for name in names[2:])


def csv_rows_to_records(
    header: Sequence[str] | None, rows: Sequence[Sequence[str]], content: Callable[[str], dict[str, Any]]
) -> list[Record]:
    """Tuple rows of a CSV file (under a header naming the columns, or with no header and at least four
    columns, all content) as Records. ``scores`` cells hold numbers separated by ``;`` or spaces."""
    names = [cell.strip().lower() for cell in header] if header else None
    records = []
    for number, row in enumerate(rows, 1):
        if names is not None and len(row) != len(names):
            raise ColumnError(f'CSV row {number} has {len(row)} columns under a header of {len(names)}')
        if names is None and len(row) != len(rows[0]):
            raise ColumnError(
                f'CSV row {number} has {len(row)} columns and row 1 has {len(rows[0])}; tuple rows (query, document, '
                'negatives) have the same columns in every row'
            )
        keys = names or [f'column_{i}' for i in range(len(row))]
        cells: list[tuple[str, Any]] = []
        for key, cell in zip(keys, row, strict=True):
            values = cell.replace(';', ' ').split()
            is_list = key == SCORES_COLUMN or (key in LABEL_COLUMNS and len(values) > 1)
            cells.append((key, values if is_list else cell.strip()))
        try:
            records.append(row_to_record(cells, content))
        except ColumnError as e:
            raise ColumnError(f'CSV row {number}: {e}') from e
    return records
