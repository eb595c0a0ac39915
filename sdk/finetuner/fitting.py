"""What ``finetuner.fit`` does before a run exists: its arguments, checked and turned into a spec.

fit()'s arguments are the contract's spec fields (:class:`~finetuner.api.v1alpha1.FinetuneRunSpec`)
under their snake_case names, plus what is genuinely the SDK's own (:data:`SDK_ARGUMENTS`):
the run's name, data given as documents, files or folders (uploaded before the run is submitted;
the spec only holds its URI), callbacks given as objects, and the older generation of Finetuner's
arguments (``cpu``, ``scheduler_step``, ``gpus``, ``nodes``). fit()'s signature, its docstring and
the CLI's ``finetuner fit`` flags are generated from the fields and their descriptions: a new spec
field is a new fit() argument without an edit here (see docs/EXTENDING.md).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import textwrap
import types
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from finetuner import callbacks as callback_classes
from finetuner.api.layout import dataset_key
from finetuner.api.v1alpha1 import CallbackSpec, FinetuneRunSpec, check_dns1123_name
from finetuner.backends.base import Backend, Reservation
from finetuner.catalog import find_backbone
from finetuner.data import DataRef, Modalities, dataset_exists, push_records, resolve
from finetuner.errors import ArgumentError
from finetuner.model_names import check_model_name
from finetuner.names import unique_name
from finetuner.run import Run

DEFAULT_EXPERIMENT = 'default'


# --- the arguments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SdkArgument:
    """An argument whose meaning is the SDK's, not the spec field's as is."""

    annotation: Any
    description: str
    spec_field: str | None = None  # the spec field it feeds (None: none directly)
    after: str | None = None  # listed after this argument (None: in its spec field's place)


SDK_ARGUMENTS: dict[str, SdkArgument] = {
    'model': SdkArgument(
        str,
        'Backbone to fine-tune: a name from finetuner.describe_models() (e.g. efficientnet_b0, bert-base-cased, '
        'openai/clip-vit-base-patch32), an alias, "timm:<name>", a Hugging Face model id or a model folder.',
        spec_field='model',
    ),
    'train_data': SdkArgument(
        Any,
        'Training data: documents (a docarray DocList, finetuner.Record objects or dicts), a CSV or JSONL '
        'file, a folder of images per class, an s3:// or file:// URI, or the name of a dataset pushed with '
        "finetuner.push_data(). Local data is uploaded to the backend's object store when the run is submitted.",
        spec_field='train_data',
    ),
    'eval_data': SdkArgument(Any, 'Evaluation data, in the same forms as train_data.', spec_field='eval_data'),
    'run_name': SdkArgument(
        str | None,
        'Name of the run (a DNS-1123 label, at most 52 characters); default: a random memorable name.',
        after='model_artifact',
    ),
    'experiment_name': SdkArgument(
        str | None, 'Experiment the run belongs to (created when missing).', spec_field='experiment'
    ),
    'callbacks': SdkArgument(
        list[Any] | None,
        'Callbacks, in order: objects of finetuner.callbacks (e.g. BestModelCheckpoint(), '
        'EvaluationCallback(query_data=docs)); their data is uploaded like train_data.',
        spec_field='callbacks',
    ),
    'cpu': SdkArgument(bool | None, 'Older form of device: cpu=True is device="cpu" (and gpus=0).', after='device'),
    'scheduler_step': SdkArgument(
        str | None,
        'Older form of scheduler_options["scheduler_step"]: "batch" or "epoch".',
        after='scheduler_options',
    ),
    'gpus': SdkArgument(int | None, 'Shortcut for resources["gpus"]: GPUs per node.', after='resources'),
    'nodes': SdkArgument(int | None, 'Shortcut for resources["nodes"]: nodes of a distributed run.', after='gpus'),
}
# Positional, in Finetuner's order; every other argument is keyword-only.
POSITIONAL = (
    'model',
    'train_data',
    'eval_data',
    'val_split',
    'model_artifact',
    'run_name',
    'description',
    'experiment_name',
)


@dataclass(frozen=True)
class Argument:
    name: str
    annotation: Any
    description: str
    spec_field: str | None  # the spec field it sets
    default: Any = None  # the spec's default, for the docs


def _optional(annotation: Any) -> Any:
    """How a spec field's type reads as an argument: enums as their strings, models also as dicts."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return Literal[tuple(member.value for member in annotation)] | None  # type: ignore[misc]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return dict[str, Any] | annotation | None
    if get_origin(annotation) is list and any(
        isinstance(a, type) and issubclass(a, BaseModel) for a in get_args(annotation)
    ):
        return list[dict[str, Any]] | None
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation):
        return annotation
    return annotation | None


