"""Console sessions over websockets, wherever the domain runs.

A session follows the domain's console log by offset (see ``ferry.console``).
Protocol: the server first sends a text frame ``{"offset": N, "host": NAME}``,
then the output as binary frames; the client sends what the user types as
binary frames. The server closes with 1000 when the domain stops and with
``MOVED`` when it left this host: the client then reconnects through its own
ferryd with ``?from=<offset it got to>``, and nothing is lost or repeated.

When the domain is not on this host, ferryd finds where it is
(``ferry.fleet.locate``: the record of where it migrated to, else by asking
every peer) and relays the session to that host's relocation API.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from aiohttp import WSMsgType, web

from ferry.client import peer_client
from ferry.console import MOVED, ConsoleHub, ConsoleLog
from ferry.domains import DomainService
from ferry.errors import FerryError, InvalidInput, NotFound
from ferry.fleet.locate import DomainLocator, Hop
from ferry.hostconfig import HostConfig
from ferry.store import Store

log = logging.getLogger(__name__)

POLL_S = 0.05


def start_offset(request: web.Request) -> int | None:
    value = request.query.get("from")
    if value is None:
        return None
    if not value.isdigit():
        raise InvalidInput(f"'from' must be a byte offset, not {value!r}")
    return int(value)


class Consoles:
    def __init__(self, host: HostConfig, svc: DomainService, store: Store) -> None:
        self.host = host
        self.svc = svc
        self.store = store
        self.locator = DomainLocator(host, svc, store)
        self.hubs: dict[str, ConsoleHub] = {}
        self.relayed = 0     # sessions relayed to the host a domain runs on, now

    async def close(self) -> None:
        for hub in self.hubs.values():
            await hub.close()

    def sessions(self) -> int:
        """Console sessions open on this host now (local and relayed)."""
        return sum(h.sessions for h in self.hubs.values()) + self.relayed

    # -- sessions ---------------------------------------------------------------------
    async def serve(self, request: web.Request, name: str, relay: bool) -> web.StreamResponse:
        """A console session for ``name``: local if it runs here, else relayed (if
        ``relay``) to the host that has it."""
        dom = self.svc.domains.get(name)
        if dom is None:
            if not relay:
                raise NotFound(f"no domain named {name!r} on host {self.host.name}")
            return await self._relay(request, await self.locator.locate(name), name)
        if dom.proc is None or not dom.config.serial:
            raise NotFound(f"domain {name} has no running console ({dom.state.value})",
                           domain=name)
        hub = self.hubs.get(name)
        if hub is None:
            hub = self.hubs[name] = ConsoleHub(name, self.svc.paths(name).console)
        try:
            queue = await hub.attach()
        except OSError as exc:
            raise NotFound(f"console of {name} is not available: {exc}", domain=name) from exc
        clog = ConsoleLog(self.svc.paths(name).root)
        start = start_offset(request)
        pos = clog.size() if start is None else start
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"offset": pos, "host": self.host.name}))
        typed = asyncio.create_task(_forward_input(ws, hub))
        try:
            while not ws.closed:
                pos, data = clog.read(pos)
                if data:
                    await ws.send_bytes(data)
                    pos += len(data)
                    continue
                current = self.svc.domains.get(name)
                if current is not dom:
                    await ws.close(code=MOVED, message=b"the domain left this host")
                    break
                if dom.proc is None:
                    pos, data = clog.read(pos)
                    if data:
                        await ws.send_bytes(data)
                    await ws.close(message=b"the domain stopped")
                    break
                if typed.done():
                    break
                await asyncio.sleep(POLL_S)
        finally:
            typed.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await typed
            await hub.detach(queue)
        return ws

    async def _relay(self, request: web.Request, hop: Hop, name: str) -> web.StreamResponse:
        start = start_offset(request)
        params = {} if start is None else {"from": str(start)}
        async with peer_client(self.host, *hop, timeout=None) as peer:
            try:
                upstream = await peer.ws(f"/v1/relocation/consoles/{name}", params)
            except FerryError as exc:
                raise NotFound(f"console of {name} is not available: {exc.message}",
                               domain=name) from exc
            ws = web.WebSocketResponse(heartbeat=20)
            await ws.prepare(request)

            async def down() -> None:
                async for msg in upstream:
                    if msg.type == WSMsgType.TEXT:
                        await ws.send_str(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await ws.send_bytes(msg.data)
                    else:
                        break

            async def up() -> None:
                async for msg in ws:
                    if msg.type == WSMsgType.BINARY:
                        await upstream.send_bytes(msg.data)
                    elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                        break

            tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
            self.relayed += 1
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.relayed -= 1
            for t in tasks:
                t.cancel()
            code = upstream.close_code or 1000
            if code not in (1000, MOVED) and not ws.closed:
                # the upstream session broke rather than closed: if the domain has
                # left that host meanwhile, it is a move like any other
                log.info("console relay of %s from %s broke (%s, %s)", name, hop[0], code,
                         upstream.exception())
                answer = await self.locator.ask(hop, name)
                if answer is not None and not answer.get("here"):
                    code = MOVED
            await upstream.close()
            # pass "moved" (or the end) on, so the client knows to come back
            await ws.close(code=code if code in (1000, MOVED) else 1011)
        return ws

    async def log(self, name: str, tail: int | None, relay: bool) -> bytes:
        if name in self.svc.domains:
            return ConsoleLog(self.svc.paths(name).root).tail(tail)
        if not relay:
            raise NotFound(f"no domain named {name!r} on host {self.host.name}")
        hop = await self.locator.locate(name)
        query = f"?tail={tail}" if tail is not None else ""
        async with peer_client(self.host, *hop, timeout=30) as peer:
            data = await peer.request("GET", f"/v1/relocation/consoles/{name}/log{query}")
        if not isinstance(data, bytes):
            raise FerryError(f"unexpected answer for the console log of {name}")
        return data


async def _forward_input(ws: web.WebSocketResponse, hub: ConsoleHub) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await hub.send(msg.data)
        elif msg.type == WSMsgType.TEXT:
            await hub.send(msg.data.encode())
        elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            break
