"""SimulatedNode: the Job controller and a kubelet, talking to the API server over HTTP.

As the Job controller it creates pods for unsuspended Jobs (Indexed ones with their completion
index), counts successes and failures, applies the pod failure policy (FailJob on exit codes,
Ignore on the DisruptionTarget condition), the backoff limit and the active deadline, removes
the pods of suspended Jobs, and writes Job status and conditions.

As the kubelet it schedules pods against its GPU capacity and node labels (a pod that does not
fit stays Pending with PodScheduled=False/Unschedulable), refuses images the test declares
unpullable (ErrImagePull), resolves the container environment (values, ``$(VAR)`` expansion,
Secret and ConfigMap key references, field references), materialises ConfigMap, emptyDir and
PersistentVolumeClaim volumes under a per-pod root folder, and runs the container with one of two
runtimes (``tests/cluster/runtime.py``):

- ``process`` (the default): the container's real command as a process group of this machine, with
  this project's Python for ``python``/``torchrun`` and the mount paths and the termination-message
  path mapped into the pod's folder;
- ``podman``: ``podman run`` of the pod's image (a missing image is ErrImagePull) with the pod's
  command, args, env, mounts, working directory, user, security settings and memory limit.

Every pod of the node shares the machine's network (pod IP 127.0.0.1), as with host networking: the
cluster DNS names a pod could resolve (``<svc>.<ns>.svc`` and, for a headless Service, the
``<hostname>.<svc>.<ns>.svc`` of the pods it selects) map to 127.0.0.1, through ``/etc/hosts`` with
podman and by replacing them in env values and arguments for a process. Exit code, termination
message (or the log tail with FallbackToLogsOnError) and phase go back into the pod status; the log
is served by the emulator's ``/log`` endpoint.

Like the real controllers it is driven by watches: two watch threads keep a cache of Jobs and
pods (an informer), and the control loop handles only the Jobs and pods an event touched, plus a
full pass every ``resync`` seconds for what time alone changes (active deadlines). Listing every
Job and pod on each pass made a burst of n runs cost n^2. Its own writes go into the cache at once
(the newer ``resourceVersion`` wins), so a pass never acts on a state older than its last write.
"""

from __future__ import annotations

import base64
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as TransportError

from tests.cluster.runtime import Launch, Mount, PodmanRuntime, ProcessRuntime, Started

PULL_ERROR = 'ErrImagePull'
POD_IP = '127.0.0.1'
CLUSTER_DOMAIN = 'cluster.local'


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace('Z', '+00:00')) if value else None


class ConfigError(Exception):
    """The container cannot be configured (missing Secret/ConfigMap key): CreateContainerConfigError."""


@dataclass
class Container:
    pod: str
    namespace: str
    uid: str
    handle: Started
    root: Path
    log: Path
    termination: Path
    gpus: int
    started_at: str
    fallback_to_logs: bool
    done: threading.Event = field(default_factory=threading.Event)


