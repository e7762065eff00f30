"""``GET /v1/events`` (websocket): this host's events as they happen, one JSON
text message each (docs/events.md has the schema)::

    {"seq": 17, "time": 1764612345.12, "host": "host-a", "kind": "migration.phase",
     "job": "3f2a...", "domain": "web01", "role": "source", "phase": "perform"}

``?domain=NAME`` keeps only that domain's events (host events such as
``host.maintenance`` come through as well). The server sends, the client only
listens (anything it sends is ignored); a client too slow to read loses
events (``seq`` shows the gap) and never holds ferryd up.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import WSMsgType, web

from ferry.errors import InvalidInput
from ferry.events import EventBus
from ferry.models import check_name


def wanted(event: dict[str, Any], domain: str | None) -> bool:
    if domain is None:
        return True
    return event.get("domain") in (None, domain)


async def serve_events(request: web.Request, bus: EventBus, host: str) -> web.StreamResponse:
    domain = request.query.get("domain")
    if domain is not None:
        try:
            check_name(domain)
        except ValueError as exc:
            raise InvalidInput(f"domain: {exc}") from exc
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    queue = bus.subscribe()

    async def drain_client() -> None:   # (reads close frames; ignores the rest)
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    reader = asyncio.create_task(drain_client())
    try:
        while not ws.closed and not reader.done():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, reader},
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            event = getter.result()
            if wanted(event, domain):
                await ws.send_str(json.dumps({"host": host, **event}, default=str))
    finally:
        bus.unsubscribe(queue)
        reader.cancel()
        await ws.close()
    return ws
