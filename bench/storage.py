#!/usr/bin/env python3
"""Ferry's live storage migration next to plain QEMU driven by hand the same way.

    .venv/bin/python bench/storage.py [--runs 1] [--memory 512] [--disk-mib 1024]
        [--written-mib 512] [--write-rate 8]

The same guest (``--memory`` MiB) with a qcow2 disk of ``--disk-mib`` MiB, of
which ``--written-mib`` MiB hold data, the guest writing ``--write-rate`` MiB/s
to its disk (and checking every block) during the move, 127.0.0.1 → 127.0.0.2:

- *qemu by hand*: two QEMU processes; the destination (``-incoming defer``)
  exports an empty image of the same size over NBD with TLS, the source
  mirrors its disk into it (``blockdev-mirror``, sync full), switches the
  mirror to write-blocking when ready, then ``migrate`` over TLS (the same
  credentials); at completion the mirror is cancelled (no pivot), the NBD
  server stopped, ``cont`` on the destination;
- *ferry*: two ferryd hosts with a local pool each and ``ferry migrate --live``
  (which does the same, plus its checks, records and cleanup).

The two ways alternate run by run (the ferryds idle during the hand-driven
runs), each on a fresh image synced to disk first. Per way: total time (from
the start to the guest running on the destination), the part before the mirror
starts and the mirror's first pass, disk bytes copied, memory bytes sent,
QEMU's downtime, the longest gap in the guest's answers to a UDP probe every
20 ms; then Ferry's ratios. Not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ferry.migration import streamtls
from ferry.qemu.block import BlockQmp
from helpers import (
    INITRD,
    KERNEL,
    GapRecorder,
    Host,
    Probe,
    disk_check,
    free_port,
    guest_config,
    plain_qmp,
)

ADDRS = ("127.0.0.1", "127.0.0.2")
Result = dict[str, float]


def make_disk(path: Path, args: argparse.Namespace) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path),
                    f"{args.disk_mib}M"], check=True)
    # data beyond the region the guest writes (its first 64 MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                    f"write -P 0x5a 64M {args.written_mib}M", str(path)], check=True,
                   capture_output=True)
    os.sync()  # (no write-back of it competing with the run that follows)


def cmdline(args: argparse.Namespace) -> str:
    return (f"console=ttyS0 quiet ferry.ip=10.0.2.15/24 ferry.tick=0 ferry.mem=64 "
            f"ferry.diskwrite=64:{args.write_rate}")


def qemu_argv(root: Path, tag: str, args: argparse.Namespace, disk: Path, fwd: str,
              incoming: bool) -> list[str]:
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "qemu64",
            "-m", f"{args.memory}M", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{root}/{tag}.qmp,server=on,wait=off",
            "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", cmdline(args),
            "-netdev", f"user,id=n0,hostfwd={fwd}", "-device", "virtio-net-pci,netdev=n0",
            "-blockdev", f"driver=file,filename={disk},node-name=disk0-file,"
                         "cache.direct=off",
            "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
            "-device", "virtio-blk-pci,drive=disk0", "-serial", "null"]
    return argv + (["-incoming", "defer"] if incoming else [])


async def run_plain(args: argparse.Namespace, root: Path, runs: list[int]) -> list[Result]:
    results = []
    for run in runs:
        src_disk, dst_disk = root / f"p{run}-src.qcow2", root / f"p{run}-dst.qcow2"
        make_disk(src_disk, args)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst_disk),
                        f"{args.disk_mib}M"], check=True)
        port = free_port()
        procs = [subprocess.Popen(qemu_argv(root, f"s{run}", args, src_disk,
                                            f"udp:{ADDRS[0]}:{port}-:7777", False),
                                  stderr=subprocess.DEVNULL)]
        probe = Probe(port, *ADDRS)
        try:
            src = await plain_qmp(root, f"s{run}")
            await src.execute("cont")
            await asyncio.to_thread(probe.wait_up)
            await asyncio.sleep(2)
            job_id = f"{run:012x}"
            with GapRecorder(port, *ADDRS) as gaps:
                t0 = time.monotonic()
                procs.append(subprocess.Popen(
                    qemu_argv(root, f"d{run}", args, dst_disk,
                              f"udp:{ADDRS[1]}:{port}-:7777", True),
                    stderr=subprocess.DEVNULL))
                dst = await plain_qmp(root, f"d{run}")
                server, client = await asyncio.to_thread(streamtls.make_pair, job_id)
                await streamtls.install(dst, root, job_id, True, server)
                await streamtls.install(src, root, job_id, False, client)
                nbd_port = free_port(socket.SOCK_STREAM, ADDRS[1])
                dblock, sblock = BlockQmp(dst), BlockQmp(src)
                await dblock.serve_nbd(ADDRS[1], nbd_port, streamtls.object_id(job_id))
                await dblock.export("e0", "disk0", "disk0", writable=True)
                mig_port = free_port(socket.SOCK_STREAM, ADDRS[1])
                await dst.execute("migrate-incoming", {"uri": f"tcp:{ADDRS[1]}:{mig_port}"})
                await sblock.open_nbd("t0", ADDRS[1], nbd_port, "disk0",
                                      streamtls.object_id(job_id),
                                      streamtls.tls_hostname(job_id))
                t_mirror = time.monotonic()
                await sblock.mirror("m0", "disk0", "t0")
                await sblock.wait_ready("m0", 3600)
                t_ready = time.monotonic()
                await sblock.write_blocking("m0")
                await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                await src.execute("migrate", {"uri": f"tcp:{ADDRS[1]}:{mig_port}"})
                while (info := await src.execute("query-migrate"))["status"] != "completed":
                    if info["status"] == "failed":
                        raise SystemExit(f"plain migration failed: {info}")
                    await asyncio.sleep(0.005)
                job = await sblock.job("m0")
                disk_bytes = job.offset if job else 0
                await sblock.cancel_job("m0")
                await sblock.dismiss("m0")
                await sblock.close_node("t0")
                while (await dst.execute("query-migrate")).get("status") != "completed":
                    await asyncio.sleep(0.005)
                await dblock.remove_export("e0")
                await dblock.stop_nbd()
                await dst.execute("cont")
                total = time.monotonic() - t0
                await asyncio.sleep(0.5)
            reply = disk_check(probe)
            results.append({"total": total, "setup": t_mirror - t0,
                            "first_pass": t_ready - t_mirror, "disk_bytes": disk_bytes,
                            "mem_bytes": info["ram"]["transferred"],
                            "downtime": info["downtime"] / 1000, "gap": gaps.max_gap(),
                            "bad": float(reply["disk_bad"])})
            await src.close()
            await dst.close()
        finally:
            probe.close()
            for p in procs:
                p.kill()
                p.wait()
            src_disk.unlink(missing_ok=True)
            dst_disk.unlink(missing_ok=True)
    return results


def run_ferry(args: argparse.Namespace, hosts: list[Host], root: Path, runs: list[int]
              ) -> list[Result]:
    results = []
    for run in runs:
        image = f"f{run}.qcow2"
        make_disk(root / "ba-local" / image, args)
        port = free_port()
        cfg = guest_config(f"bench-st{run}", port, memory=args.memory, bind="",
                           disks=[{"pool": "local", "image": image}])
        cfg["cmdline"] = cmdline(args)
        hosts[0].create(cfg)
        probe = Probe(port, *ADDRS)
        try:
            probe.wait_up()
            time.sleep(2)
            with GapRecorder(port, *ADDRS) as gaps:
                t0 = time.monotonic()
                res = hosts[0].ferry("migrate", cfg["name"], "bb", "--live", "--json",
                                     check=False)
                job = json.loads(res.stdout) if res.stdout.strip() else {}
                total = job["ended"] - job["started"] - job["phase_times"].get("confirm", 0) \
                    if job.get("state") == "completed" else time.monotonic() - t0
                time.sleep(0.5)
            if job.get("state") != "completed":
                print(f"ferry run {run + 1}: {job.get('state')}: "
                      f"{job.get('error') or res.stderr.strip()}", file=sys.stderr)
                continue
            reply = disk_check(probe)
            st = job["stats"]
            print("ferry phases: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in
                                               job["phase_times"].items()), file=sys.stderr)
            pt = job["phase_times"]
            results.append({"total": total, "setup": pt.get("begin", 0) + pt.get("prepare", 0),
                            "first_pass": pt.get("disk_copy", 0),
                            "disk_bytes": sum(d["bytes"] for d in job["disks"]),
                            "mem_bytes": st["transferred"], "downtime": st["downtime_ms"] / 1000,
                            "gap": gaps.max_gap(), "bad": float(reply["disk_bad"])})
        finally:
            probe.close()
            hosts[1].ferry("destroy", cfg["name"], check=False)
            hosts[1].ferry("undefine", cfg["name"], check=False)
            for h in hosts:
                (root / f"{h.name}-local" / image).unlink(missing_ok=True)
    return results


def med(results: list[Result], key: str) -> float:
    values = [r[key] for r in results]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--written-mib", type=int, default=512)
    ap.add_argument("--write-rate", type=float, default=8.0, help="guest disk MiB/s")
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fybs", dir="/tmp") as tmp:
        root = Path(tmp)
        ports = {a: free_port(socket.SOCK_STREAM, a) for a in ADDRS}
        hosts = []
        for i, name in enumerate(("ba", "bb")):
            (root / f"{name}-local").mkdir()
            other = ("bb", "ba")[i]
            hosts.append(Host(root, name, ADDRS[i], control_port=ports[ADDRS[i]],
                              storage_dirs=[str(root)],
                              pools=[{"name": "local", "path": str(root / f"{name}-local")}],
                              peers={other: f"{ADDRS[1 - i]}:{ports[ADDRS[1 - i]]}"}))
        try:
            # (both ways under the same conditions: the ferryds idle during the
            # hand-driven runs, and the order alternating run by run)
            for h in hosts:
                h.start()
            plain, ferry = [], []
            for run in range(args.runs):
                if run % 2 == 0:
                    plain += asyncio.run(run_plain(args, root, [run]))
                    ferry += run_ferry(args, hosts, root, [run])
                else:
                    ferry += run_ferry(args, hosts, root, [run])
                    plain += asyncio.run(run_plain(args, root, [run]))
        finally:
            for h in hosts:
                h.cleanup()
    took = time.monotonic() - t0
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}; guest {args.memory} MiB, "
          f"disk {args.disk_mib} MiB qcow2 with {args.written_mib} MiB written, the guest "
          f"writing {args.write_rate:g} MiB/s; medians of {args.runs}; {took:.0f} s")
    rows = [("total time", "total", "s"), ("  before the mirror", "setup", "s"),
            ("  mirror's first pass", "first_pass", "s"),
            ("disk bytes copied", "disk_bytes", "MiB"),
            ("memory bytes sent", "mem_bytes", "MiB"), ("QEMU downtime", "downtime", "ms"),
            ("guest unreachable (probe)", "gap", "ms"), ("bad disk blocks", "bad", "")]
    print(f"{'':28}{'qemu by hand':>16}{'ferry':>16}{'ferry/qemu':>12}")
    for label, key, unit in rows:
        a, b = med(plain, key), med(ferry, key)
        scale = {"MiB": 1 / (1 << 20), "ms": 1000.0}.get(unit, 1.0)
        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"{label:28}{a * scale:>13.1f} {unit:<2}{b * scale:>13.1f} {unit:<2}{ratio:>12}")
    print(f"completed: qemu {len(plain)}/{args.runs}, ferry {len(ferry)}/{args.runs}")


if __name__ == "__main__":
    main()
