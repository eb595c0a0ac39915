"""Serving the console with uvicorn on an address this module binds itself, so that a port in use
is an error naming the port (and port 0 picks a free one, which the caller can read back)."""

from __future__ import annotations

import os
import socket
from typing import Any

from finetuner.console.app import BackendSource, create_app
from finetuner.errors import ArgumentError


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ArgumentError('--port', f'{port} is not a TCP port; give 1-65535 (or 0 for any free port)')
    try:
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        return socket.create_server((host, port), family=family, reuse_port=False)
    except socket.gaierror as e:
        raise ArgumentError('--host', f'{host!r} is not an address of this machine ({e.strerror})') from e
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise ArgumentError(
            '--port', f'cannot listen on {host}:{port} ({why}); choose another --port, or 0 for any free port'
        ) from e


def make_server(source: BackendSource, sock: socket.socket, *, refresh: float = 2.0, log_level: str = 'info') -> Any:
    """A uvicorn Server for the console; ``server.run(sockets=[sock])`` serves until stopped."""
    import uvicorn

    app = create_app(source, refresh=refresh)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, proxy_headers=False)
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = 'localhost' if host in ('127.0.0.1', '::1') else host
    return f'http://{f"[{shown}]" if ":" in shown else shown}:{port}'
