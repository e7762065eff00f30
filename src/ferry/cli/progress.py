"""Showing migrations: the live progress bar, job tables, final statistics."""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from ferry.cli.target import Target
from ferry.errors import FerryError
from ferry.migration.models import JobRecord, JobState, Phase

LINE_EVERY_S = 5.0   # progress lines when the output is not a terminal


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1048576:,.1f} MiB"


def _record(job: dict[str, Any] | JobRecord) -> JobRecord:
    return job if isinstance(job, JobRecord) else JobRecord.model_validate(job)


def progress_line(job: dict[str, Any] | JobRecord) -> str:
    rec = _record(job)
    s = rec.stats
    if rec.queued and rec.state == JobState.running:
        return f"queued ({rec.queued})"
    parts = [f"phase {rec.phase.value}"]
    if rec.phase == Phase.perform and rec.disks and any(
            d.get("total") and d.get("bytes", 0) < d["total"] for d in rec.disks):
        parts += [f"{d.get('disk')} {mib(d.get('bytes'))}/{mib(d.get('total'))} "
                  f"{d.get('rate_mibps', 0):.0f} MiB/s" for d in rec.disks]
    if s.progress_pct is not None:
        if s.eta_s is not None:
            eta = f", ETA {s.eta_s:.0f} s"
        elif s.mbps and s.dirty_rate >= s.mbps * 1e6 / 8:
            eta = ", not converging"
        else:
            eta = ""
        parts.append(f"{s.progress_pct:.0f}%{eta}")
    if s.total:
        parts += [f"{mib(s.transferred)}/{mib(s.total)}", f"{s.mbps:.0f} Mbit/s",
                  f"dirty {mib(s.dirty_rate)}/s" + (" (sampled)" if s.dirty_rate_sampled
                                                    else ""),
                  f"remaining {mib(s.remaining)}",
                  f"pass {s.passes}"]
        if s.expected_downtime_ms is not None:
            limit = f" (allowed {s.downtime_limit_ms})" if s.downtime_limit_ms else ""
            parts.append(f"expected downtime {s.expected_downtime_ms} ms{limit}")
        if s.throttle_pct:
            parts.append(f"throttle {s.throttle_pct}%")
    if rec.escalations and rec.state == JobState.running:
        esc = rec.escalations[-1]
        parts.append(f"last escalation: {esc.get('action')}")
    if s.postcopy:
        stream = f" {s.status.value}" if s.status.value.startswith("postcopy-p") else ""
        parts.append(f"post-copy{stream}: the guest runs on {rec.dest}, "
                     f"{s.postcopy_requests} pages fetched on demand"
                     + (f", {s.recoveries} recoveries" if s.recoveries else ""))
    return ", ".join(parts)


def summary(job: dict[str, Any] | JobRecord) -> str:
    rec = _record(job)
    s, times = rec.stats, rec.phase_times
    total = (rec.ended or time.time()) - rec.started
    lines = [f"migration {rec.id}: {rec.domain} {rec.source} -> {rec.dest} "
             f"({rec.mode.value}): {rec.state.value}"]
    if rec.error:
        e = rec.error
        lines.append(f"  error:      in {e.get('phase')} on host {e.get('host')}: "
                     f"{e.get('message')}")
        for undo in e.get("undo_errors") or []:
            lines.append(f"  left over:  {undo}")
    if rec.cleanup_error:
        lines.append(f"  cleanup:    {rec.cleanup_error}")
    lines.append(f"  total time: {total:.3f} s")
    if s.downtime_ms is not None:
        lines.append(f"  downtime:   {s.downtime_ms} ms (QEMU's figure)")
    if s.paused_ms is not None:
        lines.append(f"  paused:     {s.paused_ms:.0f} ms (the guest's CPU stopped on "
                     f"{rec.source} until it ran on {rec.dest})")
    if s.transferred:
        lines.append(f"  sent:       {mib(s.transferred)} of {mib(s.total)} "
                     f"in {s.passes} passes")
    for d in rec.disks:
        saved = f", {mib(d.get('saved_bytes'))} of its base not sent" \
            if d.get("saved_bytes") else ""
        lines.append(f"  disk:       {d.get('disk')}: {mib(d.get('bytes'))} copied "
                     f"({d.get('mode')}), first pass {d.get('first_pass_s', 0):.1f} s{saved}")
    if s.postcopy:
        lines.append(f"  post-copy:  {mib(s.postcopy_bytes)} sent after the guest moved, "
                     f"{s.postcopy_requests} pages it asked for"
                     + (f", {s.recoveries} recoveries of the stream" if s.recoveries
                        else ""))
    if s.stream_tls:
        shape = (f"{s.channels} TLS channel{'s' if s.channels > 1 else ''}"
                 + (f", {s.compression}" if s.compression != "none" else "")
                 if s.channels else "one TLS stream")
        lines.append(f"  stream:     {shape}, with credentials made for this migration "
                     "only")
    for esc in rec.escalations:
        lines.append(f"  escalation: {esc.get('action')}: {esc.get('reason')}")
    if times:
        lines.append("  phases:     " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                  for k, v in times.items()))
    return "\n".join(lines)


