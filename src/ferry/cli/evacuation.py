"""Showing a host evacuation: the plan as a table, then each move as it goes."""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from rich.table import Table

from ferry.cli.progress import progress_line
from ferry.cli.target import Target
from ferry.errors import FerryError

POLL_S = 1.0
PROGRESS_EVERY_S = 5.0


def plan_table(evac: dict[str, Any]) -> Table:
    title = (f"evacuation of {evac['host']}"
             + (" (dry run: nothing changed)" if evac["dry_run"] else f" — {evac['state']}"))
    table = Table(box=None, header_style="bold", title=title, title_justify="left")
    for col in ("DOMAIN", "MEMORY", "TO", "MODE", "STATE", "JOB", "REASON"):
        table.add_column(col)
    for m in evac["moves"]:
        memory = f"{m['memory_mib']} MiB" if m["running"] else "shut off"
        table.add_row(m["domain"], memory, m.get("dest") or "-", m.get("mode") or "-",
                      m["state"], m.get("job") or "", m.get("reason") or "")
    for host, why in evac.get("refused_hosts", {}).items():
        table.add_row("", "", host, "", "not a candidate", "", why)
    return table


async def follow_evacuation(target: Target, evac: dict[str, Any], quiet: bool = False
                            ) -> dict[str, Any]:
    """Poll the evacuation until it is done: a line per move when its state
    changes, and each running job's progress every few seconds."""
    seen = {m["domain"]: m["state"] for m in evac["moves"]}
    said = 0.0
    async with target.client() as client:
        while evac["state"] == "running":
            await asyncio.sleep(POLL_S)
            evac = await client.evacuation()
            now = time.monotonic()
            for m in evac["moves"]:
                if not quiet and seen.get(m["domain"]) != m["state"]:
                    seen[m["domain"]] = m["state"]
                    why = f": {m['reason']}" if m.get("reason") else ""
                    job = f" (job {m['job']})" if m.get("job") else ""
                    sys.stderr.write(f"{m['domain']} → {m.get('dest')}: {m['state']}"
                                     f"{job}{why}\n")
            if not quiet and now - said >= PROGRESS_EVERY_S:
                said = now
                for m in evac["moves"]:
                    if m["state"] == "running" and m.get("job"):
                        try:
                            rec = await client.job(m["job"])
                        except FerryError:
                            continue
                        sys.stderr.write(f"  {m['domain']}: {progress_line(rec)}\n")
    return evac
