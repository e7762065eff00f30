#!/usr/bin/env python3
"""Ferry's live migration next to plain QEMU's, on the same guest and workloads.

    .venv/bin/python bench/migration.py [--runs 3] [--memory 512]
        [--workloads idle moderate heavy] [--link MIB/S] [--give-up S]
        [--ferry-flags "--parallel 1"]

Three ways to move the same test guest (512 MiB, the same memory pattern and
dirtying agent), each ``--runs`` times, back and forth between 127.0.0.1 and
127.0.0.2:

- *qemu*: plain QEMU as it comes: two QEMU processes started by hand (the
  destination with ``-incoming``), QMP ``migrate`` and nothing else (QEMU's
  default bandwidth cap of 128 MiB/s, no TLS), ``cont`` on the destination;
- *qemu unlimited*: the same with ``max-bandwidth`` unlimited — the fastest
  plain QEMU goes, unencrypted;
- *ferry*: two ferryd hosts and ``ferry migrate --live`` with Ferry's defaults
  (its stream always TLS).

Workloads: idle (64 MiB pattern), moderate (64 MiB dirtied at 20 MiB/s), heavy
(256 MiB dirtied at 200 MiB/s). ``--link 100`` limits every stream to 100 MiB/s
(about 1 GbE; plain QEMU with ``max-bandwidth``, Ferry with ``--bandwidth``),
and then "qemu unlimited" is left out. A plain QEMU migration still running
after ``--give-up`` seconds is cancelled and counted as not completed.

Per workload and way: completed k/n, and medians of QEMU's total time, the time
from the migrate command until the guest runs on the destination, QEMU's
downtime, the paused time (source STOP to destination RESUME, from the QMP
events), the longest gap in the guest's answers to a UDP probe every 20 ms,
and the bytes sent; then Ferry's ratios to both plain ways. Not a test: it
asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ferry.qemu.qmp import QmpConnection
from helpers import (
    GapRecorder,
    Host,
    Probe,
    free_port,
    guest_config,
    plain_qemu_argv,
    plain_qmp,
)

WORKLOADS = {"idle": (64, None), "moderate": (64, "64:20"), "heavy": (256, "256:200")}
ADDRS = ("127.0.0.1", "127.0.0.2")
WAYS = ("qemu", "qemu unlimited", "ferry")
Result = dict[str, float]


def agent_args(workload: str) -> str:
    pattern, dirty = WORKLOADS[workload]
    return f"ferry.mem={pattern}" + (f" ferry.dirty={dirty}" if dirty else "")


async def plain_hop(root: Path, args: argparse.Namespace, src: QmpConnection, hop: int,
                    port: int, cmdline: str, unlimited: bool
                    ) -> tuple[QmpConnection, subprocess.Popen[bytes], Result | None]:
    addr = ADDRS[hop % 2]
    tag = f"q{hop}"
    mig_port = free_port(socket.SOCK_STREAM, addr)
    t0 = time.monotonic()  # like Ferry's job, from before the destination QEMU starts
    proc = subprocess.Popen(plain_qemu_argv(root, tag, args.memory, cmdline,
                                            f"udp:{addr}:{port}-:7777", "defer"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = await plain_qmp(root, tag)
    await dst.execute("migrate-incoming", {"uri": f"tcp:{addr}:{mig_port}"})
    if args.link:
        await src.execute("migrate-set-parameters", {"max-bandwidth": args.link << 20})
    elif unlimited:
        await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    await src.execute("migrate", {"uri": f"tcp:{addr}:{mig_port}"})
    while (info := await src.execute("query-migrate"))["status"] != "completed":
        if info["status"] == "failed":
            raise SystemExit(f"plain migration failed: {info}")
        if time.monotonic() - t0 > args.give_up:
            await src.execute("migrate_cancel")
            while (await src.execute("query-migrate"))["status"] not in (
                    "cancelled", "failed", "completed"):
                await asyncio.sleep(0.05)
            await dst.close()
            proc.kill()
            proc.wait()
            return src, proc, None
        await asyncio.sleep(0.005)
    while (await dst.execute("query-migrate")).get("status") != "completed":
        await asyncio.sleep(0.005)
    await dst.execute("cont")
    resumed = time.monotonic() - t0
    for _ in range(100):  # the RESUME event may trail cont's answer a little
        if dst.event_time("RESUME") is not None:
            break
        await asyncio.sleep(0.005)
    stopped, started = src.event_time("STOP"), dst.event_time("RESUME")
    await src.execute("quit")
    await src.close()
    return dst, proc, {
        "qemu_total": info["total-time"] / 1000, "resumed": resumed,
        "downtime": info["downtime"] / 1000,
        "paused": (started - stopped) if started and stopped else float("nan"),
        "bytes": info["ram"]["transferred"]}


async def run_plain(args: argparse.Namespace, root: Path, workload: str,
                    unlimited: bool) -> list[Result | None]:
    port = free_port()
    cmdline = (f"console=ttyS0 quiet ferry.ip=10.0.2.15/24 ferry.tick=0 "
               f"{agent_args(workload)}")
    procs = [subprocess.Popen(plain_qemu_argv(root, "q0", args.memory, cmdline,
                                              f"udp:{ADDRS[0]}:{port}-:7777", None),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    src = await plain_qmp(root, "q0")
    await src.execute("cont")
    probe = Probe(port, *ADDRS)
    results: list[Result | None] = []
    try:
        await asyncio.to_thread(probe.wait_up)
        for hop in range(1, args.runs + 1):
            with GapRecorder(port, *ADDRS) as gaps:
                await asyncio.sleep(0.3)
                src, proc, res = await plain_hop(root, args, src, hop, port, cmdline,
                                                 unlimited)
                await asyncio.sleep(0.5)
            procs.append(proc)
            if res is None:  # gave up: the guest stays where it was
                results.append(None)
                continue
            res["gap"] = gaps.max_gap()
            results.append(res)
            await asyncio.to_thread(probe.wait_up, 10)
    finally:
        probe.close()
        await src.close()
        for p in procs:
            p.kill()
            p.wait()
    return results


def run_ferry(args: argparse.Namespace, hosts: list[Host], workload: str
              ) -> list[Result | None]:
    port = free_port()
    cfg = guest_config(f"bench-{workload}", port, memory=args.memory, bind="",
                       cmdline_extra=agent_args(workload))
    cfg["cmdline"] = cfg["cmdline"].replace("ferry.tick=1", "ferry.tick=0")
    hosts[0].create(cfg)
    probe = Probe(port, *ADDRS)
    results: list[Result | None] = []
    flags = shlex.split(args.ferry_flags)
    if args.link:
        flags += ["--bandwidth", str(args.link)]
    here = 0  # the host the guest is on (a failed hop leaves it there)
    try:
        probe.wait_up()
        for hop in range(args.runs):
            src, dst = hosts[here], hosts[1 - here]
            with GapRecorder(port, *ADDRS) as gaps:
                time.sleep(0.3)
                res = src.ferry("migrate", cfg["name"], dst.name, "--live", "--json",
                                *flags, check=False)
                time.sleep(0.5)
            job = json.loads(res.stdout) if res.stdout.strip() else {}
            if job.get("state") != "completed":
                print(f"ferry: {workload} hop {hop + 1}: {job.get('state')}: "
                      f"{job.get('error') or res.stderr.strip()}", file=sys.stderr)
                results.append(None)
                continue
            here = 1 - here
            st = job["stats"]
            results.append({
                "qemu_total": st["total_time_ms"] / 1000,
                "resumed": job["ended"] - job["started"] - job["phase_times"]["confirm"],
                "downtime": st["downtime_ms"] / 1000,
                "paused": (st.get("paused_ms") or float("nan")) / 1000,
                "bytes": st["transferred"], "gap": gaps.max_gap(),
                "passes": st["passes"], "throttle": st["max_throttle_pct"],
                "channels": st.get("channels", 0)})
            probe.wait_up(10)
    finally:
        probe.close()
        where = hosts[here]
        where.ferry("destroy", cfg["name"], check=False)
        where.ferry("undefine", cfg["name"], check=False)
    return results


def med(results: list[Result | None], key: str) -> float:
    values = [r[key] for r in results if r is not None]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS),
                    choices=list(WORKLOADS))
    ap.add_argument("--link", type=int, default=0,
                    help="limit every stream to this many MiB/s (0: as shipped)")
    ap.add_argument("--give-up", type=float, default=60.0,
                    help="seconds after which a plain QEMU migration is cancelled")
    ap.add_argument("--ferry-flags", default="", help="extra flags for ferry migrate")
    args = ap.parse_args()
    table: dict[str, dict[str, list[Result | None]]] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fybm", dir="/tmp") as tmp:
        root = Path(tmp)
        ports = {a: free_port(socket.SOCK_STREAM, a) for a in ADDRS}
        hosts = [Host(root, "ba", ADDRS[0], control_port=ports[ADDRS[0]],
                      peers={"bb": f"{ADDRS[1]}:{ports[ADDRS[1]]}"}),
                 Host(root, "bb", ADDRS[1], control_port=ports[ADDRS[1]],
                      peers={"ba": f"{ADDRS[0]}:{ports[ADDRS[0]]}"})]
        try:
            for h in hosts:
                h.start()
            for w in args.workloads:
                table[w] = {"qemu": asyncio.run(run_plain(args, root, w, unlimited=False))}
                if not args.link:
                    table[w]["qemu unlimited"] = asyncio.run(
                        run_plain(args, root, w, unlimited=True))
                table[w]["ferry"] = run_ferry(args, hosts, w)
        finally:
            for h in hosts:
                h.cleanup()
    took = time.monotonic() - t0

    link = f"streams limited to {args.link} MiB/s" if args.link else "links as shipped"
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}; guest {args.memory} "
          f"MiB; {link}; Ferry flags: {args.ferry_flags or '(defaults)'}; medians of "
          f"{args.runs}; {took:.0f} s")
    rows = [("completed", None, ""), ("QEMU total time", "qemu_total", "s"),
            ("migrate → running on dest", "resumed", "s"),
            ("QEMU downtime", "downtime", "ms"), ("paused (STOP → RESUME)", "paused", "ms"),
            ("guest unreachable (probe)", "gap", "ms"), ("bytes sent", "bytes", "MiB")]
    ways = [way for way in WAYS if way in table[args.workloads[0]]] if table else []
    for w in args.workloads:
        pattern, dirty = WORKLOADS[w]
        print(f"\n{w}: {pattern} MiB pattern" + (f", dirtying {dirty} (MiB:MiB/s)"
                                                 if dirty else ""))
        print(f"{'':28}" + "".join(f"{way:>16}" for way in ways) + f"{'ferry/qemu':>12}"
              + (f"{'ferry/unl.':>12}" if "qemu unlimited" in ways else ""))
        for label, key, unit in rows:
            cells = []
            for way in ways:
                rs = table[w][way]
                if key is None:
                    cells.append(f"{sum(r is not None for r in rs)}/{len(rs)}")
                    continue
                v = med(rs, key)
                scale = {"s": 1, "ms": 1000, "MiB": 1 / 2**20}[unit]
                cells.append(f"{v * scale:.3f} s" if unit == "s" else
                             f"{v * scale:.0f} {unit}")
            line = f"{label:28}" + "".join(f"{c:>16}" for c in cells)
            if key is not None:
                f = med(table[w]["ferry"], key)
                for base in [way for way in ("qemu", "qemu unlimited") if way in ways]:
                    b = med(table[w][base], key)
                    line += f"{f / b:12.2f}" if b == b and f == f and b else f"{'-':>12}"
            print(line)
        fr = [r for r in table[w]["ferry"] if r is not None]
        if fr:
            print(f"{'ferry: passes, max throttle':28}{med(fr, 'passes'):>14.0f}  "
                  f"{med(fr, 'throttle'):>6.0f} %  (channels: {fr[0]['channels']})")


if __name__ == "__main__":
    main()
