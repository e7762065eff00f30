#!/usr/bin/env bash
# Install what Ferry needs on a fresh Debian 12 machine (as root), idempotently:
# Debian packages, a virtualenv in .venv with Ferry, and the cached test guest.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static gcc libc6-dev iproute2 python3 python3-venv
      ca-certificates)
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
