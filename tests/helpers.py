"""Test helpers: run ferryd/ferry as real processes, talk to the guest agent."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
    if isinstance(value, dict):  # (an inline table)
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
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


def pki_dir(root: Path) -> Path:
    """The test cluster's CA (made once per work directory)."""
    from ferry import pki
    d = root / "pki"
    if not (d / "ca.pem").exists():
        pki.init_ca(d)
    return d


def certificate(root: Path, name: str, role: str = "host",
                addresses: list[str] | None = None) -> tuple[Path, Path, Path]:
    """(ca, cert, key) for ``name``, issued by the test CA on first use."""
    from ferry import pki
    d = pki_dir(root)
    if not (d / f"{name}.pem").exists():
        pki.issue(d, name, role, addresses)
    return d / "ca.pem", d / f"{name}.pem", d / f"{name}.key"


class Host:
    """One ferryd with its own state directory, run as a real process; its TCP
    port speaks mutual TLS with a host certificate from the work dir's test CA."""

    def __init__(self, root: Path, name: str, address: str = "127.0.0.1",
                 peers: dict[str, str] | None = None, **settings: Any) -> None:
        self.name = name
        self.root = root
        self.address = address
        self.state_dir = root / name
        self.socket = self.state_dir / "ferryd.sock"
        self.log = root / f"{name}.ferryd.log"
        self.config = root / f"{name}.ferryd.toml"
        self.control_port = settings.pop("control_port", None) or free_port(
            socket.SOCK_STREAM, address)
        self.peers = dict(peers or {})
        # (ca, cert, key); default: a host certificate for name and address;
        # "none": no [tls], the TCP port closed
        self.tls: tuple[Path, Path, Path] | str | None = settings.pop("tls", None)
        # run ferryd (and so its QEMUs and taps) inside this network namespace
        self.netns: str | None = settings.pop("netns", None)
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.control_port}"

    def write_config(self) -> None:
        cfg: dict[str, Any] = {"name": self.name, "state_dir": str(self.state_dir),
                               "address": self.address, "control_port": self.control_port,
                               "accel": "tcg", **self.settings}
        if self.tls == "none":  # no TLS: the TCP port stays closed
            cfg["control_port"] = 0
        text = to_toml(cfg)
        if self.tls != "none":
            ca, cert, key = self.tls or certificate(self.root, self.name, "host",
                                                    [self.address])
            text += f'\n[tls]\nca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n'
        for name, endpoint in self.peers.items():
            text += f'\n[[peers]]\nname = "{name}"\naddress = "{endpoint}"\n'
        self.config.write_text(text)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.write_config()
        with open(self.log, "ab") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen(
                [*prefix, FERRYD, "--config", str(self.config), "--log-level", "DEBUG", *extra],
                env={**os.environ, **(env or {})},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc is not None
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

    # read commands whose --json output is the API's answer as it is: tests read
    # them straight from the API (a CLI process costs ~0.7 s of CPU, and tests
    # poll these); everything else, and the CLI itself, goes through `ferry`
    READS = {("list",): "/v1/domains", ("host",): "/v1/host", ("jobs",): "/v1/jobs",
             ("migrations",): "/v1/migrations", ("pool", "list"): "/v1/pools",
             ("disk", "list"): "/v1/disks"}

    def json(self, *args: str) -> Any:
        path = self.READS.get(args)
        if path is None and len(args) == 2 and args[0] == "info":
            path = f"/v1/domains/{args[1]}"
        if path is None and len(args) == 3 and args[:2] == ("job", "show"):
            path = f"/v1/jobs/{args[2]}"
        if path is None and len(args) == 3 and args[:2] == ("disk", "list"):
            path = f"/v1/pools/{args[2]}/disks"
        if path is None:
            return json.loads(self.ferry(*args, "--json").stdout)
        return self.api("GET", path)

    def api(self, method: str, path: str) -> Any:
        """One request to this ferryd's API on its Unix socket; AssertionError
        with the error's message if it answers with one."""
        status, raw = self.request(method, path)
        body = json.loads(raw or b"null")
        if status >= 400:
            message = (body or {}).get("error", {}).get("message", body)
            raise AssertionError(f"{method} {path} on {self.name}: {status} {message}")
        return body

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """One request on this ferryd's Unix socket: (status, body as it came)."""
        import http.client

        class UnixConnection(http.client.HTTPConnection):
            def connect(conn) -> None:  # (conn: the connection; self: the host)
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(60)
                conn.sock.connect(str(self.socket))

        c = UnixConnection("ferryd")
        try:
            c.request(method, path)
            res = c.getresponse()
            return res.status, res.read()
        finally:
            c.close()

    def domains(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.json("list")}

    def create(self, cfg: dict[str, Any], path: Path | None = None) -> None:
        path = path or self.root / f"{cfg['name']}.toml"
        path.write_text(to_toml(cfg))
        self.ferry("create", str(path))

    @contextlib.contextmanager
    def booted(self, name: str, **kw: Any) -> Iterator[Probe]:
        """Create the test guest ``name`` (not waiting for it) and yield a probe for
        it; afterwards destroy and undefine it, whatever happened."""
        port = free_port()
        self.create(guest_config(name, port, **kw))
        probe = Probe(port)
        try:
            yield probe
        finally:
            probe.close()
            self.ferry("destroy", name, check=False)
            self.ferry("undefine", name, check=False)

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


def peer_hosts(root: Path, addrs: dict[str, str],
               settings: dict[str, dict[str, Any]] | None = None,
               **common: Any) -> dict[str, Host]:
    """Hosts named by ``addrs`` (name -> loopback address), each a peer of the
    others, with its own control port; ``settings``: per host, ``common``: all."""
    ports = {n: free_port(socket.SOCK_STREAM, a) for n, a in addrs.items()}
    return {n: Host(root, n, a, control_port=ports[n],
                    peers={p: f"{addrs[p]}:{ports[p]}" for p in addrs if p != n},
                    **{"storage_dirs": [str(root)], **common, **(settings or {}).get(n, {})})
            for n, a in addrs.items()}


@contextlib.contextmanager
def started(hosts: dict[str, Host]) -> Iterator[dict[str, Host]]:
    """Start every host; clean every one up afterwards, whatever happened."""
    try:
        for h in hosts.values():
            h.start()
        yield hosts
    finally:
        for h in hosts.values():
            h.cleanup()


class Probe:
    """Talks to the guest agent over UDP, wherever it runs: a domain's forward binds
    its current host's address, so probes go to every host address given."""

    def __init__(self, port: int, *addrs: str) -> None:
        self.addrs = [(a, port) for a in (addrs or ("127.0.0.1",))]
        self.seq = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.last_from: str | None = None

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str) -> None:
        for addr in self.addrs:
            with contextlib.suppress(OSError):
                self.sock.sendto(command.encode(), addr)

    def ask(self, timeout: float = 0.5, verb: str = "PROBE") -> dict[str, str] | None:
        """One probe (or another ``verb`` the agent answers: DISKCHECK, DISKSTOP);
        the agent's reply as a dict, or None if none came in time."""
        self.seq += 1
        seq = self.seq
        self.send(f"{verb} {seq}")
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, peer = self.sock.recvfrom(1024)
            except TimeoutError:
                return None
            except ConnectionRefusedError:  # an ICMP error from an address not in use
                continue
            reply = dict(kv.split("=", 1) for kv in data.decode().split())
            if reply.get("seq") == str(seq):  # late answers to old probes are skipped
                self.last_from = peer[0]
                return reply

    def wait_up(self, timeout: float = 90.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.ask(0.5)
            if reply is not None:
                return reply
        raise AssertionError(f"guest agent at {self.addrs} did not answer in {timeout}s")


def disk_check(probe: Probe, verb: str = "DISKCHECK", timeout: float = 30.0
               ) -> dict[str, str]:
    """The guest agent re-reads and verifies every block its disk writer wrote."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = probe.ask(5.0, verb)
        if reply is not None:
            return reply
    raise AssertionError(f"the guest agent did not answer {verb} within {timeout}s")


_M64 = (1 << 64) - 1
DISK_MAGIC = 0x314B445952524546


def _mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def disk_block(seq: int, blocks: int, mark: str = "") -> bytes:
    """What the agent's disk writer puts in a block for write number ``seq``
    (``mark``: its ferry.diskmark)."""
    base = _mix(seq)
    words = [DISK_MAGIC, seq % blocks, seq] + [
        (base + j * 0x2545F4914F6CDD1D) & _M64 for j in range(3, 511)]
    data = bytearray(struct.pack("<511Q", *words))
    if mark:
        m = mark.encode()
        for off in range(24, 4096 - 8 - len(m) + 1, len(m)):
            data[off:off + len(m)] = m
    x = 0
    for (w,) in struct.iter_unpack("<Q", bytes(data)):
        x ^= w
    return bytes(data) + struct.pack("<Q", x)


def image_holds_writes(image: Path, fmt: str, writes: int, blocks: int,
                       mark: str = "") -> list[int]:
    """Read ``image`` from the host: the blocks that do not hold the newest of
    ``writes`` writes the agent's disk writer made to them (empty: all do)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image),
                        str(raw)], check=True, capture_output=True)
        bad = []
        with open(raw, "rb") as f:
            for b in range(min(writes, blocks)):
                seq = b + (writes - 1 - b) // blocks * blocks
                f.seek(b * 4096)
                if f.read(4096) != disk_block(seq, blocks, mark):
                    bad.append(b)
        return bad


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class GapRecorder:
    """Probes the guest every ``interval`` s in a thread; reports the longest time
    without an answer (what the guest's users would notice)."""

    def __init__(self, port: int, *addrs: str, interval: float = 0.02) -> None:
        self.probe = Probe(port, *addrs)
        self.interval = interval
        self.replies: list[tuple[float, dict[str, str]]] = []
        self.sources: list[str | None] = []   # the host address each reply came from
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GapRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.probe.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            reply = self.probe.ask(self.interval * 2)
            if reply is not None:
                self.replies.append((time.monotonic(), reply))
                self.sources.append(self.probe.last_from)
                time.sleep(self.interval)

    def max_gap(self) -> float:
        times = [t for t, _ in self.replies]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def listening_ports(address: str) -> set[int]:
    """TCP ports in LISTEN state on ``address`` (from /proc/net/tcp)."""
    want = "".join(f"{int(p):02X}" for p in reversed(address.split(".")))
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        addr, port = local.split(":")
        if state == "0A" and addr == want:
            ports.add(int(port, 16))
    return ports


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None
                ) -> ssl.SSLContext:
    """A client context trusting ``ca``, presenting ``cert`` (if any)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_request(host: Host, ctx: ssl.SSLContext | None, method: str = "GET",
                path: str = "/v1/domains", body: bytes = b"",
                source: str = "127.0.0.1") -> tuple[int | None, str]:
    """One HTTP request to ``host``'s TCP port from address ``source``, over TLS
    with ``ctx`` (or in plaintext if None): (status, body), or (None, why it
    failed) if the connection was refused."""
    request = (f"{method} {path} HTTP/1.1\r\nHost: {host.name}\r\nConnection: close\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    try:
        with socket.create_connection((host.address, host.control_port), timeout=10,
                                      source_address=(source, 0)) as raw:
            conn: socket.socket = (raw if ctx is None
                                   else ctx.wrap_socket(raw, server_hostname=host.name))
            with conn:
                conn.sendall(request)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
    except (OSError, ssl.SSLError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not data:
        return None, "closed without an answer"
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload.decode(errors="replace")


def plain_qemu_argv(root: Path, tag: str, memory: int, cmdline: str, fwd: str,
                    incoming: str | None) -> list[str]:
    """The test guest under plain QEMU, no Ferry: the baseline of the benchmarks
    and the control of the traffic-capture test."""
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "qemu64",
            "-m", f"{memory}M", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{root}/{tag}.qmp,server=on,wait=off",
            "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", cmdline,
            "-netdev", f"user,id=n0,hostfwd={fwd}", "-device", "virtio-net-pci,netdev=n0",
            "-serial", "null"]
    return argv + (["-incoming", incoming] if incoming else [])


async def plain_qmp(root: Path, tag: str) -> Any:
    """A QMP connection to the plain QEMU ``tag`` started with plain_qemu_argv."""
    from ferry.qemu.qmp import QmpConnection
    conn = QmpConnection(tag)
    for _ in range(200):
        if (root / f"{tag}.qmp").exists():
            with contextlib.suppress(Exception):
                await conn.connect(root / f"{tag}.qmp")
                return conn
        await asyncio.sleep(0.05)
    raise RuntimeError(f"QEMU {tag} did not start")


class LoopbackCapture:
    """Every TCP payload on ``lo`` between ``addrs`` while active (an AF_PACKET
    socket, root only): how many bytes went by, how many segments contained
    ``needle``, and how many packets the kernel dropped before we read them."""

    def __init__(self, needle: bytes, addrs: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")
                 ) -> None:
        self.needle = needle
        self.addrs = {socket.inet_aton(a) for a in addrs}
        self.tcp_bytes = 0
        self.hits = 0
        self.drops = 0
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)
        self._stop.set()
        self._thread.join()
        # struct tpacket_stats {packets, drops}: SOL_PACKET 263, PACKET_STATISTICS 6
        _, self.drops = struct.unpack("II", self._sock.getsockopt(263, 6, 8))
        self._sock.close()

    def close(self) -> None:
        """For a capture never entered."""
        self._sock.close()

    def _run(self) -> None:
        buf = bytearray(1 << 17)
        while not self._stop.is_set():
            try:
                n, addr = self._sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING:  # lo shows each packet twice
                continue
            ip = 14  # lo's (all-zero) Ethernet header
            if n < ip + 20 or buf[ip] >> 4 != 4 or buf[ip + 9] != 6:
                continue
            if bytes(buf[ip + 12:ip + 16]) not in self.addrs \
                    or bytes(buf[ip + 16:ip + 20]) not in self.addrs:
                continue
            tcp = ip + (buf[ip] & 0x0F) * 4
            start = tcp + (buf[tcp + 12] >> 4) * 4
            self.tcp_bytes += max(0, n - start)
            if buf.find(self.needle, start, n) >= 0:
                self.hits += 1
