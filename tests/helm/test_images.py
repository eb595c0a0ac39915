"""The Dockerfiles, checked statically: pinned bases, non-root, real entrypoints, layers that cache.

The images themselves are built and run by tests/e2e/test_images.py (podman)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']
TRAINER_TAG = f'ghcr.io/kube-finetuner/trainer:{VERSION}'
PACKAGE_DIRS = {'finetuner': 'sdk', 'finetuner_operator': 'operator', 'finetuner_trainer': 'trainer'}

IMAGES = {
    # Dockerfile: (extra installed, entrypoint module, what the final base must be)
    'Dockerfile.trainer': ('trainer', 'finetuner_trainer', 'python'),
    'Dockerfile.operator': ('operator', 'finetuner_operator', 'python'),
}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and ${ARG}s substituted."""
    text = re.sub(r'\\\n', ' ', path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith('#'):
            continue
        keyword, _, rest = line.partition(' ')
        keyword = keyword.upper()
        rest = re.sub(r'\$\{(\w+)\}', lambda m: args.get(m.group(1), m.group(0)), rest.strip())
        if keyword == 'ARG' and not stages:
            name, _, default = rest.partition('=')
            args[name] = default
        elif keyword == 'FROM':
            words = rest.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) > 2 else None))
        else:
            assert stages, f'{path.name}: {keyword} before FROM'
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def pinned(image: str) -> bool:
    if '@sha256:' in image:
        return True
    name, _, tag = image.rpartition(':')
    return bool(name) and '/' not in tag and tag != 'latest' and bool(re.search(r'\d', tag))


@pytest.mark.parametrize('dockerfile', sorted(IMAGES))
def test_every_base_image_is_pinned(dockerfile: str) -> None:
    _, stages = parse(ROOT / dockerfile)
    names = {s.name for s in stages if s.name}
    external = [s.base for s in stages if s.base not in names]
    assert external, 'no FROM found'
    for image in external:
        assert '$' not in image, f'{dockerfile}: unresolved ARG in FROM {image}'
        assert pinned(image), f'{dockerfile}: FROM {image} is not pinned to a version tag or digest'


@pytest.mark.parametrize('dockerfile', sorted(IMAGES))
def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile: str) -> None:
    _, stages = parse(ROOT / dockerfile)
    users = [rest for keyword, rest in stages[-1].instructions if keyword == 'USER']
    assert users, f'{dockerfile}: the final stage sets no USER (it would run as root)'
    uid = users[-1].split(':')[0]
    assert uid.isdigit() and int(uid) != 0, f'{dockerfile}: USER {users[-1]} must be a numeric non-root uid'
    # runAsNonRoot can only verify a numeric uid; it is the uid the pods run as.
    from finetuner_operator.builders import RUN_AS_USER

    assert int(uid) == RUN_AS_USER


@pytest.mark.parametrize('dockerfile', sorted(IMAGES))
def test_entrypoint_is_a_module_that_exists_in_the_package(dockerfile: str) -> None:
    _, module, _ = IMAGES[dockerfile]
    _, stages = parse(ROOT / dockerfile)
    entrypoints = [rest for keyword, rest in stages[-1].instructions if keyword == 'ENTRYPOINT']
    assert entrypoints, f'{dockerfile}: no ENTRYPOINT'
    assert json.loads(entrypoints[-1]) == ['python', '-m', module], 'exec form, python -m <package>'
    main = ROOT / PACKAGE_DIRS[module] / module / '__main__.py'
    assert main.is_file(), f'{dockerfile}: ENTRYPOINT runs {module}, but {main.relative_to(ROOT)} does not exist'
    env = ' '.join(rest for keyword, rest in stages[-1].instructions if keyword == 'ENV')
    assert 'PATH=/opt/venv/bin:' in env, 'python (and torchrun) must resolve to the environment the build made'


