"""``python -m finetuner_operator``: the operator, configured once from the environment.

Equivalent to ``kopf run --standalone -m finetuner_operator.handlers`` with the liveness
endpoint and the watched namespaces taken from :class:`OperatorConfig`.
"""

from __future__ import annotations

import logging

import kopf

from finetuner_operator import handlers  # noqa: F401  (registers the handlers)
from finetuner_operator.config import OperatorConfig


def main() -> None:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')
    config = OperatorConfig.from_env()
    kopf.run(
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=f'http://0.0.0.0:{config.health_port}/healthz',
        memo=kopf.Memo(config=config),
    )


if __name__ == '__main__':
    main()
