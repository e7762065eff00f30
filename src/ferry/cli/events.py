"""``ferry events``: follow a host's event stream (``/v1/events``)."""
from __future__ import annotations

import datetime
import json
import sys
from typing import Any

from aiohttp import WSMsgType

from ferry.cli.target import Target
from ferry.errors import FerryError

SKIP = {"seq", "time", "kind", "host", "domain"}


def event_line(event: dict[str, Any]) -> str:
    """One event for a human: time, host, kind, domain, then the rest as k=v."""
    when = datetime.datetime.fromtimestamp(float(event.get("time") or 0))
    rest = " ".join(f"{k}={v}" for k, v in event.items()
                    if k not in SKIP and v is not None and v != "")
    return (f"{when:%H:%M:%S.%f}"[:-3] + f" {event.get('host', '?')} {event.get('kind')}"
            + (f" {event['domain']}" if event.get("domain") else "") + (f" {rest}" if rest
                                                                        else ""))


async def follow_events(target: Target, domain: str | None, as_json: bool) -> None:
    async with target.client() as client:
        ws = await client.events(domain)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            try:
                event = json.loads(msg.data)
            except ValueError:
                continue
            line = json.dumps(event) if as_json else event_line(event)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if not ws.closed:
            await ws.close()
        raise FerryError("the event stream ended (ferryd stopped?)")