@pytest.mark.parametrize('dockerfile', sorted(IMAGES))
def test_installs_its_extra_with_dependencies_before_sources(dockerfile: str) -> None:
    extra, _, _ = IMAGES[dockerfile]
    extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
    assert extra in extras
    _, stages = parse(ROOT / dockerfile)
    # The build stages in order (the trainer installs its dependencies in `deps`, the project in `build`).
    named = {s.name: s for s in stages if s.name}
    build_stages = [named[n] for n in ('deps', 'build') if n in named]
    steps = [f'{keyword} {rest}' for stage in build_stages for keyword, rest in stage.instructions]

    def first(pattern: str) -> int:
        return next(i for i, step in enumerate(steps) if re.search(pattern, step))

    metadata = first(r'^COPY pyproject\.toml')
    dependencies = first(rf'^RUN .*uv pip install -r pyproject\.toml --extra {extra}\b')
    sources = first(r'^COPY (sdk|operator|trainer)\b')
    project = first(r'^RUN .*uv pip install --no-deps (--target \S+ )?\.')
    assert metadata < dependencies < sources < project, 'a code change must not re-install the dependencies'
    final = stages[-1]
    copied = [rest.split() for keyword, rest in final.instructions if keyword == 'COPY']
    assert copied, 'the final stage copies the environment from the build'
    for source, *paths in copied:
        assert source.removeprefix('--from=') in named, f'{dockerfile}: the final stage copies only from build stages'
        assert all(path.startswith('/opt/') for path in paths), f'{dockerfile}: the final stage takes only /opt'


def test_trainer_code_layer_is_apart_from_the_environment() -> None:
    """A code change rebuilds a small layer: the project is installed apart from the 6 GB environment
    (in /opt/project, on the environment's path through a .pth file), and the final stage copies the
    environment from the dependencies stage, which sources do not touch."""
    _, stages = parse(ROOT / 'Dockerfile.trainer')
    named = {s.name: s for s in stages if s.name}
    assert not [rest for keyword, rest in named['deps'].instructions if re.match(r'(sdk|operator|trainer)\b', rest)]
    assert any('kube_finetuner.pth' in rest and '/opt/project' in rest for _, rest in named['deps'].instructions)
    final = [rest for keyword, rest in stages[-1].instructions if keyword == 'COPY']
    assert '--from=deps /opt/venv /opt/venv' in final
    assert '--from=build /opt/project /opt/project' in final


@pytest.mark.parametrize('dockerfile', sorted(IMAGES))
def test_final_base_fits_the_image(dockerfile: str) -> None:
    _, _, base = IMAGES[dockerfile]
    args, stages = parse(ROOT / dockerfile)
    assert stages[-1].base.startswith(f'{base}:')
    assert stages[-1].base == args['PYTHON_BASE'], 'the base is a build argument (scripts/build-images.sh sets it)'
    if dockerfile == 'Dockerfile.trainer':
        tested = version('torch').split('+')[0]
        assert f'torch=={tested} ' in (ROOT / dockerfile).read_text(), 'the image installs the torch tests ran with'


def test_trainer_image_asks_for_the_driver_its_torch_needs() -> None:
    """No CUDA base: the torch wheels bring the CUDA libraries. The NVIDIA container toolkit mounts the
    driver when NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES ask for it, and NVIDIA_REQUIRE_CUDA makes
    it refuse a node whose driver is older than the CUDA release torch was built for."""
    import torch

    _, stages = parse(ROOT / 'Dockerfile.trainer')
    env = dict(
        item.split('=', 1) for keyword, rest in stages[-1].instructions if keyword == 'ENV' for item in rest.split()
    )
    assert env['NVIDIA_VISIBLE_DEVICES'] == 'all'
    assert set(env['NVIDIA_DRIVER_CAPABILITIES'].split(',')) >= {'compute', 'utility'}
    major_minor = '.'.join((torch.version.cuda or '').split('.')[:2])
    assert major_minor, 'the tests run with a CUDA build of torch, as the image installs'
    assert env['NVIDIA_REQUIRE_CUDA'] == f'cuda>={major_minor}'
    text = (ROOT / 'Dockerfile.trainer').read_text()
    assert f'CUDA {major_minor}' in text and 'driver >= 580' in text, 'the comment names the CUDA release and driver'


