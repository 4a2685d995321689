#!/usr/bin/env bash
# Builds the .deb of mesh with cargo-deb: the binary, the systemd unit, the sample
# /etc/mesh/mesh.toml, the man page and bash, zsh and fish completions.
#   scripts/package.sh          release build, as shipped (with the eBPF programs)
#   scripts/package.sh --dev    packs the debug binary already built (CI, quicker)
# Prints the path of the .deb. Needs cargo-deb (`cargo install cargo-deb --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "scripts/package.sh needs cargo-deb: cargo install cargo-deb --locked" >&2
    exit 1
fi
profile=release
if [ "${1:-}" = --dev ]; then
    profile=dev
    bin=target/debug/mesh
    [ -x "$bin" ] || { echo "$bin is missing: cargo build --bins --features mesh-agent/ebpf" >&2; exit 1; }
else
    cargo build --release --locked -p mesh-agent --features mesh-agent/ebpf
    bin=target/release/mesh
fi
out=target/package
mkdir -p "$out"
"$bin" man | gzip -9n > "$out/mesh.1.gz"
"$bin" completions bash > "$out/mesh.bash"
"$bin" completions zsh > "$out/_mesh"
"$bin" completions fish > "$out/mesh.fish"
cargo deb -p mesh-agent --no-build --profile "$profile" --no-strip --output target/debian/ 2>&1 \
    | tail -n 1
