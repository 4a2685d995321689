#!/usr/bin/env bash
# Fuzzes mesh's parsers with libFuzzer (cargo-fuzz): TARGET for SECONDS each (default:
# every target, 600 s). The corpora in fuzz/corpus/ are kept in the repository and
# grow with every run; the first run starts from the seeds the crates' mutation tests
# use. cargo-fuzz needs unstable compiler flags; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them. CI runs the mutation tests instead (the same entry points).
#   scripts/fuzz.sh [TARGET|all] [SECONDS]
# Targets: dns_request gossip_datagram sync_frame api_body config_toml docker_labels
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(dns_request gossip_datagram sync_frame api_body config_toml docker_labels)
which=${1:-all}
secs=${2:-600}
if [ "$which" != all ]; then
    targets=("$which")
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
MESH_FUZZ_SEEDS="$seeds" cargo test -q -p mesh-dns -p mesh-gossip -p mesh-agent -p mesh-docker --lib \
    write_fuzz_seeds -- --ignored >/dev/null
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    cp -n "$seeds/$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    echo "== $t: ${secs}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" --fuzz-dir fuzz "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
        grep -E '^(#[0-9]+[[:space:]]+DONE|stat::|Done|==[0-9]+== ERROR|SUMMARY)' || true
done