class SimulatedNode:
    def __init__(
        self,
        api_client: Any,
        workdir: Path,
        *,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        gpus: int = 2,
        gpu_resource: str = 'nvidia.com/gpu',
        labels: dict[str, str] | None = None,
        unpullable: tuple[str, ...] = (),
        poll: float = 0.05,
        resync: float = 2.0,
        name: str = 'sim-node-1',
        command: list[str] | None = None,
        runtime: str = 'process',
    ):
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.workdir = Path(workdir)
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.gpus = gpus
        self.gpu_resource = gpu_resource
        self.labels = {'kubernetes.io/hostname': name, **(labels or {})}
        self.unpullable = unpullable
        self.poll = poll
        self.name = name
        # Replaces every container's command and args (a stand-in trainer for load and fault tests);
        # paths inside the container ($(VAR), mounts) are mapped as for the real command.
        self.command = list(command) if command else None
        self.runtime: ProcessRuntime | PodmanRuntime
        if runtime == 'podman':
            if command:
                raise ValueError('command replaces a container with a program of this machine: not with podman')
            self.runtime = PodmanRuntime()
        elif runtime == 'process':
            self.runtime = ProcessRuntime(python)
        else:
            raise ValueError(f"runtime must be 'process' or 'podman', not {runtime!r}")
        self.containers: dict[str, Container] = {}  # by pod uid
        self.logs: dict[tuple[str, str], Path] = {}
        self.reported: set[tuple[str, str]] = set()  # (pod uid, condition) already written
        self.written: dict[str, str] = {}  # job uid -> summary of the last status written
        self.errors: list[BaseException] = []
        self.resync = resync
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchers: list[threading.Thread] = []
        self._lock = threading.Lock()
        # The informer: cached Jobs and pods by uid, pods by owning Job, what changed since the last pass.
        self._cache = threading.Condition()
        self._jobs: dict[str, Any] = {}
        self._pods: dict[str, Any] = {}
        self._pods_of: dict[str, set[str]] = {}
        self._gone: set[str] = set()  # uids seen deleted: a late event must not bring them back
        self._dirty_jobs: set[str] = set()
        self._dirty_pods: set[str] = set()
        self._synced = {'jobs': threading.Event(), 'pods': threading.Event()}

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> SimulatedNode:
        for kind in ('jobs', 'pods'):
            thread = threading.Thread(target=self._watch, args=(kind,), name=f'simulated-node-{kind}', daemon=True)
            thread.start()
            self._watchers.append(thread)
        for synced in self._synced.values():
            synced.wait(30)
        self._thread = threading.Thread(target=self._loop, name='simulated-node', daemon=True)
        self._thread.start()
        return self

    def kill(self, pod: str, namespace: str = 'default') -> bool:
        """Kill the container of ``pod`` (SIGKILL), like a node losing the process; False if none runs."""
        with self._lock:
            running = [c for c in self.containers.values() if c.pod == pod and c.namespace == namespace]
        for container in running:
            if container.handle.process.poll() is None:
                container.handle.kill()
                return True
        return False

    def stop(self) -> None:
        self._stop.set()
        with self._cache:
            self._cache.notify_all()
        if self._thread is not None:
            self._thread.join(30)
        for thread in self._watchers:
            thread.join(10)
        for container in list(self.containers.values()):
            container.handle.kill()
            container.done.wait(10)

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) acting: Jobs get no pods while paused, like a cluster without capacity."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()
            self._touch_all()

    def read_log(self, namespace: str, pod: str) -> str | None:
        path = self.logs.get((namespace, pod))
        if path is None or not path.exists():
            return None
        return path.read_text(errors='replace')

    # --- the informer ------------------------------------------------------------------------------
    def _watch(self, kind: str) -> None:
        """List, then watch from the list's resourceVersion; list again after any error (410 included)."""
        if kind == 'jobs':
            lister: Any = self.batch.list_job_for_all_namespaces
        else:
            lister = self.core.list_pod_for_all_namespaces
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = lister()
                    self._relist(kind, listed.items, int(listed.metadata.resource_version or 0))
                    version = listed.metadata.resource_version
                    self._synced[kind].set()
                stream = watch.Watch()
                try:
                    for event in stream.stream(lister, resource_version=version, timeout_seconds=2):
                        self._observe(kind, event['type'], event['object'])
                        version = event['object'].metadata.resource_version or version
                        if self._stop.is_set():
                            break
                finally:
                    stream.stop()
            except Exception as e:  # a watch that broke or expired: list again, as informers do
                version = None
                if not self._stop.is_set() and not isinstance(e, (ApiException, TransportError)):
                    self.errors.append(e)  # not the API: a bug of this node
                self._stop.wait(0.1)

    def _relist(self, kind: str, items: list[Any], version: int) -> None:
        with self._cache:
            table = self._jobs if kind == 'jobs' else self._pods
            listed = {item.metadata.uid for item in items}
            for uid, cached in list(table.items()):
                if uid not in listed and int(cached.metadata.resource_version or 0) <= version:
                    self._forget(kind, uid)
            for item in items:
                self._store(kind, item)
            self._touch_all()

    def _observe(self, kind: str, type_: str, obj: Any) -> None:
        with self._cache:
            if type_ == 'DELETED':
                self._forget(kind, obj.metadata.uid)
            else:
                self._store(kind, obj)

    def _store(self, kind: str, obj: Any) -> None:
        """Cache ``obj`` unless the cache holds a newer version (or it was deleted); mark it to handle."""
        uid = obj.metadata.uid
        with self._cache:
            table = self._jobs if kind == 'jobs' else self._pods
            cached = table.get(uid)
            version = int(obj.metadata.resource_version or 0)
            if uid in self._gone or (cached is not None and int(cached.metadata.resource_version or 0) >= version):
                return  # nothing new (the echo of this node's own write, or a late event)
            table[uid] = obj
            if kind == 'jobs':
                self._dirty_jobs.add(uid)
            else:
                self._dirty_pods.add(uid)
                for owner in _controllers(obj):
                    self._pods_of.setdefault(owner, set()).add(uid)
                    self._dirty_jobs.add(owner)
            self._cache.notify_all()

    def _forget(self, kind: str, uid: str) -> None:
        with self._cache:
            self._gone.add(uid)
            if kind == 'jobs':
                self._jobs.pop(uid, None)
                return
            pod = self._pods.pop(uid, None)
            for owner in _controllers(pod) if pod is not None else []:
                self._pods_of.get(owner, set()).discard(uid)
                self._dirty_jobs.add(owner)
            self._cache.notify_all()
        with self._lock:
            container = self.containers.get(uid)
        if container is not None:
            container.handle.kill()  # the pod was deleted: stop its container

    def _touch_all(self) -> None:
        with self._cache:
            self._dirty_jobs.update(self._jobs)
            self._dirty_pods.update(self._pods)
            self._cache.notify_all()

    def _loop(self) -> None:
        next_resync = time.monotonic() + self.resync
        while not self._stop.is_set():
            with self._cache:
                while not self._stop.is_set() and not (self._dirty_jobs or self._dirty_pods):
                    left = next_resync - time.monotonic()
                    if left <= 0:
                        break
                    self._cache.wait(left)
            if self._stop.is_set():
                return
            if time.monotonic() >= next_resync:
                next_resync = time.monotonic() + self.resync
                self._touch_all()  # time alone changes things: active deadlines
            if self._paused.is_set():
                self._stop.wait(self.poll)
                continue
            try:
                self._pass()
            except Exception as e:  # surfaced by the fixture; the loop goes on like a real controller
                self.errors.append(e)
                self._stop.wait(self.poll)

    def step(self) -> None:
        """One pass over everything cached (the loop normally handles only what changed)."""
        self._touch_all()
        self._pass()

    def _pass(self) -> None:
        with self._cache:
            jobs = [self._jobs[uid] for uid in self._dirty_jobs if uid in self._jobs]
            pods = [self._pods[uid] for uid in self._dirty_pods if uid in self._pods]
            self._dirty_jobs.clear()
            self._dirty_pods.clear()
        for job in jobs:
            with self._cache:
                # The latest cached version: an earlier job in this pass may have written this one's pods.
                job = self._jobs.get(job.metadata.uid, job)
                owned = [self._pods[uid] for uid in self._pods_of.get(job.metadata.uid, ()) if uid in self._pods]
            self._control_job(job, owned)
        for pod in pods:
            with self._cache:
                pod = self._pods.get(pod.metadata.uid)
            if pod is not None:
                self._kubelet(pod)

    # --- Job controller --------------------------------------------------------------------------
    def _control_job(self, job: Any, pods: list[Any]) -> None:
        spec, status = job.spec, job.status or client.V1JobStatus()
        conditions = [c.to_dict() for c in (status.conditions or [])]
        if any(c['type'] in ('Complete', 'Failed') and c['status'] == 'True' for c in conditions):
            for pod in pods:
                if _active(pod):
                    self._delete_pod(pod)
            return
        ns = job.metadata.namespace
        active = [p for p in pods if _active(p)]
        if spec.suspend:
            for pod in active:
                self._delete_pod(pod)
            self._job_status(job, conditions, 'Suspended', 'True', 'JobSuspended', 'Job suspended', active=0)
            return
        new_conditions = conditions
        if any(c['type'] == 'Suspended' and c['status'] == 'True' for c in conditions):
            new_conditions = _set_condition(conditions, 'Suspended', 'False', 'JobResumed', 'Job resumed')
        start_time = status.start_time or datetime.now(timezone.utc)
        succeeded = [p for p in pods if p.status and p.status.phase == 'Succeeded']
        failed = [p for p in pods if p.status and p.status.phase == 'Failed']
        counted: list[Any] = []
        fail_job: str | None = None
        for pod in failed:
            verdict = _policy_verdict(spec.pod_failure_policy, pod)
            if verdict == 'FailJob':
                code = _exit_code(pod)
                fail_job = (
                    f'Container trainer for pod {ns}/{pod.metadata.name} failed with exit code {code} '
                    'matching FailJob rule at index 0'
                )
            elif verdict != 'Ignore':
                counted.append(pod)
        failure: tuple[str, str] | None = None
        if fail_job:
            failure = ('PodFailurePolicy', fail_job)
        elif len(counted) > (spec.backoff_limit if spec.backoff_limit is not None else 6):
            failure = ('BackoffLimitExceeded', 'Job has reached the specified backoff limit')
        elif (
            spec.active_deadline_seconds
            and (datetime.now(timezone.utc) - start_time).total_seconds() > spec.active_deadline_seconds
        ):
            failure = ('DeadlineExceeded', 'Job was active longer than specified deadline')
        counts = {'succeeded': len(succeeded), 'failed': len(counted), 'start_time': start_time}
        if failure is not None:
            for pod in active:
                self._delete_pod(pod)
            new_conditions = _set_condition(new_conditions, 'FailureTarget', 'True', *failure)
            new_conditions = _set_condition(new_conditions, 'Failed', 'True', *failure)
            self._write_job_status(job, new_conditions, active=0, **counts)
            return
        completions = spec.completions or 1
        indexed = spec.completion_mode == 'Indexed'
        done_indexes = {_index(p) for p in succeeded}
        if (indexed and len(done_indexes) >= completions) or (not indexed and len(succeeded) >= completions):
            new_conditions = _set_condition(
                new_conditions,
                'SuccessCriteriaMet',
                'True',
                'CompletionsReached',
                'Reached expected number of succeeded pods',
            )
            new_conditions = _set_condition(
                new_conditions, 'Complete', 'True', 'CompletionsReached', 'Reached expected number of succeeded pods'
            )
            self._write_job_status(job, new_conditions, active=0, completion_time=now_rfc3339(), **counts)
            return
        parallelism = spec.parallelism if spec.parallelism is not None else 1
        try:
            if indexed:
                busy = {_index(p) for p in active} | done_indexes
                missing = [i for i in range(completions) if i not in busy][: max(parallelism - len(active), 0)]
                for index in missing:
                    active.append(self._create_pod(job, index))
            else:
                remaining = completions - len(succeeded)
                for _ in range(max(min(parallelism, remaining) - len(active), 0)):
                    active.append(self._create_pod(job, None))
        except ApiException as e:
            if e.status in (404, 409) or (e.status or 0) >= 500:
                raise
            self._failed_create(job, e)
        self._write_job_status(job, new_conditions, active=len(active), **counts)

    FAILED_CREATE_RETRY = 1.0  # seconds before the Job controller tries a refused pod again

    def _failed_create(self, job: Any, error: ApiException) -> None:
        """The API server refused the Job's pod (admission: a missing ServiceAccount, a quota): a FailedCreate
        Event on the Job, in the Job controller's words, and another try later (as its backoff does)."""
        import json

        try:
            message = json.loads(error.body or '{}').get('message') or str(error.reason)
        except ValueError:
            message = str(error.reason)
        stamp = now_rfc3339()
        event = {
            'metadata': {'generateName': f'{job.metadata.name}.', 'namespace': job.metadata.namespace},
            'involvedObject': {
                'apiVersion': 'batch/v1',
                'kind': 'Job',
                'name': job.metadata.name,
                'namespace': job.metadata.namespace,
                'uid': job.metadata.uid,
            },
            'reason': 'FailedCreate',
            'message': f'Error creating: {message}',
            'type': 'Warning',
            'source': {'component': 'job-controller'},
            'firstTimestamp': stamp,
            'lastTimestamp': stamp,
            'count': 1,
        }
        self._ignore_404(lambda: self.core.create_namespaced_event(job.metadata.namespace, event))
        uid = job.metadata.uid

        def again() -> None:
            with self._cache:
                if uid in self._jobs:
                    self._dirty_jobs.add(uid)
                    self._cache.notify_all()

        timer = threading.Timer(self.FAILED_CREATE_RETRY, again)
        timer.daemon = True
        timer.start()

    def _job_status(
        self, job: Any, conditions: list[dict], type_: str, value: str, reason: str, message: str, active: int
    ) -> None:
        self._write_job_status(job, _set_condition(conditions, type_, value, reason, message), active=active)

    def _write_job_status(self, job: Any, conditions: list[dict], **fields: Any) -> None:
        status: dict[str, Any] = {'conditions': [_condition_json(c) for c in conditions] or None}
        for key, value in fields.items():
            if key == 'start_time':
                status['startTime'] = value if isinstance(value, str) else value.strftime('%Y-%m-%dT%H:%M:%SZ')
            elif key == 'completion_time':
                status['completionTime'] = value
            else:
                status[key] = value
        summary = repr(
            (
                [(c['type'], c['status']) for c in status['conditions'] or []],
                status.get('active'),
                status.get('succeeded'),
                status.get('failed'),
            )
        )
        if self.written.get(job.metadata.uid) == summary:
            return
        self.written[job.metadata.uid] = summary
        written = self._ignore_404(
            lambda: self.batch.patch_namespaced_job_status(
                job.metadata.name, job.metadata.namespace, {'status': status}
            )
        )
        if written is not None:
            self._store('jobs', written)

    def _create_pod(self, job: Any, index: int | None) -> Any:
        template = self.batch.api_client.sanitize_for_serialization(job.spec.template)
        meta = template.get('metadata') or {}
        labels = {
            **(meta.get('labels') or {}),
            'batch.kubernetes.io/job-name': job.metadata.name,
            'job-name': job.metadata.name,
            'batch.kubernetes.io/controller-uid': job.metadata.uid,
        }
        annotations = dict(meta.get('annotations') or {})
        spec = template['spec']
        prefix = f'{job.metadata.name}-'
        if index is not None:
            annotations['batch.kubernetes.io/job-completion-index'] = str(index)
            labels['batch.kubernetes.io/job-completion-index'] = str(index)
            prefix = f'{job.metadata.name}-{index}-'
            spec['hostname'] = f'{job.metadata.name}-{index}'
        body = {
            'apiVersion': 'v1',
            'kind': 'Pod',
            'metadata': {
                'generateName': prefix,
                'namespace': job.metadata.namespace,
                'labels': labels,
                'annotations': annotations,
                'ownerReferences': [
                    {
                        'apiVersion': 'batch/v1',
                        'kind': 'Job',
                        'name': job.metadata.name,
                        'uid': job.metadata.uid,
                        'controller': True,
                        'blockOwnerDeletion': True,
                    }
                ],
            },
            'spec': spec,
        }
        created = self.core.create_namespaced_pod(job.metadata.namespace, body)
        self._store('pods', created)  # seen at once: the next pass must not create it again
        return created

    def _delete_pod(self, pod: Any) -> None:
        self._ignore_404(lambda: self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace))
        self._forget('pods', pod.metadata.uid)

    @staticmethod
    def _ignore_404(call: Any) -> Any:
        try:
            return call()
        except ApiException as e:
            if e.status != 404:
                raise
            return None

    # --- kubelet ---------------------------------------------------------------------------------
    def _kubelet(self, pod: Any) -> None:
        uid = pod.metadata.uid
        phase = pod.status.phase if pod.status else None
        if uid in self.containers or phase in ('Running', 'Succeeded', 'Failed') or pod.metadata.deletion_timestamp:
            return
        container = pod.spec.containers[0]
        gpus = int(((container.resources and container.resources.limits) or {}).get(self.gpu_resource, 0))
        selector = pod.spec.node_selector or {}
        mismatch = {k: v for k, v in selector.items() if self.labels.get(k) != v}
        with self._lock:
            used = sum(c.gpus for c in self.containers.values() if not c.done.is_set())
        if mismatch or gpus > self.gpus - used:
            why = (
                "1 node(s) didn't match Pod's node affinity/selector"
                if mismatch
                else f'1 Insufficient {self.gpu_resource}'
            )
            self._report(
                pod,
                'unschedulable',
                {
                    'phase': 'Pending',
                    'conditions': [
                        {
                            'type': 'PodScheduled',
                            'status': 'False',
                            'reason': 'Unschedulable',
                            'message': f'0/1 nodes are available: {why}.',
                            'lastTransitionTime': now_rfc3339(),
                        }
                    ],
                },
            )
            return
        missing = self.runtime.image_missing(container.image) if isinstance(self.runtime, PodmanRuntime) else None
        if container.image in self.unpullable or missing:
            self._report(
                pod,
                'pull',
                {
                    'phase': 'Pending',
                    'conditions': [_pod_condition('PodScheduled', 'True')],
                    'containerStatuses': [
                        {
                            'name': container.name,
                            'image': container.image,
                            'imageID': '',
                            'ready': False,
                            'restartCount': 0,
                            'state': {
                                'waiting': {
                                    'reason': PULL_ERROR,
                                    'message': f'failed to pull and unpack image "{container.image}": '
                                    + (missing or 'not found'),
                                }
                            },
                        }
                    ],
                },
            )
            return
        try:
            self._run(pod, gpus)
        except ConfigError as e:
            # Like the kubelet, try again: the Secret or ConfigMap may be created a moment later (the operator
            # creates a run's ConfigMap right after its Job).
            self._retry_later(pod.metadata.uid)
            self._report(
                pod,
                'config',
                {
                    'phase': 'Pending',
                    'conditions': [_pod_condition('PodScheduled', 'True')],
                    'containerStatuses': [
                        {
                            'name': container.name,
                            'image': container.image,
                            'imageID': '',
                            'ready': False,
                            'restartCount': 0,
                            'state': {'waiting': {'reason': 'CreateContainerConfigError', 'message': str(e)}},
                        }
                    ],
                },
            )

    CONFIG_RETRY = 0.5  # seconds before a pod in CreateContainerConfigError is tried again

    def _retry_later(self, uid: str) -> None:
        def touch() -> None:
            with self._cache:
                if uid in self._pods:
                    self._dirty_pods.add(uid)
                    self._cache.notify_all()

        timer = threading.Timer(self.CONFIG_RETRY, touch)
        timer.daemon = True
        timer.start()

    def _report(self, pod: Any, what: str, status: dict[str, Any]) -> None:
        key = (pod.metadata.uid, what)
        if key in self.reported:
            return
        self.reported.add(key)
        self._patch_pod_status(pod.metadata.namespace, pod.metadata.name, status)

    def _patch_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        written = self._ignore_404(lambda: self.core.patch_namespaced_pod_status(name, namespace, {'status': status}))
        if written is not None:
            self._store('pods', written)

    def _secret_value(self, namespace: str, ref: Any) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(ref.name, namespace)
        except ApiException as e:
            if e.status == 404 and not ref.optional:
                raise ConfigError(f'secret "{ref.name}" not found') from e
            return None
        data = secret.data or {}
        if ref.key not in data:
            if ref.optional:
                return None
            raise ConfigError(f"couldn't find key {ref.key} in Secret {namespace}/{ref.name}")
        return base64.b64decode(data[ref.key]).decode()

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        try:
            return self.core.read_namespaced_config_map(name, namespace).data or {}
        except ApiException as e:
            if e.status == 404:
                raise ConfigError(f'configmap "{name}" not found') from e
            raise

    def _field(self, pod: Any, path: str) -> str:
        if path == 'metadata.name':
            return pod.metadata.name
        if path == 'metadata.namespace':
            return pod.metadata.namespace
        if path == 'status.podIP':
            return '127.0.0.1'
        if m := re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path):
            return (getattr(pod.metadata, m.group(1)) or {}).get(m.group(2), '')
        raise ConfigError(f'unsupported fieldRef {path}')

    def _environment(self, pod: Any, container: Any) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in container.env or []:
            if var.value_from is None:
                value = _expand(var.value or '', env)
            elif var.value_from.secret_key_ref is not None:
                value = self._secret_value(pod.metadata.namespace, var.value_from.secret_key_ref)
            elif var.value_from.config_map_key_ref is not None:
                ref = var.value_from.config_map_key_ref
                value = self._config_map(pod.metadata.namespace, ref.name).get(ref.key)
            elif var.value_from.field_ref is not None:
                value = self._field(pod, var.value_from.field_ref.field_path)
            else:
                raise ConfigError(f'unsupported valueFrom in env {var.name}')
            if value is not None:
                env[var.name] = value
        return env

    def _volumes(self, pod: Any, container: Any, rootfs: Path) -> tuple[dict[str, Mount], dict[Path, str]]:
        """Each volume mount as a folder under the pod's ``rootfs``, and the files of ConfigMap volumes."""
        ns = pod.metadata.namespace
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Mount] = {}
        files: dict[Path, str] = {}
        for mount in container.volume_mounts or []:
            target = rootfs / mount.mount_path.lstrip('/')
            if target.is_symlink():  # a claim mounted by an earlier try of this pod (CreateContainerConfigError)
                target.unlink()
            target.mkdir(parents=True, exist_ok=True)
            volume = volumes.get(mount.name)
            read_only = bool(mount.read_only)
            if volume is not None and volume.config_map is not None:
                for key, text in self._config_map(ns, volume.config_map.name).items():
                    files[target / key] = text
                read_only = True
            elif volume is not None and volume.persistent_volume_claim is not None:
                shared = self.workdir / 'pvcs' / volume.persistent_volume_claim.claim_name
                shared.mkdir(parents=True, exist_ok=True)
                shared.chmod(0o777)
                target.rmdir()
                target.symlink_to(shared, target_is_directory=True)
            else:
                target.chmod(0o777)  # an emptyDir: writable by the pod's user, whoever that is
            mounts[mount.mount_path] = Mount(target, read_only)
        return mounts, files

    def _cluster_hosts(self, pod: Any) -> dict[str, str]:
        """The cluster DNS names of the pod's namespace that resolve, each to the node's one address."""
        ns = pod.metadata.namespace
        names: dict[str, str] = {}
        with self._cache:
            pods = [p for p in self._pods.values() if p.metadata.namespace == ns and not p.metadata.deletion_timestamp]
        for service in self.core.list_namespaced_service(ns).items:
            svc = service.metadata.name
            domains = [f'{svc}.{ns}.svc', f'{svc}.{ns}.svc.{CLUSTER_DOMAIN}']
            for domain in domains:
                names[domain] = POD_IP
            if service.spec.cluster_ip != 'None' or not service.spec.selector:
                continue
            for member in pods:  # a headless Service: a record per selected pod with this subdomain
                labels = member.metadata.labels or {}
                if member.spec.subdomain != svc or not member.spec.hostname:
                    continue
                if all(labels.get(k) == v for k, v in service.spec.selector.items()):
                    for domain in domains:
                        names[f'{member.spec.hostname}.{domain}'] = POD_IP
        return names

    def _launch(self, pod: Any, container: Any, root: Path) -> Launch:
        rootfs = root / 'rootfs'
        mounts, files = self._volumes(pod, container, rootfs)
        termination_path = container.termination_message_path or '/dev/termination-log'
        termination = rootfs / termination_path.lstrip('/')
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.touch()
        termination.chmod(0o666)
        mounts[termination_path] = Mount(termination)
        extra = dict(self.extra_env)
        if isinstance(self.runtime, PodmanRuntime):
            extra.pop('PYTHONPATH', None)  # this machine's import path means nothing inside an image
        env = {**extra, **self._environment(pod, container)}
        for path, text in files.items():
            if isinstance(self.runtime, ProcessRuntime):
                # The container would see its own paths; a process of this machine needs them mapped.
                for inside in sorted([termination_path, *_config_mounts(container, pod)], key=len, reverse=True):
                    text = text.replace(inside, str(mounts[inside].host))
            path.write_text(text)
        given = self.command or [*(container.command or []), *(container.args or [])]
        security = _security(pod, container)
        user = (security['uid'], security['gid'] if security['gid'] is not None else 0)
        if security['non_root'] and user[0] == 0:
            raise ConfigError('container has runAsNonRoot and image will run as root')
        limits = (container.resources and container.resources.limits) or {}
        return Launch(
            name=f'kf-{pod.metadata.uid[:12]}',
            image=container.image,
            argv=[_expand(a, env) for a in given],
            command_given=bool(self.command or container.command),
            env=env,
            mounts=mounts,
            root=root,
            working_dir=container.working_dir,
            user=user if security['uid'] is not None else None,
            hostname=pod.spec.hostname or pod.metadata.name,
            hosts=self._cluster_hosts(pod),
            memory_bytes=_bytes(limits['memory']) if 'memory' in limits else None,
            read_only_root=bool(security['read_only']),
            drop_all_capabilities=bool(security['drop_all']),
            no_new_privileges=security['no_escalation'] is False,
        )

    def _run(self, pod: Any, gpus: int) -> None:
        ns, name, uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        container = pod.spec.containers[0]
        root = self.workdir / f'{name}-{uid[:8]}'
        launch = self._launch(pod, container, root)
        log = root / 'container.log'
        log.parent.mkdir(parents=True, exist_ok=True)
        started = now_rfc3339()
        with log.open('wb') as sink:
            handle = self.runtime.start(launch, sink)
        self.logs[(ns, name)] = log
        running = Container(
            pod=name,
            namespace=ns,
            uid=uid,
            handle=handle,
            root=root,
            log=log,
            termination=mounts_host(launch, container),
            gpus=gpus,
            started_at=started,
            fallback_to_logs=container.termination_message_policy == 'FallbackToLogsOnError',
        )
        with self._lock:
            self.containers[uid] = running
        self._patch_pod_status(
            ns,
            name,
            {
                'phase': 'Running',
                'startTime': started,
                'hostIP': POD_IP,
                'podIP': POD_IP,
                'conditions': [
                    _pod_condition('PodScheduled', 'True'),
                    _pod_condition('Initialized', 'True'),
                    _pod_condition('ContainersReady', 'True'),
                    _pod_condition('Ready', 'True'),
                ],
                'containerStatuses': [
                    {
                        'name': container.name,
                        'image': container.image,
                        'imageID': f'sim://{container.image}',
                        'ready': True,
                        'started': True,
                        'restartCount': 0,
                        'state': {'running': {'startedAt': started}},
                    }
                ],
            },
        )
        threading.Thread(target=self._wait, args=(running, container), name=f'pod-{name}', daemon=True).start()

    def _wait(self, running: Container, container: Any) -> None:
        code = running.handle.wait()
        message = running.termination.read_text(errors='replace').strip() if running.termination.exists() else ''
        if not message and code != 0 and running.fallback_to_logs:
            lines = running.log.read_text(errors='replace').splitlines()[-80:]
            message = '\n'.join(lines)[-2048:]
        finished = now_rfc3339()
        terminated: dict[str, Any] = {
            'exitCode': code if code >= 0 else 128 - code,
            'reason': 'Completed' if code == 0 else ('Error' if code > 0 else 'Killed'),
            'startedAt': running.started_at,
            'finishedAt': finished,
        }
        if message:
            terminated['message'] = message[-4096:]
        try:
            self._patch_pod_status(
                running.namespace,
                running.pod,
                {
                    'phase': 'Succeeded' if code == 0 else 'Failed',
                    'conditions': [
                        _pod_condition('PodScheduled', 'True'),
                        _pod_condition('Ready', 'False', 'PodCompleted'),
                        _pod_condition('ContainersReady', 'False', 'PodCompleted'),
                    ],
                    'containerStatuses': [
                        {
                            'name': container.name,
                            'image': container.image,
                            'imageID': f'sim://{container.image}',
                            'ready': False,
                            'started': False,
                            'restartCount': 0,
                            'state': {'terminated': terminated},
                        }
                    ],
                },
            )
        except Exception as e:  # the API server may be gone at teardown
            if not self._stop.is_set():
                self.errors.append(e)
        finally:
            running.done.set()
            with self._cache:  # its GPUs are free: pending pods may fit now
                self._dirty_pods.update(uid for uid, p in self._pods.items() if _pending(p))
                self._cache.notify_all()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no container runs (used at teardown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(not c.done.is_set() for c in self.containers.values()):
            time.sleep(0.05)


def _config_mounts(container: Any, pod: Any) -> list[str]:
    volumes = {v.name: v for v in pod.spec.volumes or []}
    return [
        m.mount_path
        for m in container.volume_mounts or []
        if volumes.get(m.name) is not None and volumes[m.name].config_map is not None
    ]


def mounts_host(launch: Launch, container: Any) -> Path:
    """The host file behind the container's termination-message path."""
    return launch.mounts[container.termination_message_path or '/dev/termination-log'].host


def _security(pod: Any, container: Any) -> dict[str, Any]:
    """The effective security settings: the container's securityContext over the pod's."""
    pod_context = pod.spec.security_context
    own = container.security_context

    def pick(name: str) -> Any:
        value = getattr(own, name, None) if own is not None else None
        if value is None and pod_context is not None:
            value = getattr(pod_context, name, None)
        return value

    capabilities = own.capabilities if own is not None else None
    return {
        'uid': pick('run_as_user'),
        'gid': pick('run_as_group'),
        'non_root': pick('run_as_non_root'),
        'read_only': own.read_only_root_filesystem if own is not None else None,
        'drop_all': 'ALL' in ((capabilities and capabilities.drop) or []),
        'no_escalation': own.allow_privilege_escalation if own is not None else None,
    }


_UNITS = {'': 1, 'k': 10**3, 'M': 10**6, 'G': 10**9, 'T': 10**12, 'Ki': 2**10, 'Mi': 2**20, 'Gi': 2**30, 'Ti': 2**40}


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``4G``, ``1e9``) in bytes."""
    match = re.fullmatch(r'([0-9.e+]+)([kMGT]i?|)', str(quantity))
    if match is None:
        raise ConfigError(f'cannot read the memory quantity {quantity!r}')
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$(VAR)`` escapes it)."""
    return re.sub(
        r'\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)',
        lambda m: '$(' if m.group(1) is None else env.get(m.group(1), m.group(0)),
        value,
    )