def follow(target: Target, job: JobRecord, quiet: bool = False) -> JobRecord:
    """Show the job's progress until it ends; Ctrl-C asks, then aborts it."""
    return asyncio.run(_follow(target, job, quiet))


async def _follow(target: Target, job: JobRecord, quiet: bool) -> JobRecord:
    console = Console(stderr=True)
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    show = not quiet and console.is_terminal
    # not a terminal (a log, a pipe, CI): a plain line every few seconds instead
    lines = not quiet and not console.is_terminal
    said = 0.0
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.percentage:>3.0f}%"), console=console,
                        transient=True, disable=not show)
    async with target.client() as client:
        with progress:
            bar = progress.add_task(job.domain, total=1)
            while job.state == JobState.running:
                if interrupted.is_set():
                    interrupted.clear()
                    progress.stop()
                    if await _confirm_abort(job.id):
                        try:
                            await client.abort_job(job.id)
                        except FerryError as exc:
                            console.print(f"cannot abort: {exc.message}")
                    progress.start()
                await asyncio.sleep(0.1)
                try:
                    job = await client.job(job.id)
                except FerryError as exc:
                    console.print(f"lost the job: {exc.message}")
                    raise
                stats = job.stats
                total = stats.total or 1
                done = stats.total - stats.remaining if stats.total else 0
                progress.update(bar, total=total, completed=done,
                                description=f"{job.domain}: {progress_line(job)}")
                if lines and job.state == JobState.running and \
                        time.monotonic() - said >= LINE_EVERY_S:
                    said = time.monotonic()
                    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {job.domain} "
                                     f"(job {job.id}): {progress_line(job)}\n")
                    sys.stderr.flush()
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


def jobs_table(jobs: Sequence[dict[str, Any] | JobRecord]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("ID", "DOMAIN", "ROLE", "MODE", "FROM", "TO", "STATE", "PROGRESS"):
        table.add_column(col)
    for j in jobs:
        rec = _record(j)
        table.add_row(rec.id, rec.domain, rec.role.value, rec.mode.value, rec.source,
                      rec.dest, "queued" if rec.queued else rec.state.value,
                      progress_line(rec))
    return table


def records_table(records: Sequence[dict[str, Any] | JobRecord]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("ID", "DOMAIN", "ROLE", "FROM", "TO", "MODE", "RESULT", "TIME", "DOWNTIME",
                "SENT", "PASSES", "ERROR"):
        table.add_column(col)
    for raw in records:
        r = _record(raw)
        s = r.stats
        total = f"{(r.ended - r.started):.2f}s" if r.ended else "-"
        err = r.error or {}
        table.add_row(r.id, r.domain, r.role.value, r.source, r.dest, r.mode.value,
                      r.state.value, total,
                      f"{s.downtime_ms} ms" if s.downtime_ms is not None else "-",
                      mib(s.transferred) if s.transferred else "-", str(s.passes or "-"),
                      f"{err.get('phase')}@{err.get('host')}: {err.get('message')}"
                      if err else (f"cleanup: {r.cleanup_error}" if r.cleanup_error else ""))
    return table
