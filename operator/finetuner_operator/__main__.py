"""``python -m finetuner_operator``: the operator, configured once from the environment.

Equivalent to ``kopf run --standalone -m finetuner_operator.handlers`` with the liveness
endpoint and the watched namespaces taken from :class:`OperatorConfig`. With
``FINETUNER_LEADER_ELECTION`` it first waits, passive, until it holds the Lease (see :mod:`leader`),
and stops (exit code 1, so that its pod restarts as a candidate) when it loses it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import kopf

from finetuner_operator import handlers, leader
from finetuner_operator.config import OperatorConfig
from finetuner_operator.kube import Kube


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM or SIGINT while standing by stops the wait (Kopf installs its own handlers once it runs)."""

    def handle(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')
    config = OperatorConfig.from_env()
    stop = threading.Event()
    elector: leader.LeaderElector | None = None
    if config.leader_election:
        elector = leader.LeaderElector.from_config(Kube(handlers.api_client()), config)
        _stop_on_signals(stop)
        with leader.standby_health(config.health_port):
            if not elector.acquire(stop):
                return 0  # stopped while standing by
        # Losing the Lease stops Kopf as SIGTERM does (a stop flag of Kopf's would be waited for in a thread
        # that blocks the interpreter's exit).
        elector.start_renewing(on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        kopf.run(
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            liveness_endpoint=f'http://0.0.0.0:{config.health_port}/healthz',
            memo=kopf.Memo(config=config),
        )
    finally:
        if elector is not None:
            elector.stop(release=not elector.lost)
    return 1 if elector is not None and elector.lost else 0


if __name__ == '__main__':
    sys.exit(main())
