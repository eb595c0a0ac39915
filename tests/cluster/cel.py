"""CEL for ``x-kubernetes-validations``, as kube-apiserver evaluates it, on Google's cel-cpp (``cel-expr-python``).

Kubernetes' rules are CEL with cel-go's extended string library, optionals and Kubernetes' own libraries
(https://kubernetes.io/docs/reference/using-api/cel/). Of those, this module offers:

- the standard language and macros (``has``, ``all``, ``exists``, ``exists_one``, ``map``, ``filter``),
  ``matches``, ``size``, timestamps and durations: cel-cpp itself;
- the extended strings library (``lowerAscii``, ``split``, ``join``, ``indexOf``, ``replace``, ``substring``,
  ``trim``, ...) and optionals (``self.?field``, ``orValue``, ``hasValue``): cel-cpp's extensions;
- Kubernetes' regex library (``find``, ``findAll``), list library (``isSorted``, ``sum``, ``min``, ``max``)
  and the predicates ``isURL`` and ``isQuantity``: implemented below.

Not offered: the ``url()``, ``quantity()``, ``ip()``, ``cidr()``, ``format`` and ``semver`` value types, and
the cost estimator (a real server refuses a CRD whose rules it estimates too costly; here every rule runs).
Rules are type-checked against ``dyn`` variables rather than the schema's declared types, so a rule that
reads an undeclared field fails when evaluated ("no such key"), not when the CRD is created.

Values are converted from JSON the way ``UnstructuredToVal`` does (apiserver/pkg/cel/common/values.go):
``number`` fields become doubles even when written as integers, and a ``null`` in an object with
properties counts as absent (``has()`` is false).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from cel_expr_python import cel
from cel_expr_python.ext import ext_optional, ext_strings

QUANTITY = re.compile(r'^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?$')


class CelError(Exception):
    """A rule that does not compile, or whose evaluation failed (``no such key``, overflow, ...)."""


def _find(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    return match.group(0) if match else ''


def _find_all(text: str, pattern: str) -> list[str]:
    return [m.group(0) for m in re.finditer(pattern, text)]


def _find_all_limit(text: str, pattern: str, limit: int) -> list[str]:
    found = _find_all(text, pattern)
    return found if limit < 0 else found[:limit]


def _is_url(text: str) -> bool:
    """Kubernetes' ``isURL``: an absolute URI or an absolute path (Go's url.ParseRequestURI)."""
    if not text or ' ' in text:
        return False
    if text.startswith('/'):
        return True
    parts = urlsplit(text)
    return bool(parts.scheme) and re.fullmatch(r'[A-Za-z][A-Za-z0-9+.-]*', parts.scheme) is not None


def _is_sorted(items: list[Any]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(items))


def _sum(items: list[Any]) -> Any:
    return sum(items) if items else 0


def _min(items: list[Any]) -> Any:
    if not items:
        raise ValueError('min called on empty list')
    return min(items)


def _max(items: list[Any]) -> Any:
    if not items:
        raise ValueError('max called on empty list')
    return max(items)


def _overload(name: str, ret: Any, params: list[Any], impl: Any, member: bool = True) -> Any:
    return cel.Overload(name, ret, params, is_member=member, impl=impl)


def _kubernetes_library() -> list[Any]:
    s, b, i, dyn_list = cel.Type.STRING, cel.Type.BOOL, cel.Type.INT, cel.Type.List(cel.Type.DYN)
    return [
        cel.FunctionDecl('find', [_overload('string_find_string', s, [s, s], _find)]),
        cel.FunctionDecl(
            'findAll',
            [
                _overload('string_find_all_string', cel.Type.List(s), [s, s], _find_all),
                _overload('string_find_all_string_int', cel.Type.List(s), [s, s, i], _find_all_limit),
            ],
        ),
        cel.FunctionDecl('isURL', [_overload('is_url_string', b, [s], _is_url, member=False)]),
        cel.FunctionDecl(
            'isQuantity', [_overload('is_quantity_string', b, [s], lambda v: QUANTITY.match(v) is not None, False)]
        ),
        cel.FunctionDecl('isSorted', [_overload('list_is_sorted', b, [dyn_list], _is_sorted)]),
        cel.FunctionDecl('sum', [_overload('list_sum', cel.Type.DYN, [dyn_list], _sum)]),
        cel.FunctionDecl('min', [_overload('list_min', cel.Type.DYN, [dyn_list], _min)]),
        cel.FunctionDecl('max', [_overload('list_max', cel.Type.DYN, [dyn_list], _max)]),
    ]


@lru_cache(maxsize=1)
def _environment() -> Any:
    return cel.NewEnv(
        variables={'self': cel.Type.DYN, 'oldSelf': cel.Type.DYN},
        functions=_kubernetes_library(),
        extensions=[ext_strings.ExtStrings(), ext_optional.ExtOptional()],
    )


@dataclass(frozen=True)
class Program:
    """One compiled expression and whether it reads ``oldSelf`` (a transition rule)."""

    source: str
    compiled: Any
    uses_old_self: bool

    def evaluate(self, self_value: Any, old_self: Any = None) -> Any:
        data = {'self': self_value}
        if self.uses_old_self:
            data['oldSelf'] = old_self
        try:
            value = self.compiled.eval(data=data)
        except RuntimeError as e:  # cel-cpp raises for values it cannot represent
            raise CelError(_clean(str(e))) from e
        if value.type() == cel.Type.ERROR:
            raise CelError(_clean(str(value.value())))
        return value.plain_value()


def _clean(message: str) -> str:
    """cel-cpp prefixes errors with a status code (``NOT_FOUND: ``); cel-go does not."""
    return re.sub(r'^[A-Z_]+: ', '', message.strip())


@lru_cache(maxsize=512)
def compile_rule(source: str) -> Program:
    """Compile ``source`` once (rules are shared by every object of a CRD); CelError when it does not parse."""
    try:
        compiled = _environment().compile(source)
    except RuntimeError as e:
        raise CelError(_clean(str(e))) from e
    return Program(source, compiled, re.search(r'\boldSelf\b', source) is not None)


def to_cel(value: Any, schema: dict[str, Any] | None) -> Any:
    """A JSON value as CEL sees it under ``schema`` (numbers as doubles, null properties absent)."""
    if value is None or schema is None:
        return value
    kind = schema.get('type')
    if kind == 'number' and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        properties = schema.get('properties')
        if properties is not None:
            return {
                key: to_cel(item, properties.get(key))
                for key, item in value.items()
                if not (item is None and key in properties)
            }
        extra = schema.get('additionalProperties')
        if isinstance(extra, dict):
            return {key: to_cel(item, extra) for key, item in value.items()}
        return value
    if isinstance(value, list):
        items = schema.get('items')
        return [to_cel(item, items if isinstance(items, dict) else None) for item in value]
    return value
