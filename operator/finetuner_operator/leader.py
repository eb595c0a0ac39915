"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection`` does it.

One replica writes runs' statuses and creates their Jobs; any other (a second replica, or an old pod
still running on the far side of a network partition after its replacement started) waits, passive,
until the Lease expires. ``replicas: 1`` with the ``Recreate`` strategy does not guarantee that: an
evicted pod may still run while its successor starts, and a partitioned node's pod is only declared
gone minutes later.

The rules (client-go's ``tryAcquireOrRenew``):

- the Lease is free when it does not exist, has no holder, or its record has not changed for
  ``lease_duration`` seconds *as seen by this process* (its own monotonic clock: the holder's clock is
  never compared with ours);
- taking it over writes the Lease at the resourceVersion read (a conflict means another candidate was
  faster), with ``leaseTransitions`` + 1;
- the leader renews every ``retry_period`` seconds; when it could not renew for ``renew_deadline``
  seconds (< ``lease_duration``, so it stops before anyone else may start) it calls ``on_lost``, and the
  operator exits (its pod restarts, a candidate again);
- a leader that stops cleanly releases the Lease (no holder), so a candidate takes over at once.

``python -m finetuner_operator`` acquires the Lease before Kopf starts (nothing is watched or written
while standing by; a small ``/healthz`` answers the liveness probe meanwhile) and stops Kopf when it
loses it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube

log = logging.getLogger('finetuner_operator')


def micro_time(moment: datetime) -> str:
    """A MicroTime as the API server writes it."""
    return moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if renew_deadline >= lease_duration:
            raise ValueError(
                f'FINETUNER_LEASE_RENEW_DEADLINE ({renew_deadline}) must be shorter than FINETUNER_LEASE_DURATION '
                f'({lease_duration}): a leader must stop before another may start'
            )
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.lost = False
        self._observed: tuple[Any, ...] | None = None  # the holder's record as last read
        self._observed_at = 0.0
        self._leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, kube: Kube, config: OperatorConfig) -> LeaderElector:
        return cls(
            kube,
            config.lease_namespace,
            config.lease_name,
            config.identity,
            config.lease_duration,
            config.lease_renew_deadline,
            config.lease_retry_period,
        )

    @property
    def leading(self) -> bool:
        return self._leading

    # --- one try -----------------------------------------------------------------------------------
    def _record(self, now: datetime, acquired: str | None, transitions: int) -> dict[str, Any]:
        return {
            'holderIdentity': self.identity,
            'leaseDurationSeconds': max(round(self.lease_duration), 1),
            'acquireTime': acquired or micro_time(now),
            'renewTime': micro_time(now),
            'leaseTransitions': transitions,
        }

    def try_acquire_or_renew(self) -> bool:
        """One try: True when this process holds the Lease afterwards."""
        now = datetime.now(timezone.utc)
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
            if lease is None:
                body = {
                    'apiVersion': 'coordination.k8s.io/v1',
                    'kind': 'Lease',
                    'metadata': {'name': self.name, 'namespace': self.namespace},
                    'spec': self._record(now, None, 0),
                }
                return self._took(self.kube.create_lease(body))
            spec = lease.get('spec') or {}
            record = tuple(spec.get(k) for k in ('holderIdentity', 'renewTime', 'leaseTransitions'))
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            holder = spec.get('holderIdentity') or ''
            expired = self.clock() - self._observed_at >= float(spec.get('leaseDurationSeconds') or self.lease_duration)
            if holder and holder != self.identity and not expired:
                return False
            mine = holder == self.identity
            transitions = int(spec.get('leaseTransitions') or 0) + (0 if mine else 1)
            updated = {**lease, 'spec': self._record(now, spec.get('acquireTime') if mine else None, transitions)}
            return self._took(self.kube.update_lease(updated))
        except Exception as e:  # the API server unreachable for a moment: the next try decides
            log.warning('leader election: cannot read or write Lease %s/%s: %s', self.namespace, self.name, e)
            return False

    def _took(self, lease: dict[str, Any] | None) -> bool:
        if lease is None:
            return False
        spec = lease.get('spec') or {}
        self._observed = tuple(spec.get(k) for k in ('holderIdentity', 'renewTime', 'leaseTransitions'))
        self._observed_at = self.clock()
        if not self._leading:
            log.info('leader election: %s now holds Lease %s/%s', self.identity, self.namespace, self.name)
        self._leading = True
        return True

    # --- the loops ---------------------------------------------------------------------------------
    def acquire(self, stop: threading.Event) -> bool:
        """Try every retry period until this process holds the Lease (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            if self.try_acquire_or_renew():
                return True
            if not announced:
                holder = self._observed[0] if self._observed else None
                log.info('leader election: standing by; Lease %s/%s is held by %s', self.namespace, self.name, holder)
                announced = True
            stop.wait(self.retry_period)
        return False

    def start_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renew in a background thread; ``on_lost`` once renewing failed for ``renew_deadline`` seconds."""
        self._thread = threading.Thread(target=self._renew, args=(on_lost,), name='leader-election', daemon=True)
        self._thread.start()

    def _renew(self, on_lost: Callable[[], None]) -> None:
        renewed = self.clock()
        while not self._stop.wait(self.retry_period):
            if self.try_acquire_or_renew():
                renewed = self.clock()
            elif self.clock() - renewed >= self.renew_deadline:
                self._leading = False
                self.lost = True
                log.error('leader election: lost Lease %s/%s (not renewed for %.0fs)', self.namespace, self.name,
                          self.clock() - renewed)  # fmt: skip
                on_lost()
                return

    def stop(self, release: bool = True) -> None:
        """Stop renewing; ``release``: give the Lease up at once (a candidate takes over without waiting)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.retry_period + 5)
        if release and self._leading:
            self._release()
        self._leading = False

    def _release(self) -> None:
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
            if lease is None or (lease.get('spec') or {}).get('holderIdentity') != self.identity:
                return
            spec = {**lease['spec'], 'holderIdentity': '', 'leaseDurationSeconds': 1}
            spec['renewTime'] = micro_time(datetime.now(timezone.utc))
            self.kube.update_lease({**lease, 'spec': spec})
            log.info('leader election: released Lease %s/%s', self.namespace, self.name)
        except Exception as e:  # it expires by itself
            log.warning('leader election: could not release Lease %s/%s: %s', self.namespace, self.name, e)


@contextmanager
def standby_health(port: int) -> Iterator[None]:
    """``/healthz`` answering while this replica stands by (Kopf serves it once it runs); 0: none."""
    if not port:
        yield
        return

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({'standby': True}).encode()
            self.send_response(200 if self.path.startswith('/healthz') else 404)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not logged
            return

    server = ThreadingHTTPServer(('0.0.0.0', port), Health)
    thread = threading.Thread(target=server.serve_forever, name='standby-health', daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
