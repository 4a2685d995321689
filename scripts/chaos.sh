#!/usr/bin/env bash
# The chaos suite: three agents in network namespaces, a client at a steady rate, and
# one failure after another (rolling replacement, 5% packet loss, partition, restarts,
# kill -9). Prints a table of what the client saw. Needs root.
#   scripts/chaos.sh          the short form CI runs (20 s of packet loss)
#   scripts/chaos.sh --long   5 minutes of packet loss
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --long ]; then
    export MESH_CHAOS_LONG=1
fi
cargo build -q --bins
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test -q -p integration --test chaos -- --nocapture --test-threads 1 >"$out" 2>&1
status=$?
set -e
echo "| phase | requests | failed | slow (>= 1 s) | notes |"
echo "| --- | --- | --- | --- | --- |"
grep '^CHAOS |' "$out" | sed -e 's/^CHAOS /|/' -e 's/$/ |/'
if [ "$status" -ne 0 ]; then
    grep -E 'panicked|timed out' "$out" | head -5 >&2
    echo "the chaos suite failed" >&2
fi
exit "$status"
