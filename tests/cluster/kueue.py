"""A stand-in for Kueue's admission on the simulated cluster, talking to the API server over HTTP.

What it does, as Kueue (kueue.x-k8s.io/v1beta1) does for a batch/v1 Job:

- a Job labelled ``kueue.x-k8s.io/queue-name: <LocalQueue>`` that is suspended and not finished is a
  pending workload of that LocalQueue's ClusterQueue;
- the ClusterQueue admits pending workloads oldest first (BestEffortFIFO: one that does not fit does
  not block a smaller one behind it) while the quota has room for *all* of a workload's pods at once:
  for every resource the ClusterQueue covers, the pod template's requests (limits for extended
  resources such as ``nvidia.com/gpu``) times the Job's parallelism, plus the usage of the workloads
  already admitted, stay within the sum of the flavors' ``nominalQuota``;
- admitting a Job unsuspends it and adds the ResourceFlavor's ``nodeLabels`` to the pod template's
  nodeSelector (the flavor's tolerations too), which Kubernetes allows on a suspended Job;
- a workload asking for a resource the ClusterQueue does not cover, or whose LocalQueue does not
  exist, stays pending; a finished Job (Complete/Failed) or a deleted one gives its quota back;
- each such Job gets a ``Workload`` (``kueue.x-k8s.io/v1beta1``) in its namespace, as Kueue's Job
  integration makes one: named ``job-<job>-<hash>``, labelled ``kueue.x-k8s.io/job-uid``, owned by the
  Job (deleted with it), ``spec.queueName`` and one pod set ``main``. Its conditions are those of Kueue's
  "Troubleshooting Jobs" page: ``QuotaReserved`` False with reason ``Inadmissible`` and the message
  ``LocalQueue <name> doesn't exist`` (or ``ClusterQueue <name> doesn't exist``); False with reason
  ``Pending`` and ``couldn't assign flavors to pod set main: <reasons>``, the reasons worded as Kueue's
  flavor assigner words them (``resource <r> unavailable in ClusterQueue``, ``insufficient quota for <r>
  in flavor <f>, request > maximum capacity (<asked> > <quota>)``, ``insufficient unused quota for <r> in
  flavor <f>, <n> more needed``); once admitted ``QuotaReserved`` True (``Quota reserved in ClusterQueue
  <cq>``) and ``Admitted`` True (``The workload is admitted``) with ``status.admission``; ``Finished``
  True once the Job ends;
- the ClusterQueue's status counts ``pendingWorkloads`` and ``admittedWorkloads`` and has each
  resource's usage, the LocalQueue's status its own counts.

What it leaves out: preemption, cohorts and borrowing, fair sharing, priorities, several flavors per
resource (the first flavor is used), admission checks, ``namespaceSelector`` (every namespace matches,
as with the chart's ``{}``), ``status.resourceRequests`` of pending Workloads.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = 'kueue.x-k8s.io', 'v1beta1'
QUEUE_LABEL = f'{GROUP}/queue-name'
JOB_UID_LABEL = f'{GROUP}/job-uid'  # on a Job's Workload: how to find it (and how the operator does)
POD_SET = 'main'  # the one pod set of a batch/v1 Job's Workload
KINDS = {  # plural: (kind, namespaced)
    'resourceflavors': ('ResourceFlavor', False),
    'clusterqueues': ('ClusterQueue', False),
    'localqueues': ('LocalQueue', True),
    'workloads': ('Workload', True),
}
_SUFFIXES = {
    '': 1,
    'm': 1e-3,
    'k': 1e3,
    'M': 1e6,
    'G': 1e9,
    'T': 1e12,
    'Ki': 2**10,
    'Mi': 2**20,
    'Gi': 2**30,
    'Ti': 2**40,
}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity as a number (``500m`` -> 0.5, ``4Gi`` -> 4294967296)."""
    match = re.fullmatch(r'([0-9.]+(?:e[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti|)', str(value).strip())
    if match is None:
        raise ValueError(f'not a resource quantity: {value!r}')
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def declare(server: Any) -> None:
    """Serve Kueue's kinds on the test API server (as installing Kueue's CRDs would)."""

    def add() -> None:
        for plural, (kind, namespaced) in KINDS.items():
            server.emu.declare(f'{GROUP}/{VERSION}/{plural}', kind, namespaced=namespaced, status=True)

    server.call(add)


