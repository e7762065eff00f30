"""A real etcd (Debian's etcd-server) on loopback for the tests: its own
temporary data directory and ports; stopped by the PID it was started with,
its directory removed, also when the test fails."""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import free_port


class Etcd:
    def __init__(self, address: str = "127.0.0.1") -> None:
        if shutil.which("etcd") is None:
            raise AssertionError("etcd is not installed: run scripts/setup.sh")
        self.address = address
        self.port = free_port(socket.SOCK_STREAM, address)
        self.peer_port = free_port(socket.SOCK_STREAM, address)
        self.data = Path(tempfile.mkdtemp(prefix="fyetcd", dir="/tmp"))
        self.log = self.data.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self) -> None:
        client = f"http://{self.endpoint}"
        peer = f"http://{self.address}:{self.peer_port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "fy", "--data-dir", str(self.data / "member"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"fy={peer}", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.address, self.port), 0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"etcd did not come up: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        self.log.unlink(missing_ok=True)
