#!/usr/bin/env python3
"""Ferry's live migration next to plain QEMU's, on the same guest and workload.

    .venv/bin/python bench/migration.py [--hops 6] [--memory 512] [--dirty 16:8]

Plain QEMU: two QEMU processes started by hand (the destination with
``-incoming``), ``migrate`` over QMP, ``cont`` on the destination: the least a
live migration can cost; once in plaintext, once with TLS credentials made per
hop as Ferry does (Ferry's stream is always TLS, so "plain + TLS" is the
like-for-like baseline). Ferry: two ferryd hosts on 127.0.0.1/127.0.0.2 and
``ferry migrate --live``. Both move the same test guest (same memory, same
dirtying agent) back and forth; the script prints medians, their ratio, and
where Ferry's own time goes (everything that is not QEMU's transfer).
Not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ferry.migration import streamtls
from ferry.qemu.qmp import QmpConnection
from helpers import Host, Probe, free_port, guest_config, plain_qemu_argv, plain_qmp


async def plain_hop(root: Path, args: argparse.Namespace, src: QmpConnection, hop: int,
                    addr: str, port: int, cmdline: str,
                    tls: bool) -> tuple[QmpConnection, subprocess.Popen[bytes],
                                        dict[str, float]]:
    tag = f"q{hop}"
    mig_port = free_port(socket.SOCK_STREAM, addr)
    proc = subprocess.Popen(plain_qemu_argv(root, tag, args.memory, cmdline,
                                            f"udp:{addr}:{port}-:7777", "defer"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    dst = await plain_qmp(root, tag)
    if tls:
        job = f"{hop:012x}"
        server, client = streamtls.make_pair(job)
        await streamtls.install(dst, root, job, True, server)
        await streamtls.install(src, root, job, False, client)
    await dst.execute("migrate-incoming", {"uri": f"tcp:{addr}:{mig_port}"})
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "auto-converge", "state": True}]})
    await src.execute("migrate-set-parameters", {"downtime-limit": 300,
                                                 "max-bandwidth": 1 << 40})
    await src.execute("migrate", {"uri": f"tcp:{addr}:{mig_port}"})
    while (info := await src.execute("query-migrate"))["status"] != "completed":
        if info["status"] == "failed":
            raise SystemExit(f"plain migration failed: {info}")
        await asyncio.sleep(0.01)
    while (await dst.execute("query-migrate")).get("status") != "completed":
        await asyncio.sleep(0.01)
    await dst.execute("cont")
    wall = time.monotonic() - t0
    await src.execute("quit")
    await src.close()
    return dst, proc, {"wall": wall, "qemu_total": info["total-time"] / 1000,
                       "downtime": info["downtime"] / 1000}


async def run_plain(args: argparse.Namespace, root: Path,
                    tls: bool) -> list[dict[str, float]]:
    port = free_port()
    cmdline = (f"console=ttyS0 quiet ferry.ip=10.0.2.15/24 ferry.tick=0 "
               f"ferry.mem={args.pattern} ferry.dirty={args.dirty}")
    procs = [subprocess.Popen(plain_qemu_argv(root, "q0", args.memory, cmdline,
                                        f"udp:127.0.0.1:{port}-:7777", None),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    src = await plain_qmp(root, "q0")
    await src.execute("cont")
    probe = Probe(port, "127.0.0.1", "127.0.0.2")
    probe.wait_up()
    results = []
    try:
        for hop in range(1, args.hops + 1):
            addr = "127.0.0.2" if hop % 2 else "127.0.0.1"
            src, proc, res = await plain_hop(root, args, src, hop, addr, port, cmdline,
                                             tls)
            procs.append(proc)
            results.append(res)
            assert probe.wait_up(10)["corrupt"] == "0"
    finally:
        probe.close()
        for p in procs:
            p.kill()
            p.wait()
    return results


def run_ferry(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    ports = {a: free_port(socket.SOCK_STREAM, a) for a in ("127.0.0.1", "127.0.0.2")}
    a = Host(root, "ba", "127.0.0.1", control_port=ports["127.0.0.1"],
             peers={"bb": f"127.0.0.2:{ports['127.0.0.2']}"})
    b = Host(root, "bb", "127.0.0.2", control_port=ports["127.0.0.2"],
             peers={"ba": f"127.0.0.1:{ports['127.0.0.1']}"})
    results = []
    try:
        a.start()
        b.start()
        port = free_port()
        cfg = guest_config("bench", port, memory=args.memory, bind="",
                           cmdline_extra=f"ferry.mem={args.pattern} ferry.dirty={args.dirty}")
        cfg["cmdline"] = cfg["cmdline"].replace("ferry.tick=1", "ferry.tick=0")
        a.create(cfg)
        probe = Probe(port, "127.0.0.1", "127.0.0.2")
        probe.wait_up()
        src, dst = a, b
        for _ in range(args.hops):
            t0 = time.monotonic()
            res = src.ferry("migrate", "bench", dst.name, "--live", "--json")
            wall = time.monotonic() - t0
            job = json.loads(res.stdout)
            assert job["state"] == "completed", job
            results.append({"wall": wall, "job": job})
            assert probe.wait_up(10)["corrupt"] == "0"
            src, dst = dst, src
        probe.close()
    finally:
        a.cleanup()
        b.cleanup()
    return results


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hops", type=int, default=6)
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--pattern", type=int, default=64, help="MiB of checked pattern")
    ap.add_argument("--dirty", default="16:8", help="MIB:RATE the agent dirties")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fybm", dir="/tmp") as tmp:
        root = Path(tmp)
        plain = asyncio.run(run_plain(args, root, tls=False))
        plain_tls = asyncio.run(run_plain(args, root, tls=True))
        ferry = run_ferry(args, root)

    p_wall, t_wall = (med([r["wall"] for r in x]) for x in (plain, plain_tls))
    p_qemu, t_qemu = (med([r["qemu_total"] for r in x]) for x in (plain, plain_tls))
    p_down, t_down = (med([r["downtime"] for r in x]) for x in (plain, plain_tls))
    jobs = [r["job"] for r in ferry]
    f_wall = med([r["wall"] for r in ferry])
    f_job = med([j["ended"] - j["started"] for j in jobs])
    f_qemu = med([j["stats"]["total_time_ms"] / 1000 for j in jobs])
    f_down = med([j["stats"]["downtime_ms"] / 1000 for j in jobs])
    phases = {k: med([j["phase_times"].get(k, 0.0) for j in jobs])
              for k in ("begin", "prepare", "perform", "finish", "confirm")}
    overhead = med([(j["ended"] - j["started"]) - j["stats"]["total_time_ms"] / 1000
                    for j in jobs])

    print(f"guest: {args.memory} MiB, {args.pattern} MiB pattern, dirtying {args.dirty} "
          f"(MiB:MiB/s); {args.hops} live hops each; medians")
    def ratio(a: float, b: float) -> str:
        return f"{a / b:8.2f}" if b else f"{'-':>8}"

    print(f"{'':28}{'plain QEMU':>12}{'plain + TLS':>12}{'Ferry':>12}"
          f"{'/plain':>8}{'/+TLS':>8}")
    print(f"{'migrate → resumed on dest':28}{p_wall:11.3f}s{t_wall:11.3f}s{f_job:11.3f}s"
          f"{ratio(f_job, p_wall)}{ratio(f_job, t_wall)}")
    print(f"{'QEMU transfer (total-time)':28}{p_qemu:11.3f}s{t_qemu:11.3f}s{f_qemu:11.3f}s"
          f"{ratio(f_qemu, p_qemu)}{ratio(f_qemu, t_qemu)}")
    print(f"{'QEMU downtime':28}{p_down * 1000:10.0f}ms{t_down * 1000:10.0f}ms"
          f"{f_down * 1000:10.0f}ms{ratio(f_down, p_down)}{ratio(f_down, t_down)}")
    print(f"{'CLI wall time (ferry only)':28}{'':24}{f_wall:11.3f}s")
    print(f"Ferry's own time (job - QEMU transfer): {overhead * 1000:.0f} ms; phases: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in phases.items()))


if __name__ == "__main__":
    main()
