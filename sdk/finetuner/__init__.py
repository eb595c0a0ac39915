"""finetuner: fine-tune embedding models on Kubernetes or on this machine.

::

    import finetuner
    run = finetuner.fit(model='efficientnet_b0', train_data=docs)
    print(run.name, run.status())

Without a cluster everything runs on this machine (the ``local`` backend); ``finetuner.login(
backend='kubernetes', ...)`` sends runs to a cluster instead. Importing this package loads
neither torch nor a Kubernetes client: those come with the backend or model that needs them.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetuner import callbacks
from finetuner.api.layout import Record, dataset_key
from finetuner.api.v1alpha1 import (
    CallbackSpec,
    CSVOptions,
    ExperimentSpec,
    FinetuneRunSpec,
    check_dns1123_name,
)
from finetuner.backends import current as _backend
from finetuner.backends import login as _login
from finetuner.backends.base import Backend
from finetuner.catalog import find_backbone
from finetuner.data import DataRef, Modalities, dataset_exists, pull_records, push_records, resolve
from finetuner.errors import (
    ArgumentError,
    BackendError,
    ExperimentNotFoundError,
    FinetunerError,
    RunFailedError,
    RunNotFinishedError,
    RunNotFoundError,
)
from finetuner.experiment import Experiment
from finetuner.models import describe_models, encode, get_model, list_models
from finetuner.names import unique_name
from finetuner.run import Run

__version__ = '0.1.0'

DEFAULT_EXPERIMENT = 'default'


def login(
    backend: str | None = None,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    in_cluster: bool | None = None,
    endpoint: str | None = None,
    bucket: str | None = None,
    prefix: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    home: str | Path | None = None,
) -> Backend:
    """Choose where runs go. Without arguments: the ``local`` backend (or ``FINETUNER_BACKEND``).

    - ``backend='kubernetes'``: ``kubeconfig`` / ``context`` / ``namespace``, or ``in_cluster=True``;
    - ``backend='local'``: runs are kept under ``home`` (default ``FINETUNER_HOME`` or ~/.cache/finetuner);
    - object store for data and models: ``bucket`` (and ``prefix``), ``endpoint`` for S3-compatible
      stores (MinIO, Ceph), credentials from the usual AWS variables or ``profile``, ``region``.
    """
    return _login(
        backend,
        kubeconfig=kubeconfig,
        context=context,
        namespace=namespace,
        in_cluster=in_cluster,
        endpoint=endpoint,
        bucket=bucket,
        prefix=prefix,
        profile=profile,
        region=region,
        home=home,
    )


# --- fit ----------------------------------------------------------------------------------------

_SPEC_FIELDS = set(FinetuneRunSpec.model_fields)
_ALIASES = {field.alias: name for name, field in FinetuneRunSpec.model_fields.items() if field.alias}
# Spec fields whose SDK argument has another name.
_ARGUMENT_OF_FIELD = {'experiment': 'experiment_name'}


def _argument_error(error: ValidationError, given: set[str]) -> ArgumentError:
    """The first pydantic error as an ArgumentError naming the fit() argument."""
    first = error.errors()[0]
    loc = [str(p) for p in first['loc']]
    message = first['msg'].removeprefix('Value error, ').replace('Input should be', 'must be')
    message = _snake_case_words(message)
    if not loc:  # a model-level rule: name the first argument its message mentions
        mentioned = [w for w in re.findall(r'[a-z_]+', message) if w in _SPEC_FIELDS]
        argument = _ARGUMENT_OF_FIELD.get(mentioned[0], mentioned[0]) if mentioned else 'fit'
        return ArgumentError(argument, message)
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


def _snake_case_words(message: str) -> str:
    """The contract speaks camelCase (the CR's fields); the SDK's arguments are snake_case."""

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        return _ALIASES.get(word, word)

    message = re.sub(r'\b[a-z]+(?:[A-Z][a-z0-9]*)+\b', replace, message)
    return re.sub(r'\b([a-z_]+): (true|false)\b', lambda m: f'{m.group(1)}={m.group(2).capitalize()}', message)


def _callback_specs(callbacks_given: Any) -> list[tuple[CallbackSpec, dict[str, Any]]]:
    """(spec, {option: data to resolve}) for every callback, in order."""
    if callbacks_given is None:
        return []
    if not isinstance(callbacks_given, (list, tuple)):
        raise ArgumentError('callbacks', f'must be a list of callbacks, got a {type(callbacks_given).__name__}')
    result = []
    for i, cb in enumerate(callbacks_given):
        if isinstance(cb, callbacks._Callback):
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


def _check_model_task(model: str, multi_modal: bool) -> None:
    backbone = find_backbone(model)
    if backbone is None:
        return
    if backbone.family == 'clip' and not multi_modal:
        raise ArgumentError(
            'multi_modal',
            f'model {model!r} is a text-to-image (CLIP) model: pass multi_modal=True and loss="CLIPLoss" '
            'with text-image pairs',
        )
    if backbone.family != 'clip' and multi_modal:
        raise ArgumentError(
            'model',
            f'multi_modal=True needs a CLIP model (e.g. openai/clip-vit-base-patch32); {model!r} is {backbone.task}',
        )


def fit(
    model: str,
    train_data: Any,
    eval_data: Any = None,
    val_split: float | None = None,
    model_artifact: str | None = None,
    run_name: str | None = None,
    description: str | None = None,
    experiment_name: str | None = None,
    model_options: dict[str, Any] | None = None,
    loss: str | None = None,
    loss_options: dict[str, Any] | None = None,
    miner: str | None = None,
    miner_options: dict[str, Any] | None = None,
    loss_optimizer: str | None = None,
    loss_optimizer_options: dict[str, Any] | None = None,
    optimizer: str | None = None,
    optimizer_options: dict[str, Any] | None = None,
    learning_rate: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    scheduler: str | None = None,
    scheduler_step: str | None = None,
    scheduler_options: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    freeze: bool | None = None,
    output_dim: int | None = None,
    num_items_per_class: int | None = None,
    sampler: str | None = None,
    group_by_length: bool | None = None,
    multi_modal: bool | None = None,
    image_modality: str | None = None,
    text_modality: str | None = None,
    csv_options: dict[str, Any] | CSVOptions | None = None,
    cpu: bool | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    to_onnx: bool | None = None,
    seed: int | None = None,
    checkpoint_every_steps: int | None = None,
    gpus: int | None = None,
    nodes: int | None = None,
    resources: dict[str, Any] | None = None,
    image: str | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    queue_name: str | None = None,
    active_deadline_seconds: int | None = None,
    backoff_limit: int | None = None,
    output: str | None = None,
    suspend: bool | None = None,
    **unknown: Any,
) -> Run:
    """Fine-tune ``model`` on ``train_data``; return the submitted :class:`Run` (phase CREATED).

    Every argument is checked before anything is uploaded or submitted; a mistake raises
    :class:`~finetuner.errors.ArgumentError` naming the argument. Data given as documents, files
    or folders is uploaded to the backend's object store; only its reference goes into the run.
    Both generations of Finetuner arguments work: ``cpu=True`` or ``device='cpu'``;
    ``scheduler_step`` at the top level or inside ``scheduler_options``.
    """
    if unknown:
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, [*_SPEC_FIELDS, 'run_name', 'experiment_name', 'cpu', 'gpus'], n=1)
        hint = f'did you mean {close[0]!r}?' if close else 'see help(finetuner.fit) for the arguments'
        raise ArgumentError(name, f'fit() has no argument {name!r}; {hint}')
    backend = _backend()
    given = {k for k, v in locals().items() if v is not None and k not in ('unknown', 'backend')}

    # --- names -------------------------------------------------------------------------------
    if run_name is not None:
        try:
            check_dns1123_name(run_name, 'run_name')
        except ValueError as e:
            raise ArgumentError('run_name', str(e).removeprefix('run_name ')) from e
    experiment = experiment_name or DEFAULT_EXPERIMENT
    try:
        check_dns1123_name(experiment, 'experiment_name')
    except ValueError as e:
        raise ArgumentError('experiment_name', str(e).removeprefix('experiment_name ')) from e
    if not isinstance(model, str) or not model.strip():
        raise ArgumentError('model', 'give a backbone name (see finetuner.describe_models()) or a model folder')
    if train_data is None:
        raise ArgumentError('train_data', 'is required: documents, a CSV path, a folder, a URI or a dataset name')

    # --- device and scheduler: both generations of arguments ----------------------------------
    if cpu is not None and device is not None and (device == 'cpu') != bool(cpu):
        raise ArgumentError('cpu', f'cpu={cpu} contradicts device={device!r}; give only one of them')
    chosen_device = device if device is not None else ('cpu' if cpu else None)
    sched: dict[str, Any] = dict(scheduler_options or {})
    if scheduler_step is not None:
        inner = sched.get('scheduler_step', sched.get('schedulerStep'))
        if inner is not None and inner != scheduler_step:
            raise ArgumentError(
                'scheduler_step', f'{scheduler_step!r} contradicts scheduler_options["scheduler_step"]={inner!r}'
            )
        sched['scheduler_step'] = scheduler_step
    res: dict[str, Any] = dict(resources or {})
    for key, value in (('gpus', gpus), ('nodes', nodes)):
        if value is not None:
            res[key] = value
    if chosen_device == 'cpu' and 'gpus' not in res:
        res['gpus'] = 0

    # --- the spec, with placeholders for data still to upload ----------------------------------
    name = run_name or unique_name({r.name for r in backend.list_runs()})
    callback_specs = _callback_specs(callbacks)
    modalities = Modalities(text=text_modality or 'text', image=image_modality or 'image')
    fields: dict[str, Any] = {
        'model': model,
        'model_options': model_options,
        'train_data': train_data if isinstance(train_data, str) else f'{name}-train',
        'eval_data': eval_data if isinstance(eval_data, str) or eval_data is None else f'{name}-eval',
        'val_split': val_split,
        'model_artifact': model_artifact,
        'description': description,
        'experiment': experiment,
        'loss': loss,
        'loss_options': loss_options,
        'miner': miner,
        'miner_options': miner_options,
        'loss_optimizer': loss_optimizer,
        'loss_optimizer_options': loss_optimizer_options,
        'optimizer': optimizer,
        'optimizer_options': optimizer_options,
        'learning_rate': learning_rate,
        'epochs': epochs,
        'batch_size': batch_size,
        'scheduler': scheduler,
        'scheduler_options': sched or None,
        'callbacks': [spec for spec, _ in callback_specs],
        'freeze': freeze,
        'output_dim': output_dim,
        'num_items_per_class': num_items_per_class,
        'sampler': sampler,
        'group_by_length': group_by_length,
        'multi_modal': multi_modal,
        'image_modality': image_modality,
        'text_modality': text_modality,
        'csv_options': csv_options,
        'device': chosen_device,
        'num_workers': num_workers,
        'to_onnx': to_onnx,
        'seed': seed,
        'checkpoint_every_steps': checkpoint_every_steps,
        'resources': res or None,
        'image': image,
        'node_selector': node_selector,
        'tolerations': tolerations,
        'queue_name': queue_name,
        'active_deadline_seconds': active_deadline_seconds,
        'backoff_limit': backoff_limit,
        'output': output,
        'suspend': suspend,
    }
    try:
        spec = FinetuneRunSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise _argument_error(e, given) from e
    _check_model_task(model, spec.multi_modal)
    if (image_modality or text_modality) and not spec.multi_modal:
        raise ArgumentError(
            'image_modality' if image_modality else 'text_modality', 'only applies to multi_modal=True (CLIP)'
        )

    # --- data: converted and checked now, uploaded only when everything is valid --------------
    store = backend.data_store()
    uploads: list[tuple[str, DataRef]] = []

    def check(data: Any, argument: str, upload_name: str) -> str:
        """The data's URI. Datasets are referenced by full URI, never by name, so the trainer reads
        exactly what the SDK wrote even where the operator's data prefix differs from this login's."""
        ref = resolve(data, argument, csv_options=spec.csv_options, modalities=modalities)
        if ref.needs_upload:
            uploads.append((upload_name, ref))
            return f'{store.uri}/{dataset_key(upload_name)}'
        assert ref.reference is not None
        if ref.reference.startswith(('s3://', 'file://')):
            return ref.reference
        if not dataset_exists(store, ref.reference):
            raise ArgumentError(
                argument,
                f'no dataset named {ref.reference!r} in {store.uri}; push it first with '
                f'finetuner.push_data({ref.reference!r}, docs) or give documents, a file or a URI',
            )
        return f'{store.uri}/{dataset_key(ref.reference)}'

    updates: dict[str, Any] = {'train_data': check(train_data, 'train_data', f'{name}-train')}
    if eval_data is not None:
        updates['eval_data'] = check(eval_data, 'eval_data', f'{name}-eval')
    callback_list = []
    for i, (cb_spec, data_fields) in enumerate(callback_specs):
        options = dict(cb_spec.options)
        for field, data in data_fields.items():
            short = field.removesuffix('_data')
            options[field] = check(data, f'callbacks[{i}].{field}', f'{name}-{i}-{short}')
        callback_list.append(CallbackSpec(name=cb_spec.name, options=options))
    updates['callbacks'] = callback_list
    spec = spec.model_copy(update=updates)
    try:
        backend.get_run(name)
    except RunNotFoundError:
        pass
    else:
        raise ArgumentError(
            'run_name', f'a run named {name!r} already exists; choose another name or delete_run({name!r})'
        )

    # --- upload and submit ---------------------------------------------------------------------
    check_ready = getattr(backend, 'check_ready', None)  # the local backend checks it can train here
    if check_ready is not None:
        check_ready()
    for dataset, ref in uploads:
        assert ref.records is not None
        push_records(store, dataset, ref.records)
    if experiment != DEFAULT_EXPERIMENT:
        backend.create_experiment(experiment)
    return Run(backend.create_run(name, spec), backend)


# --- runs ---------------------------------------------------------------------------------------


def _check_name(name: Any, argument: str) -> str:
    try:
        return check_dns1123_name(name, argument)
    except ValueError as e:
        raise ArgumentError(argument, str(e).removeprefix(f'{argument} ')) from e


def get_run(run_name: str, experiment_name: str | None = None) -> Run:
    """The run named ``run_name`` (RunNotFoundError when there is none)."""
    _check_name(run_name, 'run_name')
    if experiment_name is not None:
        return get_experiment(experiment_name).get_run(run_name)
    return Run(_backend().get_run(run_name), _backend())


def list_runs(experiment_name: str | None = None) -> list[Run]:
    """All runs, or the runs of one experiment, oldest first."""
    if experiment_name is not None:
        _check_name(experiment_name, 'experiment_name')
    backend = _backend()
    return [Run(record, backend) for record in backend.list_runs(experiment=experiment_name)]


def delete_run(run_name: str, experiment_name: str | None = None) -> None:
    """Delete the run, stopping it first when it is still going."""
    run = get_run(run_name, experiment_name)
    _backend().delete_run(run.name)


def delete_runs(experiment_name: str | None = None) -> None:
    """Delete every run (of one experiment, when named)."""
    for run in list_runs(experiment_name):
        _backend().delete_run(run.name)


# --- experiments --------------------------------------------------------------------------------


def create_experiment(name: str = DEFAULT_EXPERIMENT, description: str | None = None) -> Experiment:
    """Get or create the experiment ``name``."""
    _check_name(name, 'name')
    try:
        spec = ExperimentSpec(description=description)
    except ValidationError as e:
        raise ArgumentError('description', e.errors()[0]['msg']) from e
    backend = _backend()
    return Experiment(backend.create_experiment(name, spec), backend)


def get_experiment(name: str) -> Experiment:
    _check_name(name, 'name')
    backend = _backend()
    return Experiment(backend.get_experiment(name), backend)


def list_experiments() -> list[Experiment]:
    backend = _backend()
    return [Experiment(record, backend) for record in backend.list_experiments()]


def delete_experiment(name: str) -> None:
    """Delete the experiment and every run in it."""
    _check_name(name, 'name')
    _backend().delete_experiment(name)


def delete_experiments() -> None:
    for experiment in list_experiments():
        _backend().delete_experiment(experiment.name)


# --- datasets -----------------------------------------------------------------------------------


def push_data(name: str, data: Any, csv_options: dict[str, Any] | None = None) -> str:
    """Store ``data`` (documents, a CSV/JSONL path or an image folder) as the dataset ``name``.

    Later runs refer to it by name: ``fit(train_data=name)``. Returns the name.
    """
    try:
        check_dns1123_name(name, 'name', max_len=63)
    except ValueError as e:
        raise ArgumentError('name', str(e).removeprefix('name ')) from e
    if isinstance(data, str) and not Path(data).expanduser().exists():
        raise ArgumentError('data', f'no file or folder {data!r}; push documents or a local path')
    ref = resolve(data, 'data', csv_options=CSVOptions.model_validate(csv_options or {}))
    if not ref.needs_upload:
        raise ArgumentError('data', 'is already a reference; push documents, a file or a folder')
    assert ref.records is not None
    return push_records(_backend().data_store(), name, ref.records)


def pull_data(name: str, as_documents: bool = False) -> Any:
    """The records of dataset ``name`` (``as_documents=True``: a docarray ``DocList[LegacyDocument]``)."""
    records = pull_records(_backend().data_store(), _check_name(name, 'name'))
    if as_documents:
        from finetuner.data import to_legacy_documents

        return to_legacy_documents(records)
    return records


__all__ = [
    'ArgumentError',
    'BackendError',
    'Experiment',
    'ExperimentNotFoundError',
    'FinetunerError',
    'Record',
    'Run',
    'RunFailedError',
    'RunNotFinishedError',
    'RunNotFoundError',
    'callbacks',
    'create_experiment',
    'delete_experiment',
    'delete_experiments',
    'delete_run',
    'delete_runs',
    'describe_models',
    'encode',
    'fit',
    'get_experiment',
    'get_model',
    'get_run',
    'list_experiments',
    'list_models',
    'list_runs',
    'login',
    'pull_data',
    'push_data',
]
