"""What the operator has seen of the cluster: an informer-style cache of runs, experiments, Jobs and pods.

The watches (Kopf's) feed it every event, the operator's own writes feed it the objects the API
server answered with, and a listing at start-up (and every ``FINETUNER_RELIST_INTERVAL``) makes it
complete. Reads of the reconciler are then answered from memory: one pass over a run costs no
request unless it writes something. Without the cache a burst of runs cost ~22 requests per run,
two thirds of them reads (bench/operator_scale.py).

Rules that keep it correct:

- *newest wins*: an object replaces the cached one only if its ``resourceVersion`` is not older
  (compared as integers, which every kube-apiserver's versions are; an opaque version always
  replaces), so a slow write response never hides a newer watch event, and the reverse;
- a deleted object leaves a tombstone with its last version, so a stale write response that
  arrives after the watch said DELETED does not bring it back;
- a kind is *synced* once a listing of it has been applied: only then does a miss mean "absent";
  before that the seam asks the API server (and caches the answer);
- a listing replaces what it covers: a cached object the listing lacks is dropped when it is older
  than the listing (an object deleted while no watch was open), never when it is newer;
- Jobs and pods are kept as the few fields the status is derived from (their pod templates and
  environment are not), so 1,000 runs with their Jobs and pods fit in a few MB;
- a run that has ended (FINISHED or FAILED) is kept packed, as its JSON (a fifth of the memory of its
  dicts: runs accumulate by the thousand, and an ended run is read only when its Experiment is recounted),
  with its metadata and phase beside it: :meth:`ObjectCache.objects` answers ended runs as that light
  form, which is all that counting runs (FINETUNER_MAX_CONCURRENT_RUNS) reads; ``get`` and ``select``
  unpack them.

Cached objects are shared: callers read them and must not change them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from finetuner_operator.builders import RUN_LABEL

RUNS, EXPERIMENTS, JOBS, PODS = 'runs', 'experiments', 'jobs', 'pods'
KINDS = (RUNS, EXPERIMENTS, JOBS, PODS)
TOMBSTONES = 10_000  # deleted objects remembered (oldest forgotten first)
Key = tuple[str, str]  # (namespace, name)

_KEPT_METADATA = (
    'name',
    'namespace',
    'uid',
    'resourceVersion',
    'labels',
    'creationTimestamp',
    'deletionTimestamp',
    'ownerReferences',
)


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get('metadata') or {}
    return {key: meta[key] for key in _KEPT_METADATA if key in meta}


def strip_job(job: dict[str, Any]) -> dict[str, Any]:
    """The fields of a Job the operator reads: metadata (of its annotations, the operator's own), ``spec.suspend``
    and the status."""
    metadata = _metadata(job)
    annotations = (job.get('metadata') or {}).get('annotations') or {}
    own = {key: value for key, value in annotations.items() if key.startswith('finetuner.dev/')}
    if own:
        metadata['annotations'] = own
    return {
        'apiVersion': job.get('apiVersion', 'batch/v1'),
        'kind': 'Job',
        'metadata': metadata,
        'spec': {'suspend': bool((job.get('spec') or {}).get('suspend'))},
        'status': job.get('status') or {},
    }


def strip_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """The fields of a pod the operator reads: metadata, container names and images, the status."""
    containers = (pod.get('spec') or {}).get('containers') or []
    return {
        'apiVersion': 'v1',
        'kind': 'Pod',
        'metadata': _metadata(pod),
        'spec': {'containers': [{'name': c.get('name'), 'image': c.get('image')} for c in containers]},
        'status': pod.get('status') or {},
    }


_STRIP = {JOBS: strip_job, PODS: strip_pod}
ENDED = ('FINISHED', 'FAILED')


class Packed:
    """An ended run as compact JSON, with its metadata and phase as a small dict (``light``)."""

    __slots__ = ('data', 'light')

    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = json.dumps(obj, separators=(',', ':')).encode()
        self.light = {
            'apiVersion': obj.get('apiVersion'),
            'kind': obj.get('kind'),
            'metadata': obj.get('metadata') or {},
            'status': {'phase': (obj.get('status') or {}).get('phase')},
        }

    def unpack(self) -> dict[str, Any]:
        return json.loads(self.data)


def _pack(kind: str, obj: dict[str, Any]) -> dict[str, Any] | Packed:
    return Packed(obj) if kind == RUNS and (obj.get('status') or {}).get('phase') in ENDED else obj


def _full(stored: dict[str, Any] | Packed) -> dict[str, Any]:
    return stored.unpack() if isinstance(stored, Packed) else stored


def _light(stored: dict[str, Any] | Packed) -> dict[str, Any]:
    return stored.light if isinstance(stored, Packed) else stored


def _version(obj: dict[str, Any] | Packed) -> int | None:
    obj = _light(obj)
    try:
        return int((obj.get('metadata') or {}).get('resourceVersion'))
    except (TypeError, ValueError):
        return None


def _key(obj: dict[str, Any]) -> Key:
    meta = obj['metadata']
    return meta.get('namespace') or '', meta['name']


class ObjectCache:
    """Objects by kind and (namespace, name); thread-safe. See the module docstring for the rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[Key, dict[str, Any] | Packed]] = {kind: {} for kind in KINDS}
        self._tombstones: dict[str, OrderedDict[Key, int | None]] = {kind: OrderedDict() for kind in KINDS}
        self._pods_by_run: dict[Key, set[str]] = {}
        self._synced: set[str] = set()

    # --- reading -----------------------------------------------------------------------------
    def synced(self, kind: str) -> bool:
        return kind in self._synced

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            stored = self._objects[kind].get((namespace, name))
        return _full(stored) if stored is not None else None

    def pods_of_run(self, namespace: str, run: str) -> list[dict[str, Any]]:
        with self._lock:
            names = self._pods_by_run.get((namespace, run), ())
            pods = self._objects[PODS]
            return [_full(pods[(namespace, name)]) for name in names if (namespace, name) in pods]

    def select(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Cached objects of ``kind`` in ``namespace`` whose labels include ``labels``."""
        with self._lock:
            found = [
                obj
                for (ns, _), obj in self._objects[kind].items()
                if ns == namespace and labels.items() <= ((_light(obj)['metadata'].get('labels') or {}).items())
            ]
        return [_full(obj) for obj in found]

    def objects(self, kind: str) -> list[dict[str, Any]]:
        """Every cached object of ``kind``, all namespaces (a snapshot of the list, the objects shared); an
        ended run as its metadata and phase only (see the module docstring)."""
        with self._lock:
            return [_light(obj) for obj in self._objects[kind].values()]

    def count(self, kind: str) -> int:
        with self._lock:
            return len(self._objects[kind])

    # --- writing -----------------------------------------------------------------------------
    def put(self, kind: str, obj: dict[str, Any]) -> bool:
        """Cache ``obj`` (a watch event's object or a write's answer) unless what is cached is newer;
        True when it was taken."""
        obj = _STRIP[kind](obj) if kind in _STRIP else obj
        key = _key(obj)
        version = _version(obj)
        with self._lock:
            if key in self._tombstones[kind]:
                dead = self._tombstones[kind][key]
                if version is not None and dead is not None and version <= dead:
                    return False  # an answer older than the deletion the watch already reported
                del self._tombstones[kind][key]
            current = self._objects[kind].get(key)
            if current is not None:
                known = _version(current)
                if version is not None and known is not None and version < known:
                    return False
                if version is not None and version == known:
                    return True  # the same version again (a relist, an echo): nothing to store
            self._objects[kind][key] = _pack(kind, obj)
            if kind == PODS:
                self._index_pod(key, current, obj)
            return True

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        """The watch said ``obj`` was deleted (its last version)."""
        key = _key(obj)
        version = _version(obj)
        with self._lock:
            current = self._objects[kind].get(key)
            known = _version(current) if current is not None else None
            if current is not None and version is not None and known is not None and known > version:
                return  # a newer object of the same name was created since
            self._remove(kind, key, version)

    def observe(self, kind: str, event_type: str | None, obj: dict[str, Any]) -> None:
        """One watch event (``None`` is Kopf's initial listing)."""
        if event_type == 'DELETED':
            self.delete(kind, obj)
        else:
            self.put(kind, obj)

    def replace(
        self, kind: str, objects: Iterable[dict[str, Any]], list_version: str | None, namespace: str | None = None
    ) -> None:
        """Apply a complete listing of ``kind`` in ``namespace`` (None: the whole cluster) taken at
        ``list_version``: what it holds is cached, what it lacks is dropped unless newer than it."""
        seen: set[Key] = set()
        for obj in objects:
            self.put(kind, obj)
            seen.add(_key(obj))
        try:
            listed_at: int | None = int(list_version) if list_version is not None else None
        except ValueError:
            listed_at = None
        with self._lock:
            cached = self._objects[kind]
            for key in [k for k in cached if k not in seen and (namespace is None or k[0] == namespace)]:
                version = _version(cached[key])
                if listed_at is not None and version is not None and version > listed_at:
                    continue  # changed after the listing was taken
                self._remove(kind, key, listed_at)

    def mark_synced(self, kind: str) -> None:
        """Every namespace of ``kind`` has been listed: from now a miss means the object does not exist."""
        with self._lock:
            self._synced.add(kind)

    # --- internals (the lock is held) ----------------------------------------------------------
    def _remove(self, kind: str, key: Key, version: int | None) -> None:
        current = self._objects[kind].pop(key, None)
        if kind == PODS and current is not None:
            self._index_pod(key, current, None)
        tombstones = self._tombstones[kind]
        tombstones[key] = version
        tombstones.move_to_end(key)
        while len(tombstones) > TOMBSTONES:
            tombstones.popitem(last=False)

    def _index_pod(self, key: Key, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        namespace, name = key
        before, after = _run_of(old), _run_of(new)
        if before is not None and before != after:
            names = self._pods_by_run.get((namespace, before))
            if names is not None:
                names.discard(name)
                if not names:
                    del self._pods_by_run[(namespace, before)]
        if after is not None:
            self._pods_by_run.setdefault((namespace, after), set()).add(name)


def _run_of(obj: dict[str, Any] | None) -> str | None:
    if obj is None:
        return None
    return (obj['metadata'].get('labels') or {}).get(RUN_LABEL)
