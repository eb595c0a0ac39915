"""Backends behind the SDK: kubernetes (custom resources) and local (subprocess), and which one is in use.

The SDK's whole module state is the one :class:`Session` here. ``finetuner.login()`` replaces it;
without a login the embedded default is used: the ``local`` backend, unless ``FINETUNER_BACKEND``
says ``kubernetes`` or the process runs inside a cluster (a pod with a service account).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetuner.backends.base import Backend
from finetuner.errors import ArgumentError

BackendName = Literal['local', 'kubernetes']
BACKEND_NAMES: tuple[str, ...] = ('local', 'kubernetes')


@dataclass
class Session:
    backend: Backend | None = None
    options: dict[str, Any] = field(default_factory=dict)


_session = Session()


def in_cluster() -> bool:
    return (
        bool(os.environ.get('KUBERNETES_SERVICE_HOST'))
        and Path('/var/run/secrets/kubernetes.io/serviceaccount/token').exists()
    )


def default_backend_name() -> str:
    chosen = os.environ.get('FINETUNER_BACKEND', '').strip().lower()
    if chosen:
        if chosen not in BACKEND_NAMES:
            raise ArgumentError('FINETUNER_BACKEND', f'unknown backend {chosen!r}; use local or kubernetes')
        return chosen
    return 'kubernetes' if in_cluster() else 'local'


def _configure_object_store(endpoint: str | None, profile: str | None, region: str | None) -> None:
    """boto3 reads these itself (finetuner.storage.s3_client); credentials stay in AWS_* or a profile."""
    if endpoint is not None:
        if not endpoint.startswith(('http://', 'https://')):
            raise ArgumentError('endpoint', f'{endpoint!r} is not a URL; write e.g. http://minio.local:9000')
        os.environ['FINETUNER_S3_ENDPOINT'] = endpoint
    if profile is not None:
        os.environ['AWS_PROFILE'] = profile
    if region is not None:
        os.environ['AWS_DEFAULT_REGION'] = region


def _data_prefix(bucket: str | None, prefix: str | None) -> str | None:
    if bucket is None:
        if prefix is not None:
            raise ArgumentError('prefix', 'given without bucket; add bucket="my-bucket"')
        return None
    if not bucket or '/' in bucket or bucket.startswith('s3:'):
        raise ArgumentError('bucket', f'{bucket!r} is not a bucket name; give the name only, e.g. "finetuner"')
    return f's3://{bucket}/{prefix.strip("/")}' if prefix else f's3://{bucket}'


def make_backend(
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
    cpu_runs: int | None = None,
    gpus: list[int] | None = None,
) -> Backend:
    name = (backend or default_backend_name()).lower()
    if name not in BACKEND_NAMES:
        raise ArgumentError('backend', f'unknown backend {backend!r}; use "local" or "kubernetes"')
    data = _data_prefix(bucket, prefix)
    _configure_object_store(endpoint, profile, region)
    if name == 'local':
        cluster_args = {'kubeconfig': kubeconfig, 'context': context, 'namespace': namespace, 'in_cluster': in_cluster}
        given = [k for k, v in cluster_args.items() if v is not None]
        if given:
            raise ArgumentError(given[0], 'only applies to backend="kubernetes"; add backend="kubernetes" or drop it')
        from finetuner.backends.local import LocalBackend

        return LocalBackend(home=home, data=data, cpu_runs=cpu_runs, gpus=gpus)
    local_args = {'home': home, 'cpu_runs': cpu_runs, 'gpus': gpus}
    given_local = [k for k, v in local_args.items() if v is not None]
    if given_local:
        what = 'where local runs are kept' if given_local[0] == 'home' else "the local queue's limits"
        raise ArgumentError(given_local[0], f'only applies to backend="local" ({what})')
    from finetuner.backends.kubernetes import KubernetesBackend

    return KubernetesBackend(
        kubeconfig=kubeconfig, context=context, namespace=namespace, in_cluster=in_cluster, data=data
    )


def login(backend: str | None = None, **options: Any) -> Backend:
    """Choose the backend (and object store) every later SDK call uses; see finetuner.login."""
    _session.backend = make_backend(backend, **options)
    _session.options = {'backend': backend, **options}
    return _session.backend


def current() -> Backend:
    """The backend in use: the one of the last login(), else the embedded default."""
    if _session.backend is None:
        _session.backend = make_backend()
    return _session.backend


def use(backend: Backend | None) -> None:
    """Put a ready backend in place (tests, embedding); None goes back to the default."""
    _session.backend = backend
    _session.options = {}
