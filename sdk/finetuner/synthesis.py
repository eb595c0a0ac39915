"""``finetuner.synthesize``: training data from unlabelled queries and documents, as a run.

::

    run = finetuner.synthesize(
        query_data=questions,                 # texts: documents, Records, strings, a file, a URI
        corpus_data=answers,
        models=finetuner.SynthesisModels(relation_miner='sentence-transformers/all-MiniLM-L6-v2',
                                         cross_encoder='cross-encoder/ms-marco-MiniLM-L6-v2'),
        num_relations=3,
    )
    run.wait()
    tuned = finetuner.fit(model='sentence-transformers/all-MiniLM-L6-v2', train_data=run.train_data,
                          loss='MarginMSELoss')

A synthesis run is a FinetuneRun with ``task: synthesis`` (see :mod:`finetuner.api.mining`): on a cluster
the operator runs it as a trainer Job, locally the local backend as a trainer process, with the same
phases, status, logs and resume as a fine-tuning run. ``run.train_data`` is the URI of what it wrote.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetuner import fitting
from finetuner.api.mining import Task
from finetuner.backends import current as _backend
from finetuner.backends.base import Reservation
from finetuner.catalog import find_cross_encoder
from finetuner.data import resolve
from finetuner.errors import ArgumentError
from finetuner.names import unique_name
from finetuner.run import Run

# fit() arguments a synthesis run takes besides its own: where and how it runs, not how it trains.
RUN_ARGUMENTS = frozenset(
    {
        'run_name',
        'experiment_name',
        'description',
        'model_options',
        'csv_options',
        'device',
        'cpu',
        'gpus',
        'resources',
        'image',
        'node_selector',
        'tolerations',
        'queue_name',
        'active_deadline_seconds',
        'backoff_limit',
        'output',
        'suspend',
        'seed',
        'image_pull_secrets',
        'affinity',
        'priority_class_name',
        'env',
        'volumes',
        'service_account_name',
    }
)


@dataclass(frozen=True)
class SynthesisModels:
    """The two models of a synthesis run (Finetuner's names): the embedding model that mines relations
    between queries and documents, and the cross-encoder that scores them."""

    relation_miner: str
    cross_encoder: str


def _models(models: Any) -> SynthesisModels:
    if isinstance(models, dict):
        unknown = sorted(set(models) - {'relation_miner', 'cross_encoder'})
        if unknown:
            raise ArgumentError(
                f'models.{unknown[0]}', 'is not a model of synthesis; give relation_miner and cross_encoder'
            )
        try:
            models = SynthesisModels(**models)
        except TypeError as e:
            raise ArgumentError('models', 'give both relation_miner and cross_encoder') from e
    if not isinstance(models, SynthesisModels):
        raise ArgumentError(
            'models',
            'give finetuner.SynthesisModels(relation_miner=..., cross_encoder=...) or a dict with those keys, got '
            f'a {type(models).__name__}',
        )
    chosen = {}
    for role in ('relation_miner', 'cross_encoder'):
        value = getattr(models, role)
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(value, str) or not value.strip():
            raise ArgumentError(f'models.{role}', 'give a model name, a Hugging Face id or a model folder')
        chosen[role] = value
    check_cross_encoder_folder(chosen['cross_encoder'])
    return SynthesisModels(**chosen)


def check_cross_encoder_folder(name: str) -> None:
    """A local cross-encoder folder is checked here (a hub id is checked by the trainer, which loads it)."""
    path = Path(name).expanduser()
    if find_cross_encoder(name) is not None or not path.is_dir():
        return
    config_file = path / 'config.json'
    if not config_file.is_file():
        raise ArgumentError('models.cross_encoder', f'{name!r} holds no config.json: not a Hugging Face model folder')
    architectures = json.loads(config_file.read_text()).get('architectures') or []
    if not any(str(a).endswith('ForSequenceClassification') for a in architectures):
        declared = ', '.join(architectures) or 'no architecture'
        raise ArgumentError(
            'models.cross_encoder',
            f'{name!r} is not a cross-encoder: its config.json declares {declared}, '
            'not a *ForSequenceClassification model; give a cross-encoder such as cross-encoder/ms-marco-MiniLM-L6-v2',
        )


def _texts(data: Any, argument: str) -> list[str] | None:
    """The texts of local data (None for a URI or dataset name: the trainer reads and checks those)."""
    ref = resolve(data, argument)
    if not ref.needs_upload:
        return None
    texts = []
    for i, record in enumerate(ref.records or []):
        if record.text is None or not record.text.strip():
            what = 'chunks' if record.chunks else 'empty text' if record.text is not None else record.content_kind
            raise ArgumentError(
                f'{argument}[{i}]',
                f'has no text ({what}); synthesis reads texts: give each one as a string or a record with text',
            )
        texts.append(record.text)
    return texts


def _check_data(query_data: Any, corpus_data: Any, num_relations: Any) -> None:
    if isinstance(num_relations, bool) or not isinstance(num_relations, int):
        raise ArgumentError('num_relations', f'must be a whole number, got {num_relations!r}')
    if query_data is None:
        raise ArgumentError('query_data', 'is required: the unlabelled queries (texts)')
    if corpus_data is None:
        raise ArgumentError('corpus_data', 'is required: the documents the queries are related to (texts)')
    _texts(query_data, 'query_data')
    corpus = _texts(corpus_data, 'corpus_data')
    if corpus is not None and num_relations > len(set(corpus)):
        raise ArgumentError(
            'num_relations',
            f'{num_relations} relations per query, but corpus_data holds {len(set(corpus))} distinct documents; '
            f'lower num_relations to at most {len(set(corpus))} or give a larger corpus',
        )


def synthesize(
    query_data: Any,
    corpus_data: Any,
    models: SynthesisModels | dict[str, str],
    num_relations: int = 3,
    *,
    max_length: int | None = None,
    batch_size: int | None = None,
    search: str | None = None,
    **run_arguments: Any,
) -> Run:
    """Submit a synthesis run: mine ``num_relations`` documents of ``corpus_data`` for every query of
    ``query_data`` with ``models.relation_miner``, score each pair with ``models.cross_encoder``, and write
    the scored tuples as training data for ``fit(loss='MarginMSELoss', train_data=run.train_data)``.

    Args:
        query_data: the queries (texts): documents, Records, strings, a CSV or JSONL file, a URI or a dataset name.
        corpus_data: the documents (texts), in the same forms.
        models: ``SynthesisModels(relation_miner=..., cross_encoder=...)`` or a dict with those keys.
        num_relations: documents per query; at most the number of distinct documents.
        max_length: tokens of a (query, document) pair the cross-encoder reads (default: its own limit).
        batch_size: texts embedded or pairs scored per batch (default 64).
        search: 'exact', 'faiss' or 'auto' (default).
        run_arguments: where and how the run goes, as fit() names them (run_name, experiment_name, device, gpus,
            resources, image, queue_name, ...).

    Returns:
        The submitted :class:`~finetuner.run.Run` (phase CREATED); ``run.train_data`` once it is FINISHED.

    Raises:
        ArgumentError: a bad argument, named (an empty corpus, a query without text, a model that is not a
            cross-encoder, more relations than documents, ...); nothing was uploaded.
    """
    not_here = sorted(set(run_arguments) - RUN_ARGUMENTS)
    if not_here:
        raise ArgumentError(
            not_here[0],
            'synthesize() trains nothing; it takes where and how the run goes (see help(finetuner.synthesize))',
        )
    chosen = _models(models)
    _check_data(query_data, corpus_data, num_relations)
    backend = _backend()
    options = {'corpus_data': 'pending-upload', 'cross_encoder': chosen.cross_encoder, 'num_relations': num_relations}
    for key, value in (('max_length', max_length), ('batch_size', batch_size), ('search', search)):
        if value is not None:
            options[key] = value
    given = fitting.bind(
        (),
        {
            **run_arguments,
            'model': chosen.relation_miner,
            'train_data': query_data,
            'task': Task.SYNTHESIS.value,
            'synthesis': options,
        },
    )
    experiment = fitting.check_names(given)
    name = given['run_name'] or unique_name({r.name for r in backend.list_runs()})
    spec = fitting.build_spec(given, name, experiment, [])
    reservation = Reservation(name=name)
    spec, plan = fitting.plan_data(given, reservation, spec, [], backend)
    corpus_uri = plan.uri(corpus_data, 'corpus_data', reservation.dataset('corpus'))
    reservation.datasets = [dataset for dataset, _ in plan.uploads]
    assert spec.synthesis is not None
    spec = spec.model_copy(update={'synthesis': spec.synthesis.model_copy(update={'corpus_data': corpus_uri})})
    return fitting.submit(backend, name, experiment, spec, reservation, plan)