def _spec_default(info: FieldInfo) -> Any:
    if info.is_required():
        return None
    default = info.get_default(call_default_factory=True)
    return None if isinstance(default, BaseModel) or default in ({}, []) else default


@functools.cache
def arguments() -> tuple[Argument, ...]:
    """Every fit() argument, positional ones first, the rest in the spec's order."""
    by_field = {sdk.spec_field: name for name, sdk in SDK_ARGUMENTS.items() if sdk.spec_field}
    following: dict[str, list[str]] = {}
    for name, sdk in SDK_ARGUMENTS.items():
        if sdk.after:
            following.setdefault(sdk.after, []).append(name)
    result: list[Argument] = []

    def add(name: str, info: FieldInfo | None = None, spec_field: str | None = None) -> None:
        sdk = SDK_ARGUMENTS.get(name)
        if sdk is not None:
            default = _default_of(sdk.spec_field)
            result.append(Argument(name, sdk.annotation, sdk.description, sdk.spec_field, default))
        elif info is not None:
            annotation = _optional(info.annotation)
            result.append(Argument(name, annotation, info.description or '', spec_field, _spec_default(info)))
        for after in following.get(name, ()):
            add(after)

    for spec_field, info in FinetuneRunSpec.model_fields.items():
        add(by_field.get(spec_field, spec_field), info, spec_field)
    order = {name: i for i, name in enumerate(POSITIONAL)}
    return tuple(sorted(result, key=lambda a: order.get(a.name, len(order))))


def _default_of(spec_field: str | None) -> Any:
    return _spec_default(FinetuneRunSpec.model_fields[spec_field]) if spec_field else None


@functools.cache
def signature() -> inspect.Signature:
    """fit()'s signature: ``model`` and ``train_data`` required, every other argument None (the
    contract's default), the arguments after Finetuner's first eight keyword-only."""
    parameters = []
    for argument in arguments():
        kind = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD if argument.name in POSITIONAL else inspect.Parameter.KEYWORD_ONLY
        )
        default = inspect.Parameter.empty if argument.name in ('model', 'train_data') else None
        parameters.append(inspect.Parameter(argument.name, kind, default=default, annotation=argument.annotation))
    return inspect.Signature(parameters, return_annotation=Run)


def docstring(summary: str) -> str:
    """``summary``, then an ``Args:`` entry per argument from its description, then Returns and Raises."""
    lines = [inspect.cleandoc(summary), '', 'Args:']
    for argument in arguments():
        text = snake_case_words(argument.description)
        if argument.default is not None:
            text += f' Default: {argument.default!r}.'
        entry = f'{argument.name}: {text}'
        lines += textwrap.wrap(entry, 108, initial_indent='    ', subsequent_indent='        ', break_on_hyphens=False)
    lines += [
        '',
        'Returns:',
        '    The submitted :class:`~finetuner.run.Run`, in phase CREATED.',
        '',
        'Raises:',
        '    ArgumentError: an argument is wrong (it names the argument and the fix); nothing was uploaded.',
    ]
    return '\n'.join(lines)


# --- from the arguments to a spec -----------------------------------------------------------------


_ALIASES = {info.alias: name for name, info in FinetuneRunSpec.model_fields.items() if info.alias}
_ARGUMENT_OF_FIELD = {
    sdk.spec_field: name for name, sdk in SDK_ARGUMENTS.items() if sdk.spec_field and sdk.spec_field != name
}


