#!/usr/bin/env bash
# Build the project's images: the operator (Dockerfile.operator) and the trainer (Dockerfile.trainer).
#
#   bash scripts/build-images.sh                    # both, tagged ghcr.io/kube-finetuner/{operator,trainer}:<version>
#   bash scripts/build-images.sh operator           # one of them
#   bash scripts/build-images.sh --dry-run trainer  # print the commands only
#
# Options (or the environment variable in brackets):
#   --engine podman|docker    [FINETUNER_ENGINE]  default: podman when installed, else docker when its daemon answers
#   --bases auto|real|standin [FINETUNER_BASES]   real: the bases the Dockerfiles name (pulled from their registries);
#                             standin: local stand-ins made by scripts/make-standins.sh (no registry needed, root);
#                             auto (default): real when docker.io and ghcr.io answer, else standin
#   --repository PREFIX       [FINETUNER_REPOSITORY] default ghcr.io/kube-finetuner (the Helm chart's default)
#   --tag TAG                 [FINETUNER_TAG]      default: the version in pyproject.toml (the chart's appVersion)
#   --dry-run                 print what would run
#
# With podman, images go to the project's own storage (scripts/podman-env.sh; FINETUNER_PODMAN_ROOT=default
# uses podman's usual one). Builds then see this machine's package sources as they are configured for pip:
# its CA bundle (a TLS-intercepting proxy's CA included) and any local index or wheel folders in
# `pip config list`, mounted read-only, so torch comes from the same files as the project's .venv.
# The trainer image is large: ~6.8 GB, and the build needs ~40 GB of free disk at its peak.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE="${FINETUNER_ENGINE:-}"
BASES="${FINETUNER_BASES:-auto}"
REPOSITORY="${FINETUNER_REPOSITORY:-ghcr.io/kube-finetuner}"
TAG="${FINETUNER_TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}"
DRY_RUN=0
IMAGES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE="$2"; shift 2 ;;
    --bases) BASES="$2"; shift 2 ;;
    --repository) REPOSITORY="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    operator|trainer) IMAGES+=("$1"); shift ;;
    all) IMAGES+=(operator trainer); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument '$1' (images: operator, trainer, all; see --help)" >&2; exit 2 ;;
  esac
done
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(operator trainer)

if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null; then
    ENGINE=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
  else
    echo 'build-images: no container engine: install podman (Debian/Ubuntu: apt-get install podman buildah runc' \
      'fuse-overlayfs debootstrap) or start a Docker daemon' >&2
    exit 2
  fi
fi
case "$ENGINE" in
  podman) [ "$DRY_RUN" = 1 ] || eval "$(bash scripts/podman-env.sh)" ;;
  docker) ;;
  *) echo "build-images: --engine must be podman or docker, not '$ENGINE'" >&2; exit 2 ;;
esac

reachable() {  # any HTTP answer from a registry's API endpoint (401 included) means it can be pulled from
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$1" 2>/dev/null || true)"
  [ -n "$code" ] && [ "$code" != 000 ]
}
if [ "$BASES" = auto ]; then
  if reachable https://registry-1.docker.io/v2/ && reachable https://ghcr.io/v2/; then BASES=real; else BASES=standin; fi
fi
case "$BASES" in
  real) BASE_ARGS=() ;;
  standin)
    [ "$ENGINE" = podman ] || { echo 'build-images: --bases standin needs podman' >&2; exit 2; }
    PYTHON_STANDIN=localhost/kube-finetuner-standin/python:3.11-slim-bookworm
    UV_STANDIN="localhost/kube-finetuner-standin/uv:$(sed -n 's/^ARG UV_IMAGE=.*uv:\([0-9.]*\)$/\1/p' Dockerfile.operator)"
    BASE_ARGS=(--pull=never --build-arg "PYTHON_BASE=$PYTHON_STANDIN" --build-arg "UV_IMAGE=$UV_STANDIN")
    ;;
  *) echo "build-images: --bases must be auto, real or standin, not '$BASES'" >&2; exit 2 ;;