def test_trainer_python_source_is_a_build_argument() -> None:
    args, stages = parse(ROOT / 'Dockerfile.trainer')
    assert args['PYTHON'] == 'system', 'the default works offline with a python base'
    run = ' '.join(rest for stage in stages for keyword, rest in stage.instructions if keyword == 'RUN')
    assert 'system) UV_PYTHON_DOWNLOADS=never uv venv --python /usr/local/bin/python3.11' in run
    assert 'managed) uv python install 3.11' in run


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    rules = [
        line.strip()
        for line in (ROOT / '.dockerignore').read_text().splitlines()
        if line.strip() and not line.startswith('#')
    ]
    assert rules[0] == '*', 'an allow-list: the build context is what the images need, not .venv or .git'
    allowed = {rule[1:].rstrip('/') for rule in rules if rule.startswith('!')}
    for dockerfile in IMAGES:
        _, stages = parse(ROOT / dockerfile)
        for stage in stages:
            for keyword, rest in stage.instructions:
                if keyword != 'COPY' or rest.startswith('--from='):
                    continue
                *sources, _destination = rest.split()
                for source in sources:
                    assert source in allowed, f'{dockerfile}: COPY {source} is excluded by .dockerignore'
                    assert (ROOT / source).exists(), f'{dockerfile}: COPY {source} does not exist'


