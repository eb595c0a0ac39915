"""A stand-in for ``python -m finetuner_trainer`` with the standard library only (starts in ~30 ms).

Load and API-fault tests need many trainer pods, not training: this script follows the output
contract of ``finetuner.api.layout`` (progress, then the artifact, its manifest written last) against
the test cluster's S3 server with plain unsigned HTTP (moto accepts it; objects are written with a
public ACL so that the next unsigned write may replace them). ``spec.modelOptions``
steers it: ``seconds`` to stay running (reporting progress), ``exitCode`` to fail with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def put(endpoint: str, output_uri: str, key: str, value: Any) -> None:
    bucket_and_prefix = output_uri.removeprefix('s3://')
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    url = f'{endpoint}/{bucket_and_prefix}/{key}'
    # Unsigned: moto lets an anonymous client overwrite only objects whose ACL is public.
    request = urllib.request.Request(
        url, data=data, method='PUT', headers={'x-amz-acl': 'public-read', 'Content-Type': 'application/octet-stream'}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f'PUT {url}: {e.code} {e.read()[:300]!r}') from e


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--config', required=True)
    args = parser.parse_args()
    config = json.loads(Path(args.config).read_text())
    options = config['spec'].get('modelOptions') or {}
    endpoint = os.environ['FINETUNER_S3_ENDPOINT'].rstrip('/')
    output = config['outputUri']
    print(f'stand-in trainer: run {config["namespace"]}/{config["runName"]}', flush=True)
    seconds = float(options.get('seconds', 0))
    deadline = time.monotonic() + seconds
    step = 0
    while True:
        step += 1
        put(endpoint, output, 'progress.json', {'epoch': 1, 'epochs': 1, 'step': step, 'totalSteps': 100})
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    code = int(options.get('exitCode', 0))
    if code:
        Path(config['terminationLog']).write_text(f'stand-in trainer failed with exit code {code}')
        return code
    put(endpoint, output, 'artifact/model.bin', b'weights')
    put(endpoint, output, 'artifact/manifest.json', {'files': ['model.bin'], 'format': 'stand-in'})
    print('stand-in trainer: artifact published', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