esac

# Package sources inside RUN steps (podman only: `docker build` has no volumes; BuildKit uses the daemon's network).
SOURCE_ARGS=()
if [ "$ENGINE" = podman ]; then
  WORK="${TMPDIR:-/tmp}/kube-finetuner-build"
  mkdir -p "$WORK"
  UV_TOML="$WORK/uv.toml"
  python3 - "$UV_TOML" >"$WORK/mounts" <<'EOF'
import shlex, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse

# `pip config list` prints key='value' lines for every scope (global, user, site, environment).
listed = subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'], capture_output=True, text=True).stdout
settings = {}
for line in listed.splitlines():
    key, _, value = line.partition('=')
    name = key.rsplit('.', 1)[-1]
    if name in ('index-url', 'extra-index-url', 'find-links'):
        settings.setdefault(name, [])
        for item in shlex.split(value)[0].split() if value else []:
            if item not in settings[name]:
                settings[name].append(item)
mounts = set()
def local(location):
    path = urlparse(location).path if location.startswith('file:') else location
    if not path.startswith('/'):
        return None
    # A PEP 503 tree (.../simple/<project>/index.html) links to files beside "simple": mount its parent.
    return str(Path(path).parent) if Path(path).name == 'simple' else path
# pip takes the best version over all its indexes; uv's default takes a package from the first index that
# has it, which would let a local mirror's older release win over the newer one the .venv was built with.
lines = ['# written by scripts/build-images.sh from `pip config list`', 'native-tls = true',
         'index-strategy = "unsafe-best-match"']
for name, key in (('index-url', 'index-url'), ('extra-index-url', 'extra-index-url'), ('find-links', 'find-links')):
    values = settings.get(name, [])
    if not values:
        continue
    for value in values:
        if (folder := local(value)) and Path(folder).exists():
            mounts.add(folder)
    if name == 'index-url':
        lines.append(f'index-url = "{values[0]}"')
    else:
        lines.append(f'{key} = [' + ', '.join(f'"{v}"' for v in values) + ']')
Path(sys.argv[1]).write_text('\n'.join(lines) + '\n')
print('\n'.join(sorted(mounts)))
EOF
  SOURCE_ARGS+=(--network=host -v "$UV_TOML:/etc/uv/uv.toml:ro")
  while read -r folder; do
    [ -n "$folder" ] && SOURCE_ARGS+=(-v "$folder:$folder:ro")
  done <"$WORK/mounts"
  for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [ -f "$bundle" ]; then
      SOURCE_ARGS+=(-v "$bundle:/etc/ssl/certs/ca-certificates.crt:ro")
      break
    fi
  done
fi

run() {
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

build() {
  local image="$1" name="$REPOSITORY/$1:$TAG" started size extra=()
  started=$(date +%s)
  # The stand-in python base has Python 3.11 as the python images do: the trainer uses it (no download).
  if [ "$image" = trainer ] && [ "$BASES" = standin ]; then extra=(--build-arg PYTHON=system); fi
  run "$ENGINE" build "${BASE_ARGS[@]}" "${extra[@]}" "${SOURCE_ARGS[@]}" -f "Dockerfile.$image" -t "$name" .
  if [ "$DRY_RUN" = 0 ]; then
    size="$("$ENGINE" image inspect --format '{{.Size}}' "$name")"
    printf '==> %s built in %d s, %s MB (%s bases, %s)\n' "$name" "$(($(date +%s) - started))" \
      "$((size / 1000000))" "$BASES" "$ENGINE"
  fi
}

lock() {  # one build at a time per storage: test sessions may build the same image at once
  if [ "$DRY_RUN" = 0 ] && command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/kube-finetuner-build.lock"
    flock 9
  fi
}

lock
if [ "$BASES" = standin ]; then
  run bash scripts/make-standins.sh
fi
for image in "${IMAGES[@]}"; do
  build "$image"
done
