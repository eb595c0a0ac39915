"""SimulatedNode: the Job controller and a kubelet, talking to the API server over HTTP.

As the Job controller it creates pods for unsuspended Jobs (Indexed ones with their completion
index), counts successes and failures, applies the pod failure policy (FailJob on exit codes,
Ignore on the DisruptionTarget condition), the backoff limit and the active deadline, removes
the pods of suspended Jobs, and writes Job status and conditions.

As the kubelet it schedules pods against its GPU capacity and node labels (a pod that does not
fit stays Pending with PodScheduled=False/Unschedulable), refuses images the test declares
unpullable (ErrImagePull), resolves the container environment (values, ``$(VAR)`` expansion,
Secret and ConfigMap key references, field references), materialises ConfigMap and emptyDir
volumes under a per-pod root folder, maps the mount paths and the termination-message path into
it, then runs the container's real command as a subprocess of this project's Python. Exit code,
termination message (or the log tail with FallbackToLogsOnError) and phase go back into the pod
status; the log is served by the emulator's ``/log`` endpoint.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

PULL_ERROR = 'ErrImagePull'


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
    process: subprocess.Popen[bytes]
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
        name: str = 'sim-node-1',
        command: list[str] | None = None,
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
        self.containers: dict[str, Container] = {}  # by pod uid
        self.logs: dict[tuple[str, str], Path] = {}
        self.reported: set[tuple[str, str]] = set()  # (pod uid, condition) already written
        self.written: dict[str, str] = {}  # job uid -> summary of the last status written
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> SimulatedNode:
        self._thread = threading.Thread(target=self._loop, name='simulated-node', daemon=True)
        self._thread.start()
        return self

    def kill(self, pod: str, namespace: str = 'default') -> bool:
        """Kill the container of ``pod`` (SIGKILL), like a node losing the process; False if none runs."""
        with self._lock:
            running = [c for c in self.containers.values() if c.pod == pod and c.namespace == namespace]
        for container in running:
            if container.process.poll() is None:
                container.process.kill()
                return True
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for container in list(self.containers.values()):
            if container.process.poll() is None:
                container.process.kill()
            container.done.wait(10)

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) acting: Jobs get no pods while paused, like a cluster without capacity."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    def read_log(self, namespace: str, pod: str) -> str | None:
        path = self.logs.get((namespace, pod))
        if path is None or not path.exists():
            return None
        return path.read_text(errors='replace')

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._paused.is_set():
                    self.step()
            except Exception as e:  # surfaced by the fixture; the loop goes on like a real controller
                self.errors.append(e)
            self._stop.wait(self.poll)

    def step(self) -> None:
        jobs = self.batch.list_job_for_all_namespaces().items
        pods = self.core.list_pod_for_all_namespaces().items
        live_uids = {p.metadata.uid for p in pods}
        with self._lock:
            for uid, container in list(self.containers.items()):
                if uid not in live_uids and container.process.poll() is None:
                    container.process.kill()  # the pod was deleted: stop its container
        for job in jobs:
            self._control_job(job, [p for p in pods if _owned_by(p, job.metadata.uid)])
        for pod in pods:
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
        if indexed:
            busy = {_index(p) for p in active} | done_indexes
            missing = [i for i in range(completions) if i not in busy][: max(parallelism - len(active), 0)]
            for index in missing:
                active.append(self._create_pod(job, index))
        else:
            remaining = completions - len(succeeded)
            for _ in range(max(min(parallelism, remaining) - len(active), 0)):
                active.append(self._create_pod(job, None))
        self._write_job_status(job, new_conditions, active=len(active), **counts)

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
        self._ignore_404(
            lambda: self.batch.patch_namespaced_job_status(
                job.metadata.name, job.metadata.namespace, {'status': status}
            )
        )

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
        return self.core.create_namespaced_pod(job.metadata.namespace, body)

    def _delete_pod(self, pod: Any) -> None:
        self._ignore_404(lambda: self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace))

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
        if container.image in self.unpullable:
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
                                    'message': f'failed to pull and unpack image "{container.image}": not found',
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

    def _report(self, pod: Any, what: str, status: dict[str, Any]) -> None:
        key = (pod.metadata.uid, what)
        if key in self.reported:
            return
        self.reported.add(key)
        self._patch_pod_status(pod.metadata.namespace, pod.metadata.name, status)

    def _patch_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._ignore_404(lambda: self.core.patch_namespaced_pod_status(name, namespace, {'status': status}))

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

    def _environment(self, pod: Any, container: Any, mapping: dict[str, Path]) -> dict[str, str]:
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
                env[var.name] = _map_path(value, mapping)
        return env

    def _run(self, pod: Any, gpus: int) -> None:
        ns, name, uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        container = pod.spec.containers[0]
        root = self.workdir / f'{name}-{uid[:8]}'
        rootfs = root / 'rootfs'
        mapping: dict[str, Path] = {}
        volumes = {v.name: v for v in pod.spec.volumes or []}
        termination_path = container.termination_message_path or '/dev/termination-log'
        files: dict[Path, str] = {}
        for mount in container.volume_mounts or []:
            target = rootfs / mount.mount_path.lstrip('/')
            target.mkdir(parents=True, exist_ok=True)
            mapping[mount.mount_path] = target
            volume = volumes.get(mount.name)
            if volume is not None and volume.config_map is not None:
                data = self._config_map(ns, volume.config_map.name)
                for key, text in data.items():
                    files[target / key] = text
            elif volume is not None and volume.persistent_volume_claim is not None:
                shared = self.workdir / 'pvcs' / volume.persistent_volume_claim.claim_name
                shared.mkdir(parents=True, exist_ok=True)
                target.rmdir()
                target.symlink_to(shared, target_is_directory=True)
        termination = rootfs / termination_path.lstrip('/')
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.touch()
        mapping[termination_path] = termination
        env = self._environment(pod, container, mapping)
        for path, text in files.items():
            # The container would see its own paths; the host process needs them mapped into its root.
            for inside in sorted([termination_path, *_config_mounts(container, volumes)], key=len, reverse=True):
                text = text.replace(inside, str(mapping[inside]))
            path.write_text(text)
        given = self.command or [*(container.command or []), *(container.args or [])]
        argv = [_expand(a, env) for a in given]
        # Files that exist on the host (the interpreter, a test's stand-in script) stay as they are even
        # when they lie below a mount path such as /tmp (a checkout under /tmp); container paths map.
        argv = [a if os.path.isfile(a) else _map_path(a, mapping) for a in argv]
        if argv and argv[0] in ('python', 'python3'):
            argv[0] = self.python
        elif argv and argv[0] == 'torchrun':
            argv = [self.python, '-m', 'torch.distributed.run', *argv[1:]]
        process_env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), **self.extra_env, **env}
        log = root / 'container.log'
        log.parent.mkdir(parents=True, exist_ok=True)
        started = now_rfc3339()
        with log.open('wb') as sink:
            process = subprocess.Popen(argv, cwd=rootfs, env=process_env, stdout=sink, stderr=subprocess.STDOUT)
        self.logs[(ns, name)] = log
        running = Container(
            pod=name,
            namespace=ns,
            uid=uid,
            process=process,
            root=root,
            log=log,
            termination=termination,
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
                'hostIP': '127.0.0.1',
                'podIP': '127.0.0.1',
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
        code = running.process.wait()
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
            self.errors.append(e)
        finally:
            running.done.set()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no container runs (used at teardown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(not c.done.is_set() for c in self.containers.values()):
            time.sleep(0.05)


def _config_mounts(container: Any, volumes: dict[str, Any]) -> list[str]:
    return [
        m.mount_path
        for m in container.volume_mounts or []
        if volumes.get(m.name) is not None and volumes[m.name].config_map is not None
    ]


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$(VAR)`` escapes it)."""
    return re.sub(
        r'\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)',
        lambda m: '$(' if m.group(1) is None else env.get(m.group(1), m.group(0)),
        value,
    )


def _map_path(value: str, mapping: dict[str, Path]) -> str:
    for inside in sorted(mapping, key=len, reverse=True):
        if value == inside or value.startswith(inside.rstrip('/') + '/'):
            return str(mapping[inside]) + value[len(inside) :]
        prefix, sep, rest = value.partition('=')
        if sep and (rest == inside or rest.startswith(inside.rstrip('/') + '/')):
            return f'{prefix}={mapping[inside]}{rest[len(inside) :]}'
    return value


def _owned_by(pod: Any, uid: str) -> bool:
    return any(ref.uid == uid and ref.controller for ref in pod.metadata.owner_references or [])


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