def snake_case_words(text: str) -> str:
    """The contract speaks camelCase (the CR's fields); the SDK's arguments are snake_case."""

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        field_name = _ALIASES.get(word, word)
        return _ARGUMENT_OF_FIELD.get(field_name, field_name) if word in _ALIASES else word

    text = re.sub(r'\b[a-z]+(?:[A-Z][a-z0-9]*)+\b', replace, text)
    return re.sub(r'\b([a-z_]+): (true|false)\b', lambda m: f'{m.group(1)}={m.group(2).capitalize()}', text)


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """fit()'s arguments by name (None where not given); an unknown one raises ArgumentError."""
    known = signature().parameters
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f'did you mean {close[0]!r}?' if close else 'see help(finetuner.fit) for the arguments'
        raise ArgumentError(name, f'fit() has no argument {name!r}; {hint}')
    bound = signature().bind(*args, **kwargs)
    return {name: bound.arguments.get(name) for name in known}


def argument_error(error: ValidationError, given: set[str]) -> ArgumentError:
    """The first pydantic error as an ArgumentError naming the fit() argument."""
    first = error.errors()[0]
    loc = [str(p) for p in first['loc']]
    message = snake_case_words(first['msg'].removeprefix('Value error, ').replace('Input should be', 'must be'))
    if not loc:  # a model-level rule: name the first argument its message mentions
        names = {a.name for a in arguments()}
        mentioned = [w for w in re.findall(r'[a-z_]+', message) if w in names]
        return ArgumentError(mentioned[0] if mentioned else 'fit', message)
    top = loc[0]
    if top == 'scheduler_options' and loc[1:] == ['scheduler_step'] and 'scheduler_step' in given:
        argument = 'scheduler_step'
    elif top == 'resources' and len(loc) > 1 and loc[1] in given:
        argument = loc[1]
    elif top == 'device' and 'cpu' in given and 'device' not in given:
        argument = 'cpu'
    else:
        argument = '.'.join([_ARGUMENT_OF_FIELD.get(top, top), *loc[1:]])
    if first['type'] not in ('value_error', 'assertion_error') and 'input' in first:
        message = f'{message} (got {first["input"]!r})'
    return ArgumentError(argument, message)


def check_names(given: dict[str, Any]) -> str:
    """Check the run's and the experiment's names, the model and the data's presence; the experiment."""
    if given['run_name'] is not None:
        _dns_name(given['run_name'], 'run_name')
    experiment = given['experiment_name'] or DEFAULT_EXPERIMENT
    _dns_name(experiment, 'experiment_name')
    model = given['model']
    if isinstance(model, os.PathLike):  # a model folder as a Path: the spec holds its absolute path
        folder = Path(os.fspath(model)).expanduser()
        model = given['model'] = str(folder.resolve()) if folder.exists() else os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ArgumentError('model', 'give a backbone name (see finetuner.describe_models()) or a model folder')
    check_model_name(model)
    if given['train_data'] is None:
        raise ArgumentError('train_data', 'is required: documents, a CSV path, a folder, a URI or a dataset name')
    return experiment


def _dns_name(value: Any, argument: str) -> None:
    try:
        check_dns1123_name(value, argument)
    except ValueError as e:
        raise ArgumentError(argument, str(e).removeprefix(f'{argument} ')) from e


def device(given: dict[str, Any]) -> str | None:
    """``device``, from either generation: ``cpu=True`` or ``device='cpu'``."""
    cpu, chosen = given['cpu'], given['device']
    if cpu is not None and chosen is not None and (chosen == 'cpu') != bool(cpu):
        raise ArgumentError('cpu', f'cpu={cpu} contradicts device={chosen!r}; give only one of them')
    return chosen if chosen is not None else ('cpu' if cpu else None)


def scheduler_options(given: dict[str, Any]) -> dict[str, Any] | None:
    """``scheduler_options``, with ``scheduler_step`` given at the top level (the older form) moved in."""
    options: dict[str, Any] = dict(given['scheduler_options'] or {})
    step = given['scheduler_step']
    if step is not None:
        inner = options.get('scheduler_step', options.get('schedulerStep'))
        if inner is not None and inner != step:
            raise ArgumentError('scheduler_step', f'{step!r} contradicts scheduler_options["scheduler_step"]={inner!r}')
        options['scheduler_step'] = step
    return options or None


