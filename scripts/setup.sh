#!/usr/bin/env bash
# Idempotent host set-up for building and testing portguard.
#
# Installs only what is missing:
#   - Debian packages: LLVM dev libraries matching the nightly rustc's LLVM major
#     (needed to build bpf-linker), protobuf-compiler (the CRI client's protos),
#     plus what the integration tests use: iproute2, containerd + runc +
#     CNI plugins + busybox-static for real containers, systemd (systemd-analyze
#     verifies the unit file), util-linux (setpriv limits capabilities).
#   - kubernetes-validate (PyPI), which validates deploy/ manifests offline.
#   - ocsf-json-schema (PyPI), which ships the OCSF schema of every 1.x
#     release and makes JSON Schemas of its classes: the tests validate
#     `--format ocsf` events with it offline (scripts/ocsf_validate.py).
#   - jsonschema (PyPI; kubernetes-validate brings it, checked on its own),
#     which validates event lines and PolicyReports against their schemas
#     (kubernetes-validate knows only built-in kinds, not CRDs).
#   - the nightly toolchain's rust-src component (for -Z build-std=core).
#   - bpf-linker, built against that same LLVM major, into ~/.cargo/bin (cached
#     across runs: skipped when `bpf-linker --version` already works and reports
#     the right LLVM major).
#   - a bpffs mount at /sys/fs/bpf when none is mounted (needs root).
#
# Safe to run any number of times; prints what it does.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "not root and no sudo: package installs and bpffs mount will be skipped"; SUDO="false"; fi
fi

export PATH="$HOME/.cargo/bin:$PATH"

command -v rustup >/dev/null 2>&1 || { log "rustup not found; install it from https://rustup.rs"; exit 1; }

# 1. nightly toolchain + rust-src. Never `rustup update`: a newer nightly may bump
#    LLVM past what bpf-linker supports.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# 2. LLVM major of the nightly rustc decides which llvm-N-dev and bpf-linker feature we need.
LLVM_MAJOR="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
[ -n "$LLVM_MAJOR" ] || { log "cannot read LLVM version from rustc +nightly -vV"; exit 1; }
log "nightly rustc uses LLVM $LLVM_MAJOR"

want_pkgs=(iproute2 runc busybox-static jq protobuf-compiler containerd containernetworking-plugins systemd util-linux bpftool)
need_linker=1
if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version >/dev/null 2>&1; then
  # bpf-linker links LLVM dynamically or statically; check the LLVM it was built for.
  if bpf-linker --version 2>&1 | grep -q "LLVM $LLVM_MAJOR" \
     || [ "$(cat "$HOME/.cargo/.bpf-linker-llvm" 2>/dev/null)" = "$LLVM_MAJOR" ]; then
    need_linker=0
  fi
fi
if [ "$need_linker" = 1 ]; then
  want_pkgs+=("llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" zlib1g-dev libzstd-dev)
fi

missing=()
for p in "${want_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$need_linker" = 1 ]; then
  log "building bpf-linker for LLVM $LLVM_MAJOR (about a minute)"
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install --locked --force bpf-linker \
    --no-default-features --features "llvm-${LLVM_MAJOR}"
  echo "$LLVM_MAJOR" > "$HOME/.cargo/.bpf-linker-llvm"
else
  log "bpf-linker present: $(bpf-linker --version 2>&1 | head -1)"
fi

# cargo-fuzz runs the policy fuzz target in the test suite (cached in
# ~/.cargo/bin like bpf-linker).
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (about two minutes)"
  cargo install --locked cargo-fuzz
fi

# kubernetes-validate validates the Kubernetes manifests offline in the tests.
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  log "installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate
fi
if ! python3 -c 'import jsonschema' >/dev/null 2>&1; then
  log "installing jsonschema (PyPI)"
  python3 -m pip install --quiet jsonschema
fi

# ocsf-json-schema validates the OCSF events (--format ocsf) offline in the
# tests; pinned, so the schemas the tests read do not change under them.
OCSF_JSON_SCHEMA_VERSION=1.2.0
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('ocsf-json-schema') != '$OCSF_JSON_SCHEMA_VERSION')" >/dev/null 2>&1 \
   || ! python3 -c 'import jsonschema' >/dev/null 2>&1; then
  log "installing ocsf-json-schema $OCSF_JSON_SCHEMA_VERSION and jsonschema (PyPI)"
  python3 -m pip install --quiet "ocsf-json-schema==$OCSF_JSON_SCHEMA_VERSION" jsonschema
fi

# 3. bpffs (the agent pins its programs, links and maps there).
if [ "$SUDO" != false ] && ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  log "mounting bpffs at /sys/fs/bpf"
  $SUDO mount -t bpf bpf /sys/fs/bpf || log "warning: could not mount bpffs"
fi
# securityfs lets us read the active LSM list (/sys/kernel/security/lsm).
if [ "$SUDO" != false ] && ! grep -q ' /sys/kernel/security securityfs ' /proc/mounts; then
  $SUDO mount -t securityfs securityfs /sys/kernel/security 2>/dev/null || true
fi

log "done"
