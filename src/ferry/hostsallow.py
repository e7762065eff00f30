"""``hosts_allow``: which peers may open a connection to the relocation API.

Patterns, as xend's ``xend-relocation-hosts-allow``: an IP address
(``192.0.2.7``), a CIDR range (``192.0.2.0/24``), or a regular expression
matched against the peer's address and its reverse-DNS name
(``^host-[0-9]+\\.example\\.org$``). The default is localhost only.

``AllowGate`` enforces it at the socket: a connection from elsewhere is
aborted in ``connection_made``, before a byte of it is read (before the TLS
handshake too), and logged with the peer's address.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable, Sequence

from ferry.tls import Identity, identity

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

    def quick(self, address: str) -> bool | None:
        """The verdict from the address alone, or None if a reverse-DNS lookup
        (which may block) is needed to decide."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if any(ip in net for net in self._nets):
            return True
        if not self._regexes:
            return False
        if any(rx.search(address) for rx in self._regexes):
            return True
        return None

    def by_names(self, address: str) -> bool:
        """The regexes against the address's reverse names (blocks on DNS)."""
        return any(rx.search(name) for rx in self._regexes
                   for name in _reverse_names(address))

    def permits(self, address: str) -> bool:
        verdict = self.quick(address)
        return self.by_names(address) if verdict is None else verdict


@functools.lru_cache(maxsize=256)
def _reverse_names(address: str) -> tuple[str, ...]:
    try:
        name, aliases, _ = socket.gethostbyaddr(address)
    except OSError:
        return ()
    return (name, *aliases)


Target = Callable[[], asyncio.Protocol]
# (the peer's certificate or None without TLS, its address) -> where its requests
# go, or why it is refused
Router = Callable[[Identity | None, str], Target | str]
HANDSHAKE_TIMEOUT = 10.0


_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "HTTP_REQUEST": "plain HTTP, not TLS",
    "WRONG_VERSION_NUMBER": "not TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "not TLS 1.3",
}


def _why(exc: BaseException) -> str:
    """A handshake failure in words: OpenSSL's verify message ("certificate has
    expired", "unable to get local issuer certificate") or its reason code."""
    verify = getattr(exc, "verify_message", None)
    if verify:
        return f"client certificate rejected: {verify}"
    reason = getattr(exc, "reason", None)
    if reason:
        return _REASONS.get(str(reason), str(reason))
    return str(exc) or type(exc).__name__


class AllowGate(asyncio.Protocol):
    """Wraps each accepted connection: refuses peers outside ``hosts_allow`` before
    a byte is read, then (with ``tls``) runs the TLS handshake, and hands the
    connection to the protocol ``router`` picks for the peer's certificate, or
    drops it with the router's reason. Every refusal is logged with the address."""

    def __init__(self, allow: HostsAllow, router: Router, listener: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self._allow = allow
        self._router = router
        self._listener = listener
        self._tls = tls
        self._address = "?"
        self._inner: asyncio.Protocol | None = None
        self._early: list[bytes] = []     # data decrypted before the router decided
        self._lost = False
        self._early_eof = False           # EOF before the router decided
        self._handshake: asyncio.Task[None] | None = None

    def _refuse(self, transport: asyncio.BaseTransport, why: str) -> None:
        log.warning("refused a connection from %s to %s: %s", self._address,
                    self._listener, why)
        # abort, not close: drop at once, without reading what the peer sent
        transport.abort()  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._address = peer[0] if peer else "?"
        verdict = self._allow.quick(self._address)
        if verdict is False:
            return self._refuse(transport, "not in hosts_allow")
        if verdict is True and self._tls is None:
            return self._attach(transport, None)
        # reverse DNS and the handshake take time: not in this callback
        transport.pause_reading()  # type: ignore[attr-defined]
        self._handshake = asyncio.get_running_loop().create_task(
            self._admit(transport, check_names=verdict is None))

    async def _admit(self, raw: asyncio.BaseTransport, check_names: bool) -> None:
        if check_names:
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, self._allow.by_names, self._address):
                return self._refuse(raw, "not in hosts_allow")
        if self._tls is None:
            raw.resume_reading()  # type: ignore[attr-defined]
            return self._attach(raw, None)
        assert self._tls is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                raw, self, self._tls, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:  # every failure is a refusal
            return self._refuse(raw, f"TLS handshake failed: {_why(exc)}")
        if tls is None or self._lost:
            raw.abort()  # type: ignore[attr-defined]
            return
        try:
            self._attach(tls, identity(tls.get_extra_info("peercert")))
        except Exception:
            log.exception("connection from %s to %s: cannot serve it", self._address,
                          self._listener)
            tls.abort()

    def _attach(self, transport: asyncio.BaseTransport, who: Identity | None) -> None:
        target = self._router(who, self._address)
        if isinstance(target, str):
            return self._refuse(transport, target)
        if who is not None:
            log.debug("connection from %s to %s: %s", self._address, self._listener, who)
        self._inner = target()
        self._inner.connection_made(transport)
        for data in self._early:
            self._inner.data_received(data)
        self._early.clear()
        if self._early_eof:
            self._inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        elif self._tls is not None:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            self._early_eof = True
            return True  # keep the transport open until the router has decided
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