# --- scripts/build-images.sh and scripts/podman-env.sh, without building (the builds: tests/e2e/test_images.py)


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ['bash', *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_build_script_with_docker_and_real_bases_runs_plain_docker_builds() -> None:
    result = _script('scripts/build-images.sh', '--dry-run', '--engine', 'docker', '--bases', 'real', '--tag', '1.2.3')
    assert result.returncode == 0, result.stderr
    builds = [line for line in result.stdout.splitlines() if line.startswith('+ ')]
    assert builds == [
        '+ docker build -f Dockerfile.operator -t ghcr.io/kube-finetuner/operator:1.2.3 .',
        '+ docker build -f Dockerfile.trainer -t ghcr.io/kube-finetuner/trainer:1.2.3 .',
    ]


def test_build_script_with_podman_and_stand_ins_mounts_the_machines_package_sources(tmp_path: Path) -> None:
    mirror = tmp_path / 'mirror'
    (mirror / 'simple').mkdir(parents=True)
    wheels = tmp_path / 'wheels'
    wheels.mkdir()
    env = {
        'TMPDIR': str(tmp_path),
        'PIP_CONFIG_FILE': os.devnull,  # only the variables below, not this machine's pip configuration
        'PIP_EXTRA_INDEX_URL': f'file://{mirror}/simple https://mirror.example/simple',
        'PIP_FIND_LINKS': str(wheels),
        'PIP_INDEX_URL': 'https://pypi.example/simple',
    }
    result = _script(
        'scripts/build-images.sh', '--dry-run', '--engine', 'podman', '--bases', 'standin', 'trainer', env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == '+ bash scripts/make-standins.sh'
    build = lines[1].split()
    assert build[:3] == ['+', 'podman', 'build'] and build[-5:] == ['-f', 'Dockerfile.trainer', '-t', TRAINER_TAG, '.']
    words = ' '.join(build)
    assert '--pull=never' in words
    assert '--build-arg PYTHON_BASE=localhost/kube-finetuner-standin/python:3.11-slim-bookworm' in words
    assert '--build-arg UV_IMAGE=localhost/kube-finetuner-standin/uv:0.5.11' in words
    assert '--build-arg PYTHON=system' in words
    uv_toml = tmp_path / 'kube-finetuner-build' / 'uv.toml'
    assert f'-v {uv_toml}:/etc/uv/uv.toml:ro' in words
    assert f'-v {mirror}:{mirror}:ro' in words, 'a local PEP 503 tree is mounted from the folder above simple/'
    assert f'-v {wheels}:{wheels}:ro' in words
    settings = tomllib.loads(uv_toml.read_text())
    assert settings == {
        'native-tls': True,
        'index-strategy': 'unsafe-best-match',
        'index-url': 'https://pypi.example/simple',
        'extra-index-url': [f'file://{mirror}/simple', 'https://mirror.example/simple'],
        'find-links': [str(wheels)],
    }


def test_build_script_refuses_what_it_cannot_do() -> None:
    unknown = _script('scripts/build-images.sh', '--dry-run', 'webui')
    assert unknown.returncode == 2
    assert "unknown argument 'webui' (images: operator, trainer, all; see --help)" in unknown.stderr
    engine = _script('scripts/build-images.sh', '--dry-run', '--engine', 'buildkit')
    assert (engine.returncode, engine.stderr.strip()) == (
        2,
        "build-images: --engine must be podman or docker, not 'buildkit'",
    )
    docker = _script('scripts/build-images.sh', '--dry-run', '--engine', 'docker', '--bases', 'standin')
    assert (docker.returncode, docker.stderr.strip()) == (2, 'build-images: --bases standin needs podman')
    shown = _script('scripts/build-images.sh', '--help')
    assert shown.returncode == 0 and '--bases auto|real|standin' in shown.stdout


def test_podman_env_keeps_the_projects_storage_apart_and_its_limits_within_the_machines(tmp_path: Path) -> None:
    import resource

    result = _script('scripts/podman-env.sh', env={'FINETUNER_PODMAN_ROOT': str(tmp_path / 'podman')})
    assert result.returncode == 0, result.stderr
    exported = dict(line.removeprefix('export ').replace("'", '').split('=', 1) for line in result.stdout.splitlines())
    root = tmp_path / 'podman'
    assert exported == {
        'CONTAINERS_CONF': f'{root}/containers.conf',
        'CONTAINERS_STORAGE_CONF': f'{root}/storage.conf',
        'TMPDIR': f'{root}/tmp',
    }
    storage = tomllib.loads((root / 'storage.conf').read_text())['storage']
    assert (storage['graphroot'], storage['runroot']) == (f'{root}/storage', f'{root}/run')
    containers = tomllib.loads((root / 'containers.conf').read_text())
    assert containers['engine']['runtime'] == 'runc'
    limits = dict(item.split('=') for item in containers['containers']['default_ulimits'])
    for name, which in (('nofile', resource.RLIMIT_NOFILE), ('nproc', resource.RLIMIT_NPROC)):
        soft, hard = (int(v) for v in limits[name].split(':'))
        machine = resource.getrlimit(which)[1]
        assert soft == hard and (machine == resource.RLIM_INFINITY or hard <= machine), name
    assert _script('scripts/podman-env.sh', env={'FINETUNER_PODMAN_ROOT': 'default'}).stdout == ''


@pytest.mark.parametrize(
    ('exit_code', 'output', 'outcome'),
    [
        (2, 'build-images: no container engine: install podman', 'unavailable'),
        (1, 'error: Failed to fetch: `https://pypi.org/simple/kopf/`\n  Caused by: dns error', 'unavailable'),
        (1, 'Error: building at STEP "RUN uv pip install ...": exit status 1', 'broken'),
        (0, '==> built', 'built'),
    ],
)
def test_image_fixtures_skip_only_where_the_machine_cannot_build(
    tmp_path: Path, exit_code: int, output: str, outcome: str
) -> None:
    """The image tests skip where no engine, root or network is at hand, and fail on a broken image."""
    from tests.cluster.runtime import BuildUnavailable, build_image

    script = tmp_path / 'build.sh'
    script.write_text(f'echo {json.dumps(output)} >&2\nexit {exit_code}\n')
    if outcome == 'built':
        assert build_image('operator', script=script) == f'ghcr.io/kube-finetuner/operator:{VERSION}'
    elif outcome == 'unavailable':
        with pytest.raises(BuildUnavailable) as caught:
            build_image('operator', script=script)
        assert ('no container engine' if exit_code == 2 else 'the build needs a package index') in str(caught.value)
    else:
        with pytest.raises(RuntimeError, match=r'scripts/build-images.sh operator failed:\n.*exit status 1'):
            build_image('operator', script=script)
