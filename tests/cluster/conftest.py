from tests.cluster.fixtures import api_server, cluster, s3, s3_server  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line('markers', 'operator_config(**fields): OperatorConfig overrides for the cluster fixture')
    config.addinivalue_line('markers', 'node(**options): SimulatedNode options for the cluster fixture')
