"""Finetuner's CSV data format, read the same way by the SDK (before upload) and by the trainer.

Rows are ``item,label`` when ``csvOptions.isLabeled``, else ``query,document``; a third numeric
column is a similarity score (an empty one is none; a score makes the row a scored pair even when
labelled). Under a header row naming a negative column (``anchor,positive,negative`` or
``negative_1..n``, sentence-transformers' conventions), or with four or more columns, rows are
(query, document, negatives...) tuples (:mod:`finetuner.api.columns`). The dialect is sniffed
unless given, a header row is skipped, blank rows are ignored, then ``samplingRate`` and ``size``
apply. How a cell becomes content (text, an image path, image bytes) is the caller's choice: the SDK
can inline local images, the trainer resolves paths against the data's location.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable
from typing import Any

from finetuner.api.columns import ColumnError, csv_rows_to_records, is_tuple_header
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import CSVOptions

HEADER_WORDS = ('text', 'query', 'item', 'image', 'anchor', 'sentence', 'uri', 'path', 'question')


class CSVFormatError(ValueError):
    """A row that does not fit the format; the message names the row and what is expected."""


def csv_rows(text: str, options: CSVOptions) -> list[list[str]]:
    return csv_table(text, options)[1]


def csv_table(text: str, options: CSVOptions) -> tuple[list[str] | None, list[list[str]]]:
    """(the header row or None, the data rows) of a CSV text."""
    if options.dialect == 'auto':
        try:
            dialect: Any = csv.Sniffer().sniff(text[:8192], delimiters=',\t;|')
        except csv.Error:
            dialect = csv.excel
    else:
        dialect = options.dialect
    rows = [row for row in csv.reader(io.StringIO(text), dialect) if any(cell.strip() for cell in row)]
    header = None
    if rows and rows[0] and rows[0][0].strip().lower() in HEADER_WORDS:
        header, rows = rows[0], rows[1:]
    if options.sampling_rate is not None:
        rng = random.Random(0)
        rows = [row for row in rows if rng.random() < options.sampling_rate]
    if options.size is not None:
        rows = rows[: options.size]
    return header, rows


def parse_csv_text(
    text: str,
    options: CSVOptions,
    content: Callable[[str], dict[str, Any]],
    text_modality: str | None = None,
    image_modality: str | None = None,
) -> list[Record]:
    """Records of a CSV text; ``content(cell)`` gives a cell's Record fields (text, uri or blob)."""
    header, rows = csv_table(text, options)
    if (header is not None and is_tuple_header(header)) or (header is None and any(len(row) >= 4 for row in rows)):
        try:
            return csv_rows_to_records(header if header is not None else None, rows, content)
        except ColumnError as e:
            raise CSVFormatError(str(e)) from e
    records = []
    for number, row in enumerate(rows, 1):
        if len(row) not in (2, 3):
            raise CSVFormatError(
                f'CSV row {number} has {len(row)} columns; expected 2 (item,label or query,document), 3 (with a '
                'score), or a header row anchor,positive,negative[_1,...] for tuples with negatives'
            )
        score: float | None = None
        if len(row) == 3 and row[2].strip():  # an empty third cell is no score
            try:
                score = float(row[2])
            except ValueError as e:
                raise CSVFormatError(
                    f'CSV row {number}: the third column {row[2]!r} is not a number; for (anchor, positive, '
                    'negative) triplets give a header row anchor,positive,negative'
                ) from e
        first = content(row[0])
        if options.is_labeled and score is None:
            records.append(Record(**first, label=row[1].strip()))
            continue
        chunks = []
        for fields in (first, content(row[1])):
            modality = text_modality if 'text' in fields else image_modality
            chunks.append(Record(**fields, modality=modality))
        records.append(Record(chunks=chunks, score=score))
    return records
