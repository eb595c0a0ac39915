"""The operator's one seam to the object store: the trainer's reports in a run's output location.

:class:`StoreReports` is the only code of the operator that reads the object store (the API server
is :mod:`kube`'s). It reads only the reports a pass can use (on S3 each one is a request; see
:func:`reports_to_read`) and answers a typed :class:`TrainerReports`. Tests hand the reconciler any
object with the same ``read`` method.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Collection
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from finetuner.api import layout
from finetuner.api.v1alpha1 import Progress
from finetuner.storage import LocalStore, S3Store, open_store, s3_client

log = logging.getLogger('finetuner_operator')

REPORTS = ('artifact', 'metrics', 'failure', 'progress')
_S3_ENV = ('FINETUNER_S3_ENDPOINT', 'AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_DEFAULT_REGION', 'AWS_PROFILE')


class TrainerReports(BaseModel):
    """What the trainer left in a run's output location; only the reports asked for are set
    (``model_fields_set``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    artifact: bool = False  # artifact/manifest.json exists
    metrics: dict[str, Any] | None = None  # metrics.json
    failure: dict[str, Any] | None = None  # failure.json
    progress: Progress | None = None  # progress.json
    store_error: str | None = None  # the store could not be read: nothing about the artifact is known


class ReportReader(Protocol):
    """What the reconciler needs of the seam (a test gives a fake with this method)."""

    def read(self, output_uri: str, wanted: Collection[str]) -> TrainerReports: ...


@functools.lru_cache(maxsize=4)
def _s3_client(environment: tuple[str | None, ...]) -> Any:
    """One boto3 client per store configuration (clients are thread-safe; building one costs more
    CPU than the few reads a status pass makes)."""
    return s3_client()


def _with_shared_client(store: LocalStore | S3Store) -> LocalStore | S3Store:
    if isinstance(store, S3Store):
        return S3Store(store.bucket, store.prefix, client=_s3_client(tuple(os.environ.get(k) for k in _S3_ENV)))
    return store


class StoreReports:
    """Reads the trainer's reports over the object store (S3 or file://)."""

    def read(self, output_uri: str, wanted: Collection[str] = REPORTS) -> TrainerReports:
        """The reports ``wanted`` under ``output_uri``. ``store_error`` is set when the store cannot be
        read (down, unreachable): then a completed Job is not reported FINISHED until it can be. A
        report that is missing or malformed is only left out (None)."""
        found: dict[str, Any] = {}
        try:
            store = _with_shared_client(open_store(output_uri))
            if 'artifact' in wanted:
                found['artifact'] = layout.ARTIFACT_MANIFEST in store.list(layout.ARTIFACT)  # raises when unreachable
            for key, name in ((layout.METRICS, 'metrics'), (layout.FAILURE, 'failure'), (layout.PROGRESS, 'progress')):
                if name in wanted:
                    found[name] = _read_json(store, output_uri, key)
        except Exception as e:
            log.warning('cannot read reports under %s: %s', output_uri, e)
            return TrainerReports(store_error=' '.join(str(e).split())[:200])
        return _typed(found, output_uri)


def _read_json(store: LocalStore | S3Store, output_uri: str, key: str) -> Any:
    try:
        return store.read_json_or_none(key)
    except ValueError as e:  # a torn or foreign file: the status goes on without it
        log.warning('ignoring malformed %s/%s: %s', output_uri, key, e)
        return None


def _typed(found: dict[str, Any], output_uri: str) -> TrainerReports:
    if found.get('progress') is not None:
        try:
            found['progress'] = Progress.model_validate(found['progress'])
        except ValidationError:
            log.warning('ignoring malformed %s/%s', output_uri, layout.PROGRESS)
            found['progress'] = None
    for name in ('metrics', 'failure'):
        if found.get(name) is not None and not isinstance(found[name], dict):
            found[name] = None
    return TrainerReports(**found)


def reports_to_read(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> tuple[str, ...]:
    """Which reports the status can use now: the artifact only for a Job that completed, the failure
    only for one that failed, progress and metrics once a pod has run; nothing before."""
    conditions = {
        c.get('type') for c in ((job or {}).get('status') or {}).get('conditions') or [] if c.get('status') == 'True'
    }
    if 'Complete' in conditions:
        return ('artifact', 'metrics', 'progress')
    if 'Failed' in conditions:
        return ('failure', 'metrics', 'progress')
    if any((p.get('status') or {}).get('phase') in ('Running', 'Succeeded', 'Failed') for p in pods):
        return ('metrics', 'progress')
    return ()
