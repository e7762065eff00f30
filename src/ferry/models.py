"""Domain definitions and runtime records (pydantic models).

A definition is what an operator writes in TOML; it is validated here, once,
whoever sends it (CLI, another host). Checks that need the host (does the
kernel file exist, is there memory free) live in the domain service.
"""
from __future__ import annotations

import enum
import ipaddress
import re
import secrets
import uuid as uuidlib
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
# QEMU's own -machine names look like "q35", "pc-q35-7.2", "pc-i440fx-7.2", "microvm"
MACHINE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
CPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,127}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")  # IFNAMSIZ - 1
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: beyond this, a typo
MAX_VCPUS = 255


def check_name(value: str) -> str:
    """A domain (or host) name: letters, digits, ``_ . -``, at most 63, starting
    with a letter or digit."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid name {value!r}: use letters, digits, '_', '.', '-' (at most 63), "
            "starting with a letter or digit")
    return value


Name = Annotated[str, AfterValidator(check_name)]


def _abs_path(value: Path) -> Path:
    text = str(value)
    if not value.is_absolute():
        raise ValueError(f"path {text!r} must be absolute")
    if "\0" in text or "\n" in text or any(part == ".." for part in value.parts):
        raise ValueError(f"path {text!r} must not contain '..', NUL or newlines")
    # QEMU option values use ',' as a separator: refuse it rather than escape it
    if "," in text:
        raise ValueError(f"path {text!r} must not contain ','")
    return value


AbsPath = Annotated[Path, AfterValidator(_abs_path)]

POOL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def check_pool_name(value: str) -> str:
    if not isinstance(value, str) or not POOL_RE.fullmatch(value):
        raise ValueError(f"invalid pool name {value!r}: lowercase letters, digits, '_', "
                         "'-' (at most 32), starting with a letter")
    return value


def check_image_name(value: str) -> str:
    """An image inside a pool: a relative path without '..' (``web01.qcow2``,
    ``base/debian.qcow2``)."""
    if not isinstance(value, str) or not value or len(value) > 255 or \
            value.startswith("/") or any(c in value for c in "\0\n\r,") or \
            any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"invalid image name {value!r}: a path inside its pool, without "
                         "'..', ',' or a leading '/'")
    return value


PoolName = Annotated[str, AfterValidator(check_pool_name)]
ImageName = Annotated[str, AfterValidator(check_image_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiskFormat(enum.StrEnum):
    raw = "raw"
    qcow2 = "qcow2"


class DiskBus(enum.StrEnum):
    virtio = "virtio"
    ide = "ide"
    scsi = "scsi"


class DiskCache(enum.StrEnum):
    """How the host caches a disk's writes (QEMU's cache modes). Only ``none`` and
    ``directsync`` bypass the host's page cache; on a shared pool the others can
    let the destination read stale data after a migration (refused unless
    ``--unsafe``)."""

    writeback = "writeback"        # host page cache; the guest flushes (QEMU's default)
    none = "none"                  # O_DIRECT; the guest flushes
    writethrough = "writethrough"  # host page cache; every write flushed
    directsync = "directsync"      # O_DIRECT and every write flushed
    unsafe = "unsafe"              # host page cache; the guest's flushes ignored

    @property
    def direct(self) -> bool:
        return self in (DiskCache.none, DiskCache.directsync)


class Disk(Strict):
    """A disk: an image in one of the host's storage pools (``pool`` + ``image``),
    or a ``path`` inside one. Each host resolves the pool to its own directory
    (``ferry.storage.localize``), so a definition that names pools moves between
    hosts whose pools live at different paths."""

    path: AbsPath | None = None
    pool: PoolName | None = None
    image: ImageName | None = None
    format: DiskFormat = DiskFormat.qcow2
    bus: DiskBus = DiskBus.virtio
    readonly: bool = False
    cache: DiskCache = DiskCache.writeback

    @model_validator(mode="after")
    def _where(self) -> Disk:
        if (self.pool is None) != (self.image is None):
            raise ValueError("a disk names both 'pool' and 'image' (or a 'path')")
        if self.path is None and self.pool is None:
            raise ValueError("a disk needs 'pool' and 'image', or 'path'")
        return self

    @property
    def where(self) -> str:
        """How the operator named it: ``pool:image`` or the path."""
        return f"{self.pool}:{self.image}" if self.pool else str(self.path)


class NicMode(enum.StrEnum):
    bridge = "bridge"   # a tap on a host bridge
    user = "user"       # QEMU's user-mode network (slirp), for tests and laptops
    none = "none"       # a NIC with no backend link (cable unplugged)


class NicModel(enum.StrEnum):
    virtio = "virtio-net-pci"
    e1000 = "e1000"
    rtl8139 = "rtl8139"


FORWARD_RE = re.compile(
    r"^(?P<proto>tcp|udp):(?P<haddr>[0-9.]*):(?P<hport>\d{1,5})-(?P<gaddr>[0-9.]*):(?P<gport>\d{1,5})$")


def _check_forward(value: str) -> str:
    m = FORWARD_RE.fullmatch(value)
    if not m:
        raise ValueError(f"forward {value!r} must look like 'udp:127.0.0.1:7777-:7777'")
    for key in ("haddr", "gaddr"):
        if m[key]:
            ipaddress.IPv4Address(m[key])
    for key in ("hport", "gport"):
        if not 1 <= int(m[key]) <= 65535:
            raise ValueError(f"port {m[key]} out of range in forward {value!r}")
    return value


def new_mac() -> str:
    """A random locally administered unicast MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


