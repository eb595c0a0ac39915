from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.fixtures import (  # noqa: F401
    api_server,
    cluster,
    operator_image,
    podman_ready,
    register_markers,
    s3,
    s3_server,
    trainer_image,
)
from tests.e2e.targets import Target, real_target


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


@pytest.fixture(autouse=True)
def _fresh_sdk_session() -> Iterator[None]:
    """Each scenario logs in itself; none leaves the SDK pointed at a stopped cluster."""
    import finetuner.backends

    yield
    finetuner.backends.use(None)


@pytest.fixture(params=['simulated', pytest.param('real', marks=pytest.mark.cluster)])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The same scenarios on the simulated cluster (default) and on a real one (``-m cluster``)."""
    if request.param == 'real':
        yield real_target()
    else:
        sim: Any = request.getfixturevalue('cluster')
        yield Target(
            'simulated',
            sim.api,
            'default',
            sim.bucket,
            timeout=180.0,
            restart_operator=sim.operator.restart,
            pause_node=sim.node.pause,
        )
