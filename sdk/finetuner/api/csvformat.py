"""Finetuner's CSV data format, read the same way by the SDK (before upload) and by the trainer.

Rows are ``item,label`` when ``csvOptions.isLabeled``, else ``query,document``; a third numeric
column is a similarity score (an empty one is none; a score makes the row a scored pair even when
labelled). Blank rows are ignored, then ``samplingRate`` and ``size`` apply. How a cell becomes
content (text, an image path, image bytes) is the caller's choice: the SDK can inline local images,
the trainer resolves paths against the data's location.

What is not given is decided from the file, and every decision is reported (:class:`CSVRead`'s
``notes``; the trainer logs them, the SDK logs them at INFO):

- **delimiter**: ``csvOptions.delimiter``, else the dialect's, else sniffed among ``, TAB ; |``.
  When several of them split every row into the same 2 or 3 columns (a ``;`` file whose texts hold
  one comma each), labelled data takes the one whose label column has the fewest distinct values;
  otherwise the ambiguity is a warning naming the option.
- **header**: ``csvOptions.header`` true or false, else detected: a first row whose every cell is a
  usual column name (``text``, ``label``, ``title``, ``category``, ``question``, ``answer``,
  ``sentence1``, ``image_path``, ...), or one the csv module's ``Sniffer.has_header`` recognises
  (a column whose type or length the first row does not share).
- a ``text,label`` file read as pairs (``isLabeled`` false) whose second column holds a few short
  values, repeated, gets a warning: they look like class names.
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic.alias_generators import to_camel

from finetuner.api.datachecks import looks_like_labels
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import CSVOptions

DELIMITERS = ',\t;|'
SNIFF_BYTES = 64 * 1024
# Words of usual column names: a first row made only of these is a header.
COLUMN_WORDS = frozenset(
    'a anchor answer answers b body caption captions categories category class classes content context '
    'description doc docs document documents file filename hypothesis id image images img input item items '
    'label labels name negative neg output passage passages path paths pos positive premise prompt query '
    'queries question questions relevance response score scores sentence sentences similarity tag tags target '
    'text texts title uri url'.split()
)


class CSVFormatError(ValueError):
    """A row that does not fit the format; the message names the row and what is expected."""


def spec_option(key: str) -> str:
    """How a CSV option is named in a FinetuneRun spec (the trainer's messages)."""
    return f'csvOptions.{to_camel(key)}'


@dataclass
class CSVRead:
    """The records of a CSV text and what was decided reading it."""

    records: list[Record]
    notes: list[str] = field(default_factory=list)  # decisions: delimiter, header (log them)
    warnings: list[str] = field(default_factory=list)  # what may not be what the user meant


def _show(value: str) -> str:
    return {'\t': 'TAB'}.get(value, repr(value))


def _split(text: str, dialect: Any, limit: int | None = None) -> list[list[str]]:
    rows = []
    for row in csv.reader(io.StringIO(text), dialect):
        if any(cell.strip() for cell in row):
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _with(dialect: Any, **overrides: str) -> type[csv.Dialect]:
    """A dialect class: ``dialect`` with some attributes replaced."""
    names = ('delimiter', 'quotechar', 'escapechar', 'doublequote', 'skipinitialspace', 'lineterminator', 'quoting')
    attributes = {name: getattr(dialect, name) for name in names}
    attributes.update(overrides)
    return type('CSVDialect', (csv.Dialect,), attributes)


def _consistent(sample: str, dialect: Any, delimiter: str, header_apart: bool) -> list[list[str]] | None:
    """The sample's rows split by ``delimiter`` when every row (but the first, with ``header_apart``)
    has the same 2 or 3 columns."""
    try:
        rows = _split(sample, _with(dialect, delimiter=delimiter), limit=200)
    except csv.Error:
        return None
    widths = {len(row) for row in (rows[1:] if header_apart else rows) or rows}
    return rows if len(widths) == 1 and widths <= {2, 3} else None


def _distinct_labels(rows: list[list[str]]) -> int:
    return len({row[1].strip() for row in rows})


def _choose_delimiter(sample: str, options: CSVOptions, option: Callable[[str], str], read: CSVRead) -> Any:
    """The dialect to read with (see the module's docstring), noting how it was chosen."""
    if options.dialect != 'auto':
        dialect: Any = csv.get_dialect(options.dialect)
        if options.delimiter or options.quotechar:
            overrides = {'delimiter': options.delimiter, 'quotechar': options.quotechar}
            dialect = _with(dialect, **{k: v for k, v in overrides.items() if v})
        return dialect
    try:
        sniffed: Any = csv.Sniffer().sniff(sample, delimiters=options.delimiter or DELIMITERS)
    except csv.Error:
        sniffed = csv.excel
    if options.quotechar:
        sniffed = _with(sniffed, quotechar=options.quotechar)
    if options.delimiter:
        return _with(sniffed, delimiter=options.delimiter)
    # Delimiters giving every row the same 2 or 3 columns; failing any, every row but a first (header) one.
    fitting = {d: rows for d in DELIMITERS if (rows := _consistent(sample, sniffed, d, False)) is not None}
    if not fitting:
        fitting = {d: rows for d in DELIMITERS if (rows := _consistent(sample, sniffed, d, True)) is not None}
    chosen = sniffed.delimiter
    if fitting and chosen not in fitting:
        chosen = next(iter(fitting))
    if len(fitting) > 1:
        names = ' and '.join(_show(d) for d in fitting)
        counts = {d: _distinct_labels(rows) for d, rows in fitting.items()}
        if options.is_labeled and list(counts.values()).count(min(counts.values())) == 1:
            chosen = min(counts, key=lambda d: counts[d])
            read.notes.append(
                f'CSV: {names} both split every row into the same columns; {_show(chosen)} gives the fewest '
                f'distinct labels, so cells are split at {_show(chosen)} (set {option("delimiter")} to choose)'
            )
        else:
            read.warnings.append(
                f'CSV: {names} both split every row into the same columns; cells are split at {_show(chosen)}: '
                f'set {option("delimiter")} if the file uses another'
            )
    read.notes.append(f'CSV: cells split at {_show(chosen)} (sniffed from the file)')
    return _with(sniffed, delimiter=chosen)


def _column_names(row: list[str]) -> bool:
    """Every cell is a usual column name: words of :data:`COLUMN_WORDS`, each with at most one digit
    after it, joined by spaces, ``_``, ``-`` or ``.`` (``text``, ``Question``, ``sentence1``,
    ``image_path``; not ``item 0`` or ``class-0``)."""
    for cell in row:
        parts = re.split(r'[\s_.-]+', cell.strip().lower())
        if len(cell.strip()) > 40 or not all(_column_word(part) for part in parts):
            return False
    return True


def _column_word(part: str) -> bool:
    match = re.fullmatch(r'([a-z]+)\d?', part)
    return match is not None and match.group(1) in COLUMN_WORDS


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _numeric_header(rows: list[list[str]]) -> bool:
    """A column of numbers (a score) whose first cell is not one."""
    sample = rows[1:21]
    for column in range(len(rows[0])):
        cells = [row[column].strip() for row in sample if len(row) > column and row[column].strip()]
        name = rows[0][column].strip() if len(rows[0]) > column else ''
        if cells and all(_is_number(cell) for cell in cells) and name and not _is_number(name):
            return True
    return False


def _sniffed_header(sample: str, dialect: Any) -> bool:
    """The csv module's ``Sniffer.has_header`` on the sample, read with ``dialect`` (not re-sniffed).
    Asked only with 5 rows or more after the first: it votes by columns whose every cell has one
    length, which on two or three rows happens by chance."""

    class Fixed(csv.Sniffer):
        def sniff(self, sample: str, delimiters: str | None = None) -> Any:
            return dialect

    try:
        return Fixed().has_header(sample)
    except (csv.Error, ValueError, IndexError):
        return False


def _decide_header(
    rows: list[list[str]], sample: str, dialect: Any, options: CSVOptions, option: Callable[[str], str], read: CSVRead
) -> bool:
    first = rows[0] if rows else []
    if options.header is not None:
        said = 'a header and skipped' if options.header else 'data'
        given = str(options.header).lower()
        read.notes.append(f'CSV: the first row {first} is read as {said} ({option("header")} is {given})')
        return options.header
    if _column_names(first):
        reason = 'its cells are column names'
    elif len(rows) > 1 and _numeric_header(rows):
        reason = 'a column of numbers starts with a name'
    elif len(rows) > 5 and _sniffed_header(sample, dialect):
        reason = "the csv module's Sniffer found a header"
    else:
        read.notes.append(
            f'CSV: the first row {first} is read as data (no header detected; set {option("header")} to true '
            'if it names the columns)'
        )
        return False
    read.notes.append(
        f'CSV: the first row {first} is read as a header and skipped ({reason}; set {option("header")} to false '
        'to read it as data)'
    )
    return True


def read_rows(
    text: str, options: CSVOptions, option: Callable[[str], str] = spec_option
) -> tuple[list[list[str]], CSVRead]:
    """The data rows of a CSV text (header and blank rows dropped, sampling and size applied)."""
    read = CSVRead(records=[])
    sample = text[:SNIFF_BYTES]
    dialect = _choose_delimiter(sample, options, option, read)
    rows = _split(text, dialect)
    if rows and _decide_header(rows, sample, dialect, options, option, read):
        rows = rows[1:]
    if options.sampling_rate is not None:
        rng = random.Random(0)
        rows = [row for row in rows if rng.random() < options.sampling_rate]
    if options.size is not None:
        rows = rows[: options.size]
    return rows, read


def _label_warning(rows: list[list[str]], options: CSVOptions, option: Callable[[str], str]) -> str | None:
    """A warning when pairs (isLabeled false) have a second column of class names."""
    if options.is_labeled or not rows or any(len(row) != 2 for row in rows):
        return None
    labels = looks_like_labels([row[1] for row in rows], [row[0].strip() for row in rows])
    if labels is None:
        return None
    shown = ', '.join(repr(label) for label in labels[:5]) + (', ...' if len(labels) > 5 else '')
    return (
        f'CSV: the second column holds {len(labels)} distinct short values over {len(rows)} rows ({shown}), like '
        f'class labels, but {option("is_labeled")} is false, so every row trains as a (query, document) pair; '
        f'set {option("is_labeled")} to true if they are labels'
    )


def read_csv_text(
    text: str,
    options: CSVOptions,
    content: Callable[[str], dict[str, Any]],
    text_modality: str | None = None,
    image_modality: str | None = None,
    option: Callable[[str], str] = spec_option,
) -> CSVRead:
    """Records of a CSV text, with what was decided; ``content(cell)`` gives a cell's Record fields
    (text, uri or blob); ``option(name)`` how the caller names a CSV option in its messages."""
    rows, read = read_rows(text, options, option)
    warning = _label_warning(rows, options, option)
    if warning:
        read.warnings.append(warning)
    for number, row in enumerate(rows, 1):
        if len(row) not in (2, 3):
            raise CSVFormatError(
                f'CSV row {number} has {len(row)} columns; expected 2 (item,label or query,document) or 3'
            )
        score: float | None = None
        if len(row) == 3 and row[2].strip():  # an empty third cell is no score
            try:
                score = float(row[2])
            except ValueError as e:
                raise CSVFormatError(f'CSV row {number}: the third column {row[2]!r} is not a number') from e
        first = content(row[0])
        if options.is_labeled and score is None:
            read.records.append(Record(**first, label=row[1].strip()))
            continue
        chunks = []
        for fields in (first, content(row[1])):
            modality = text_modality if 'text' in fields else image_modality
            chunks.append(Record(**fields, modality=modality))
        read.records.append(Record(chunks=chunks, score=score))
    return read


def parse_csv_text(
    text: str,
    options: CSVOptions,
    content: Callable[[str], dict[str, Any]],
    text_modality: str | None = None,
    image_modality: str | None = None,
) -> list[Record]:
    """Records of a CSV text (:func:`read_csv_text` without what was decided)."""
    return read_csv_text(text, options, content, text_modality, image_modality).records


def decode_csv(data: bytes, encoding: str) -> str:
    """The text of CSV bytes; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped."""
    import codecs

    if codecs.lookup(encoding).name == 'utf-8':
        encoding = 'utf-8-sig'
    return data.decode(encoding)
