"""``hosts_allow``: which peers may open a connection to the relocation API.

Patterns, as xend's ``xend-relocation-hosts-allow``: an IP address
(``192.0.2.7``), a CIDR range (``192.0.2.0/24``), or a regular expression
matched against the peer's address and its reverse-DNS name
(``^host-[0-9]+\\.example\\.org$``). The default is localhost only.

``AllowGate`` enforces it at the socket: a connection from elsewhere is
aborted in ``connection_made``, before a byte of it is read, and logged with
the peer's address.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

DEFAULT = ("127.0.0.0/8", "::1")


class HostsAllow:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._regexes: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                self._nets.append(ipaddress.ip_network(pattern, strict=False))
            except ValueError:
                try:
                    self._regexes.append(re.compile(pattern))
                except re.error as exc:
                    raise ValueError(f"hosts_allow pattern {pattern!r} is neither an "
                                     f"address, a CIDR range nor a regex: {exc}") from exc

    def permits(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if any(ip in net for net in self._nets):
            return True
        if not self._regexes:
            return False
        names = [address, *_reverse_names(address)]
        return any(rx.search(name) for rx in self._regexes for name in names)


@functools.lru_cache(maxsize=256)
def _reverse_names(address: str) -> tuple[str, ...]:
    try:
        name, aliases, _ = socket.gethostbyaddr(address)
    except OSError:
        return ()
    return (name, *aliases)


class AllowGate(asyncio.Protocol):
    """Wraps the protocol of each accepted connection; refuses disallowed peers
    before the wrapped protocol (the HTTP parser) ever exists."""

    def __init__(self, allow: HostsAllow, inner_factory: Callable[[], asyncio.Protocol],
                 listener: str) -> None:
        self._allow = allow
        self._factory = inner_factory
        self._listener = listener
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if peer else "?"
        if not self._allow.permits(address):
            log.warning("refused a connection from %s to %s: not in hosts_allow", address,
                        self._listener)
            # abort, not close: drop at once, without reading what the peer sent
            transport.abort()  # type: ignore[attr-defined]
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
