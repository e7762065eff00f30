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

EVENT_SOCKETS: web.AppKey[set[Any]] = web.AppKey("event_sockets")  # (open sessions)


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
    sockets: set[Any] = request.app[EVENT_SOCKETS]
    sockets.add(ws)

    async def drain_client() -> None:   # (reads close frames; ignores the rest)
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    reader = asyncio.create_task(drain_client())
    getter: asyncio.Future[dict[str, Any]] | None = None
    try:
        while not ws.closed and not reader.done():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, reader},
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                break
            event = getter.result()
            if wanted(event, domain):
                try:
                    await ws.send_str(json.dumps({"host": host, **event}, default=str))
                except ConnectionError:
                    break   # (the client went away)
    finally:
        bus.unsubscribe(queue)
        sockets.discard(ws)
        for task in (getter, reader):
            if task is not None:
                task.cancel()
        await ws.close()
    return ws


async def close_event_sockets(app: web.Application) -> None:
    """At shutdown: end every events session, so that nothing waits on them."""
    sockets = app[EVENT_SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"ferryd is stopping")
