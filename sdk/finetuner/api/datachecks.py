"""Checks of data that the SDK (before anything is uploaded) and the trainer share.

- :func:`image_problem`: a cheap look at an encoded image's header and size, without decoding it
  (the SDK has no image library): an empty file, or a PNG, JPEG, BMP, WebP, GIF or TIFF file cut
  short, gets a sentence; anything else passes (the trainer decodes and checks every image).
- :func:`empty_text_problem`: all texts empty is an error; most of them empty a warning.
- :func:`looks_like_labels`: a column of few distinct short values, repeated: class names.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _png_problem(data: bytes) -> str | None:
    """Walk the chunks (length, type, data, CRC) until IEND: a file that ends first is cut short."""
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack('>I4s', data[offset : offset + 8])
        offset += 12 + length
        if offset > len(data):
            name = kind.decode('latin-1')
            return f'a PNG cut short: its {name!r} chunk needs {offset} bytes, the file has {len(data)}'
        if kind == b'IEND':
            return None
    return f'a PNG cut short after {len(data)} bytes (no IEND chunk)'


def _jpeg_problem(data: bytes) -> str | None:
    """Walk the marker segments to the image data (SOS); an end-of-image marker must follow it."""
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return f'a JPEG with a broken header (no marker at byte {offset})'
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        length = struct.unpack('>H', data[offset + 2 : offset + 4])[0]
        if marker == 0xDA:  # start of scan: the entropy-coded data follows, then EOI
            if data.rfind(b'\xff\xd9') < offset + 2 + length:
                return f'a JPEG cut short after {len(data)} bytes (no end-of-image marker after its image data)'
            return None
        offset += 2 + length
    return f'a JPEG cut short after {len(data)} bytes (its header ends before the image data)'


def _riff_problem(data: bytes) -> str | None:
    declared = struct.unpack('<I', data[4:8])[0] + 8
    if declared > len(data):
        return f'a WebP cut short: its header declares {declared} bytes, the file has {len(data)}'
    return None


def _bmp_problem(data: bytes) -> str | None:
    declared = struct.unpack('<I', data[2:6])[0]
    if declared > len(data):
        return f'a BMP cut short: its header declares {declared} bytes, the file has {len(data)}'
    return None


TIFF_DATA_TAGS = {273: 279, 324: 325}  # StripOffsets -> StripByteCounts, TileOffsets -> TileByteCounts
TIFF_TYPES = {3: 'H', 4: 'I'}  # SHORT, LONG


def _tiff_values(data: bytes, order: str, entry: int) -> list[int]:
    """The values of a TIFF directory entry of SHORT or LONG numbers (inline or at their offset)."""
    kind, count = struct.unpack(order + 'HI', data[entry + 2 : entry + 8])
    code = TIFF_TYPES.get(kind)
    if code is None:
        return []
    size = struct.calcsize(code) * count
    start = entry + 8 if size <= 4 else struct.unpack(order + 'I', data[entry + 8 : entry + 12])[0]
    if start + size > len(data):
        return []
    return list(struct.unpack(f'{order}{count}{code}', data[start : start + size]))


def _tiff_problem(data: bytes) -> str | None:
    """The first directory must be in the file, and so must the end of every strip (or tile) it lists."""
    order = '<' if data[:2] == b'II' else '>'
    ifd = struct.unpack(order + 'I', data[4:8])[0]
    if ifd + 2 > len(data):
        return f'a TIFF cut short: its first directory is at byte {ifd}, the file has {len(data)}'
    entries = struct.unpack(order + 'H', data[ifd : ifd + 2])[0]
    if ifd + 2 + 12 * entries > len(data):
        return f'a TIFF cut short inside its first directory (at byte {ifd})'
    found = {}
    for i in range(entries):
        entry = ifd + 2 + 12 * i
        found[struct.unpack(order + 'H', data[entry : entry + 2])[0]] = entry
    for offsets, counts in TIFF_DATA_TAGS.items():
        if offsets in found and counts in found:
            pieces = zip(
                _tiff_values(data, order, found[offsets]), _tiff_values(data, order, found[counts]), strict=False
            )
            end = max((start + size for start, size in pieces), default=0)
            if end > len(data):
                return f'a TIFF cut short: its image data ends at byte {end}, the file has {len(data)}'
    return None


def image_problem(data: bytes) -> str | None:
    """Why ``data`` cannot be a whole image (empty, or a known format cut short), or None."""
    if not data:
        return 'the image is empty (0 bytes)'
    if data.startswith(PNG_SIGNATURE[: min(len(data), 8)]) and data[:1] == b'\x89':
        return _png_problem(data) if len(data) >= 8 else f'a PNG cut short after {len(data)} bytes'
    if data[:2] == b'\xff\xd8':
        return _jpeg_problem(data)
    if data[:4] == b'RIFF' and data[8:12] == b'WEBP':
        return _riff_problem(data)
    if data[:2] == b'BM' and len(data) >= 6:
        return _bmp_problem(data)
    if data[:6] in (b'GIF87a', b'GIF89a') and len(data) < 14:
        return f'a GIF cut short after {len(data)} bytes'
    if data[:4] in (b'II*\x00', b'MM\x00*') and len(data) >= 8:
        return _tiff_problem(data)
    return None


@dataclass(frozen=True)
class EmptyTexts:
    empty: int
    total: int

    @property
    def all_empty(self) -> bool:
        return self.empty == self.total


def empty_texts(texts: Sequence[str]) -> EmptyTexts | None:
    """How many texts are empty (or only whitespace), when over half of them are; None otherwise."""
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if not texts or 2 * len(empty) <= len(texts):
        return None
    return EmptyTexts(len(empty), len(texts))


def looks_like_labels(values: Sequence[str], others: Sequence[str]) -> list[str] | None:
    """The distinct values of a column (most common first) when they look like class names: at least
    4 rows, at most half as many distinct values as rows and fewer than the other column has, every
    value short (at most 4 words, 40 characters). None otherwise."""
    cleaned = [value.strip() for value in values]
    counts = Counter(cleaned)
    if len(cleaned) < 4 or 2 * len(counts) > len(cleaned) or len(counts) >= len(set(others)):
        return None
    if any(len(value) > 40 or len(value.split()) > 4 or not value for value in counts):
        return None
    return [value for value, _ in counts.most_common()]