def _controllers(pod: Any) -> list[str]:
    return [ref.uid for ref in pod.metadata.owner_references or [] if ref.controller and ref.uid]


def _pending(pod: Any) -> bool:
    return (pod.status is None or pod.status.phase in (None, 'Pending')) and not pod.metadata.deletion_timestamp


def _active(pod: Any) -> bool:
    return (
        pod.status is None or pod.status.phase in (None, 'Pending', 'Running')
    ) and not pod.metadata.deletion_timestamp


def _index(pod: Any) -> int | None:
    value = (pod.metadata.annotations or {}).get('batch.kubernetes.io/job-completion-index')
    return int(value) if value is not None else None


def _exit_code(pod: Any) -> int | None:
    for status in (pod.status and pod.status.container_statuses) or []:
        if status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def _policy_verdict(policy: Any, pod: Any) -> str | None:
    """The action of the first pod-failure-policy rule matching a failed pod (None: count it)."""
    if policy is None:
        return None
    code = _exit_code(pod)
    conditions = {c.type: c.status for c in (pod.status.conditions or [])}
    for rule in policy.rules or []:
        if rule.on_exit_codes is not None and code is not None:
            values = set(rule.on_exit_codes.values)
            hit = code in values if rule.on_exit_codes.operator == 'In' else code not in values
            if hit:
                return rule.action
        for pattern in rule.on_pod_conditions or []:
            if conditions.get(pattern.type) == (pattern.status or 'True'):
                return rule.action
    return None


