"""A TCP client that streams a known byte sequence through the guest's echo
server and checks every byte that comes back (run inside the client namespace).

    python streamer.py HOST PORT [RATE_KIB_S]

Sends until stdin closes (or reaches EOF), then stops sending, waits for the
echo to catch up and prints one JSON line: bytes sent and received, the first
mismatch offset (null if none: nothing lost, duplicated or reordered), the
longest time without receiving anything, and any connection error.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import time


def pattern(offset: int, length: int) -> bytes:
    """Bytes ``offset`` .. ``offset + length`` of the stream: consecutive 8-byte
    big-endian counters, so no stretch of it ever repeats: a lost, duplicated or
    reordered block cannot line up with what was expected."""
    first, skip = divmod(offset, 8)
    words = (skip + length + 7) // 8
    data = b"".join(struct.pack(">Q", w) for w in range(first, first + words))
    return data[skip:skip + length]


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    rate = int(sys.argv[3]) * 1024 if len(sys.argv) > 3 else 256 * 1024
    sock = socket.create_connection((host, port), timeout=10)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print(json.dumps({"connected": True}), flush=True)
    sent = received = 0
    mismatch: int | None = None
    error = None
    t0 = last_rx = time.monotonic()
    max_gap = 0.0
    stopping_at: float | None = None
    chunk = 4096
    while True:
        now = time.monotonic()
        if stopping_at is None and sent < (now - t0) * rate:
            try:
                sent += sock.send(pattern(sent, chunk))
            except BlockingIOError:
                pass
            except OSError as exc:
                error = f"send: {exc}"
                break
        for key, _ in sel.select(timeout=0.005):
            if key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 1024):
                    stopping_at = stopping_at or time.monotonic()
                    sel.unregister(sys.stdin)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                error = f"recv: {exc}"
                break
            if not data:
                error = "the guest closed the connection"
                break
            if mismatch is None and data != pattern(received, len(data)):
                expect = pattern(received, len(data))
                mismatch = received + next(i for i in range(len(data))
                                           if data[i] != expect[i])
            received += len(data)
            max_gap = max(max_gap, time.monotonic() - last_rx)
            last_rx = time.monotonic()
        if error:
            break
        if stopping_at is not None:
            if received >= sent:
                break
            if time.monotonic() - stopping_at > 60:
                error = "the echo did not catch up within 60 s"
                break
        elif sent >= received + 4 * 1024 * 1024:
            time.sleep(0.01)  # don't run far ahead of a paused guest
    sock.close()
    print(json.dumps({"sent": sent, "received": received, "mismatch": mismatch,
                      "max_gap_s": round(max_gap, 3), "error": error}), flush=True)


if __name__ == "__main__":
    main()
