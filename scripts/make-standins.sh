#!/usr/bin/env bash
# Stand-ins for the images' base images, made on a machine that reaches no container registry:
#   PYTHON_STANDIN  Debian 12 (bookworm) minbase + python3.11, from the apt mirror this machine already uses
#                   (debootstrap), with python3.11/python3/python in /usr/local/bin like the python:3.11-slim images;
#   UV_STANDIN      uv's static binaries (/uv, /uvx) taken from uv's wheel on PyPI, like ghcr.io/astral-sh/uv.
# Usage: bash scripts/make-standins.sh   (root; needs debootstrap and podman; idempotent)
# scripts/build-images.sh calls it when no registry is reachable and passes the stand-ins as build arguments.
# What a stand-in does not test: the real base's exact Python patch release and its Debian point release.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_STANDIN="${PYTHON_STANDIN:-localhost/kube-finetuner-standin/python:3.11-slim-bookworm}"
UV_VERSION="$(sed -n 's/^ARG UV_IMAGE=.*uv:\([0-9.]*\)$/\1/p' Dockerfile.operator)"
UV_STANDIN="${UV_STANDIN:-localhost/kube-finetuner-standin/uv:$UV_VERSION}"
eval "$(bash scripts/podman-env.sh)"

for tool in podman debootstrap chroot; do
  command -v "$tool" >/dev/null || { echo "make-standins: $tool is missing; on Debian/Ubuntu: apt-get install podman debootstrap runc" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo 'make-standins: debootstrap needs root' >&2; exit 2; }

if podman image exists "$PYTHON_STANDIN"; then
  echo "==> $PYTHON_STANDIN exists"
else
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  [ -n "$mirror" ] || mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$(mktemp -d /var/tmp/kube-finetuner-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
  echo "==> debootstrap bookworm from $mirror"
  # TMPDIR stays outside the chroot: ca-certificates fails to configure with a TMPDIR that does not exist there.
  if ! env -u TMPDIR debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -5 "$rootfs.log" >&2
    echo "make-standins: debootstrap from $mirror failed (no apt mirror reachable?)" >&2
    exit 2
  fi
  rm -f "$rootfs.log"
  in_root() { env -u TMPDIR DEBIAN_FRONTEND=noninteractive chroot "$rootfs" "$@"; }
  in_root apt-get update -qq
  in_root apt-get install -y -qq --no-install-recommends python3.11 ca-certificates >/dev/null
  in_root apt-get clean
  for name in python3.11 python3 python; do ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/$name"; done
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$PYTHON_STANDIN" >/dev/null
  echo "==> $PYTHON_STANDIN made"
fi

if podman image exists "$UV_STANDIN"; then
  echo "==> $UV_STANDIN exists"
else
  wheels="$(mktemp -d)"
  if ! python3 -m pip download -q "uv==$UV_VERSION" --no-deps --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --python-version 3.11 -d "$wheels"; then
    echo "make-standins: cannot download uv $UV_VERSION's wheel (no package index reachable?)" >&2
    exit 2
  fi
  python3 -m zipfile -e "$wheels"/uv-*.whl "$wheels/unpacked"
  scripts_dir="$(echo "$wheels"/unpacked/uv-*.data/scripts)"
  chmod +x "$scripts_dir/uv" "$scripts_dir/uvx"
  # A scratch image holding only /uv and /uvx, as the real one does.
  printf 'FROM scratch\nCOPY uv uvx /\n' >"$scripts_dir/Containerfile"
  podman build --quiet --pull=never -t "$UV_STANDIN" -f "$scripts_dir/Containerfile" "$scripts_dir" >/dev/null
  rm -rf "$wheels"
  echo "==> $UV_STANDIN made"
fi
