"""Container runtimes of the simulated node: a container as a process group, or as a podman container.

The kubelet part of :class:`~tests.cluster.node.SimulatedNode` resolves a pod's container into a
:class:`Launch` (argv, environment, mounts, user, working directory, host names) in the container's
own terms. :class:`ProcessRuntime` runs it as a process group of this machine, with container paths
mapped into a per-pod folder; :class:`PodmanRuntime` runs it from its image with ``podman run``, where
the paths, the user and ``/etc/hosts`` are real.

Podman uses the project's own storage and configuration (``scripts/podman-env.sh``), the storage that
``scripts/build-images.sh`` builds the images into.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
PODMAN_ENV_SCRIPT = ROOT / 'scripts' / 'podman-env.sh'
BUILD_SCRIPT = ROOT / 'scripts' / 'build-images.sh'
REPOSITORY = 'ghcr.io/kube-finetuner'


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']


def image_name(which: str) -> str:
    """The tag ``scripts/build-images.sh`` gives an image (``operator`` or ``trainer``)."""
    return f'{REPOSITORY}/{which}:{project_version()}'


@dataclass
class Mount:
    host: Path
    read_only: bool = False


@dataclass
class Launch:
    """One container as the kubelet resolved it, in the container's own terms."""

    name: str  # unique on the node (the engine's container name)
    image: str
    argv: list[str]  # command + args, $(VAR) expanded; empty: the image's entrypoint and command
    command_given: bool  # the pod set `command` (replaces the image's ENTRYPOINT)
    env: dict[str, str]
    mounts: dict[str, Mount]  # container path -> host path
    root: Path  # the pod's folder on the host (process runtime: the container's "/")
    working_dir: str | None = None
    user: tuple[int, int] | None = None  # (uid, gid)
    hostname: str | None = None
    hosts: dict[str, str] = field(default_factory=dict)  # extra /etc/hosts entries: name -> address
    memory_bytes: int | None = None
    read_only_root: bool = False
    drop_all_capabilities: bool = False
    no_new_privileges: bool = False


class Started:
    """A running container: the process to wait on and how to kill it."""

    def __init__(self, process: subprocess.Popen[bytes], kill: Any, finish: Any = None):
        self.process = process
        self._kill = kill
        self._finish = finish

    def kill(self) -> None:
        if self.process.poll() is None:
            self._kill()

    def wait(self) -> int:
        """The exit code (negative: killed by that signal)."""
        code = self.process.wait()
        if self._finish is not None:
            self._finish()
        return code


class ProcessRuntime:
    """The container's command as a process group of this machine (its children die with it)."""

    def __init__(self, python: str):
        self.python = python

    def start(self, launch: Launch, sink: IO[bytes]) -> Started:
        mapping = {inside: mount.host for inside, mount in launch.mounts.items()}
        argv = [_resolve_hosts(a, launch.hosts) for a in launch.argv]
        # Files that exist on the host (the interpreter, a test's stand-in script) stay as they are even
        # when they lie below a mount path such as /tmp (a checkout under /tmp); container paths map.
        argv = [a if os.path.isfile(a) else map_path(a, mapping) for a in argv]
        if argv and argv[0] in ('python', 'python3'):
            argv[0] = self.python
        elif argv and argv[0] == 'torchrun':
            argv = [self.python, '-m', 'torch.distributed.run', *argv[1:]]
        env = {k: map_path(_resolve_hosts(v, launch.hosts), mapping) for k, v in launch.env.items()}
        env.setdefault('PATH', os.environ.get('PATH', '/usr/bin:/bin'))
        if 'PYTHONPATH' in os.environ:  # this checkout's sources, as the image would have them installed
            env.setdefault('PYTHONPATH', os.environ['PYTHONPATH'])
        cwd = map_path(launch.working_dir, mapping) if launch.working_dir else str(launch.root / 'rootfs')
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )

        def kill() -> None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        return Started(process, kill)


class PodmanRuntime:
    """``podman run`` of the pod's image: host networking, the pod's mounts, user, env and command."""

    def __init__(self, podman: Podman | None = None):
        self.podman = podman or Podman()

    def image_missing(self, image: str) -> str | None:
        """Why the image cannot be run (not in the node's storage), or None."""
        if self.podman.image_exists(image):
            return None
        return f'image "{image}" is not in the node\'s podman storage (build it with scripts/build-images.sh)'

    def argv(self, launch: Launch) -> list[str]:
        args = ['run', '--name', launch.name, '--network=host', '--pull=never', '--log-driver=none']
        if launch.hostname:
            args += ['--hostname', launch.hostname]
        for name, address in sorted(launch.hosts.items()):
            args += ['--add-host', f'{name}:{address}']
        for inside, mount in sorted(launch.mounts.items()):
            args += ['-v', f'{mount.host.resolve()}:{inside}:{"ro" if mount.read_only else "rw"}']
        for key in sorted(launch.env):
            args += ['-e', key]  # the value comes from podman's own environment: never on a command line
        if launch.working_dir:
            args += ['-w', launch.working_dir]
        if launch.user is not None:
            args += ['--user', f'{launch.user[0]}:{launch.user[1]}']
        if launch.memory_bytes:
            args += ['--memory', str(launch.memory_bytes), '--memory-swap', str(launch.memory_bytes)]
        if launch.read_only_root:
            args.append('--read-only')
        if launch.drop_all_capabilities:
            args.append('--cap-drop=all')
        if launch.no_new_privileges:
            args += ['--security-opt', 'no-new-privileges']
        command = launch.argv
        if launch.command_given:
            # Kubernetes' command replaces ENTRYPOINT (and the image's CMD goes with it); args follow.
            args += ['--entrypoint', json.dumps(command[:1]), launch.image, *command[1:]]
        else:
            args += [launch.image, *command]
        return args

    def start(self, launch: Launch, sink: IO[bytes]) -> Started:
        self.podman.run(['rm', '--force', '--ignore', launch.name])
        env = {**self.podman.env, **launch.env}
        # Started from the pod's folder: after a container is killed at its memory limit, podman 4.3 (cgroup v1)
        # leaves an empty file named ``oom`` in the directory it was started from, here the repository's root.
        launch.root.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [self.podman.binary, *self.argv(launch)],
            cwd=launch.root,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

        def kill() -> None:
            # Until the container exists (`podman run` may still be creating it), a kill finds nothing.
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                if self.podman.run(['kill', '--signal', 'KILL', launch.name]).returncode == 0:
                    return
                time.sleep(0.2)

        def finish() -> None:
            # Not asked: podman's State.OOMKilled, which conmon leaves false under cgroup v1 (a container
            # killed at its memory limit then reads as exit code 137, reason Error).
            self.podman.run(['rm', '--force', '--ignore', launch.name])

        return Started(process, kill, finish)