def resources(given: dict[str, Any], chosen_device: str | None) -> dict[str, Any] | None:
    """``resources``, with the ``gpus`` and ``nodes`` shortcuts; no GPU for a run on the CPU."""
    result: dict[str, Any] = dict(given['resources'] or {})
    for key in ('gpus', 'nodes'):
        if given[key] is not None:
            result[key] = given[key]
    if chosen_device == 'cpu' and 'gpus' not in result:
        result['gpus'] = 0
    return result or None


def callback_specs(callbacks_given: Any) -> list[tuple[CallbackSpec, dict[str, Any]]]:
    """(spec, {option: data to resolve}) for every callback, in order."""
    if callbacks_given is None:
        return []
    if not isinstance(callbacks_given, (list, tuple)):
        raise ArgumentError('callbacks', f'must be a list of callbacks, got a {type(callbacks_given).__name__}')
    result = []
    for i, cb in enumerate(callbacks_given):
        if isinstance(cb, callback_classes._Callback):
            data = {f: getattr(cb, f) for f in cb.data_fields if getattr(cb, f) is not None}
            result.append((cb.to_spec(), data))
        elif isinstance(cb, (CallbackSpec, dict)):
            try:
                spec = CallbackSpec.model_validate(cb) if isinstance(cb, dict) else cb
            except ValidationError as e:
                raise ArgumentError(f'callbacks[{i}]', e.errors()[0]['msg'].removeprefix('Value error, ')) from e
            result.append((spec, {}))
        else:
            raise ArgumentError(
                f'callbacks[{i}]',
                f'a {type(cb).__name__} is not a callback; use the classes of finetuner.callbacks, '
                'e.g. BestModelCheckpoint()',
            )
    return result


def check_model_task(model: str, spec: FinetuneRunSpec, given: dict[str, Any]) -> None:
    """The backbone fits the task: CLIP models train text-image pairs, the others do not."""
    backbone = find_backbone(model)
    if backbone is not None and backbone.family == 'clip' and not spec.multi_modal:
        raise ArgumentError(
            'multi_modal',
            f'model {model!r} is a text-to-image (CLIP) model: pass multi_modal=True and loss="CLIPLoss" '
            'with text-image pairs',
        )
    if backbone is not None and backbone.family != 'clip' and spec.multi_modal:
        raise ArgumentError(
            'model',
            f'multi_modal=True needs a CLIP model (e.g. openai/clip-vit-base-patch32); {model!r} is {backbone.task}',
        )
    if (given['image_modality'] or given['text_modality']) and not spec.multi_modal:
        raise ArgumentError(
            'image_modality' if given['image_modality'] else 'text_modality', 'only applies to multi_modal=True (CLIP)'
        )


def build_spec(
    given: dict[str, Any], name: str, experiment: str, callbacks: list[tuple[CallbackSpec, dict[str, Any]]]
) -> FinetuneRunSpec:
    """The spec from the arguments, with placeholders for data still to upload (nothing uploaded yet)."""
    fields = {a.spec_field: given[a.name] for a in arguments() if a.spec_field and given[a.name] is not None}
    chosen_device = device(given)
    sdk_side = {
        'train_data': given['train_data'] if isinstance(given['train_data'], str) else f'{name}-train',
        'eval_data': given['eval_data']
        if isinstance(given['eval_data'], str) or given['eval_data'] is None
        else f'{name}-eval',
        'experiment': experiment,
        'callbacks': [spec for spec, _ in callbacks],
        'device': chosen_device,
        'scheduler_options': scheduler_options(given),
        'resources': resources(given, chosen_device),
    }
    fields.update(sdk_side)
    try:
        spec = FinetuneRunSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise argument_error(e, {k for k, v in given.items() if v is not None}) from e
    check_model_task(given['model'], spec, given)
    return spec