def workload_name(job_name: str, job_uid: str) -> str:
    """Kueue's name for a Job's Workload (jobframework.GetWorkloadNameForOwnerWithGVK)."""
    digest = hashlib.sha1(f'Job\nbatch\n{job_name}\n{job_uid}'.encode()).hexdigest()
    return f'job-{job_name}'[:247] + '-' + digest[:5]


def amount(resource: str, value: float) -> str:
    """A quantity as Kueue's messages write it (``500m`` of cpu, ``2`` GPUs, ``4Gi`` of memory)."""
    if resource == 'cpu' and value != int(value):
        return f'{round(value * 1000)}m'
    for suffix in ('Ti', 'Gi', 'Mi', 'Ki'):
        if value >= _SUFFIXES[suffix] and value % _SUFFIXES[suffix] == 0:
            return f'{int(value // _SUFFIXES[suffix])}{suffix}'
    return f'{value:g}'


def _now() -> str:
    return datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


@dataclass
class Workload:
    job: Any
    queue: str
    requests: dict[str, float]
    body: dict[str, Any]  # the Workload object on the API server


def _finished(job: Any) -> bool:
    return any(
        c.type in ('Complete', 'Failed') and c.status == 'True' for c in (job.status and job.status.conditions) or []
    )


def _requests(job: Any) -> dict[str, float]:
    """What all of a Job's pods ask for at once: per-pod requests (or limits) times parallelism."""
    spec = job.spec.template.spec
    pods = job.spec.parallelism if job.spec.parallelism is not None else 1
    total: dict[str, float] = {}
    for container in spec.containers:
        resources = container.resources
        asked = {**((resources and resources.limits) or {}), **((resources and resources.requests) or {})}
        for name, value in asked.items():
            total[name] = total.get(name, 0.0) + quantity(value) * pods
    return total


