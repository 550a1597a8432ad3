#!/usr/bin/env bash
# Install what is missing (idempotent), build portguard in release mode, create
# the example cgroups and run the agent on the bundled example policy.
# Run as root. Stop with Ctrl-C: this demo pins nothing (--pin-dir none), so
# the programs detach; a deployed agent pins them and keeps enforcing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p portguard

CG2="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)"
if [ -z "$CG2" ]; then
  echo "quickstart: no cgroup2 filesystem mounted (see docs/troubleshooting.md)" >&2
  exit 1
fi
mkdir -p "$CG2/portguard-demo/web" "$CG2/portguard-demo/db"

cat >&2 <<MSG

portguard is starting on examples/policy.yaml; events (JSON) follow on stdout.
In another root shell, put a shell into the example "web" cgroup and try it:

  echo \$\$ > $CG2/portguard-demo/web/cgroup.procs
  python3 -m http.server 8080 --bind 0.0.0.0     # allowed
  python3 -m http.server 8081                    # Permission denied, and an event

Stop with Ctrl-C (the demo pins nothing: enforcement stops with the agent).
MSG
exec ./target/release/portguard run --policy examples/policy.yaml --pin-dir none "$@"
