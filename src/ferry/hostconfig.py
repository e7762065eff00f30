"""ferryd's own configuration: one TOML file (``ferryd --config``).

Example (every key optional)::

    name = "host-a"                     # default: the machine's host name
    state_dir = "/var/lib/ferry"        # all of this host's state lives here
    socket = "/run/ferry/ferryd.sock"   # default: <state_dir>/ferryd.sock
    accel = "auto"                      # auto | kvm | tcg
    qemu = "qemu-system-x86_64"
    qemu_scope = "auto"                 # each QEMU in its own systemd scope (so a
                                        # restart of ferryd.service leaves domains
                                        # running): auto | always | never
    memory_reserve = 512                # MiB kept back for the host itself
    shutdown_timeout = 60               # s before an ACPI shutdown becomes destroy
    address = "127.0.0.1"               # this host's address (control, user-net forwards)
    control_port = 7790                 # TCP port of the API for peers and remote
                                        # operators (default 0: closed); needs [tls]
    migration_address = "127.0.0.1"     # where incoming migration streams arrive
                                        # (default: address)
    metrics_address = "127.0.0.1:9790"  # /metrics over plain HTTP for a local scraper
                                        # (default: off; the API serves it as well)
    ui_address = "127.0.0.1:7780"       # the dashboard (/ui) and the API over plain
                                        # HTTP, loopback only, for the demo (default:
                                        # off; the TCP port serves /ui over mTLS)
    hosts_allow = ["127.0.0.0/8", "::1"]  # who may connect to the relocation API:
                                        # addresses, CIDR ranges, host-name regexes
    storage_dirs = ["/var/lib/ferry/images"]  # a directory every host sees at the
                                        # same path (shared storage): the shared
                                        # pool "storage" (one at most; more: [[pools]])
    bridges = ["br0"]                   # bridges domains may use (default: any bridge)
    [announce]                          # after a migration, the destination announces
    rounds = 5                          # the guest's MACs (QEMU announce-self): rounds,
    initial_ms = 50                     # first gap, growing by step_ms up to max_ms
    max_ms = 550
    step_ms = 100
    [migration]                         # defaults of `ferry migrate` from this host
    max_downtime_ms = 300               # (a domain's own [migration] table and the
    bandwidth_mibps = 0                 # CLI's flags come first); 0: no cap
    timeout_s = 600                     # pre-copy seconds before on_timeout
    on_timeout = "pause"                # pause | abort | postcopy
    postcopy = "never"                  # never | auto | now
    parallel = 2                        # TLS channels (default: cores, at most 4)
    compress = "none"                   # none | zstd (of the channels)
    [limits]                            # migrations this host runs at once; more
    outgoing = 2                        # wait (queued) until one ends
    incoming = 2
    bandwidth_mibps = 0                 # shared by its outgoing migrations (0: none)
    [cluster]                           # who owns each domain (docs/cluster.md):
    backend = "embedded"                # embedded | etcd
    endpoints = ["127.0.0.1:2379"]      # etcd's client URLs, IPV4:PORT
    ca = "/etc/ferry/etcd/ca.pem"       # etcd over TLS (cert and key: as a client)
    [tls]                               # mutual TLS on the TCP port (ferry pki)
    ca = "/etc/ferry/pki/ca.pem"        # the cluster CA
    cert = "/etc/ferry/pki/host-a.pem"  # this host's certificate (ferry pki issue --host)
    key = "/etc/ferry/pki/host-a.key"
    [[pools]]                           # storage pools: a disk names a pool and an
    name = "local"                      # image in it (pool = "local", image =
    path = "/var/lib/ferry/local"       # "web01.qcow2"), or a path inside one; a
    shared = false                      # migration copies disks of pools that are
                                        # not shared (--copy-storage auto)
    [[peers]]                           # other hosts, so they can be named
    name = "host-b"
    address = "192.0.2.2"               # optionally "ADDRESS:PORT"
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ferry import hostsallow
from ferry.errors import InvalidInput
from ferry.models import AbsPath, Accel, MigrationSettings, PoolName, check_name
from ferry.tls import TlsFiles
from ferry.validation import describe


class Pool(BaseModel):
    """A directory of disk images. ``shared``: every host sees the same files at
    this pool's path (NFS, a cluster file system), so a migration leaves its
    disks where they are; otherwise each host has its own, and a migration
    copies the disks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PoolName
    path: AbsPath
    shared: bool = False

    def holds(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return real.is_relative_to(os.path.realpath(self.path))


class Peer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    address: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_endpoint(value, 7790)
        return value


def parse_endpoint(text: str, default_port: int) -> tuple[str, int]:
    """``"127.0.0.2"`` or ``"127.0.0.2:7790"`` → (address, port); IPv4 only for now."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    try:
        ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IPv4 address (with optional :port)") from exc
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


class Announce(BaseModel):
    """QEMU's announce-self after switch-over: ``rounds`` gratuitous RARPs per MAC,
    the first ``initial_ms`` apart, each gap ``step_ms`` longer, at most ``max_ms``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(default=5, ge=1, le=100)
    initial_ms: int = Field(default=50, ge=1, le=100_000)
    max_ms: int = Field(default=550, ge=1, le=100_000)
    step_ms: int = Field(default=100, ge=1, le=100_000)

    def qmp(self) -> dict[str, int]:
        return {"rounds": self.rounds, "initial": self.initial_ms, "max": self.max_ms,
                "step": self.step_ms}


class Limits(BaseModel):
    """How much migrating a host does at once: jobs beyond ``outgoing`` (as
    source) or ``incoming`` (as destination) wait, queued, until one ends;
    ``bandwidth_mibps`` (0: no budget) is shared evenly by the outgoing
    migrations that are copying, each also within its own cap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outgoing: int = Field(default=2, ge=1, le=64)
    incoming: int = Field(default=2, ge=1, le=64)
    bandwidth_mibps: int = Field(default=0, ge=0, le=1_000_000)


class ClusterSettings(BaseModel):
    """``[cluster]``: where the record of which host owns each domain lives
    (``ferry.fleet.registry``): ``embedded`` (each host's own database, peers
    asked) or ``etcd`` (``endpoints``, optionally over TLS with ``ca`` and a
    client ``cert``/``key``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["embedded", "etcd"] = "embedded"
    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1,
                                 max_length=16)
    prefix: str = Field(default="/ferry", pattern=r"^/[A-Za-z0-9_./-]{0,100}$")
    ca: AbsPath | None = None
    cert: AbsPath | None = None
    key: AbsPath | None = None
    lock_ttl_s: int = Field(default=10, ge=2, le=300)
    timeout_s: float = Field(default=3.0, gt=0, le=60)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for e in value:
            host, _, port = e.rpartition(":")
            try:
                ipaddress.IPv4Address(host)
                ok = port.isdigit() and 0 < int(port) < 65536
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"endpoint {e!r}: give IPV4:PORT, e.g. 127.0.0.1:2379")
        return value

    @model_validator(mode="after")
    def _pair(self) -> ClusterSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key (or neither)")
        if self.cert is not None and self.ca is None:
            raise ValueError("a client cert needs the ca that etcd's certificate is "
                             "checked against")
        return self


class HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    state_dir: AbsPath = Path("/var/lib/ferry")
    socket: AbsPath | None = None
    accel: Accel = Accel.auto
    qemu: str = "qemu-system-x86_64"
    # each QEMU in a systemd scope of its own, so a restart of ferryd's service
    # leaves the domains running: auto (when systemd runs), always, never
    qemu_scope: Literal["auto", "always", "never"] = "auto"
    memory_reserve: int = Field(default=512, ge=0)
    shutdown_timeout: float = Field(default=60.0, ge=0, le=3600)
    address: str = "127.0.0.1"
    control_port: int = Field(default=0, ge=0, le=65535)
    migration_address: str | None = None
    # plain HTTP with /metrics only, for a local scraper (e.g. "127.0.0.1:9790");
    # None: off (the management API serves /metrics as well)
    metrics_address: str | None = None
    # the dashboard and the whole management API over plain HTTP, without
    # certificates, for the demo (e.g. "127.0.0.1:7780"); loopback only; None: off
    ui_address: str | None = None
    # where setup installed the dashboard's xterm.js (npm's @xterm/xterm)
    web_vendor: AbsPath = Path("/var/cache/ferry/web/node_modules")
    peers: list[Peer] = Field(default_factory=list)
    hosts_allow: list[str] = Field(default_factory=lambda: list(hostsallow.DEFAULT))
    # a shared directory (every host sees it at the same path): the shared pool
    # "storage" (one at most; disks may only live inside a pool)
    storage_dirs: list[AbsPath] = Field(default_factory=lambda: [Path("/var/lib/ferry/images")])
    pools: list[Pool] = Field(default_factory=list)
    # bridges domains may use; None: any bridge that exists
    bridges: list[str] | None = None
    announce: Announce = Field(default_factory=Announce)
    # this host's migration defaults (a request's flags and a domain's own
    # [migration] table come first)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    limits: Limits = Field(default_factory=Limits)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    tls: TlsFiles | None = None

    @model_validator(mode="after")
    def _tls_if_open(self) -> HostConfig:
        if self.control_port and self.tls is None:
            raise ValueError(f"control_port {self.control_port} is open but [tls] is not "
                             "configured: Ferry's TCP API is mutual TLS only (see "
                             "'ferry pki'); set [tls] ca, cert, key, or control_port = 0")
        return self

    @model_validator(mode="after")
    def _pool_names(self) -> HostConfig:
        if len(self.storage_dirs) > 1:
            # (named by position, a pool would change its name on a host that lists
            # them in another order, and a definition would find the wrong disk)
            first, *rest = self.storage_dirs
            tables = " ".join(f'[[pools]] name = "storage-{i}" path = "{d}" shared = true'
                              for i, d in enumerate(rest, start=2))
            raise ValueError(f"storage_dirs lists {len(self.storage_dirs)} directories: "
                             f"only one is allowed (the shared pool 'storage'); keep "
                             f'storage_dirs = ["{first}"] and give each other directory '
                             f"a [[pools]] table of its own, one key per line ({tables}: "
                             "the names older Ferry gave them)")
        names = [p.name for p in self.storage_pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two storage pools are named {dup[0]!r} (storage_dirs is "
                             "the shared pool 'storage')")
        return self

    @property
    def storage_pools(self) -> list[Pool]:
        """The configured pools, then ``storage_dirs``' one as the shared pool
        ``storage``."""
        implicit = [Pool(name="storage", path=d, shared=True) for d in self.storage_dirs]
        return [*self.pools, *implicit]

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.storage_pools if p.name == name), None)

    def pool_of(self, path: Path) -> Pool | None:
        """The pool ``path`` lies in (the deepest, if pools nest)."""
        found = [p for p in self.storage_pools if p.holds(path)]
        return max(found, key=lambda p: len(Path(os.path.realpath(p.path)).parts),
                   default=None)

    @field_validator("ui_address")
    @classmethod
    def _ui_address(cls, value: str | None) -> str | None:
        if value is not None:
            host, _ = parse_endpoint(value, 7780)
            if not ipaddress.IPv4Address(host).is_loopback:
                raise ValueError(f"ui_address {value}: plain HTTP without certificates "
                                 "is for this machine only (127.0.0.0/8); over the "
                                 "network, open the dashboard on the TCP port (mutual TLS, "
                                 "an operator certificate in the browser)")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_endpoint(value, 9790)
        return value

    @field_validator("hosts_allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        hostsallow.HostsAllow(value)  # raises ValueError with the bad pattern
        return value

    @field_validator("address", "migration_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.IPv4Address(value)
        return value

    def in_storage(self, path: Path) -> bool:
        """Is ``path`` (symlinks resolved) inside one of the storage pools?"""
        return self.pool_of(path) is not None

    @property
    def migration_ip(self) -> str:
        return self.migration_address or self.address

    def resolve_peer(self, dest: str) -> tuple[str, tuple[str, int]]:
        """A destination given as a peer's name or as ``ADDRESS[:PORT]`` →
        (name or address, (address, port)). Raises ValueError if it is neither."""
        for peer in self.peers:
            if peer.name == dest:
                return peer.name, parse_endpoint(peer.address, 7790)
        try:
            endpoint = parse_endpoint(dest, 7790)
        except ValueError:
            known = ", ".join(p.name for p in self.peers) or "none"
            raise ValueError(f"unknown destination {dest!r}: not a peer of {self.name} "
                             f"(peers: {known}) nor an IPv4 address") from None
        for peer in self.peers:
            if parse_endpoint(peer.address, 7790) == endpoint:
                return peer.name, endpoint
        return dest, endpoint

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / "ferryd.sock"


def load_host_config(path: Path | None, **overrides: object) -> HostConfig:
    """Read ferryd's TOML config; ``overrides`` (from the command line) win.

    Raises InvalidInput with a readable reason for malformed TOML or bad keys."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise InvalidInput(f"cannot read config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"malformed TOML in {path}: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return HostConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"bad config {path}: {describe(exc)}") from exc
