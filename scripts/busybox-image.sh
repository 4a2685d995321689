#!/usr/bin/env bash
# Builds a tiny local Docker image from the host's static busybox, for tests and
# examples on machines with no registry and no internet.
#
# Usage: scripts/busybox-image.sh TAG        e.g. scripts/busybox-image.sh mesh-test/busybox:1
#
# It talks to the engine the docker CLI would use: set DOCKER_HOST (for instance
# DOCKER_HOST=unix:///tmp/mesh-dk-123-0/d.sock, what DockerHost::host_env() gives) to
# target a private engine. It prefers /usr/bin/docker (Debian's docker.io CLI) over
# whatever `docker` is first on PATH; DOCKER=/path/to/docker overrides both.
#
# Needs busybox-static (/usr/bin/busybox, or BUSYBOX=/path/to/busybox): a static
# binary, since the image has no libc.
#
# The image holds:
#   /bin/busybox and a symlink in /bin for every applet (sh, httpd, nc, nslookup,
#     wget, sleep, cat, echo, ls, kill, true, false, hostname, ip, ifconfig, mkdir,
#     rm, test, grep, ...), /bin is on Docker's default PATH;
#   /www with an index.html ("busybox"), for `httpd -f -p 80 -h /www`;
#   /etc/passwd and /etc/group with root and nobody, /tmp (1777);
#   CMD ["sh"].
# Tests pass their own command, e.g.
#   docker run -d mesh-test/busybox:1 httpd -f -p 80 -h /www
# and in a Compose file:
#   services:
#     web:
#       image: mesh-test/busybox:1
#       command: ["httpd", "-f", "-p", "80", "-h", "/www"]
#
# Idempotent: the image carries a label with a digest of its contents (busybox and
# this script); when TAG already has it, nothing is done. Otherwise the image is
# (re)imported and TAG moved to it.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 TAG   (e.g. $0 mesh-test/busybox:1)" >&2
  exit 2
fi
tag=$1

busybox=${BUSYBOX:-/usr/bin/busybox}
if [ ! -x "$busybox" ]; then
  echo "error: $busybox is missing: install busybox-static (apt-get install busybox-static) or set BUSYBOX" >&2
  exit 1
fi
if ! "$busybox" --list >/dev/null 2>&1; then
  echo "error: $busybox does not run as busybox (no --list)" >&2
  exit 1
fi
if command -v ldd >/dev/null && ldd "$busybox" >/dev/null 2>&1; then
  echo "error: $busybox is dynamically linked; the image has no libc: install busybox-static" >&2
  exit 1
fi

if [ -n "${DOCKER:-}" ]; then
  docker=$DOCKER
elif [ -x /usr/bin/docker ]; then
  docker=/usr/bin/docker
elif command -v docker >/dev/null; then
  docker=$(command -v docker)
else
  echo "error: no docker CLI (install docker.io, or set DOCKER)" >&2
  exit 1
fi

if ! err=$("$docker" version 2>&1 >/dev/null); then
  echo "error: no Docker engine answers at ${DOCKER_HOST:-the default socket}: $err" >&2
  exit 1
fi

applets=$("$busybox" --list)
need=(sh httpd nc nslookup wget sleep cat echo ls kill true false hostname ip ifconfig mkdir rm test grep)
for a in "${need[@]}"; do
  if ! grep -qx -- "$a" <<<"$applets"; then
    echo "error: $busybox has no '$a' applet, which the image must provide" >&2
    exit 1
  fi
done

label=org.mesh.busybox-image.digest
digest=$({ sha256sum <"$busybox"; sha256sum <"$0"; } | sha256sum | cut -c1-32)
have=$("$docker" image inspect -f "{{index .Config.Labels \"$label\"}}" "$tag" 2>/dev/null || true)
if [ "$have" = "$digest" ]; then
  echo "$tag is up to date"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,www,proc,sys,dev,root}
install -d -m 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
while read -r a; do
  [ -n "$a" ] && [ "$a" != busybox ] && ln -s busybox "$root/bin/$a"
done <<<"$applets"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
echo busybox >"$root/www/index.html"

# Fixed owners, order and times: the same inputs give the same layer.
tar -C "$root" --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -cf - . |
  "$docker" import \
    --change 'CMD ["sh"]' \
    --change "LABEL $label=$digest" \
    --message "busybox from $busybox" \
    - "$tag" >/dev/null
echo "imported $tag"
