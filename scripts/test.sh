#!/usr/bin/env bash
# Install what is missing (idempotent), then run the whole test suite:
# formatting, clippy, unit tests and the privileged integration tests.
# Run as root: the integration tests load BPF programs and create cgroups.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^clippy' \
  || rustup component add clippy --toolchain nightly
exec cargo xtask test "$@"
