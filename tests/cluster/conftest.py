import pytest

from tests.cluster.fixtures import api_server, cluster, register_markers, s3, s3_server  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)
