"""``python -m tests.cluster.serve``: the test cluster's API server (KubeEmu) in a process of its own.

For a person with kubectl::

    python -m tests.cluster.serve --kubeconfig /tmp/kubeconfig      # serves until Ctrl-D / Ctrl-C
    KUBECONFIG=/tmp/kubeconfig kubectl apply -f examples/run.yaml     # validated as a real API server would
    KUBECONFIG=/tmp/kubeconfig kubectl explain finetunerun.spec

The project's CRDs are installed and kubectl's default (server-side) validation, ``explain``, ``get`` with
printer columns and ``describe`` work; runs get a status only once an operator runs against the same
kubeconfig (``KUBECONFIG=/tmp/kubeconfig python -m finetuner_operator``), and no pod starts (no node).

Benchmarks run it apart from the processes they measure, so that the emulator does not share a GIL
with the client threads that drive it. It prints ``url <server URL>`` once serving, then answers one
command per line on stdin with one JSON line on stdout, and stops when stdin closes:

- ``watch_starts``: how many watch requests each resource has had (``{key: count}``);
- ``requests``: every request so far, counted by User-Agent and method (``{"agent method": count}``);
- ``paths``: the same by User-Agent, method and path (segments with digits shown as ``*``);
- ``count <key>``: how many objects of ``key`` (``batch/v1/jobs``) are stored;
- ``objects <key>``: those objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.cluster.harness import ApiServer, write_kubeconfig


def _shape(path: str) -> str:
    route, _, query = path.partition('?')
    shape = '/'.join('*' if any(c.isdigit() for c in part) else part for part in route.split('/'))
    return shape + ('?watch' if 'watch=' in query else '')


def answer(server: ApiServer, line: str) -> Any:
    command, _, argument = line.strip().partition(' ')
    emu = server.emu
    if command == 'watch_starts':
        return server.call(lambda: dict(emu.watch_starts))
    if command == 'requests':
        return server.call(lambda: dict(Counter(f'{a.split("/")[0]} {method}' for method, _, a in emu.requests)))
    if command == 'paths':
        return server.call(lambda: dict(Counter(f'{a.split("/")[0]} {m} {_shape(p)}' for m, p, a in emu.requests)))
    if command == 'count':
        return server.call(lambda: len(emu.store[argument]))
    if command == 'objects':
        return server.objects(argument)
    return {'error': f'unknown command {command!r}: watch_starts, requests, count KEY, objects KEY'}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Serve the test cluster API (KubeEmu) until stdin closes.')
    parser.add_argument('--kubeconfig', type=Path, help='write a kubeconfig for kubectl here')
    parser.add_argument('--namespace', default='default', help="the kubeconfig context's namespace")
    args = parser.parse_args(argv)
    server = ApiServer().start()
    try:
        print('url', server.url, flush=True)
        if args.kubeconfig is not None:
            write_kubeconfig(server.url, args.kubeconfig, args.namespace)
            print(
                f'kubeconfig written: KUBECONFIG={args.kubeconfig} kubectl get finetuner', file=sys.stderr, flush=True
            )
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(answer(server, line)), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
