"""One view of every host: asked from any host, answered within a bound.

This host answers for itself; each peer (``[[peers]]``) is asked over the
relocation API with the host's certificate, all at once, each within
``ASK_TIMEOUT`` seconds: a host that does not answer in time is shown as
unreachable, with why, and nothing waits on it any longer.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from ferry.client import FerryClient, peer_client
from ferry.domains import DomainService
from ferry.errors import FerryError
from ferry.hostconfig import HostConfig, parse_endpoint
from ferry.models import DomainInfo, HostInfo

ASK_TIMEOUT = 3.0   # s a peer has to answer


class HostView(BaseModel):
    """One host as the cluster view shows it."""

    name: str
    address: str
    reachable: bool
    error: str | None = None
    answered_in_s: float | None = None
    info: HostInfo | None = None
    jobs: int = 0             # migrations running there (outgoing and incoming)


class DomainView(BaseModel):
    host: str
    domain: DomainInfo


PeerConnector = Callable[[str, tuple[str, int], float | None], FerryClient]


class ClusterView:
    def __init__(self, host: HostConfig, svc: DomainService,
                 hostinfo: Callable[[], HostInfo], jobs: Callable[[], int],
                 connect: PeerConnector | None = None) -> None:
        self.host = host
        self.svc = svc
        self.hostinfo = hostinfo
        self.jobs = jobs
        self.connect: PeerConnector = connect or (
            lambda name, endpoint, timeout: peer_client(host, name, endpoint, timeout))

    def _peers(self) -> list[tuple[str, tuple[str, int]]]:
        return [(p.name, parse_endpoint(p.address, 7790)) for p in self.host.peers]

    async def _ask(self, name: str, endpoint: tuple[str, int], path: str
                   ) -> tuple[Any, float]:
        t0 = time.monotonic()
        async with asyncio.timeout(ASK_TIMEOUT):
            async with self.connect(name, endpoint, ASK_TIMEOUT) as peer:
                return await peer.request("GET", path), time.monotonic() - t0

    async def hosts(self) -> list[HostView]:
        """This host and every peer: what each says of itself, or why it can't."""
        me = HostView(name=self.host.name,
                      address=f"{self.host.address}:{self.host.control_port}",
                      reachable=True, answered_in_s=0.0, info=self.hostinfo(),
                      jobs=self.jobs())

        async def one(name: str, endpoint: tuple[str, int]) -> HostView:
            where = f"{endpoint[0]}:{endpoint[1]}"
            try:
                data, took = await self._ask(name, endpoint, "/v1/relocation/host")
                return HostView(name=name, address=where, reachable=True,
                                answered_in_s=round(took, 3),
                                info=HostInfo.model_validate(data["info"]),
                                jobs=int(data.get("jobs", 0)))
            except TimeoutError:
                why = f"no answer within {ASK_TIMEOUT:g}s"
            except FerryError as exc:
                why = exc.message
            except (KeyError, TypeError, ValueError) as exc:
                why = f"an answer this host does not understand ({exc})"
            except Exception as exc:  # (TLS files, the socket: it is still one host)
                why = repr(exc)
            return HostView(name=name, address=where, reachable=False, error=why)

        return [me, *await asyncio.gather(*(one(n, e) for n, e in self._peers()))]

    async def domains(self) -> tuple[list[DomainView], list[HostView]]:
        """Every domain on every host that answers; the hosts that do not."""
        out = [DomainView(host=self.host.name, domain=d) for d in self.svc.infos()]
        missing = []

        async def one(name: str, endpoint: tuple[str, int]) -> None:
            where = f"{endpoint[0]}:{endpoint[1]}"
            try:
                data, _ = await self._ask(name, endpoint, "/v1/relocation/domains")
                views = [DomainView(host=name, domain=DomainInfo.model_validate(d))
                         for d in data]
                out.extend(views)  # (all of a host's, or none)
                return
            except TimeoutError:
                why = f"no answer within {ASK_TIMEOUT:g}s"
            except FerryError as exc:
                why = exc.message
            except (TypeError, ValueError) as exc:
                why = f"an answer this host does not understand ({exc})"
            except Exception as exc:
                why = repr(exc)
            missing.append(HostView(name=name, address=where, reachable=False, error=why))

        await asyncio.gather(*(one(n, e) for n, e in self._peers()))
        out.sort(key=lambda v: (v.domain.name, v.host))
        return out, missing
