"""Async client of ferryd's API: over its Unix socket, or over TCP with mutual TLS.

Answers come back as the typed models (``HostInfo``, ``DomainInfo``,
``JobRecord``, ...). Every error comes back as the FerryError subclass the daemon raised
(structured JSON, never a string to parse); a daemon that can't be reached
is a FerryError too, naming the socket.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from ferry.errors import FerryError, Refused, Unreachable
from ferry.hostconfig import HostConfig, parse_endpoint
from ferry.migration.models import JobRecord, MigrationCheck
from ferry.models import DomainInfo, HostInfo
from ferry.tls import TlsFiles, client_context
from ferry.validation import describe

M = TypeVar("M", bound=BaseModel)

DEFAULT_SOCKET = Path("/var/lib/ferry/ferryd.sock")
# seconds to open a connection to a ferryd, TCP and TLS handshake included: a host
# that drops packets is given up on this fast, whatever the call's own timeout
CONNECT_TIMEOUT = 5.0
SAVE_TIMEOUT = 3700.0  # s: a save or restore may take long (ferryd bounds it at 3600)
HANDSHAKE_HINT = ("the host closed the connection during the TLS handshake: is this "
                  "address in its hosts_allow, and is your certificate signed by its CA?")


def _cert_reason(exc: aiohttp.ClientConnectorCertificateError) -> str:
    err = exc.certificate_error
    return str(getattr(err, "verify_message", None) or getattr(err, "reason", None) or err)


def _os_reason(exc: aiohttp.ClientConnectorError, server_name: str | None) -> str:
    """Why a connection failed, in words (aiohttp leaves strerror None when the
    peer hung up during the TLS handshake)."""
    reason = exc.os_error.strerror
    if reason:
        return str(reason)
    if server_name is not None:
        return HANDSHAKE_HINT
    return repr(exc.os_error)


def peer_client(host: HostConfig, peer: str, endpoint: tuple[str, int],
                timeout: float | None) -> FerryClient:
    """A client from host ``host`` to its peer ``peer`` (a name, or an address when
    the peer is not configured by name) at ``endpoint``: mutual TLS with the
    host's certificate, and the peer's certificate must name ``peer``."""
    if host.tls is None:
        raise Refused(f"host {host.name} has no [tls] configured, so it cannot reach "
                      "other hosts (Ferry's TCP API is mutual TLS only)")
    try:
        parse_endpoint(peer, 7790)
        server_name = endpoint[0]  # an address: its certificate must name it
    except ValueError:
        server_name = peer
    return FerryClient(endpoint=endpoint, timeout=timeout, tls=host.tls,
                       server_name=server_name, local_address=host.address)


class FerryClient:
    """Talks to one ferryd: over its Unix socket, or (``endpoint``) over TCP."""

    def __init__(self, socket: Path = DEFAULT_SOCKET, timeout: float | None = 600.0,
                 endpoint: tuple[str, int] | None = None, tls: TlsFiles | None = None,
                 server_name: str | None = None, local_address: str | None = None) -> None:
        """Over TCP (``endpoint``) only with ``tls``: our certificate, and the CA
        the server's must be signed by; the server's must name ``server_name``
        (default: the endpoint's address). ``local_address``: where to connect from
        (a host connects from its own address, which its certificate names)."""
        self.socket = socket
        self.server_name: str | None = None
        connector: aiohttp.BaseConnector
        if endpoint is None:
            connector = aiohttp.UnixConnector(path=str(socket))
            self.base = "http://ferryd"
            self.where = str(socket)
        else:
            if tls is None:
                raise FerryError(f"refusing to reach {endpoint[0]}:{endpoint[1]} without "
                                 "TLS: no certificate configured")
            self.server_name = server_name or endpoint[0]
            connector = aiohttp.TCPConnector(
                force_close=True, ssl=client_context(tls),
                local_addr=(local_address, 0) if local_address else None)
            self.base = f"https://{endpoint[0]}:{endpoint[1]}"
            self.where = f"{self.server_name} ({endpoint[0]}:{endpoint[1]})"
        self._timeout = timeout
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=CONNECT_TIMEOUT))

    async def __aenter__(self) -> FerryClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: Any = None,
                      timeout: float | None = None) -> Any:
        # no `timeout` argument: the session's (aiohttp reads timeout=None as "none")
        extra: dict[str, Any] = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(
            total=timeout, connect=min(timeout, CONNECT_TIMEOUT))}
        try:
            async with self._session.request(
                    method, self.base + path,
                    data=None if body is None else json.dumps(body),
                    headers={"Content-Type": "application/json", "X-Ferry": "1"},
                    server_hostname=self.server_name, **extra) as resp:
                raw = await resp.read()
                ctype = resp.content_type
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Unreachable(f"ferryd at {self.where} is not who we expected: "
                              f"{_cert_reason(exc)}") from exc
        except aiohttp.ClientSSLError as exc:
            raise Unreachable(f"TLS with ferryd at {self.where} failed: {exc.os_error}"
                              ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"cannot reach ferryd at {self.where}: "
                              f"{_os_reason(exc, self.server_name)}") from exc
        except TimeoutError as exc:
            raise Unreachable(f"ferryd at {self.where} did not answer {method} {path} "
                              "in time") from exc
        except aiohttp.ClientOSError as exc:
            # a reset right after connecting: the peer's TLS gate refused us
            hangup = exc.errno in (errno.ECONNRESET, errno.EPIPE) and self.server_name
            raise Unreachable(f"lost ferryd at {self.where} before it answered"
                              + (f": {HANDSHAKE_HINT}" if hangup else f": {exc!r}")) from exc
        except aiohttp.ServerDisconnectedError as exc:
            hint = f": {HANDSHAKE_HINT}" if self.server_name else ""
            raise Unreachable(f"lost ferryd at {self.where} before it answered{hint}"
                              ) from exc
        except aiohttp.ClientError as exc:
            raise Unreachable(f"lost ferryd at {self.where}: {exc!r}") from exc
        if ctype != "application/json":
            if status >= 400:
                raise FerryError(f"ferryd answered {status}: {raw[:200]!r}")
            return raw
        data = json.loads(raw)
        if status >= 400:
            raise FerryError.from_json(data.get("error", {"message": str(data)}))
        return data

    # -- the API, one method per endpoint: typed answers --------------------------------
    def _as(self, model: type[M], data: Any) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise FerryError(f"ferryd at {self.where} answered in a form this client "
                             f"does not understand ({describe(exc)}): is it another "
                             "version of Ferry?") from exc

    def _as_list(self, model: type[M], data: Any) -> list[M]:
        if not isinstance(data, list):
            raise FerryError(f"ferryd at {self.where} answered {type(data).__name__}, "
                             "not a list")
        return [self._as(model, item) for item in data]

    async def host(self) -> HostInfo:
        return self._as(HostInfo, await self.request("GET", "/v1/host"))

    async def set_maintenance(self, on: bool) -> HostInfo:
        return self._as(HostInfo, await self.request("POST", "/v1/host/maintenance",
                                                     {"on": on}))

    async def evacuate(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("POST", "/v1/host/evacuate", body)
        return out

    async def evacuation(self) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", "/v1/host/evacuation")
        return out

    async def domains(self) -> list[DomainInfo]:
        return self._as_list(DomainInfo, await self.request("GET", "/v1/domains"))

    async def domain(self, name: str) -> DomainInfo:
        return self._as(DomainInfo, await self.request("GET", f"/v1/domains/{name}"))

    async def define(self, config: dict[str, Any], start: bool = False) -> DomainInfo:
        return self._as(DomainInfo, await self.request(
            "POST", "/v1/domains", {"config": config, "start": start}))

    async def undefine(self, name: str) -> None:
        await self.request("DELETE", f"/v1/domains/{name}")

    async def action(self, name: str, action: str, **body: Any) -> DomainInfo:
        return self._as(DomainInfo, await self.request(
            "POST", f"/v1/domains/{name}/{action}", body or None))

    async def console_log(self, name: str, tail: int | None = None) -> bytes:
        query = f"?tail={tail}" if tail is not None else ""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/domains/{name}/console/log{query}")

    async def ws(self, path: str, params: dict[str, str] | None = None
                 ) -> aiohttp.ClientWebSocketResponse:
        """A websocket to ``path``; connection errors become FerryError."""
        try:
            return await self._session.ws_connect(self.base + path, params=params or {},
                                                  heartbeat=20,
                                                  server_hostname=self.server_name)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Unreachable(f"ferryd at {self.where} is not who we expected: "
                              f"{_cert_reason(exc)}") from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise FerryError(f"ferryd at {self.where} refused {path} ({exc.status})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"cannot reach ferryd at {self.where}: "
                              f"{_os_reason(exc, self.server_name)}") from exc

    async def console(self, name: str, start: int | None = None
                      ) -> aiohttp.ClientWebSocketResponse:
        """A websocket to the domain's console, from byte offset ``start`` (default:
        now). See ferry.api.consoles for the protocol."""
        params = {} if start is None else {"from": str(start)}
        try:
            return await self._session.ws_connect(f"{self.base}/v1/domains/{name}/console",
                                                  params=params)
        except aiohttp.WSServerHandshakeError as exc:
            # the daemon refused before upgrading: fetch the structured reason
            await self.domain(name)
            raise FerryError(f"console of {name} is not available ({exc.status})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"cannot reach ferryd at {self.where}: "
                              f"{_os_reason(exc, self.server_name)}") from exc

    # -- migration --------------------------------------------------------------------
    async def migrate(self, name: str, **body: Any) -> JobRecord:
        return self._as(JobRecord, await self.request(
            "POST", f"/v1/domains/{name}/migrate", {**body, "check": False}))

    async def cluster_hosts(self) -> list[dict[str, Any]]:
        return list(await self.request("GET", "/v1/cluster/hosts"))

    async def cluster_domains(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/v1/cluster/domains"))

    async def pools(self) -> list[dict[str, Any]]:
        return list(await self.request("GET", "/v1/pools"))

    async def disks(self, pool: str | None = None) -> list[dict[str, Any]]:
        return list(await self.request("GET", f"/v1/pools/{pool}/disks" if pool
                                       else "/v1/disks"))

    async def create_disk(self, pool: str, **body: Any) -> dict[str, Any]:
        return dict(await self.request("POST", f"/v1/pools/{pool}/disks", body))

    async def delete_disk(self, pool: str, image: str) -> dict[str, Any]:
        from urllib.parse import quote
        return dict(await self.request("DELETE", f"/v1/pools/{quote(pool)}/disks/"
                                       f"{quote(image, safe='/')}"))

    async def recover_migration(self, name: str) -> JobRecord:
        return self._as(JobRecord, await self.request(
            "POST", f"/v1/domains/{name}/recover"))

    async def check_migration(self, name: str, **body: Any) -> MigrationCheck:
        return self._as(MigrationCheck, await self.request(
            "POST", f"/v1/domains/{name}/migrate", {**body, "check": True}))

    async def jobs(self) -> list[JobRecord]:
        return self._as_list(JobRecord, await self.request("GET", "/v1/jobs"))

    async def job(self, job_id: str) -> JobRecord:
        return self._as(JobRecord, await self.request("GET", f"/v1/jobs/{job_id}"))

    async def job_log(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", f"/v1/jobs/{job_id}/log")
        return out

    async def events(self, domain: str | None = None) -> aiohttp.ClientWebSocketResponse:
        """The host's events as they happen (``ferry.api.events``)."""
        return await self.ws("/v1/events", {"domain": domain} if domain else None)

    async def abort_job(self, job_id: str) -> JobRecord:
        return self._as(JobRecord, await self.request("POST", f"/v1/jobs/{job_id}/abort"))

    async def save(self, name: str, path: str) -> dict[str, Any]:
        res: dict[str, Any] = await self.request(
            "POST", f"/v1/domains/{name}/save", {"path": path}, timeout=SAVE_TIMEOUT)
        return res

    async def restore(self, path: str) -> DomainInfo:
        return self._as(DomainInfo, await self.request(
            "POST", "/v1/restore", {"path": path}, timeout=SAVE_TIMEOUT))

    async def steer_job(self, job_id: str, **limits: int) -> JobRecord:
        return self._as(JobRecord, await self.request(
            "POST", f"/v1/jobs/{job_id}/set", limits))

    async def complete_job(self, job_id: str) -> JobRecord:
        return self._as(JobRecord, await self.request(
            "POST", f"/v1/jobs/{job_id}/complete"))

    async def resolve_job(self, job_id: str, runs_on: str) -> JobRecord:
        return self._as(JobRecord, await self.request(
            "POST", f"/v1/jobs/{job_id}/resolve", {"runs_on": runs_on}))

    async def migrations(self) -> list[JobRecord]:
        return self._as_list(JobRecord, await self.request("GET", "/v1/migrations"))
