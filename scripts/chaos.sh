#!/usr/bin/env bash
# The chaos suite: three agents in network namespaces, a client at a steady rate, and
# one failure after another (rolling replacement, 5% packet loss, partition, restarts,
# kill -9). Prints a table of what the client saw. Needs root.
#   scripts/chaos.sh          the short form CI runs (20 s of packet loss)
#   scripts/chaos.sh --long   5 minutes of packet loss; the table also goes to
#                             bench/results/chaos.md, which bench/RESULTS.md includes
set -euo pipefail
cd "$(dirname "$0")/.."
long=
if [ "${1:-}" = --long ]; then
    export MESH_CHAOS_LONG=1
    long=1
fi
cargo build -q --bins --features mesh-agent/ebpf
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test -q -p integration --test chaos -- --nocapture --test-threads 1 >"$out" 2>&1
status=$?
set -e
table() {
    echo "| phase | requests | failed | slow (>= 1 s) | slowest (ms) | notes |"
    echo "| --- | --- | --- | --- | --- | --- |"
    # A test's progress dot may precede a row on its line.
    sed -n 's/^.*CHAOS | \(.*\)$/| \1 |/p' "$out"
}
table
if [ -n "$long" ]; then
    {
        echo "_$(date -u +%Y-%m-%d) · $(nproc) CPUs, $(uname -r) · commit \`$(git rev-parse --short HEAD)\`_"
        echo
        echo "Three agents in network namespaces; a client sends 40 HTTP requests and 20 DNS"
        echo "queries (UDP, through the mesh to dnsmasq) a second to one host's published ports"
        echo "throughout. \"Slow\" requests succeeded after a second or more (a lost SYN"
        echo "retransmitted). Loss is 5% of the packets between hosts, dropped by the switch they"
        echo "share (a lossy wire); the client's own link is clean."
        echo
        table
        if [ "$status" -ne 0 ]; then
            echo
            echo "The run stopped at a failed assertion:"
            echo
            grep -E -A2 'panicked' "$out" | sed 's/^/    /' | head -6 || true
        fi
    } > bench/results/chaos.md
    echo "wrote bench/results/chaos.md" >&2
fi
if [ "$status" -ne 0 ]; then
    grep -E -A3 'panicked|timed out|SKIPPED' "$out" | head -20 >&2 || true
    echo "the chaos suite failed" >&2
fi
exit "$status"
