#!/usr/bin/env bash
# Runs every check and test of mesh, as CI does. On a fresh Debian machine it first
# installs the system packages the tests need (as root; others are told what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: dig for the DNS tests; nft for the nftables plane and
# the chaos suite's packet loss; conntrack for the nftables plane's flow cleanup;
# dnsmasq as a real DNS server behind the mesh; docker.io for a private Docker engine
# (dockerd, containerd, runc) and busybox-static for its image (scripts/busybox-image.sh);
# docker-compose for the Compose example; clang-19, libbpf-dev and linux-libc-dev
# compile the eBPF plane's C programs, and bpftool shows what is attached; chromium and
# chromium-driver run the dashboard's browser test; prometheus gives promtool, which checks
# the alert rules in deploy/; systemd gives systemd-analyze, which verifies deploy/mesh.service;
# faketime gives libfaketime, which starts an agent with its clock an hour ahead; ethtool
# turns checksum offload off, so the eBPF tests' receivers verify every checksum.
packages=(bind9-dnsutils nftables conntrack dnsmasq-base docker.io busybox-static docker-compose
  clang-19 libbpf-dev linux-libc-dev bpftool chromium chromium-driver prometheus systemd faketime
  ethtool)
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

# The eBPF programs are a cargo feature, so that mesh builds where clang is missing;
# CI builds and tests them. The check without it keeps that build working.
features=(--features mesh-agent/ebpf)
cargo fmt --all -- --check
cargo check -p mesh-agent --locked
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
# The integration tests run the `mesh` binary and a test backend; build them first.
cargo build --workspace --bins --locked "${features[@]}"
# The .deb, from that binary: integration/tests/packaging.rs checks what it holds.
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --version 3.8.0
./scripts/package.sh --dev
export MESH_REQUIRE_PACKAGE=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: one failing test binary does not hide the others' results.
# As root (CI), the Docker tests must run, not skip: the packages above provide dockerd.
# The same holds for the browser and promtool, which the packages above also provide.
if [ "$(id -u)" = 0 ]; then
  export MESH_REQUIRE_DOCKER=1 MESH_REQUIRE_EBPF=1 MESH_REQUIRE_BROWSER=1 MESH_REQUIRE_PROMTOOL=1 \
    MESH_REQUIRE_SYSTEMD=1 MESH_REQUIRE_FAKETIME=1
fi
cargo test --workspace --locked --no-fail-fast "${features[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# Every failing test, by name, at the end where CI output is read first.
failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/  \1/' || true)
if [ -n "$failed" ]; then
  echo "failed tests:"
  echo "$failed"
fi
if [ "$status" -ne 0 ] && [ -z "$failed" ]; then
  echo "cargo test failed before or outside a test (build error, or a test binary crashed): see above"
fi
exit "$status"