class Podman:
    """The podman binary with the project's configuration (``scripts/podman-env.sh``)."""

    def __init__(self) -> None:
        self.binary = shutil.which('podman') or 'podman'
        self.env = {**os.environ, **podman_environment()}

    def run(self, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def image_exists(self, image: str) -> bool:
        return self.run(['image', 'exists', image]).returncode == 0


@functools.cache
def podman_environment() -> dict[str, str]:
    """CONTAINERS_CONF, CONTAINERS_STORAGE_CONF and TMPDIR as ``scripts/podman-env.sh`` sets them."""
    out = subprocess.run(['bash', str(PODMAN_ENV_SCRIPT)], capture_output=True, text=True, check=True).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix('export ').partition('=')
        env[key] = shlex.split(value)[0]
    return env


@functools.cache
def podman_unusable() -> str | None:
    """Why podman cannot run containers here (None when it can): the skip reason of podman tests."""
    if shutil.which('podman') is None:
        return 'podman is not installed (Debian/Ubuntu: apt-get install podman runc; see docs/INSTALL.md)'
    podman = Podman()
    try:
        with build_lock(podman):  # `podman info` waits for the storage while a build commits a layer
            result = podman.run(['info', '--format', '{{.Host.OCIRuntime.Name}}'], timeout=120)
    except (subprocess.SubprocessError, OSError) as e:
        return f'podman does not answer: {e}'
    if result.returncode != 0:
        return f'podman info failed: {result.stderr.strip()[-300:]}'
    return None


@contextlib.contextmanager
def build_lock(podman: Podman) -> Iterator[None]:
    """The lock scripts/build-images.sh holds while it builds (TMPDIR of the project's podman)."""
    folder = Path(podman.env.get('TMPDIR') or '/tmp')
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / 'kube-finetuner-build.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def map_path(value: str, mapping: dict[str, Path]) -> str:
    """A container path (or ``--flag=path``) as the host path it is mounted from."""
    for inside in sorted(mapping, key=len, reverse=True):
        if value == inside or value.startswith(inside.rstrip('/') + '/'):
            return str(mapping[inside]) + value[len(inside) :]
        prefix, sep, rest = value.partition('=')
        if sep and (rest == inside or rest.startswith(inside.rstrip('/') + '/')):
            return f'{prefix}={mapping[inside]}{rest[len(inside) :]}'
    return value


def _resolve_hosts(value: str, hosts: dict[str, str]) -> str:
    """Cluster DNS names in ``value`` replaced by their addresses (what /etc/hosts does in a container).

    A process of this machine resolves names through the machine's own resolver, which knows no
    cluster names; the names the node knows are exactly those a pod could resolve."""
    import re

    for name in sorted(hosts, key=len, reverse=True):
        value = re.sub(rf'(?<![\w.-]){re.escape(name)}(?![\w-]|\.[\w-])', hosts[name], value)
    return value


# What uv and pip say when no package index answers: a machine without the network, not a broken image.
NETWORK_ERRORS = re.compile(
    r'dns error|Temporary failure in name resolution|Network is unreachable|Could not resolve host'
    r'|Failed to fetch: `https?://|Max retries exceeded with url'
)


class BuildUnavailable(Exception):
    """The image cannot be built on this machine (no engine, not root, no registry and no stand-in)."""


def build_image(which: str, timeout: float = 3600.0, script: Path = BUILD_SCRIPT) -> str:
    """``scripts/build-images.sh <which>`` (the layer cache makes a build without changes take seconds);
    the image's name. A build the script says is impossible here (exit code 2) raises BuildUnavailable;
    any other failure is a broken image and raises RuntimeError with the build's output."""
    result = subprocess.run(
        ['bash', str(script), which], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode == 2:
        raise BuildUnavailable(result.stderr.strip()[-500:])
    offline = NETWORK_ERRORS.search(result.stdout + result.stderr)
    if result.returncode != 0 and offline:
        raise BuildUnavailable(f'the build needs a package index and got "{offline.group(0)}"')
    if result.returncode != 0:
        raise RuntimeError(f'scripts/build-images.sh {which} failed:\n{(result.stdout + result.stderr)[-4000:]}')
    return image_name(which)
