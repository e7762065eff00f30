"""Test helpers: run ferryd/ferry as real processes, talk to the guest agent."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
FERRY = str(BIN / "ferry")
FERRYD = str(BIN / "ferryd")
GUEST_DIR = Path(os.environ.get("FERRY_GUEST_DIR", "/var/cache/ferry/guest"))
KERNEL = GUEST_DIR / "vmlinuz"
INITRD = GUEST_DIR / "initrd.img"


def free_port(kind: int = socket.SOCK_DGRAM, addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a domain definition: scalars, lists, arrays of tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    for key, items in tables:
        for item in items:
            lines.append(f"\n[[{key}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def guest_config(name: str, port: int, *, memory: int = 256, cmdline_extra: str = "",
                 bind: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    """The test guest, its agent's UDP port forwarded to ``bind:port``."""
    cfg: dict[str, Any] = {
        "name": name, "memory": memory, "vcpus": 1, "accel": "tcg",
        "kernel": str(KERNEL), "initrd": str(INITRD),
        "cmdline": f"console=ttyS0 quiet ferry.ip=10.0.2.15/24 ferry.tick=1 {cmdline_extra}"
                   .strip(),
        "nics": [{"mode": "user", "forwards": [f"udp:{bind}:{port}-:7777"]}],
    }
    cfg.update(extra)
    return cfg


class Host:
    """One ferryd with its own state directory, run as a real process."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root
        self.state_dir = root / name
        self.socket = self.state_dir / "ferryd.sock"
        self.log = root / f"{name}.ferryd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [FERRYD, "--state-dir", str(self.state_dir), "--name", self.name,
                 "--accel", "tcg", "--log-level", "DEBUG", *extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferryd {self.name} exited: {self.log.read_text()[-2000:]}")
            if self.socket.exists() and self.ferry("host", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"ferryd {self.name} did not come up: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def ferry(self, *args: str, check: bool = True, input: bytes | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FERRY_SOCKET": str(self.socket), "COLUMNS": "200"}
        res = subprocess.run([FERRY, *args], capture_output=True, text=True, env=env,
                             timeout=timeout, input=None if input is None else input.decode())
        if check and res.returncode != 0:
            raise AssertionError(f"ferry {' '.join(args)} failed ({res.returncode}): "
                                 f"{res.stderr.strip()}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.ferry(*args, "--json").stdout)

    def domains(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.json("list")}

    def create(self, cfg: dict[str, Any], path: Path | None = None) -> None:
        path = path or self.root / f"{cfg['name']}.toml"
        path.write_text(to_toml(cfg))
        self.ferry("create", str(path))

    def qemu_pids(self) -> list[int]:
        """QEMU processes whose command line points into this host's state dir."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if b"qemu-system" in cmd and str(self.state_dir).encode() + b"/" in cmd:
                    stat = (proc / "stat").read_text()
                    if stat.rpartition(")")[2].split()[0] != "Z":
                        pids.append(int(proc.name))
        return pids

    def cleanup(self) -> None:
        """Destroy every domain, stop ferryd, and kill any QEMU left over."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for name, dom in self.domains().items():
                    if dom["pid"]:
                        self.ferry("destroy", name, check=False)
        self.stop()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Probe:
    """Talks to the guest agent over UDP."""

    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        self.addr = (addr, port)
        self.seq = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str) -> None:
        self.sock.sendto(command.encode(), self.addr)

    def ask(self, timeout: float = 0.5) -> dict[str, str] | None:
        """One probe; the agent's reply as a dict, or None if none came in time."""
        self.seq += 1
        seq = self.seq
        self.send(f"PROBE {seq}")
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1024)
            except TimeoutError:
                return None
            reply = dict(kv.split("=", 1) for kv in data.decode().split())
            if reply.get("seq") == str(seq):  # late answers to old probes are skipped
                return reply

    def wait_up(self, timeout: float = 90.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.ask(0.5)
            if reply is not None:
                return reply
        raise AssertionError(f"guest agent at {self.addr} did not answer in {timeout}s")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
