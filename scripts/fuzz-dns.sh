#!/usr/bin/env bash
# Fuzzes the DNS request path (parse, answer, encode) with libFuzzer for SECONDS
# (default 60). cargo-fuzz needs unstable compiler flags; RUSTC_BOOTSTRAP lets the
# stable toolchain accept them. Not part of CI: the mutation test in
# mesh-dns/src/fuzzing.rs covers the same path on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz run request --fuzz-dir mesh-dns/fuzz -- -max_total_time="${1:-60}" -rss_limit_mb=2048