class KueueStandIn:
    """Admits queued Jobs by quota (see the module docstring); a thread polling the API server."""

    def __init__(self, api_client: Any, poll: float = 0.1):
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.poll = poll
        self.admitted: list[str] = []  # 'namespace/job' in the order admitted
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name='kueue-stand-in', daemon=True)

    def start(self) -> KueueStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except ApiException as e:  # the API server going away at teardown
                if not self._stop.is_set():
                    self.errors.append(e)
            except Exception as e:
                self.errors.append(e)
            self._stop.wait(self.poll)

    def _list(self, plural: str) -> list[dict[str, Any]]:
        return self.custom.list_cluster_custom_object(GROUP, VERSION, plural)['items']

    def _workload(self, job: Any, known: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The Job's Workload, created as Kueue's Job integration creates it (None: the Job is gone)."""
        meta = job.metadata
        if meta.uid in known:
            return known[meta.uid]
        body = {
            'apiVersion': f'{GROUP}/{VERSION}',
            'kind': 'Workload',
            'metadata': {
                'name': workload_name(meta.name, meta.uid),
                'namespace': meta.namespace,
                'labels': {JOB_UID_LABEL: meta.uid},
                'ownerReferences': [
                    {
                        'apiVersion': 'batch/v1',
                        'kind': 'Job',
                        'name': meta.name,
                        'uid': meta.uid,
                        'controller': True,
                        'blockOwnerDeletion': True,
                    }
                ],
            },
            'spec': {
                'queueName': meta.labels[QUEUE_LABEL],
                'podSets': [
                    {
                        'name': POD_SET,
                        'count': job.spec.parallelism if job.spec.parallelism is not None else 1,
                        'template': self.batch.api_client.sanitize_for_serialization(job.spec.template),
                    }
                ],
            },
        }
        try:
            created = self.custom.create_namespaced_custom_object(GROUP, VERSION, meta.namespace, 'workloads', body)
        except ApiException as e:
            if e.status == 409:  # made by an earlier pass that this listing did not see yet
                return self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, meta.namespace, 'workloads', body['metadata']['name']
                )
            if e.status == 404:
                return None
            raise
        known[meta.uid] = created
        return created

    def _set_status(self, workload: dict[str, Any], conditions: list[dict[str, str]], **status: Any) -> None:
        """Write the Workload's conditions (type, status, reason, message) and other status fields, keeping
        each condition's lastTransitionTime while its status stays; nothing is written when nothing changed."""
        old_status = workload.get('status') or {}
        old = {c['type']: c for c in old_status.get('conditions') or []}
        merged = dict(old)
        for condition in conditions:
            before = old.get(condition['type']) or {}
            since = before.get('lastTransitionTime') if before.get('status') == condition['status'] else None
            merged[condition['type']] = {**condition, 'lastTransitionTime': since or _now()}
        new_status = {**old_status, **status, 'conditions': list(merged.values())}

        def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
            strip = [{k: v for k, v in c.items() if k != 'lastTransitionTime'} for c in a.get('conditions') or []]
            other = [{k: v for k, v in c.items() if k != 'lastTransitionTime'} for c in b.get('conditions') or []]
            return strip == other and {k: v for k, v in a.items() if k != 'conditions'} == {
                k: v for k, v in b.items() if k != 'conditions'
            }

        if same(old_status, new_status):
            return
        meta = workload['metadata']
        try:
            workload['status'] = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta['namespace'], 'workloads', meta['name'], {'status': new_status}
            ).get('status')
        except ApiException as e:
            if e.status != 404:  # deleted with its Job meanwhile
                raise

    def _inadmissible(self, workload: dict[str, Any], message: str) -> None:
        condition = {'type': 'QuotaReserved', 'status': 'False', 'reason': 'Inadmissible', 'message': message}
        self._set_status(workload, [condition])

    def _finish(self, job: Any, workload: dict[str, Any]) -> None:
        failed = next((c for c in (job.status.conditions or []) if c.type == 'Failed' and c.status == 'True'), None)
        if failed is not None:
            finished = {'reason': 'Failed', 'message': failed.message or 'Job failed'}
        else:
            finished = {'reason': 'Succeeded', 'message': 'Job finished successfully'}
        self._set_status(workload, [{'type': 'Finished', 'status': 'True', **finished}])

    def step(self) -> None:
        """One admission pass over every ClusterQueue."""
        flavors = {f['metadata']['name']: f for f in self._list('resourceflavors')}
        queues = {q['metadata']['name']: q for q in self._list('clusterqueues')}
        local = {(q['metadata']['namespace'], q['metadata']['name']): q for q in self._list('localqueues')}
        known = {(w['metadata'].get('labels') or {}).get(JOB_UID_LABEL): w for w in self._list('workloads')}
        jobs = [j for j in self.batch.list_job_for_all_namespaces().items if QUEUE_LABEL in (j.metadata.labels or {})]
        jobs.sort(key=lambda j: (j.metadata.creation_timestamp, j.metadata.name))
        usage: dict[str, dict[str, float]] = {name: {} for name in queues}
        pending: dict[str, list[Workload]] = {name: [] for name in queues}
        counts: dict[tuple[str, str], list[int]] = {key: [0, 0] for key in local}  # [pending, admitted]
        for job in jobs:
            body = self._workload(job, known)
            if body is None:
                continue  # the Job was deleted meanwhile
            if _finished(job):
                self._finish(job, body)
                continue
            key = (job.metadata.namespace, job.metadata.labels[QUEUE_LABEL])
            lq = local.get(key)
            if lq is None:
                self._inadmissible(body, f"LocalQueue {key[1]} doesn't exist")
                continue  # Kueue leaves it pending
            cq = (lq.get('spec') or {}).get('clusterQueue')
            if cq not in queues:
                self._inadmissible(body, f"ClusterQueue {cq} doesn't exist")
                continue
            workload = Workload(job, cq, _requests(job), body)
            if job.spec.suspend:
                pending[cq].append(workload)
                counts[key][0] += 1
            else:
                for name, value in workload.requests.items():
                    usage[cq][name] = usage[cq].get(name, 0.0) + value
                counts[key][1] += 1
        for name, queue in queues.items():
            for workload in pending[name]:
                flavor, reasons = self._fits(queue, usage[name], workload.requests)
                if flavor is None:
                    message = f"couldn't assign flavors to pod set {POD_SET}: {', '.join(sorted(reasons))}"
                    condition = {'type': 'QuotaReserved', 'status': 'False', 'reason': 'Pending', 'message': message}
                    self._set_status(workload.body, [condition])
                    continue
                self._admit(workload, name, flavor, flavors.get(flavor) or {})
                for resource, value in workload.requests.items():
                    usage[name][resource] = usage[name].get(resource, 0.0) + value
                key = (workload.job.metadata.namespace, workload.job.metadata.labels[QUEUE_LABEL])
                counts[key][0] -= 1
                counts[key][1] += 1
        self._write_status(queues, local, counts, usage)

    @staticmethod
    def _quota(queue: dict[str, Any]) -> dict[str, tuple[str, float]]:
        """Each covered resource: (its flavor, the flavor's nominal quota); the first flavor of a group."""
        covered: dict[str, tuple[str, float]] = {}
        for group in queue['spec'].get('resourceGroups') or []:
            flavor = (group.get('flavors') or [{}])[0]
            for resource in flavor.get('resources') or []:
                covered[resource['name']] = (flavor['name'], quantity(resource['nominalQuota']))
        return covered

    def _fits(
        self, queue: dict[str, Any], used: dict[str, float], asked: dict[str, float]
    ) -> tuple[str | None, list[str]]:
        """(the flavor the workload is admitted with, []), or (None, why not: Kueue's words per resource)."""
        covered = self._quota(queue)
        missing = [
            f'resource {name} unavailable in ClusterQueue' for name, v in asked.items() if v > 0 and name not in covered
        ]
        if missing:
            return None, missing  # a resource the ClusterQueue does not cover: never admissible
        reasons = []
        for name, value in asked.items():
            if value <= 0:
                continue
            flavor, quota = covered[name]
            if value > quota + 1e-9:
                reasons.append(
                    f'insufficient quota for {name} in flavor {flavor}, request > maximum capacity '
                    f'({amount(name, value)} > {amount(name, quota)})'
                )
            elif used.get(name, 0.0) + value > quota + 1e-9:
                more = used.get(name, 0.0) + value - quota
                reasons.append(
                    f'insufficient unused quota for {name} in flavor {flavor}, {amount(name, more)} more needed'
                )
        if reasons:
            return None, reasons
        return next(iter(covered.values()))[0], []

    def _admit(self, workload: Workload, cluster_queue: str, flavor_name: str, flavor: dict[str, Any]) -> None:
        job = workload.job
        admission = {
            'clusterQueue': cluster_queue,
            'podSetAssignments': [
                {
                    'name': POD_SET,
                    'count': job.spec.parallelism if job.spec.parallelism is not None else 1,
                    'flavors': {name: flavor_name for name, value in workload.requests.items() if value > 0},
                    'resourceUsage': {name: amount(name, value) for name, value in workload.requests.items()},
                }
            ],
        }
        reserved = {
            'type': 'QuotaReserved',
            'status': 'True',
            'reason': 'QuotaReserved',
            'message': f'Quota reserved in ClusterQueue {cluster_queue}',
        }
        admitted = {'type': 'Admitted', 'status': 'True', 'reason': 'Admitted', 'message': 'The workload is admitted'}
        self._set_status(workload.body, [reserved, admitted], admission=admission)
        spec = flavor.get('spec') or {}
        template_spec: dict[str, Any] = {}
        if spec.get('nodeLabels'):
            template_spec['nodeSelector'] = {**(job.spec.template.spec.node_selector or {}), **spec['nodeLabels']}
        if spec.get('tolerations'):
            existing = self.batch.api_client.sanitize_for_serialization(job.spec.template.spec.tolerations or [])
            template_spec['tolerations'] = existing + spec['tolerations']
        body: dict[str, Any] = {'spec': {'suspend': False}}
        if template_spec:
            body['spec']['template'] = {'spec': template_spec}
        try:
            self.batch.patch_namespaced_job(job.metadata.name, job.metadata.namespace, body)
        except ApiException as e:
            if e.status == 404:
                return  # deleted meanwhile
            raise
        self.admitted.append(f'{job.metadata.namespace}/{job.metadata.name}')

    def _write_status(
        self,
        queues: dict[str, dict[str, Any]],
        local: dict[tuple[str, str], dict[str, Any]],
        counts: dict[tuple[str, str], list[int]],
        usage: dict[str, dict[str, float]],
    ) -> None:
        for name, queue in queues.items():
            mine = [c for key, c in counts.items() if (local[key].get('spec') or {}).get('clusterQueue') == name]
            by_flavor: dict[str, list[dict[str, str]]] = {}
            for resource, (flavor, _) in self._quota(queue).items():
                by_flavor.setdefault(flavor, []).append(
                    {'name': resource, 'total': f'{usage[name].get(resource, 0):g}'}
                )
            status = {
                'pendingWorkloads': sum(c[0] for c in mine),
                'admittedWorkloads': sum(c[1] for c in mine),
                'flavorsUsage': [{'name': flavor, 'resources': used} for flavor, used in by_flavor.items()],
            }
            if (queue.get('status') or {}) != status:
                self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, 'clusterqueues', name, {'status': status}
                )
        for (namespace, name), (pending, admitted) in counts.items():
            status = {'pendingWorkloads': pending, 'admittedWorkloads': admitted}
            if (local[(namespace, name)].get('status') or {}) != status:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, 'localqueues', name, {'status': status}
                )