class Nic(Strict):
    model: NicModel = NicModel.virtio
    mac: str = Field(default_factory=new_mac)
    mode: NicMode = NicMode.user
    bridge: str | None = None
    forwards: list[Annotated[str, AfterValidator(_check_forward)]] = Field(default_factory=list)

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.lower()
        if not MAC_RE.fullmatch(value):
            raise ValueError(f"invalid MAC {value!r}")
        if int(value[:2], 16) & 1:
            raise ValueError(f"MAC {value!r} is a multicast address")
        return value

    @model_validator(mode="after")
    def _mode(self) -> Nic:
        if self.mode == NicMode.bridge:
            if not self.bridge or not BRIDGE_RE.fullmatch(self.bridge):
                raise ValueError("a bridge NIC needs 'bridge', a valid interface name")
        elif self.bridge is not None:
            raise ValueError(f"'bridge' is only for mode 'bridge', not {self.mode.value!r}")
        if self.forwards and self.mode != NicMode.user:
            raise ValueError("'forwards' is only for mode 'user'")
        return self


class Accel(enum.StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


class OnTimeout(enum.StrEnum):
    """What a live migration does when its ``timeout_s`` of pre-copy is up."""

    pause = "pause"   # stop the guest and finish as an offline migration
    abort = "abort"   # cancel; the guest keeps running on the source
    postcopy = "postcopy"  # switch to post-copy: the guest runs on at the destination


class Postcopy(enum.StrEnum):
    """Whether a live migration may switch to post-copy (the guest runs at the
    destination while the rest of its memory follows on demand)."""

    never = "never"   # pre-copy only (the default: a broken link then costs nothing)
    auto = "auto"     # when the convergence policy sees pre-copy not converging
    now = "now"       # as soon as the first pass is under way


class Compression(enum.StrEnum):
    """Compression of the multifd channels (QEMU's ``multifd-compression``)."""

    none = "none"
    zstd = "zstd"


MAX_CHANNELS = 16
StrictInt = Annotated[int, pydantic.Strict()]
StrictNumber = Annotated[float, pydantic.Strict()]   # (an int is a number too)


class MigrationSettings(Strict):
    """A migration's tunables, each of which may be left out: in a request (the
    CLI's flags), in a domain's ``[migration]`` table, in ferryd's ``[migration]``
    section. What a layer leaves out (None) the next decides, in that order, and
    then Ferry's default (``ferry.migration.models.MigrateOptions``)."""

    # strict numbers: `timeout_s = true` in a config file is a mistake, not 1 s
    max_downtime_ms: StrictInt | None = Field(default=None, ge=1, le=600_000)
    bandwidth_mibps: StrictInt | None = Field(default=None, ge=0, le=1_000_000,
                                              description="0: unlimited")
    timeout_s: StrictNumber | None = Field(default=None, gt=0, le=86_400)
    on_timeout: OnTimeout | None = None
    postcopy: Postcopy | None = None
    parallel: StrictInt | None = Field(default=None, ge=1, le=MAX_CHANNELS,
                                       description="encrypted channels (multifd); 1: one "
                                       "stream")
    compress: Compression | None = None


class DomainConfig(Strict):
    """A domain's definition, as written in its TOML file."""

    name: Name
    uuid: uuidlib.UUID = Field(default_factory=uuidlib.uuid4)
    memory: int = Field(description="MiB", ge=16, le=MAX_MEMORY_MIB)
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    machine: str = "q35"
    cpu: str = "qemu64"
    accel: Accel = Accel.auto
    kernel: AbsPath | None = None
    initrd: AbsPath | None = None
    cmdline: str = ""
    disks: list[Disk] = Field(default_factory=list)
    nics: list[Nic] = Field(default_factory=list, max_length=8)
    serial: bool = True
    # this domain's own migration defaults, over ferryd's [migration]
    migration: MigrationSettings | None = None

    @field_validator("machine")
    @classmethod
    def _machine(cls, value: str) -> str:
        if not MACHINE_RE.fullmatch(value):
            raise ValueError(f"invalid machine type {value!r}")
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str) -> str:
        if not CPU_RE.fullmatch(value):
            raise ValueError(f"invalid CPU model {value!r}")
        return value

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, value: str) -> str:
        if len(value) > 2048 or any(c in value for c in "\0\n\r"):
            raise ValueError("cmdline must be one line of at most 2048 characters")
        return value

    @model_validator(mode="after")
    def _boot(self) -> DomainConfig:
        if self.kernel is None:
            if self.initrd is not None or self.cmdline:
                raise ValueError("'initrd' and 'cmdline' need 'kernel'")
            if not self.disks:
                raise ValueError("nothing to boot: give 'kernel' or at least one disk")
        macs = [nic.mac for nic in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("two NICs share a MAC address")
        paths = [d.path for d in self.disks if d.path is not None]
        images = [(d.pool, d.image) for d in self.disks if d.pool is not None]
        if len(set(paths)) != len(paths) or len(set(images)) != len(images):
            raise ValueError("two disks share a path")
        return self


class DomainState(enum.StrEnum):
    shutoff = "shutoff"
    running = "running"
    paused = "paused"
    stopping = "stopping"   # ACPI shutdown requested, QEMU still up
    crashed = "crashed"     # QEMU went away without being asked to


# Allowed transitions; DomainService.set_state refuses anything else.
TRANSITIONS: dict[DomainState, frozenset[DomainState]] = {
    DomainState.shutoff: frozenset({DomainState.running, DomainState.paused}),
    DomainState.running: frozenset({DomainState.paused, DomainState.stopping,
                                    DomainState.shutoff, DomainState.crashed}),
    DomainState.paused: frozenset({DomainState.running, DomainState.stopping,
                                   DomainState.shutoff, DomainState.crashed}),
    DomainState.stopping: frozenset({DomainState.shutoff, DomainState.crashed,
                                     DomainState.running, DomainState.paused}),
    DomainState.crashed: frozenset({DomainState.shutoff, DomainState.running,
                                    DomainState.paused}),
}

ACTIVE_STATES = frozenset({DomainState.running, DomainState.paused, DomainState.stopping})


class DomainInfo(BaseModel):
    """What `ferry list` / `ferry info` show."""

    model_config = ConfigDict(extra="allow")  # what a newer ferryd adds is kept

    name: str
    uuid: str
    state: DomainState
    memory: int
    vcpus: int
    accel: str | None = None
    pid: int | None = None
    state_reason: str = ""
    state_since: float = 0.0
    config: DomainConfig | None = None


class HostInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # what a newer ferryd adds is kept

    name: str
    version: str = "unknown"  # ferryd's (an older ferryd does not say)
    accel: str
    qemu: str
    qemu_version: str
    arch: str
    memory_total: int
    memory_free: int
    # MiB kept back: the host's memory_reserve plus what arriving migrations were promised
    memory_reserved: int = 0
    domains: int
    running: int
    state_dir: str
    # "ADDRESS:PORT (mutual TLS, hosts_allow ...)" or "closed"
    tcp_api: str = "closed"
    maintenance: bool = False   # takes no new domains, no incoming migrations
    registry: str = "embedded"  # where the cluster's record of owners lives


class MaintenanceRequest(Strict):
    on: bool


class DefineRequest(Strict):
    config: DomainConfig
    start: bool = False


class ShutdownRequest(Strict):
    timeout: float = Field(default=60.0, ge=0, le=3600)


ActionName = Literal["start", "pause", "unpause", "shutdown", "destroy", "reboot"]
