"""moto's S3 server on loopback, with one bucket: the object store of the test cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.cluster.harness import free_port

ACCESS_KEY = 'test-access-key'
SECRET_KEY = 'test-secret-key'
REGION = 'us-east-1'


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    server: Any

    @property
    def env(self) -> dict[str, str]:
        """What a client of this store needs in its environment."""
        return {
            'AWS_ACCESS_KEY_ID': ACCESS_KEY,
            'AWS_SECRET_ACCESS_KEY': SECRET_KEY,
            'AWS_DEFAULT_REGION': REGION,
            'AWS_ENDPOINT_URL': self.endpoint,
            'FINETUNER_S3_ENDPOINT': self.endpoint,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            's3',
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={'addressing_style': 'path'}),
        )

    def keys(self, prefix: str = '') -> list[str]:
        pages = self.client().get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj['Key'] for page in pages for obj in page.get('Contents', []))


def _cache_moto_module_list() -> None:
    """moto's server lists its own package folder (a listdir and ~150 isdir calls) on every request,
    under a lock that every request takes: under load most of its time went there. The list does not
    change while it runs."""
    import functools

    import moto.backends

    if not hasattr(moto.backends.list_of_moto_modules, 'cache_info'):
        listed = moto.backends.list_of_moto_modules
        moto.backends.list_of_moto_modules = functools.cache(lambda: tuple(listed()))  # type: ignore[assignment]


def start_s3(bucket: str = 'finetuner') -> S3Server:
    from moto.server import ThreadedMotoServer

    _cache_moto_module_list()

    port = free_port()
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
    server.start()
    s3 = S3Server(endpoint=f'http://127.0.0.1:{port}', bucket=bucket, server=server)
    s3.client().create_bucket(Bucket=bucket)
    return s3
