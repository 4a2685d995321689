#!/usr/bin/env bash
# Reproduces bench/RESULTS.md: installs the reference servers and tools, builds mesh
# and mesh-bench in release mode, runs the data-plane, DNS and gossip benchmarks, then
# writes RESULTS.md, the raw JSON in results/ and plots/. Needs root (network namespaces).
# Also measures the cost of an API write as the table grows (api).
# Environment: REPS (5), SECS (4), DNS_SECS (5), GOSSIP_SIZES ("100:30,1000:10"),
# ONLY ("dataplane dns gossip api").
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh needs root: it creates network namespaces and pins processes" >&2
    exit 1
fi

PACKAGES="haproxy nginx libnginx-mod-stream iperf3 dnsperf unbound knot dnsmasq-base bind9-dnsutils fonts-dejavu-core clang-19 libbpf-dev linux-libc-dev"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian starts the packaged daemons; the benchmark runs its own copies, pinned.
for s in nginx unbound knot haproxy; do
    systemctl stop "$s" >/dev/null 2>&1 || true
done

cargo build --release -q -p mesh-agent -p mesh-bench --features mesh-agent/ebpf
BENCH=target/release/mesh-bench
OUT=bench/results
mkdir -p "$OUT"
ONLY=${ONLY:-"dataplane dns gossip api"}

for part in $ONLY; do
    case $part in
        dataplane) echo "== data plane"; $BENCH dataplane --reps "${REPS:-5}" --secs "${SECS:-4}" --out "$OUT" ;;
        dns) echo "== DNS"; $BENCH dns --reps "${REPS:-5}" --secs "${DNS_SECS:-5}" --out "$OUT" ;;
        gossip) echo "== gossip (simulator)"; $BENCH gossip --sizes "${GOSSIP_SIZES:-100:30,1000:10}" --out "$OUT" ;;
        api) echo "== API write cost"; $BENCH api --out "$OUT" ;;
        withdrawal) echo "== withdrawal (simulator, ~40 min)"; $BENCH withdrawal --sizes "${WITHDRAWAL_SIZES:-3:1000,100:40,1000:20}" --out "$OUT" ;;
        soak) echo "== soak (${SOAK_MINUTES:-60} min)"; $BENCH soak --minutes "${SOAK_MINUTES:-60}" --out "$OUT" ;;
        nft-scale) echo "== nftables apply at scale"; $BENCH nft-scale --services "${NFT_SERVICES:-10000}" --tasks 10 --out "$OUT" ;;
        *) echo "unknown part $part (dataplane, dns, gossip, api, withdrawal, soak, nft-scale)" >&2; exit 2 ;;
    esac
done
$BENCH report --results "$OUT" --bench-dir bench
echo "done: bench/RESULTS.md"
