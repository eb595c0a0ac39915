"""Kubernetes resource quantities, as far as the operator computes with them (per-GPU defaults).

Only the forms the contract accepts (``QUANTITY_PATTERN``: a decimal number with an optional
``m``, ``k``, ``M``, ``G``, ``T``, ``Ki``, ``Mi``, ``Gi`` or ``Ti`` suffix) are read.
"""

from __future__ import annotations

import re
from decimal import Decimal

SUFFIXES: dict[str, Decimal] = {
    '': Decimal(1),
    'm': Decimal('0.001'),
    'k': Decimal(10**3),
    'M': Decimal(10**6),
    'G': Decimal(10**9),
    'T': Decimal(10**12),
    'Ki': Decimal(2**10),
    'Mi': Decimal(2**20),
    'Gi': Decimal(2**30),
    'Ti': Decimal(2**40),
}
_FORM = re.compile(r'^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$')
_BINARY = ('Ti', 'Gi', 'Mi', 'Ki')


def _split(quantity: str) -> tuple[Decimal, str]:
    match = _FORM.match(quantity.strip())
    if match is None:
        raise ValueError(f'{quantity!r} is not a Kubernetes quantity; write e.g. "4", "500m" or "16Gi"')
    return Decimal(match.group(1)), match.group(2) or ''


def value(quantity: str) -> Decimal:
    """The quantity as a plain number (bytes, or cores)."""
    number, suffix = _split(quantity)
    return number * SUFFIXES[suffix]


def _plain(number: Decimal) -> str:
    text = format(number.normalize(), 'f')
    return text.rstrip('0').rstrip('.') if '.' in text else text


def times(quantity: str, factor: int) -> str:
    """``quantity`` times ``factor``, in the quantity's own unit (``16Gi`` x 4 = ``64Gi``)."""
    number, suffix = _split(quantity)
    return _plain(number * factor) + suffix


def of_bytes(amount: Decimal) -> str:
    """An amount of bytes in the largest binary unit that divides it (else plain bytes)."""
    whole = int(amount)
    for suffix in _BINARY:
        unit = int(SUFFIXES[suffix])
        if whole >= unit and whole % unit == 0:
            return f'{whole // unit}{suffix}'
    return str(whole)


def smaller(first: str, second: str) -> str:
    return first if value(first) <= value(second) else second
