#!/usr/bin/env bash
# Podman as this project uses it: its own storage and configuration under one folder, so that image builds
# and the test suite's containers never touch (or depend on) the machine's default podman set-up.
#
#   eval "$(bash scripts/podman-env.sh)"      # exports CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, TMPDIR
#   podman images                              # the project's images
#
# FINETUNER_PODMAN_ROOT (default ~/.cache/kube-finetuner/podman) is that folder; FINETUNER_PODMAN_ROOT=default
# prints nothing and leaves podman's own configuration in charge (e.g. to push from your usual storage).
#
# Two settings that some machines need and that are harmless elsewhere:
# - runtime runc: crun 1.8 (Debian 12's) refuses hybrid cgroup hierarchies ("cannot set limits");
# - default ulimits no higher than this shell's hard limits: podman raises RLIMIT_NOFILE/NPROC to its own
#   defaults (1048576) and fails where the machine's hard limit is lower ("error setting rlimit type 7").
#   NPROC is capped at 32768 as well: on a VM with a hard limit of 96369 runc was refused that value and
#   accepted 32768 (plenty for a container).
set -euo pipefail

ROOT_DIR="${FINETUNER_PODMAN_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-finetuner/podman}"
if [ "$ROOT_DIR" = default ]; then
  exit 0
fi
mkdir -p "$ROOT_DIR"/storage "$ROOT_DIR"/run "$ROOT_DIR"/tmp "$ROOT_DIR"/networks
ROOT_DIR="$(cd "$ROOT_DIR" && pwd)"

hard_limit() {  # the hard limit of ulimit option $1, capped at $2; "unlimited" counts as the cap
  local value
  value="$(ulimit -H "$1")"
  if [ "$value" = unlimited ] || [ "$value" -gt "$2" ]; then value="$2"; fi
  echo "$value"
}
NOFILE="$(hard_limit -n 1048576)"
NPROC="$(hard_limit -u 32768)"

write_if_changed() {  # write stdin to $1 only when it differs (a running podman keeps reading the old one)
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  cat >"$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

write_if_changed "$ROOT_DIR/containers.conf" <<EOF
# written by scripts/podman-env.sh
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
tmp_dir = "$ROOT_DIR/run/libpod"
volume_path = "$ROOT_DIR/storage/volumes"
static_dir = "$ROOT_DIR/storage/libpod"
[network]
network_config_dir = "$ROOT_DIR/networks"
EOF

write_if_changed "$ROOT_DIR/storage.conf" <<EOF
# written by scripts/podman-env.sh
[storage]
driver = "overlay"
graphroot = "$ROOT_DIR/storage"
runroot = "$ROOT_DIR/run"
EOF

echo "export CONTAINERS_CONF='$ROOT_DIR/containers.conf'"
echo "export CONTAINERS_STORAGE_CONF='$ROOT_DIR/storage.conf'"
echo "export TMPDIR='$ROOT_DIR/tmp'"
