"""Which ferryd the CLI talks to: the local one over its Unix socket, or any
host over TCP with an operator certificate (``ferry --host NAME|ADDRESS``).

The operator's files come from ``--ca/--cert/--key`` (or FERRY_CA, FERRY_CERT,
FERRY_KEY), else from the client configuration
(``~/.config/ferry/client.toml``, or FERRY_CLIENT_CONFIG)::

    ca = "/home/alice/.config/ferry/ca.pem"
    cert = "/home/alice/.config/ferry/alice.pem"
    key = "/home/alice/.config/ferry/alice.key"
    [[hosts]]                     # so hosts can be named on the command line
    name = "host-a"
    address = "192.0.2.1"         # optionally "ADDRESS:PORT" (default port 7790)

A host named on the command line must present a certificate with that name;
one given by address, a certificate naming that address.
"""
from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.client import FerryClient
from ferry.errors import InvalidInput, NotFound
from ferry.hostconfig import parse_endpoint
from ferry.tls import TlsFiles

DEFAULT_PORT = 7790


def client_config_path() -> Path:
    env = os.environ.get("FERRY_CLIENT_CONFIG")
    return Path(env) if env else Path.home() / ".config" / "ferry" / "client.toml"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"malformed TOML in {path}: {exc}") from exc


@dataclass
class Target:
    socket: Path
    host: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def describe(self) -> str:
        return self.host or str(self.socket)

    def client(self, timeout: float | None = 600.0) -> FerryClient:
        if self.host is None:
            return FerryClient(self.socket, timeout=timeout)
        name, endpoint, tls = self.resolve()
        return FerryClient(endpoint=endpoint, timeout=timeout, tls=tls, server_name=name)

    def resolve(self) -> tuple[str, tuple[str, int], TlsFiles]:
        """(the name the host's certificate must carry, its endpoint, our files)."""
        assert self.host is not None
        path = client_config_path()
        config = _read_config(path)
        files = {}
        for key in ("ca", "cert", "key"):
            value = getattr(self, key) or config.get(key)
            if not value:
                raise InvalidInput(
                    f"--host needs an operator certificate: give --{key} (or FERRY_"
                    f"{key.upper()}), or set {key} in {path}")
            files[key] = Path(value).expanduser().resolve()
        tls = TlsFiles.model_validate(files)
        for entry in config.get("hosts", []):
            if isinstance(entry, dict) and entry.get("name") == self.host:
                try:
                    return self.host, parse_endpoint(str(entry.get("address")), DEFAULT_PORT), tls
                except ValueError as exc:
                    raise InvalidInput(f"host {self.host} in {path}: {exc}") from exc
        try:
            endpoint = parse_endpoint(self.host, DEFAULT_PORT)
            return endpoint[0], endpoint, tls
        except ValueError:
            pass
        name, _, port = self.host.partition(":")
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NotFound(f"unknown host {name!r}: not in {path} and not resolvable "
                           f"({exc.strerror})") from exc
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise InvalidInput(f"bad port in --host {self.host!r}")
        return name, (str(infos[0][4][0]), int(port or DEFAULT_PORT)), tls
