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
- the ClusterQueue's status counts ``pendingWorkloads`` and ``admittedWorkloads`` and has each
  resource's usage, the LocalQueue's status its own counts.

What it leaves out: Workload objects, preemption, cohorts and borrowing, fair sharing, priorities,
several flavors per resource (the first flavor is used), admission checks, ``namespaceSelector``
(every namespace matches, as with the chart's ``{}``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = 'kueue.x-k8s.io', 'v1beta1'
QUEUE_LABEL = f'{GROUP}/queue-name'
KINDS = {  # plural: (kind, namespaced)
    'resourceflavors': ('ResourceFlavor', False),
    'clusterqueues': ('ClusterQueue', False),
    'localqueues': ('LocalQueue', True),
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


@dataclass
class Workload:
    job: Any
    queue: str
    requests: dict[str, float]


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

    def step(self) -> None:
        """One admission pass over every ClusterQueue."""
        flavors = {f['metadata']['name']: f for f in self._list('resourceflavors')}
        queues = {q['metadata']['name']: q for q in self._list('clusterqueues')}
        local = {(q['metadata']['namespace'], q['metadata']['name']): q for q in self._list('localqueues')}
        jobs = [j for j in self.batch.list_job_for_all_namespaces().items if QUEUE_LABEL in (j.metadata.labels or {})]
        jobs.sort(key=lambda j: (j.metadata.creation_timestamp, j.metadata.name))
        usage: dict[str, dict[str, float]] = {name: {} for name in queues}
        pending: dict[str, list[Workload]] = {name: [] for name in queues}
        counts: dict[tuple[str, str], list[int]] = {key: [0, 0] for key in local}  # [pending, admitted]
        for job in jobs:
            if _finished(job):
                continue
            key = (job.metadata.namespace, job.metadata.labels[QUEUE_LABEL])
            lq = local.get(key)
            cq = (lq or {}).get('spec', {}).get('clusterQueue')
            if cq not in queues:
                continue  # no LocalQueue (or no ClusterQueue behind it): Kueue leaves it pending
            workload = Workload(job, cq, _requests(job))
            if job.spec.suspend:
                pending[cq].append(workload)
                counts[key][0] += 1
            else:
                for name, value in workload.requests.items():
                    usage[cq][name] = usage[cq].get(name, 0.0) + value
                counts[key][1] += 1
        for name, queue in queues.items():
            for workload in pending[name]:
                flavor = self._fits(queue, usage[name], workload.requests)
                if flavor is None:
                    continue
                self._admit(workload.job, flavors.get(flavor) or {})
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

    def _fits(self, queue: dict[str, Any], used: dict[str, float], asked: dict[str, float]) -> str | None:
        """The flavor the workload is admitted with, or None when the quota has no room for it."""
        covered = self._quota(queue)
        if not covered or any(name not in covered for name, value in asked.items() if value > 0):
            return None  # a resource the ClusterQueue does not cover: never admissible
        if any(used.get(name, 0.0) + value > covered[name][1] + 1e-9 for name, value in asked.items()):
            return None
        return next(iter(covered.values()))[0]

    def _admit(self, job: Any, flavor: dict[str, Any]) -> None:
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
