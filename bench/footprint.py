#!/usr/bin/env python3
"""ferryd's footprint: resident memory while it manages N domains, and how fast
`ferry list` answers. Not a test (no pass/fail): it prints numbers.

    .venv/bin/python bench/footprint.py [--domains 10]

Starts its own ferryd in a temporary state directory, creates N small test
guests (no memory pattern, so they idle), measures, and removes everything.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Host, guest_config


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=10)
    ap.add_argument("--list-runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fyb", dir="/tmp") as tmp:
        host = Host(Path(tmp), "bench")
        host.start()
        try:
            assert host.proc is not None
            idle = rss_mib(host.proc.pid)
            for i in range(args.domains):
                cfg = guest_config(f"d{i:02d}", 0, memory=128,
                                   cmdline_extra="ferry.mem=0 ferry.tick=0")
                cfg["nics"] = []
                host.create(cfg)
            # measure a steady state: every guest booted and idle
            for i in range(args.domains):
                deadline = time.monotonic() + 180
                while "FERRY-AGENT READY" not in host.ferry("console", f"d{i:02d}",
                                                            "--log").stdout:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"d{i:02d} did not boot")
                    time.sleep(0.5)
            time.sleep(2)
            for _ in range(3):
                host.ferry("list")
            loaded = rss_mib(host.proc.pid)
            times = []
            for _ in range(args.list_runs):
                t0 = time.perf_counter()
                host.ferry("list")
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            host.ferry("list", "--json")
            json_time = time.perf_counter() - t0
            load = Path("/proc/loadavg").read_text().split()[0]
            running = sum(1 for d in host.domains().values() if d["state"] == "running")
        finally:
            host.cleanup()
    print(f"ferryd RSS idle:                 {idle:6.1f} MiB")
    print(f"ferryd RSS with {running:2d} domains:     {loaded:6.1f} MiB   (goal < 100 MiB)")
    print(f"`ferry list` median of {args.list_runs}:     {statistics.median(times) * 1000:6.0f} ms"
          f"   (max {max(times) * 1000:.0f} ms; goal well under 1 s)")
    print(f"`ferry list --json`:             {json_time * 1000:6.0f} ms")
    print(f"load average while measuring:    {load}")


if __name__ == "__main__":
    main()
