"""The ``kubernetes`` backend: runs are FinetuneRun custom resources reconciled by the operator.

Custom resources are written through the contract models (``.to_k8s()``) and their status is
parsed back with them. Logs come from the trainer pod (found by the ``finetuner.dev/run`` label)
and, once the pod is gone, from the copy the trainer leaves in the run's output location.
API errors are re-raised as :mod:`finetuner.errors` types (``raise ... from e``). The
official client is imported here only, so ``import finetuner`` stays light.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from finetuner.api import layout
from finetuner.api.v1alpha1 import (
    GROUP,
    VERSION,
    Experiment,
    ExperimentSpec,
    ExperimentStatus,
    FinetuneRun,
    FinetuneRunSpec,
    FinetuneRunStatus,
    ObjectMeta,
    Phase,
)
from finetuner.backends.base import Backend, ExperimentRecord, Reservation, RunRecord
from finetuner.errors import (
    ArgumentError,
    BackendError,
    ExperimentNotFoundError,
    RunNotFinishedError,
    RunNotFoundError,
)
from finetuner.storage import LocalStore, S3Store, StorageError, open_store

RUNS = 'finetuneruns'
EXPERIMENTS = 'experiments'
RUN_LABEL = 'finetuner.dev/run'
EXPERIMENT_LABEL = 'finetuner.dev/experiment'
CANCEL_ANNOTATION = 'run.finetuner.dev/cancel'
DEFAULT_DATA = 's3://finetuner'
TRAINER_CONTAINER = 'trainer'


class KubernetesBackend(Backend):
    name = 'kubernetes'

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
        in_cluster: bool | None = None,
        data: str | None = None,
        api_client: Any = None,
        poll_interval: float = 1.0,
    ):
        """Connect with a kubeconfig (``KUBECONFIG`` or ~/.kube/config), a context, or in-cluster.

        ``data`` is the prefix datasets are pushed to (``FINETUNER_DATA``, else s3://finetuner): it
        must be the operator's FINETUNER_DATA for the trainer to find named datasets.
        """
        from kubernetes import client, config

        self.poll_interval = poll_interval
        self._data = (data or os.environ.get('FINETUNER_DATA') or DEFAULT_DATA).rstrip('/')
        if api_client is None:
            configuration = client.Configuration()
            try:
                if in_cluster:
                    config.load_incluster_config(client_configuration=configuration)
                    current = None
                else:
                    path = kubeconfig or os.environ.get('KUBECONFIG') or None
                    config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
                    contexts, active = config.list_kube_config_contexts(config_file=path)
                    chosen = next((c for c in contexts if c['name'] == context), None) if context else active
                    current = ((chosen or {}).get('context') or {}).get('namespace')
            except (config.ConfigException, OSError) as e:
                where = 'in-cluster service account' if in_cluster else (kubeconfig or 'KUBECONFIG/~/.kube/config')
                raise BackendError(f'cannot load the Kubernetes configuration from {where}: {e}') from e
            api_client = client.ApiClient(configuration)
            self.namespace = namespace or current or _incluster_namespace() or 'default'
        else:
            self.namespace = namespace or 'default'
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    # --- helpers ---------------------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, not_found: Exception | None = None, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status == 404 and not_found is not None:
                raise not_found from e
            if e.status == 404:
                raise BackendError(
                    f'{what}: not found ({_api_message(e)}); are the finetuner CRDs installed? '
                    'Install them with the Helm chart (docs/OPERATOR.md)'
                ) from e
            if e.status in (401, 403):
                raise BackendError(
                    f'{what}: the cluster refused the call ({e.status} {e.reason}); '
                    f'check your kubeconfig user and its RBAC rights in namespace {self.namespace!r}'
                ) from e
            raise BackendError(f'{what}: {e.status} {e.reason}: {_api_message(e)}') from e
        except HTTPError as e:
            raise BackendError(f'{what}: cannot reach the Kubernetes API: {e}') from e

    def _record(self, body: dict[str, Any]) -> RunRecord:
        meta = body['metadata']
        status = _known(FinetuneRunStatus, body.get('status'))
        return RunRecord(
            name=meta['name'],
            namespace=meta.get('namespace') or self.namespace,
            spec=FinetuneRunSpec.model_validate(body.get('spec') or {}),
            status=status,
            created_at=meta.get('creationTimestamp'),
        )

    def _experiment_record(self, body: dict[str, Any]) -> ExperimentRecord:
        meta = body['metadata']
        return ExperimentRecord(
            name=meta['name'],
            namespace=meta.get('namespace') or self.namespace,
            spec=ExperimentSpec.model_validate(body.get('spec') or {}),
            status=_known(ExperimentStatus, body.get('status')),
            created_at=meta.get('creationTimestamp'),
        )

    def _get_run_body(self, name: str) -> dict[str, Any]:
        return self._call(
            f'get run {name!r}',
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            RUNS,
            name,
            not_found=RunNotFoundError(name, f'namespace {self.namespace!r}'),
        )

    # --- runs ------------------------------------------------------------------------------------
    def create_run(self, name: str, spec: FinetuneRunSpec, reservation: Reservation | None = None) -> RunRecord:
        """Create the FinetuneRun (the API server refuses a second one of the name: 409)."""
        from kubernetes.client.exceptions import ApiException

        if spec.experiment:
            self.create_experiment(spec.experiment)
        run = FinetuneRun(
            metadata=ObjectMeta(name=name, namespace=self.namespace, labels={EXPERIMENT_LABEL: spec.experiment}),
            spec=spec,
        )
        try:
            body = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, RUNS, run.to_k8s())
        except ApiException as e:
            if e.status == 409:
                raise ArgumentError(
                    'run_name', f'a run named {name!r} already exists; choose another name or delete_run({name!r})'
                ) from e
            if e.status == 422:
                raise ArgumentError('spec', f'the cluster refused the run: {_api_message(e)}') from e
            return self._call(f'create run {name!r}', _raise, e)
        if body is None:  # some servers answer 200 without a body
            body = self._get_run_body(name)
        return self._record(body)

    def get_run(self, name: str) -> RunRecord:
        return self._record(self._get_run_body(name))

    def list_runs(self, experiment: str | None = None) -> list[RunRecord]:
        selector = f'{EXPERIMENT_LABEL}={experiment}' if experiment else None
        result = self._call(
            'list runs',
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            RUNS,
            label_selector=selector,
        )
        records = [self._record(item) for item in result.get('items') or []]
        return sorted(records, key=lambda r: (r.created_at or '', r.name))

    def delete_run(self, name: str) -> None:
        """Delete the run (its Job, pods and ConfigMap follow by garbage collection) and its outputs."""
        record = self.get_run(name)
        self._call(
            f'delete run {name!r}',
            self.custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            RUNS,
            name,
            propagation_policy='Background',
            not_found=RunNotFoundError(name, f'namespace {self.namespace!r}'),
        )
        if record.status.output_uri:
            try:
                open_store(record.status.output_uri).delete()
            except StorageError:
                pass  # outputs are best effort: the run itself is gone

    def cancel_run(self, name: str) -> None:
        record = self.get_run(name)
        if record.status.phase in (Phase.FINISHED.value, Phase.FAILED.value):
            return
        patch = {'metadata': {'annotations': {CANCEL_ANNOTATION: 'true'}}}
        self._call(
            f'cancel run {name!r}',
            self.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            RUNS,
            name,
            patch,
            not_found=RunNotFoundError(name, f'namespace {self.namespace!r}'),
        )

    def suspend_run(self, name: str) -> None:
        self._set_suspend(name, True)

    def resume_run(self, name: str) -> None:
        self._set_suspend(name, False)

    def _set_suspend(self, name: str, suspend: bool) -> None:
        """Patch ``spec.suspend``; the operator stops (or lets go again) the run's Job."""
        record = self.get_run(name)
        if record.status.phase in (Phase.FINISHED.value, Phase.FAILED.value):
            return
        self._call(
            f'{"suspend" if suspend else "resume"} run {name!r}',
            self.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            RUNS,
            name,
            {'spec': {'suspend': suspend}},
            not_found=RunNotFoundError(name, f'namespace {self.namespace!r}'),
        )

    def _pods(self, name: str) -> list[Any]:
        pods = self._call(
            f'list pods of run {name!r}',
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=f'{RUN_LABEL}={name}',
        ).items
        return sorted(pods, key=lambda p: p.metadata.creation_timestamp or 0)

    def logs(self, name: str) -> str:
        record = self.get_run(name)
        pods = self._pods(name)
        if pods:
            from kubernetes.client.exceptions import ApiException

            try:
                return self.core.read_namespaced_pod_log(
                    pods[-1].metadata.name, self.namespace, container=TRAINER_CONTAINER
                )
            except ApiException as e:
                if e.status not in (400, 404):  # 400: container not started yet
                    raise BackendError(f'logs of run {name!r}: {e.status} {e.reason}: {_api_message(e)}') from e
        if record.status.output_uri:
            try:
                return open_store(record.status.output_uri).read_text(layout.TRAIN_LOG)
            except StorageError:
                pass
        if record.status.phase in (None, Phase.CREATED.value):
            raise RunNotFinishedError(f'run {name!r} has not started yet ({record.status.details}); no logs so far')
        return ''

    def stream_logs(self, name: str) -> Iterator[str]:
        """Lines of the trainer's log as they come, until the run ends (polling the pod log)."""
        sent = 0
        while True:
            record = self.get_run(name)
            try:
                text = self.logs(name)
            except RunNotFinishedError:
                text = ''
            lines = text.splitlines()
            yield from lines[sent:]
            sent = max(sent, len(lines))
            if record.status.phase in (Phase.FINISHED.value, Phase.FAILED.value):
                return
            time.sleep(self.poll_interval)

    def output_store(self, name: str) -> LocalStore | S3Store:
        record = self.get_run(name)
        if not record.status.output_uri:
            raise RunNotFinishedError(
                f'run {name!r} has no output location yet ({record.status.details or "not reconciled"})'
            )
        try:
            return open_store(record.status.output_uri)
        except StorageError as e:
            raise BackendError(str(e)) from e

    # --- experiments -----------------------------------------------------------------------------
    def create_experiment(
        self, name: str, spec: ExperimentSpec | None = None, uploads: Reservation | None = None
    ) -> ExperimentRecord:
        """Get or create the Experiment; the operator creates the runs of its sweep (``uploads``: datasets
        uploaded for its run template, which stay in the data store with it)."""
        from kubernetes.client.exceptions import ApiException

        experiment = Experiment(metadata=ObjectMeta(name=name, namespace=self.namespace), spec=spec or ExperimentSpec())
        try:
            body = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, EXPERIMENTS, experiment.to_k8s()
            )
        except ApiException as e:
            if e.status != 409:
                return self._call(f'create experiment {name!r}', _raise, e)
            body = None
        if body is None:
            return self.get_experiment(name)
        return self._experiment_record(body)

    def get_experiment(self, name: str) -> ExperimentRecord:
        body = self._call(
            f'get experiment {name!r}',
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            EXPERIMENTS,
            name,
            not_found=ExperimentNotFoundError(name, f'namespace {self.namespace!r}'),
        )
        return self._experiment_record(body)

    def list_experiments(self) -> list[ExperimentRecord]:
        result = self._call(
            'list experiments', self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, EXPERIMENTS
        )
        return sorted((self._experiment_record(i) for i in result.get('items') or []), key=lambda r: r.name)

    def delete_experiment(self, name: str) -> None:
        """Delete the experiment; its runs go with it (owner references, background propagation)."""
        runs = self.list_runs(experiment=name)
        self._call(
            f'delete experiment {name!r}',
            self.custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            EXPERIMENTS,
            name,
            propagation_policy='Background',
            not_found=ExperimentNotFoundError(name, f'namespace {self.namespace!r}'),
        )
        for run in runs:  # runs created before the experiment existed are not owned by it
            try:
                self.delete_run(run.name)
            except RunNotFoundError:
                pass

    # --- data ------------------------------------------------------------------------------------
    def data_store(self) -> LocalStore | S3Store:
        try:
            return open_store(self._data)
        except StorageError as e:
            raise BackendError(str(e)) from e


def _raise(error: Exception) -> Any:
    raise error


def _api_message(error: Any) -> str:
    import json

    try:
        return json.loads(error.body).get('message') or str(error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(error, 'reason', error))


def _known(model: Any, raw: dict[str, Any] | None) -> Any:
    """Parse a status with the contract, ignoring fields a newer operator may have added."""
    known = {f.alias or n for n, f in model.model_fields.items()}
    return model.model_validate({k: v for k, v in (raw or {}).items() if k in known})


def _incluster_namespace() -> str | None:
    path = '/var/run/secrets/kubernetes.io/serviceaccount/namespace'
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None
