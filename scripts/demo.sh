#!/usr/bin/env bash
# The demo: two Ferry hosts on this machine (ferryd on 127.0.0.1 and 127.0.0.2,
# each with its own state directory), the test guest booted on the first, then
# live-migrated to the second and back, with the statistics of each hop.
# Everything it starts is stopped and removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

GUEST=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
DEMO=$(mktemp -d /tmp/ferry-demo.XXXXXX)
BIN=$PWD/.venv/bin
PORT=${FERRY_DEMO_PORT:-7790}
UDP=${FERRY_DEMO_UDP:-17777}
UI=${FERRY_DEMO_UI:-7780}          # host a's dashboard (plain HTTP, loopback only)
METRICS=${FERRY_DEMO_METRICS:-9790}
pids=()

cleanup() {
    set +e
    for h in a b; do
        if [ -S "$DEMO/$h/ferryd.sock" ]; then
            FERRY_SOCKET=$DEMO/$h/ferryd.sock "$BIN/ferry" destroy demo >/dev/null 2>&1
        fi
    done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    # a QEMU left by a failure above: by the pid QEMU wrote in our state directory
    for f in "$DEMO"/*/domains/*/qemu.pid "$DEMO"/*/disk-servers/*/qemu.pid; do
        [ -r "$f" ] || continue
        p=$(cat "$f")
        grep -qF "$DEMO/" "/proc/$p/cmdline" 2>/dev/null && kill -9 "$p" 2>/dev/null
    done
    rm -rf "$DEMO"
}
trap cleanup EXIT

# the cluster's certificates: a CA, one certificate per host, one for the operator
PKI=$DEMO/pki
echo "== ferry pki init; ferry pki issue a|b --host; ferry pki issue demo-operator --operator"
"$BIN/ferry" pki init --dir "$PKI" >/dev/null
"$BIN/ferry" pki issue a --host --address 127.0.0.1 --dir "$PKI" >/dev/null
"$BIN/ferry" pki issue b --host --address 127.0.0.2 --dir "$PKI" >/dev/null
"$BIN/ferry" pki issue demo-operator --operator --dir "$PKI" >/dev/null

hostconf() {  # name address peer-name peer-address [more top-level keys]
    cat > "$DEMO/$1.toml" <<CONF
name = "$1"
state_dir = "$DEMO/$1"
address = "$2"
control_port = $PORT
${5:-}
[tls]
ca = "$PKI/ca.pem"
cert = "$PKI/$1.pem"
key = "$PKI/$1.key"
[[peers]]
name = "$3"
address = "$4:$PORT"
CONF
}
# host a also serves the dashboard and /metrics, on loopback
hostconf a 127.0.0.1 b 127.0.0.2 "ui_address = \"127.0.0.1:$UI\"
metrics_address = \"127.0.0.1:$METRICS\""
hostconf b 127.0.0.2 a 127.0.0.1
for h in a b; do
    "$BIN/ferryd" --config "$DEMO/$h.toml" > "$DEMO/$h.log" 2>&1 &
    pids+=($!)
done
for h in a b; do
    for _ in $(seq 100); do [ -S "$DEMO/$h/ferryd.sock" ] && break; sleep 0.1; done
done
ferry_on() { local h=$1; shift; FERRY_SOCKET=$DEMO/$h/ferryd.sock "$BIN/ferry" "$@"; }

cat > "$DEMO/demo.toml" <<DOM
name = "demo"
memory = 256
kernel = "$GUEST/vmlinuz"
initrd = "$GUEST/initrd.img"
cmdline = "console=ttyS0 quiet ferry.ip=10.0.2.15/24 ferry.tick=1 ferry.dirty=16:8"
[[nics]]
mode = "user"
forwards = ["udp::$UDP-:7777"]   # the agent's probe port, on each host's own address
DOM

probe() {  # ask the guest agent where it runs now
    "$BIN/python" - "$UDP" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
for _ in range(20):
    for addr in ("127.0.0.1", "127.0.0.2"):
        s.sendto(b"PROBE 1", (addr, int(sys.argv[1])))
    try:
        data, peer = s.recvfrom(512)
    except (TimeoutError, ConnectionRefusedError):
        continue
    r = dict(kv.split("=", 1) for kv in data.decode().split())
    print(f"    guest answers at {peer[0]}: up {int(r['mono_ns']) / 1e9:.1f} s, "
          f"memory pattern checked {r['scans']}x, corruption {r['corrupt']}")
    break
else:
    print("    guest did not answer")
PY
}

echo "== host a: ferry create demo.toml"
ferry_on a create "$DEMO/demo.toml"
for _ in $(seq 120); do
    ferry_on a console demo --log | grep -q "FERRY-AGENT READY" && break; sleep 0.25
done
echo "== host a: ferry console demo --log"
ferry_on a console demo --log | tail -n 6
echo "== host a: ferry list"
ferry_on a list
probe
echo "== the dashboard, while the guest runs: http://127.0.0.1:$UI/ui/"
echo "   (hosts, domains, a migration's progress live, the console; for the demo it is"
echo "   plain HTTP on loopback; on a real host, the TCP port with an operator certificate)"
echo "== host a: ferry migrate demo b --live"
ferry_on a migrate demo b --live
probe
echo "== from anywhere, as the operator: ferry --host 127.0.0.2 list (mutual TLS)"
"$BIN/ferry" --host 127.0.0.2:$PORT --ca "$PKI/ca.pem" --cert "$PKI/demo-operator.pem" \
    --key "$PKI/demo-operator.key" list
echo "== host b: ferry migrate demo a --live"
ferry_on b migrate demo a --live
probe
echo "== host a: ferry migrations"
COLUMNS=160 ferry_on a migrations
echo "== host a: a few lines of http://127.0.0.1:$METRICS/metrics"
"$BIN/python" - "$METRICS" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read()
for line in text.decode().splitlines():
    if line.startswith(("ferry_migrations_total", "ferry_migration_duration_seconds_count",
                        "ferry_migration_downtime_seconds_sum", 'ferry_domains{state="running"}',
                        "ferry_host_memory_free_bytes", "process_resident_memory_bytes")):
        print("    " + line)
PY
echo "== done: cleaning up"
