from collections.abc import Iterator

import pytest

from tests.cluster.fixtures import api_server, cluster, register_markers, s3, s3_server  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


@pytest.fixture(autouse=True)
def _fresh_sdk_session() -> Iterator[None]:
    """No test leaves the SDK logged in to a cluster that has stopped."""
    import finetuner.backends

    yield
    finetuner.backends.use(None)