def _set_condition(conditions: list[dict], type_: str, status: str, reason: str, message: str) -> list[dict]:
    result = [c for c in conditions if c['type'] != type_]
    old = next((c for c in conditions if c['type'] == type_), None)
    if old is not None and old['status'] == status:
        result.append(old)
    else:
        stamp = now_rfc3339()
        result.append(
            {
                'type': type_,
                'status': status,
                'reason': reason,
                'message': message,
                'last_transition_time': stamp,
                'last_probe_time': stamp,
            }
        )
    return result


def _condition_json(c: dict[str, Any]) -> dict[str, Any]:
    def stamp(value: Any) -> Any:
        return value.strftime('%Y-%m-%dT%H:%M:%SZ') if isinstance(value, datetime) else value

    return {
        'type': c['type'],
        'status': c['status'],
        'reason': c.get('reason'),
        'message': c.get('message'),
        'lastTransitionTime': stamp(c.get('last_transition_time') or c.get('lastTransitionTime')),
        'lastProbeTime': stamp(c.get('last_probe_time') or c.get('lastProbeTime')),
    }


def _pod_condition(type_: str, status: str, reason: str | None = None) -> dict[str, Any]:
    condition = {'type': type_, 'status': status, 'lastTransitionTime': now_rfc3339()}
    if reason:
        condition['reason'] = reason
    return condition
