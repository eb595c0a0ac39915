"""What kube-apiserver's apiextensions does to a custom resource on every write, in the same words.

Written from the Kubernetes documentation ("Extend the Kubernetes API with CustomResourceDefinitions":
https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/) and its
sources (staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/{schema,validation}, kube-openapi's
validate package and apimachinery's field errors). In order, for a create or an update:

1. ``metadata`` keeps only ObjectMeta's fields; unknown fields are **pruned** everywhere the schema does not
   say ``x-kubernetes-preserve-unknown-fields``; ``fieldValidation`` decides what happens to them: Strict
   refuses the request (400, ``strict decoding error: unknown field "spec.x"``), Warn (the default) answers
   with a ``Warning`` header per field, Ignore drops them silently;
2. ``default``\\ s are filled in where a field is absent (or null without ``nullable``);
3. the **structural schema** is checked: types (``integer`` accepts a whole float, ``number`` an integer),
   ``nullable``, ``x-kubernetes-int-or-string``, ``required``, ``enum``, ``minimum``/``maximum`` (and their
   exclusive forms), ``multipleOf``, ``minLength``/``maxLength``, ``pattern``, ``minItems``/``maxItems``,
   ``minProperties``/``maxProperties``;
4. ``x-kubernetes-validations`` CEL rules (see :mod:`tests.cluster.cel`), transition rules (``oldSelf``)
   only on updates and only where an old value exists, ``fieldPath``, ``reason``, ``message`` and
   ``messageExpression``.

Errors are ``field.Error``\\ s rendered as apimachinery renders them (``spec.epochs: Invalid value: -1:
spec.epochs in body should be greater than or equal to 1``) and gathered into a 422 ``Invalid`` Status with
``details.causes``, which is what kubectl prints for a real cluster. Not emulated: validation ratcheting of
unchanged fields, ``optionalOldSelf``, ``x-kubernetes-list-type`` map/set semantics, formats.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

OBJECT_META_FIELDS = frozenset(
    'name generateName namespace selfLink uid resourceVersion generation creationTimestamp deletionTimestamp '
    'deletionGracePeriodSeconds labels annotations ownerReferences finalizers managedFields'.split()
)
FIELD_VALIDATION = ('Strict', 'Warn', 'Ignore')


# --- Go's formatting, so that messages read exactly like the real server's ---------------------------


def go_float(value: float) -> str:
    """``fmt.Sprintf("%v", float64)``: the shortest digits, in exponent form when the exponent is below -4
    or from 6 up (strconv's rule for the shortest 'g' format): 0.5, 1e-05, 123456, 1e+06."""
    if math.isinf(value) or math.isnan(value):
        return {True: '+Inf', False: '-Inf'}[value > 0] if math.isinf(value) else 'NaN'
    if value == 0:
        return '0'
    sign = '-' if value < 0 else ''
    mantissa, _, exponent = f'{abs(value)!r}'.partition('e')
    whole, _, fraction = mantissa.partition('.')
    digits = (whole + fraction).lstrip('0')
    point = len(whole) + (int(exponent) if exponent else 0)  # digits before the decimal point
    if whole == '0':  # 0.000123: the point sits before the fraction's leading zeros
        point = -(len(fraction) - len(fraction.lstrip('0'))) + (int(exponent) if exponent else 0)
    digits = digits.rstrip('0') or '0'
    power = point - 1
    if power < -4 or power >= 6:
        body = digits[0] + ('.' + digits[1:] if len(digits) > 1 else '')
        return f'{sign}{body}e{"-" if power < 0 else "+"}{abs(power):02d}'
    if power < 0:
        return f'{sign}0.{"0" * (-power - 1)}{digits}'
    padded = digits.ljust(power + 1, '0')
    rest = padded[power + 1 :]
    return f'{sign}{padded[: power + 1]}{"." + rest if rest else ""}'


def go_quote(text: str) -> str:
    """``strconv.Quote``: double quotes, Go escapes, printable Unicode kept."""
    return json.dumps(text, ensure_ascii=False)


def go_value(value: Any) -> str:
    """How ``field.Error`` prints a bad value: numbers and booleans plain, strings quoted, the rest as Go's %#v."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return go_quote(value)
    if value is None:
        return '"null"'  # ErrorBody prints a nil value as the string "null", quoted
    if isinstance(value, list):
        return '[]interface {}{' + ', '.join(_go_sharp(v) for v in value) + '}'
    return 'map[string]interface {}{' + ', '.join(f'{go_quote(k)}:{_go_sharp(v)}' for k, v in value.items()) + '}'


def _go_sharp(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return go_value(value)
    if isinstance(value, str):
        return go_quote(value)
    if value is None:
        return 'interface {}(nil)'
    return go_value(value)


# --- field errors ----------------------------------------------------------------------------------

_OMIT = object()
_LABELS = {
    'FieldValueRequired': 'Required value',
    'FieldValueInvalid': 'Invalid value',
    'FieldValueTypeInvalid': 'Invalid value',
    'FieldValueNotSupported': 'Unsupported value',
    'FieldValueForbidden': 'Forbidden',
    'FieldValueTooLong': 'Too long',
    'FieldValueTooMany': 'Too many',
    'FieldValueDuplicate': 'Duplicate value',
    'InternalError': 'Internal error',
}


@dataclass(frozen=True)
class FieldError:
    """apimachinery's ``field.Error``: a type, the field's path, the bad value and a detail."""

    type: str
    field: str
    value: Any = _OMIT
    detail: str = ''

    def body(self) -> str:
        """``ErrorBody()``: the message without the field (what a Status cause carries)."""
        label = _LABELS[self.type]
        if self.type in ('FieldValueRequired', 'FieldValueForbidden', 'FieldValueTooLong', 'InternalError'):
            text = label
        elif self.value is _OMIT:
            text = label
        else:
            text = f'{label}: {go_value(self.value)}'
        return f'{text}: {self.detail}' if self.detail else text

    def __str__(self) -> str:
        return f'{self.field}: {self.body()}'


def required(path: str, detail: str = '') -> FieldError:
    return FieldError('FieldValueRequired', path, '', detail)


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError('FieldValueInvalid', path, value, detail)


def not_supported(path: str, value: Any, allowed: list[Any]) -> FieldError:
    quoted = [go_quote(v) if isinstance(v, str) else json.dumps(v) for v in allowed]
    return FieldError('FieldValueNotSupported', path, value, 'supported values: ' + ', '.join(quoted))


def status_invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> dict[str, Any]:
    """``apierrors.NewInvalid``: the 422 Status, with one cause per error (duplicates dropped)."""
    unique: list[FieldError] = []
    for error in errors:
        if str(error) not in {str(e) for e in unique}:
            unique.append(error)
    texts = [str(e) for e in unique]
    joined = texts[0] if len(texts) == 1 else '[' + ', '.join(texts) + ']'
    qualified = f'{kind}.{group}' if group else kind
    return {
        'apiVersion': 'v1',
        'kind': 'Status',
        'metadata': {},
        'status': 'Failure',
        'message': f'{qualified} {go_quote(name)} is invalid: {joined}',
        'reason': 'Invalid',
        'details': {
            'name': name,
            'group': group,
            'kind': kind,
            'causes': [{'reason': e.type, 'message': e.body(), 'field': e.field} for e in unique],
        },
        'code': 422,
    }


# --- the structural schema --------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'boolean'
    if isinstance(value, int):
        return 'integer'
    if isinstance(value, float):
        return 'number'
    if isinstance(value, str):
        return 'string'
    if isinstance(value, list):
        return 'array'
    return 'object'


def _child(path: str, name: str) -> str:
    return f'{path}.{name}' if path else name


def _body_path(path: str) -> str:
    return path or '.'


def _type_errors(value: Any, schema: dict[str, Any], path: str) -> list[FieldError]:
    if schema.get('x-kubernetes-int-or-string'):
        allowed = ['integer', 'string']
    elif schema.get('type'):
        allowed = [schema['type']]
    else:
        return []
    actual = _json_type(value)
    if actual == 'null':
        if schema.get('nullable'):
            return []
    elif actual in allowed or (actual == 'integer' and 'number' in allowed):
        return []
    elif actual == 'number' and 'integer' in allowed and float(value).is_integer():
        return []
    detail = f'{_body_path(path)} in body must be of type {",".join(allowed)}: {go_quote(actual)}'
    return [FieldError('FieldValueTypeInvalid', path, actual, detail)]


def _string_errors(value: str, schema: dict[str, Any], path: str) -> list[FieldError]:
    errors = []
    where = f'{_body_path(path)} in body'
    if 'maxLength' in schema and len(value) > schema['maxLength']:
        errors.append(FieldError('FieldValueTooLong', path, value, f'may not be longer than {schema["maxLength"]}'))
    if 'minLength' in schema and len(value) < schema['minLength']:
        errors.append(invalid(path, value, f'{where} should be at least {schema["minLength"]} chars long'))
    if 'pattern' in schema and re.search(schema['pattern'], value) is None:
        errors.append(invalid(path, value, f"{where} should match '{schema['pattern']}'"))
    return errors


def _number_errors(value: float, schema: dict[str, Any], path: str) -> list[FieldError]:
    errors = []
    where = f'{_body_path(path)} in body'
    if 'multipleOf' in schema and (value / schema['multipleOf']) % 1 != 0:
        errors.append(invalid(path, value, f'{where} should be a multiple of {go_float(schema["multipleOf"])}'))
    if 'maximum' in schema:
        bound, exclusive = schema['maximum'], bool(schema.get('exclusiveMaximum'))
        if value > bound or (exclusive and value == bound):
            words = 'less than' if exclusive else 'less than or equal to'
            errors.append(invalid(path, value, f'{where} should be {words} {go_float(bound)}'))
    if 'minimum' in schema:
        bound, exclusive = schema['minimum'], bool(schema.get('exclusiveMinimum'))
        if value < bound or (exclusive and value == bound):
            words = 'greater than' if exclusive else 'greater than or equal to'
            errors.append(invalid(path, value, f'{where} should be {words} {go_float(bound)}'))
    return errors


def _array_errors(value: list[Any], schema: dict[str, Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if 'maxItems' in schema and len(value) > schema['maxItems']:
        errors.append(
            FieldError('FieldValueTooMany', path, len(value), f'must have at most {schema["maxItems"]} items')
        )
    if 'minItems' in schema and len(value) < schema['minItems']:
        errors.append(
            invalid(path, value, f'{_body_path(path)} in body should have at least {schema["minItems"]} items')
        )
    items = schema.get('items')
    if isinstance(items, dict):
        for index, item in enumerate(value):
            errors += validate_schema(item, items, f'{path}[{index}]')
    return errors


def _object_errors(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    where = f'{_body_path(path)} in body'
    if 'maxProperties' in schema and len(value) > schema['maxProperties']:
        errors.append(
            FieldError('FieldValueTooMany', path, len(value), f'must have at most {schema["maxProperties"]} items')
        )
    if 'minProperties' in schema and len(value) < schema['minProperties']:
        errors.append(invalid(path, value, f'{where} should have at least {schema["minProperties"]} properties'))
    for name in schema.get('required') or []:
        if name not in value:
            errors.append(required(_child(path, name)))
    properties = schema.get('properties') or {}
    for name, sub in properties.items():
        if name in value:
            errors += validate_schema(value[name], sub, _child(path, name))
    extra = schema.get('additionalProperties')
    if isinstance(extra, dict):
        for name, item in value.items():
            if name not in properties:
                errors += validate_schema(item, extra, _child(path, name))
    return errors


def validate_schema(value: Any, schema: dict[str, Any], path: str = '') -> list[FieldError]:
    """kube-openapi's SchemaValidator: type, string, enum, array, number and object checks, in that order."""
    errors = _type_errors(value, schema, path)
    if value is None:
        return errors
    if isinstance(value, str):
        errors += _string_errors(value, schema, path)
    if 'enum' in schema and value not in schema['enum']:
        errors.append(not_supported(path, value, schema['enum']))
    if isinstance(value, list):
        errors += _array_errors(value, schema, path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        errors += _number_errors(value, schema, path)
    if isinstance(value, dict):
        errors += _object_errors(value, schema, path)
    return errors


# --- pruning and defaulting -------------------------------------------------------------------------


def prune(value: Any, schema: dict[str, Any] | None, path: str, unknown: list[str], root: bool = False) -> Any:
    """Drop what the schema does not declare (pruning/algorithm.go); the dropped paths go to ``unknown``."""
    if schema is None:
        return value
    if isinstance(value, dict):
        properties = schema.get('properties')
        extra = schema.get('additionalProperties')
        keep_all = schema.get('x-kubernetes-preserve-unknown-fields') is True
        result = {}
        for key, item in value.items():
            if root and key in ('apiVersion', 'kind', 'metadata'):
                result[key] = item
            elif properties is not None and key in properties:
                result[key] = prune(item, properties[key], _child(path, key), unknown)
            elif isinstance(extra, dict):
                result[key] = prune(item, extra, _child(path, key), unknown)
            elif keep_all or extra is True:
                result[key] = item
            else:
                unknown.append(_child(path, key))
        return result
    if isinstance(value, list) and isinstance(schema.get('items'), dict):
        return [prune(item, schema['items'], f'{path}[{i}]', unknown) for i, item in enumerate(value)]
    return value


def apply_defaults(value: Any, schema: dict[str, Any] | None) -> Any:
    """Fill ``default``\\ s of absent properties, also inside items and maps (defaulting/algorithm.go)."""
    if schema is None:
        return value
    if isinstance(value, dict):
        properties = schema.get('properties') or {}
        for name, sub in properties.items():
            missing = name not in value or (value[name] is None and not sub.get('nullable'))
            if missing and 'default' in sub:
                value[name] = copy.deepcopy(sub['default'])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
        extra = schema.get('additionalProperties')
        if isinstance(extra, dict):
            for name in value:
                if name not in properties:
                    value[name] = apply_defaults(value[name], extra)
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        return [apply_defaults(item, schema['items']) for item in value]
    return value


def coerce_metadata(obj: dict[str, Any], unknown: list[str]) -> None:
    """Keep only ObjectMeta's fields in ``metadata`` (objectmeta/coerce.go), noting the rest as unknown."""
    meta = obj.get('metadata')
    if not isinstance(meta, dict):
        return
    for key in [k for k in meta if k not in OBJECT_META_FIELDS]:
        unknown.append(f'metadata.{key}')
        del meta[key]


# --- CEL rules ---------------------------------------------------------------------------------------


@dataclass
class RuleContext:
    errors: list[FieldError] = field(default_factory=list)


def _rule_path(path: str, field_path: str | None) -> str:
    if not field_path:
        return path
    if field_path.startswith('['):
        return path + field_path
    return _child(path, field_path.removeprefix('.'))


def _rule_error(rule: dict[str, Any], path: str, schema_type: str, detail: str) -> FieldError:
    reason = rule.get('reason')
    if reason == 'FieldValueForbidden':
        return FieldError('FieldValueForbidden', path, '', detail)
    if reason == 'FieldValueRequired':
        return required(path, detail)
    if reason == 'FieldValueDuplicate':
        return FieldError('FieldValueDuplicate', path, schema_type)
    return invalid(path, schema_type, detail)


def _cel_message(error: Exception) -> str:
    text = str(error)
    if match := re.match(r'Key not found in map : "(.*)"', text):
        return f'no such key: {match.group(1)}'
    if text.startswith('No matching overloads found'):
        return 'no such overload'
    return text


def _evaluate_rules(
    value: Any, old: Any, schema: dict[str, Any], path: str, root: bool, errors: list[FieldError]
) -> None:
    from tests.cluster import cel

    rules = schema.get('x-kubernetes-validations') or []
    if not rules or value is None:
        return
    view = cel_view(value, schema, root)
    old_view = cel_view(old, schema, root) if old is not None else None
    schema_type = schema.get('type', 'object')
    for rule in rules:
        program = cel.compile_rule(rule['rule'])
        if program.uses_old_self and old is None:
            continue  # transition rules run only when there is an old value to compare with
        message = (rule.get('message') or '').strip() or f'failed rule: {rule["rule"].strip()}'
        try:
            passed = program.evaluate(view, old_view)
        except cel.CelError as e:
            what = (rule.get('message') or '').strip() or rule['rule'].strip()
            errors.append(invalid(path, schema_type, f'{_cel_message(e)} evaluating rule: {what}'))
            continue
        if passed is True:
            continue
        if rule.get('messageExpression'):
            try:
                evaluated = cel.compile_rule(rule['messageExpression']).evaluate(view, old_view)
                if isinstance(evaluated, str) and evaluated.strip():
                    message = evaluated.strip()
            except cel.CelError:
                pass
        errors.append(_rule_error(rule, _rule_path(path, rule.get('fieldPath')), schema_type, message))


def cel_view(value: Any, schema: dict[str, Any], root: bool = False) -> Any:
    """The value a rule sees as ``self``: at a resource's root only metadata.name and generateName."""
    from tests.cluster import cel

    converted = cel.to_cel(value, schema)
    if root and isinstance(converted, dict):
        meta = value.get('metadata') or {}
        converted = {**converted, 'metadata': {k: meta[k] for k in ('name', 'generateName') if k in meta}}
    return converted


def validate_rules(
    value: Any, old: Any, schema: dict[str, Any] | None, path: str = '', root: bool = True
) -> list[FieldError]:
    """Every ``x-kubernetes-validations`` rule on the way down (cel/validation.go), old values by key."""
    errors: list[FieldError] = []
    if schema is None or value is None or not _subtree_has_rules(schema):
        return errors
    _evaluate_rules(value, old, schema, path, root, errors)
    if isinstance(value, dict):
        properties = schema.get('properties') or {}
        old_map = old if isinstance(old, dict) else {}
        for name, sub in properties.items():
            if name in value and (name != 'metadata' or not root):
                errors += validate_rules(value[name], old_map.get(name), sub, _child(path, name), False)
        extra = schema.get('additionalProperties')
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in properties:
                    errors += validate_rules(item, old_map.get(name), extra, _child(path, name), False)
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        for index, item in enumerate(value):
            errors += validate_rules(item, None, schema['items'], f'{path}[{index}]', False)
    return errors


_RULES_BELOW: dict[int, tuple[Any, bool]] = {}  # id(schema node) -> (the node, kept alive; has rules below)


def _subtree_has_rules(schema: dict[str, Any]) -> bool:
    """Whether ``schema`` or a node under it has rules (memoised: a CRD's schema lives as long as its kind)."""
    known = _RULES_BELOW.get(id(schema))
    if known is None or known[0] is not schema:
        known = (schema, '"x-kubernetes-validations"' in json.dumps(schema))
        _RULES_BELOW[id(schema)] = known
    return known[1]


def compile_errors(schema: dict[str, Any], path: str) -> list[FieldError]:
    """CRD admission: every rule must compile (``spec.versions[i].schema.openAPIV3Schema...rule``)."""
    from tests.cluster import cel

    errors: list[FieldError] = []
    for index, rule in enumerate(schema.get('x-kubernetes-validations') or []):
        for key in ('rule', 'messageExpression'):
            if rule.get(key):
                try:
                    cel.compile_rule(rule[key])
                except cel.CelError as e:
                    where = f'{path}.x-kubernetes-validations[{index}].{key}'
                    errors.append(invalid(where, rule[key], f'compilation failed: {e}'))
    for name, sub in (schema.get('properties') or {}).items():
        errors += compile_errors(sub, f'{path}.properties[{name}]')
    if isinstance(schema.get('items'), dict):
        errors += compile_errors(schema['items'], f'{path}.items')
    if isinstance(schema.get('additionalProperties'), dict):
        errors += compile_errors(schema['additionalProperties'], f'{path}.additionalProperties')
    return errors


# --- all of it, as one admission step ------------------------------------------------------------------


class StrictDecodingError(Exception):
    """Unknown fields under ``fieldValidation=Strict``: the real server answers 400 BadRequest."""

    def __init__(self, kind: str, version: str, unknown: list[str]):
        fields = ', '.join(f'unknown field {go_quote(p)}' for p in unknown)
        super().__init__(
            f'{kind} in version {go_quote(version)} cannot be handled as a {kind}: strict decoding error: {fields}'
        )


@dataclass
class Admitted:
    obj: dict[str, Any]
    warnings: list[str]
    errors: list[FieldError]


def admit(
    obj: dict[str, Any],
    old: dict[str, Any] | None,
    schema: dict[str, Any],
    *,
    kind: str,
    version: str,
    field_validation: str = 'Warn',
) -> Admitted:
    """Prune, default and validate ``obj`` (an update when ``old`` is given) against the CRD's schema."""
    unknown: list[str] = []
    coerce_metadata(obj, unknown)
    pruned = prune(obj, schema, '', unknown, root=True)
    unknown = sorted(set(unknown), key=unknown.index)
    if unknown and field_validation == 'Strict':
        raise StrictDecodingError(kind, version, unknown)
    warnings = [f'unknown field {go_quote(p)}' for p in unknown] if field_validation == 'Warn' else []
    apply_defaults(pruned, schema)
    checked = {k: v for k, v in pruned.items() if k != 'metadata'}
    errors = validate_schema(checked, {**schema, 'properties': _without_metadata(schema)}, '')
    if any(e.type in BLOCKING for e in errors):
        errors.append(invalid('<nil>', None, RULES_NOT_CHECKED))
    else:
        errors += validate_rules(pruned, old, schema)
    return Admitted(pruned, warnings, errors)


# Errors after which the CEL rules are not run (registry/customresource/strategy.go: hasBlockingErr).
BLOCKING = (
    'FieldValueNotSupported',
    'FieldValueRequired',
    'FieldValueTooLong',
    'FieldValueTooMany',
    'FieldValueTypeInvalid',
)
RULES_NOT_CHECKED = (
    'some validation rules were not checked because the object was invalid; '
    'correct the existing errors to complete validation'
)


def _without_metadata(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (schema.get('properties') or {}).items() if k != 'metadata'}
