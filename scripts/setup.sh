#!/usr/bin/env bash
# Install what Ferry needs on a fresh Debian 12 machine (as root), idempotently:
# Debian packages, a virtualenv in .venv with Ferry, and the cached test guest.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static gcc libc6-dev iproute2 iputils-ping python3 python3-venv
      ca-certificates
      etcd-server)   # the [cluster] etcd backend's tests start their own etcd on loopback
# QEMU 7.2, what Debian 12 ships, loses about one guest in ten in a live migration
# under TCG while the guest dirties memory (bench/plain_qemu_early_migration.py);
# QEMU >= 8 does not. On bookworm, take QEMU from Debian's bookworm-backports.
qemu_major() {
    dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/[.].*//'
}
major=$(qemu_major || true)
# The archive this machine is already configured to take bookworm from (a
# one-line .list or a deb822 .sources entry): backports come from the same place.
bookworm_archive() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        sed -E 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }'
    done | head -n 1 | grep . && return
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk 'BEGIN { RS = "" }
             /(^|\n)Types:[^\n]*deb( |\n|$)/ && /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ {
                 if (match($0, /URIs:[ \t]*[^ \t\n]+/)) {
                     u = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u)
                     print u; exit } }' "$f"
    done | head -n 1 | grep .
}
if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null \
        && [ "${major:-0}" -lt 8 ]; then
    archive=$(bookworm_archive) || {
        echo "setup: QEMU >= 8 is needed and no bookworm archive is configured in" \
             "/etc/apt to take bookworm-backports from" >&2
        exit 1
    }
    echo "setup: QEMU from bookworm-backports ($archive)"
    echo "deb $archive bookworm-backports main" \
        > /etc/apt/sources.list.d/ferry-backports.list
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-utils
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# the guest kernel is fetched with apt-get download: its index must be there
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
    apt-get update -q
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

export FERRY_GUEST_DIR=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
.venv/bin/python guest/build.py --out "$FERRY_GUEST_DIR" >/dev/null
echo "setup: ready (venv .venv, guest in $FERRY_GUEST_DIR)"
