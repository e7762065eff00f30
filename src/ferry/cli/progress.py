"""Showing migrations: the live progress bar, job tables, final statistics."""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from ferry.cli.target import Target
from ferry.errors import FerryError


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1048576:,.1f} MiB"


def progress_line(job: dict[str, Any]) -> str:
    s = job.get("stats", {})
    parts = [f"phase {job['phase']}"]
    if s.get("total"):
        parts += [f"{mib(s.get('transferred'))}/{mib(s.get('total'))}",
                  f"{s.get('mbps', 0):.0f} Mbit/s", f"dirty {mib(s.get('dirty_rate'))}/s",
                  f"remaining {mib(s.get('remaining'))}", f"pass {s.get('passes', 0)}"]
        if s.get("expected_downtime_ms") is not None:
            parts.append(f"expected downtime {s['expected_downtime_ms']} ms")
        if s.get("throttle_pct"):
            parts.append(f"throttle {s['throttle_pct']}%")
    return ", ".join(parts)


def summary(job: dict[str, Any]) -> str:
    s, times = job.get("stats", {}), job.get("phase_times", {})
    total = (job.get("ended") or time.time()) - job["started"]
    lines = [f"migration {job['id']}: {job['domain']} {job['source']} -> {job['dest']} "
             f"({job['mode']}): {job['state']}"]
    if job.get("error"):
        e = job["error"]
        lines.append(f"  error:      in {e.get('phase')} on host {e.get('host')}: "
                     f"{e.get('message')}")
    lines.append(f"  total time: {total:.3f} s")
    if "downtime_ms" in s:
        lines.append(f"  downtime:   {s['downtime_ms']} ms (QEMU's figure)")
    if s.get("transferred") is not None:
        lines.append(f"  sent:       {mib(s.get('transferred'))} of {mib(s.get('total'))} "
                     f"in {s.get('passes', 0)} passes")
    if s.get("stream_tls"):
        lines.append("  stream:     TLS, with credentials made for this migration only")
    if s.get("forced_pause"):
        lines.append("  note:       paused at the timeout to finish")
    if times:
        lines.append("  phases:     " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                  for k, v in times.items()))
    return "\n".join(lines)


def follow(target: Target, job: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Show the job's progress until it ends; Ctrl-C asks, then aborts it."""
    return asyncio.run(_follow(target, job, quiet))


async def _follow(target: Target, job: dict[str, Any], quiet: bool) -> dict[str, Any]:
    console = Console(stderr=True)
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    show = not quiet and console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.percentage:>3.0f}%"), console=console,
                        transient=True, disable=not show)
    async with target.client() as client:
        with progress:
            bar = progress.add_task(job["domain"], total=1)
            while job["state"] == "running":
                if interrupted.is_set():
                    interrupted.clear()
                    progress.stop()
                    if await _confirm_abort(job["id"]):
                        try:
                            await client.abort_job(job["id"])
                        except FerryError as exc:
                            console.print(f"cannot abort: {exc.message}")
                    progress.start()
                await asyncio.sleep(0.1)
                try:
                    job = await client.job(job["id"])
                except FerryError as exc:
                    console.print(f"lost the job: {exc.message}")
                    raise
                s = job.get("stats", {})
                total = s.get("total") or 1
                done = total - s.get("remaining", total) if s.get("total") else 0
                progress.update(bar, total=total, completed=done,
                                description=f"{job['domain']}: {progress_line(job)}")
    loop.remove_signal_handler(signal.SIGINT)
    if not quiet:
        sys.stdout.write(summary(job) + "\n")
    return job


async def _confirm_abort(job_id: str) -> bool:
    if not sys.stdin.isatty():
        return True
    sys.stderr.write(f"\nAbort migration {job_id}? The guest stays on the source. [y/N] ")
    sys.stderr.flush()
    answer = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("ID", "DOMAIN", "MODE", "TO", "PHASE", "PROGRESS"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j["id"], j["domain"], j["mode"], j["dest"], j["phase"],
                      progress_line(j))
    return table


def records_table(records: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("ID", "DOMAIN", "ROLE", "FROM", "TO", "MODE", "RESULT", "TIME", "DOWNTIME",
                "SENT", "PASSES", "ERROR"):
        table.add_column(col)
    for r in records:
        s = r.get("stats", {})
        total = f"{(r['ended'] - r['started']):.2f}s" if r.get("ended") else "-"
        err = r.get("error") or {}
        table.add_row(r["id"], r["domain"], r["role"], r["source"], r["dest"], r["mode"],
                      r["state"], total,
                      f"{s['downtime_ms']} ms" if "downtime_ms" in s else "-",
                      mib(s.get("transferred")) if s.get("transferred") else "-",
                      str(s.get("passes", "-")),
                      f"{err.get('phase')}@{err.get('host')}: {err.get('message')}"
                      if err else "")
    return table
