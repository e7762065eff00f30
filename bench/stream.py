#!/usr/bin/env python3
"""How fast QEMU's migration stream can go on this machine, encrypted or not.

    .venv/bin/python bench/stream.py [--memory 512] [--pattern 384] [--runs 3]
                                     [--only NAME ...]

First the limit: one core's AES-GCM throughput (``openssl speed`` and, if
gnutls-bin is installed, ``gnutls-cli --benchmark-ciphers``, GnuTLS being what
QEMU encrypts with). Then the stream: the test guest under plain QEMU fills
``--pattern`` MiB of its memory with non-zero data and is paused, so the guest
neither dirties memory nor competes for a core; it is then migrated between two
QEMUs on loopback with each stream setting in turn (plaintext, TLS as Ferry set
it up before, TLS priority strings, multifd channels, zstd), and the script
prints the stream's throughput (RAM bytes sent / transfer time), as MB/s and as
a fraction of the AES-GCM limit, and the CPU seconds each QEMU spent per GB.
Not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ferry.migration import streamtls
from ferry.qemu.qmp import QmpConnection
from helpers import Probe, free_port, plain_qemu_argv, plain_qmp

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Setting:
    """One way of running the stream."""
    name: str
    tls: bool = False
    priority: str | None = None      # tls-creds-x509 "priority"; None: QEMU's default
    channels: int = 0                # multifd channels; 0: the single main channel
    compress: str = "none"           # multifd-compression
    params: dict[str, Any] = field(default_factory=dict)
    caps: dict[str, bool] = field(default_factory=dict)


TLS13_AES128 = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM"
TLS13_AES256 = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-256-GCM"
SETTINGS = [
    Setting("plaintext"),
    Setting("tls (as before)", tls=True),
    Setting("tls1.3 aes-128-gcm", tls=True, priority=TLS13_AES128),
    Setting("tls1.3 aes-256-gcm", tls=True, priority=TLS13_AES256),
    Setting("plaintext multifd 2", channels=2),
    # the multifd rows run with QEMU's default priority, as Ferry does
    Setting("tls multifd 2", tls=True, channels=2),
    Setting("tls multifd 3", tls=True, channels=3),
    Setting("tls multifd 4", tls=True, channels=4),
    Setting("tls multifd 2 +auto-converge", tls=True, priority=TLS13_AES128, channels=2,
            caps={"auto-converge": True}),
    Setting("tls multifd 2 downtime-limit 50", tls=True, priority=TLS13_AES128,
            channels=2, params={"downtime-limit": 50}),
    Setting("tls downtime-limit 50", tls=True, priority=TLS13_AES128,
            params={"downtime-limit": 50}),
    Setting("tls multifd 2 zstd", tls=True, priority=TLS13_AES128, channels=2,
            compress="zstd"),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def openssl_gcm(cipher: str) -> float | None:
    """Bytes/s of one core for ``cipher`` on 16 KiB blocks (a TLS record's size)."""
    if not shutil.which("openssl"):
        return None
    out = subprocess.run(["openssl", "speed", "-evp", cipher, "-bytes", "16384",
                          "-seconds", "2", "-mr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("+F:"):
            return float(line.split(":")[-1])
    return None


def gnutls_gcm() -> dict[str, float]:
    """GnuTLS's own AEAD figures (bytes/s), if gnutls-cli is installed."""
    if not shutil.which("gnutls-cli"):
        return {}
    out = subprocess.run(["gnutls-cli", "--benchmark-ciphers"], capture_output=True,
                         text=True, timeout=120).stdout
    got = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("AES-128-GCM", "AES-256-GCM"):
            scale = {"GB/sec": 1e9, "MB/sec": 1e6}.get(parts[2])
            if scale:
                got[parts[0]] = float(parts[1]) * scale
    return got


async def hop(root: Path, args: argparse.Namespace, src: QmpConnection, src_pid: int,
              n: int, setting: Setting, cmdline: str, port: int
              ) -> tuple[QmpConnection, subprocess.Popen[bytes], dict[str, float]]:
    addr = "127.0.0.2" if n % 2 else "127.0.0.1"
    tag = f"s{n}"
    proc = subprocess.Popen(plain_qemu_argv(root, tag, args.memory, cmdline,
                                            f"udp:{addr}:{port}-:7777", "defer"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = await plain_qmp(root, tag)
    caps = {"events": True, "multifd": setting.channels > 0, "auto-converge": False,
            **setting.caps}
    for q in (src, dst):
        await q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in caps.items()]})
        params: dict[str, Any] = {"tls-creds": "", "tls-hostname": "", **setting.params}
        if setting.channels:
            params["multifd-channels"] = setting.channels
            params["multifd-compression"] = setting.compress
        await q.execute("migrate-set-parameters", params)
    if setting.tls:
        job = f"{n:012x}"
        server, client = streamtls.make_pair(job)
        for q, is_server, creds in ((dst, True, server), (src, False, client)):
            await streamtls.load(q, root, streamtls.object_id(job), is_server, creds)
            if setting.priority:  # the bench sets it by hand, to compare strings
                await q.execute("qom-set", {"path": f"/objects/{streamtls.object_id(job)}",
                                            "property": "priority",
                                            "value": setting.priority})
            params = {"tls-creds": streamtls.object_id(job)}
            if not is_server:
                params["tls-hostname"] = streamtls.tls_hostname(job)
            await q.execute("migrate-set-parameters", params)
    await src.execute("migrate-set-parameters", {
        "max-bandwidth": 1 << 40,
        "downtime-limit": setting.params.get("downtime-limit", 300)})
    mig_port = free_port(socket.SOCK_STREAM, addr)
    await dst.execute("migrate-incoming", {"uri": f"tcp:{addr}:{mig_port}"})
    cpu0 = (cpu_seconds(src_pid), cpu_seconds(proc.pid))
    await src.execute("migrate", {"uri": f"tcp:{addr}:{mig_port}"})
    while (info := await src.execute("query-migrate"))["status"] != "completed":
        if info["status"] == "failed":
            raise SystemExit(f"{setting.name}: migration failed: {info}")
        await asyncio.sleep(0.005)
    while (await dst.execute("query-migrate")).get("status") != "completed":
        await asyncio.sleep(0.005)
    cpu1 = (cpu_seconds(src_pid), cpu_seconds(proc.pid))
    if args.running:
        await dst.execute("cont")
    await src.execute("quit")
    await src.close()
    ram = info["ram"]
    secs = (info["total-time"] - info.get("setup-time", 0)) / 1000
    sent = ram["transferred"]
    return dst, proc, {"rate": sent / secs, "bytes": sent, "secs": secs,
                       "downtime": info.get("downtime", 0) / 1000,
                       "setup": info.get("setup-time", 0) / 1000,
                       "src_cpu": (cpu1[0] - cpu0[0]) / (sent / 1e9),
                       "dst_cpu": (cpu1[1] - cpu0[1]) / (sent / 1e9)}


async def run_streams(args: argparse.Namespace, root: Path,
                      settings: list[Setting]) -> dict[str, list[dict[str, float]]]:
    port = free_port()
    cmdline = (f"console=ttyS0 quiet ferry.ip=10.0.2.15/24 ferry.tick=0 "
               f"ferry.mem={args.pattern}")
    first = subprocess.Popen(plain_qemu_argv(root, "s0", args.memory, cmdline,
                                             f"udp:127.0.0.1:{port}-:7777", None),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [first]
    src = await plain_qmp(root, "s0")
    await src.execute("cont")
    probe = Probe(port, "127.0.0.1", "127.0.0.2")
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in settings}
    try:
        probe.wait_up(60)
        if not args.running:
            await src.execute("stop")
        n = 0
        for _ in range(args.runs):
            for setting in settings:
                n += 1
                src, proc, res = await hop(root, args, src, procs[-1].pid, n, setting,
                                           cmdline, port)
                procs.append(proc)
                results[setting.name].append(res)
    finally:
        probe.close()
        for p in procs:
            p.kill()
            p.wait()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--pattern", type=int, default=384, help="MiB of non-zero memory")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="names of the settings to run")
    ap.add_argument("--running", action="store_true",
                    help="leave the guest running (idle): shows each setting's downtime")
    args = ap.parse_args()
    settings = [s for s in SETTINGS if not args.only or s.name in args.only]

    limits = {"openssl aes-128-gcm": openssl_gcm("aes-128-gcm"),
              "openssl aes-256-gcm": openssl_gcm("aes-256-gcm")}
    limits.update({f"gnutls {k.lower()}": v for k, v in gnutls_gcm().items()})
    known = [v for v in limits.values() if v]
    limit = max(known) if known else None
    with tempfile.TemporaryDirectory(prefix="fyst", dir="/tmp") as tmp:
        t0 = time.monotonic()
        results = asyncio.run(run_streams(args, Path(tmp), settings))
        took = time.monotonic() - t0

    cpu = os.cpu_count()
    print(f"machine: {cpu} cores; {os.uname().release}; guest {args.memory} MiB, "
          f"{args.pattern} MiB non-zero, {'running' if args.running else 'paused'}; "
          f"medians of {args.runs}; {took:.0f} s")
    print("one core's AEAD throughput (16 KiB blocks):")
    for name, v in limits.items():
        print(f"  {name:28}{v / 1e6:10.0f} MB/s" if v else f"  {name:28}  not measured")
    print(f"{'stream':28}{'MB/s':>10}{'/ AES-GCM':>11}{'src CPU s/GB':>14}"
          f"{'dst CPU s/GB':>14}{'MiB sent':>10}{'setup ms':>10}{'downtime':>10}")
    for s in settings:
        rs = results[s.name]
        rate = statistics.median(r["rate"] for r in rs)
        frac = f"{rate / limit:10.0%}" if limit else f"{'-':>10}"
        print(f"{s.name:28}{rate / 1e6:10.0f}{frac} "
              f"{statistics.median(r['src_cpu'] for r in rs):13.2f}"
              f"{statistics.median(r['dst_cpu'] for r in rs):14.2f}"
              f"{statistics.median(r['bytes'] for r in rs) / 2**20:10.0f}"
              f"{statistics.median(r['setup'] for r in rs) * 1000:10.0f}"
              f"{statistics.median(r['downtime'] for r in rs) * 1000:10.0f}")


if __name__ == "__main__":
    main()
