"""`ferry console`: interactive attach in a real pseudo-terminal, Ctrl-] detaches."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from conftest import RunningGuest
from helpers import FERRY


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen in {timeout}s; got {buf[-300:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    return buf


def attach(running: RunningGuest) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    env = {**os.environ, "FERRY_SOCKET": str(running.host.socket)}
    proc = subprocess.Popen([FERRY, "console", running.name], stdin=slave, stdout=slave,
                            stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    return proc, master


def test_attach_shows_live_output_and_ctrl_bracket_detaches(running: RunningGuest) -> None:
    proc, master = attach(running)
    try:
        read_until(master, b"Ctrl-] detaches", 10)
        read_until(master, b"FERRY-AGENT tick=", 10)  # live output, not the log
        os.write(master, b"\x1d")
        read_until(master, b"detached", 10)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    # the domain is unaffected by the detach
    assert running.host.domains()[running.name]["state"] == "running"
    assert running.probe.wait_up(10)


def test_two_consoles_see_the_same_output_and_input_reaches_the_guest(
        running: RunningGuest) -> None:
    (p1, m1), (p2, m2) = attach(running), attach(running)
    try:
        read_until(m1, b"FERRY-AGENT tick=", 10)
        read_until(m2, b"FERRY-AGENT tick=", 10)
        # what one session types reaches the guest (the agent echoes lines),
        # and the answer reaches both sessions
        os.write(m1, b"hello-ferry\r")
        read_until(m1, b"FERRY-AGENT heard: hello-ferry", 10)
        read_until(m2, b"FERRY-AGENT heard: hello-ferry", 10)
        os.write(m1, b"\x1d")
        assert p1.wait(10) == 0
        # the other session is still live after the first one left
        read_until(m2, b"FERRY-AGENT tick=", 10)
        os.write(m2, b"\x1d")
        assert p2.wait(10) == 0
    finally:
        for p in (p1, p2):
            if p.poll() is None:
                p.kill()
                p.wait()
        os.close(m1)
        os.close(m2)