# --- data: converted and checked now, uploaded only once everything is valid ----------------------


@dataclass
class DataPlan:
    """Where each data argument of a run goes: URIs for the spec, records to upload before submitting."""

    store: Any
    spec: FinetuneRunSpec
    modalities: Modalities
    uploads: list[tuple[str, DataRef]] = field(default_factory=list)

    def uri(self, data: Any, argument: str, upload_name: str) -> str:
        """The data's URI. Datasets are referenced by full URI, never by name, so the trainer reads
        exactly what the SDK wrote even where the operator's data prefix differs from this login's."""
        ref = resolve(data, argument, csv_options=self.spec.csv_options, modalities=self.modalities)
        if ref.needs_upload:
            self.uploads.append((upload_name, ref))
            return f'{self.store.uri}/{dataset_key(upload_name)}'
        assert ref.reference is not None
        if ref.reference.startswith(('s3://', 'file://')):
            return ref.reference
        if not dataset_exists(self.store, ref.reference):
            raise ArgumentError(
                argument,
                f'no dataset named {ref.reference!r} in {self.store.uri}; push it first with '
                f'finetuner.push_data({ref.reference!r}, docs) or give documents, a file or a URI',
            )
        return f'{self.store.uri}/{dataset_key(ref.reference)}'

    def upload(self) -> None:
        for dataset, ref in self.uploads:
            assert ref.records is not None
            push_records(self.store, dataset, ref.records)


def plan_data(
    given: dict[str, Any],
    reservation: Reservation,
    spec: FinetuneRunSpec,
    callbacks: list[tuple[CallbackSpec, dict[str, Any]]],
    backend: Backend,
) -> tuple[FinetuneRunSpec, DataPlan]:
    """The spec with every data argument replaced by its URI, and what to upload before submitting
    (under dataset names of this submission alone, ``<run>-<uid>-train``: see Reservation)."""
    modalities = Modalities(text=given['text_modality'] or 'text', image=given['image_modality'] or 'image')
    plan = DataPlan(backend.data_store(), spec, modalities)
    updates: dict[str, Any] = {'train_data': plan.uri(given['train_data'], 'train_data', reservation.dataset('train'))}
    if given['eval_data'] is not None:
        updates['eval_data'] = plan.uri(given['eval_data'], 'eval_data', reservation.dataset('eval'))
    resolved = []
    for i, (cb_spec, data_fields) in enumerate(callbacks):
        options = dict(cb_spec.options)
        for option, data in data_fields.items():
            short = option.removesuffix('_data')
            options[option] = plan.uri(data, f'callbacks[{i}].{option}', reservation.dataset(f'{i}-{short}'))
        resolved.append(CallbackSpec(name=cb_spec.name, options=options))
    updates['callbacks'] = resolved
    reservation.data_uri = plan.store.uri
    reservation.datasets = [dataset for dataset, _ in plan.uploads]
    return spec.model_copy(update=updates), plan


# --- fit ----------------------------------------------------------------------------------------


def fit(backend: Backend, given: dict[str, Any]) -> Run:
    """Check every argument, reserve the run's name, then upload the data and submit the run (see
    ``finetuner.fit``). A name in use is refused before anything is uploaded; a submission that fails
    after its uploads deletes them and frees the name."""
    experiment = check_names(given)
    device(given)  # contradictions between the two generations before anything is read
    scheduler_options(given)
    name = given['run_name'] or unique_name({r.name for r in backend.list_runs()})
    callbacks = callback_specs(given['callbacks'])
    spec = build_spec(given, name, experiment, callbacks)
    reservation = Reservation(name=name)
    spec, data = plan_data(given, reservation, spec, callbacks, backend)
    check_ready = getattr(backend, 'check_ready', None)  # the local backend checks it can train here
    if check_ready is not None:
        check_ready()
    backend.reserve_run(reservation)
    try:
        data.upload()
        if experiment != DEFAULT_EXPERIMENT:
            backend.create_experiment(experiment)
        return Run(backend.create_run(name, spec, reservation), backend)
    except BaseException:
        backend.release_run(reservation)
        raise
