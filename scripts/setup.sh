#!/usr/bin/env bash
# Install what Ferry needs on a fresh Debian 12 machine (as root), idempotently:
# Debian packages, a virtualenv in .venv with Ferry, and the cached test guest.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static gcc libc6-dev iproute2 iputils-ping python3 python3-venv
      ca-certificates
      etcd-server    # the [cluster] etcd backend's tests start their own etcd on loopback
      chromium chromium-driver)   # the dashboard's test, in a real (headless) browser
# QEMU 7.2, what Debian 12 ships, loses about one guest in ten in a live migration
# under TCG while the guest dirties memory (bench/plain_qemu_early_migration.py);
# QEMU >= 8 does not. On bookworm, take QEMU from Debian's bookworm-backports.
qemu_major() {
    dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/[.].*//'
}
major=$(qemu_major || true)
# Backports come from the archive this machine already takes bookworm from,
# as apt itself reports its configured sources (apt-get indextargets): no
# mirror of our own, so a machine on a local mirror keeps using it.
# (read once: "RELEASE TARGET_OF SITE SOURCESENTRY" per line; empty if apt can't say)
TARGETS=$(apt-get indextargets --format '$(RELEASE) $(TARGET_OF) $(SITE) $(SOURCESENTRY)' \
          2>/dev/null || true)
bookworm_keyring() {  # the Signed-By of bookworm's own entry, else Debian's keyring
    local entry file line key=""
    entry=$(awk '$1 == "bookworm" && $2 == "deb" && !n++ { print $4 }' <<<"$TARGETS")
    file=${entry%:*}; line=${entry##*:}
    if [[ "$file" == *.sources && -r "$file" ]]; then
        # the stanza that names bookworm among its Suites (apt's numbering of
        # stanzas skips comment-only ones: match by content, not by number)
        key=$(awk 'BEGIN { RS = "" }
                   /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ {
                       if (match($0, /Signed-By:[ \t]*[^ \t\n]+/)) {
                           s = substr($0, RSTART, RLENGTH); sub(/Signed-By:[ \t]*/, "", s)
                           print s; exit } }' "$file")
    elif [[ -r "$file" ]]; then
        key=$(sed -n "${line}p" "$file" | grep -o 'signed-by=[^] ]*' | head -n 1 | cut -d= -f2 \
              || true)
    fi
    [ -n "$key" ] && [ -r "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
    echo "$key"
}
if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null \
        && [ "${major:-0}" -lt 8 ]; then
    ours=/etc/apt/sources.list.d/ferry-backports.sources
    backports=$(awk '$1 == "bookworm-backports" && !n++ { print $4 }' <<<"$TARGETS")
    if [ -n "$backports" ] && [[ "$backports" != "$ours:"* ]] \
            && [[ "$backports" != /etc/apt/sources.list.d/ferry-backports.list:* ]]; then
        echo "setup: QEMU from bookworm-backports (configured on this machine already)"
    else
        rm -f /etc/apt/sources.list.d/ferry-backports.list   # (what older setups wrote)
        site=$(awk '$1 == "bookworm" && $2 == "deb" && !n++ { print $3 }' <<<"$TARGETS")
        if [ -z "$site" ]; then
            echo "setup: QEMU >= 8 is needed and no bookworm archive is configured in" \
                 "/etc/apt to take bookworm-backports from" >&2
            exit 1
        fi
        echo "setup: QEMU from bookworm-backports ($site)"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
            "$site" "$(bookworm_keyring)" > "$ours"
    fi
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

# the dashboard's terminal: xterm.js from npm (Debian 12's libjs-xterm 3.8 ships
# only a CommonJS stub, not a browser build), at one exact version, from the
# npm registry this machine is configured with; ferryd serves it (web_vendor)
XTERM_VERSION=5.5.0
WEB=/var/cache/ferry/web
if [ "$(cat "$WEB/node_modules/@xterm/xterm/package.json" 2>/dev/null |
        sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' | head -n 1)" != "$XTERM_VERSION" ]; then
    if ! command -v npm >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm
    fi
    mkdir -p "$WEB"
    npm install --prefix "$WEB" --no-package-lock --no-audit --no-fund --loglevel=error \
        "@xterm/xterm@$XTERM_VERSION" >/dev/null
fi

export FERRY_GUEST_DIR=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
.venv/bin/python guest/build.py --out "$FERRY_GUEST_DIR" >/dev/null
echo "setup: ready (venv .venv, guest in $FERRY_GUEST_DIR)"
