#!/usr/bin/env bash
# Runs every check and test of mesh, as CI does. On a fresh Debian machine it first
# installs the system packages the tests need (as root; others are told what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: dig for the DNS tests. The cluster, nftables and
# eBPF tests will add theirs here.
packages=(bind9-dnsutils)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "warning: missing packages: ${missing[*]} (run as root to install them); tests that need them print SKIPPED" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the `mesh` binary and a test backend; build them first.
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
