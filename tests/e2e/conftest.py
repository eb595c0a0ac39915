from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.fixtures import api_server, cluster, register_markers, s3, s3_server  # noqa: F401
from tests.e2e.targets import Target, real_target


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


@pytest.fixture(params=['simulated', pytest.param('real', marks=pytest.mark.cluster)])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The same scenarios on the simulated cluster (default) and on a real one (``-m cluster``)."""
    import finetuner.backends

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
    finetuner.backends.use(None)
