"""Where does a domain run now? Following migration records from host to host.

Each host remembers where it sent a domain last (its newest completed outgoing
migration); ``DomainLocator.locate`` follows that trail through the peers'
relocation API (``whereabouts``), and if the trail ends without finding the
domain, asks every configured peer. Used by the console relay; the cluster
view and evacuation will build on it.
"""
from __future__ import annotations

import logging
from typing import Any

from ferry.client import peer_client
from ferry.domains import DomainService
from ferry.errors import FerryError, NotFound
from ferry.hostconfig import HostConfig
from ferry.migration.models import JobState, Role
from ferry.store import Store

log = logging.getLogger(__name__)

# a host: its name (or address) and its TCP endpoint
Hop = tuple[str, tuple[str, int]]
MAX_HOPS = 8
ASK_TIMEOUT = 5.0


class DomainLocator:
    def __init__(self, host: HostConfig, svc: DomainService, store: Store) -> None:
        self.host = host
        self.svc = svc
        self.store = store

    def next_hop(self, name: str) -> Hop | None:
        """Where this host sent ``name`` last (the newest completed migration away):
        (the host's name, its endpoint)."""
        for rec in reversed(self.store.migrations(state=JobState.completed.value)):
            if rec["domain"] == name and rec["role"] == Role.source.value:
                try:
                    return self.host.resolve_peer(rec["dest"])
                except ValueError:
                    return None
        return None

    async def locate(self, name: str) -> Hop:
        """The host that has ``name`` (its name and endpoint); NotFound if none."""
        seen: set[tuple[str, int]] = set()
        hop = self.next_hop(name)
        while hop is not None and hop[1] not in seen and len(seen) < MAX_HOPS:
            seen.add(hop[1])
            answer = await self.ask(hop, name)
            if answer is None:
                break
            if answer.get("here"):
                return hop
            nxt = answer.get("next")
            hop = (str(nxt[0]), (str(nxt[1]), int(nxt[2]))) if nxt else None
        for peer in self.host.peers:
            try:
                hop = self.host.resolve_peer(peer.name)
            except ValueError:
                continue
            if hop[1] in seen:
                continue
            answer = await self.ask(hop, name)
            if answer and answer.get("here"):
                return hop
        raise NotFound(f"no domain named {name!r} on host {self.host.name} or its peers",
                       domain=name)

    def whereabouts(self, name: str) -> dict[str, Any]:
        """What a peer's ``locate`` asks: is it here, or where did it go?"""
        if name in self.svc.domains:
            return {"here": True}
        hop = self.next_hop(name)
        return {"here": False, "next": [hop[0], *hop[1]] if hop else None}

    async def ask(self, hop: Hop, name: str) -> dict[str, Any] | None:
        """A peer's whereabouts answer for ``name``; None if it doesn't answer."""
        try:
            async with peer_client(self.host, *hop, timeout=ASK_TIMEOUT) as peer:
                answer = await peer.request("GET", f"/v1/relocation/whereabouts/{name}")
        except FerryError as exc:
            log.info("locating %s: %s did not answer: %s", name, hop[0], exc.message)
            return None
        return answer if isinstance(answer, dict) else None
