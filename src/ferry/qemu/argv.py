"""Domain definition → QEMU command line: a pure function, tested against golden files.

Nothing here touches the host: paths for sockets and logs come in as
``RuntimePaths``, the accelerator comes in already resolved.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ferry.models import Disk, DiskBus, DiskCache, DomainConfig, NicMode


@dataclass(frozen=True)
class RuntimePaths:
    """Where one domain's QEMU keeps its sockets, pid file and logs."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.root / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"


def tap_name(config: DomainConfig, index: int, host: str) -> str:
    """The tap device of NIC ``index`` of ``config`` on host ``host``: stable, ≤ 15
    characters, and different on every host, so that while a domain migrates its
    source and destination taps never share a name (not even with both hosts in
    one network namespace)."""
    digest = hashlib.blake2s(f"{host}/{config.uuid}".encode(), digest_size=5).hexdigest()
    return f"fy{digest}n{index}"


def taps(config: DomainConfig, host: str) -> list[tuple[str, str, str]]:
    """(tap, bridge, guest MAC) of each bridged NIC of ``config`` on host ``host``."""
    return [(tap_name(config, i, host), str(nic.bridge), str(nic.mac))
            for i, nic in enumerate(config.nics) if nic.mode == NicMode.bridge]


def build_argv(config: DomainConfig, paths: RuntimePaths, *, qemu: str, accel: str,
               incoming: str | None = None, host_address: str = "",
               host_name: str = "host") -> list[str]:
    """The full argv that starts ``config`` paused (``-S``), QMP on ``paths.qmp``.

    ``incoming``, when given, is passed as ``-incoming`` (``"defer"`` for a
    migration destination). A user-net forward with no host address binds
    ``host_address``: the same definition then listens on each host's own
    address, wherever the domain runs. ``host_name`` names the bridged NICs'
    taps (see tap_name)."""
    argv = [
        qemu,
        "-name", f"guest={config.name},debug-threads=on",
        "-uuid", str(config.uuid),
        "-machine", config.machine,
        "-accel", accel,
        "-cpu", config.cpu,
        "-m", f"{config.memory}M",
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-msg", "timestamp=on",
        "-S",
        "-pidfile", str(paths.pidfile),
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
    ]
    if config.kernel is not None:
        argv += ["-kernel", str(config.kernel)]
        if config.initrd is not None:
            argv += ["-initrd", str(config.initrd)]
        if config.cmdline:
            argv += ["-append", config.cmdline]
    argv += _disk_args(config)
    argv += _nic_args(config, host_address, host_name)
    if config.serial:
        argv += [
            "-chardev",
            f"socket,id=console0,path={paths.console},server=on,wait=off,"
            f"logfile={paths.console_log},logappend=on",
            "-serial", "chardev:console0",
        ]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def disk_server_argv(config: DomainConfig, paths: RuntimePaths, *, qemu: str) -> list[str]:
    """A QEMU with only ``config``'s disks as block nodes ``disk0``, ``disk1``, …
    and no machine, never run: it serves or mirrors the disks of a shut-off
    domain during its migration (QMP on ``paths.qmp``)."""
    argv = [qemu, "-name", f"disks-{config.name}", "-machine", "none", "-nodefaults",
            "-no-user-config", "-display", "none", "-S", "-pidfile", str(paths.pidfile),
            "-qmp", f"unix:{paths.qmp},server=on,wait=off"]
    for i, disk in enumerate(config.disks):
        argv += _blockdev_args(i, disk)
    return argv


def _blockdev_args(i: int, disk: Disk) -> list[str]:
    node = f"disk{i}"
    if disk.path is None:  # (every config is located on its host before this)
        raise ValueError(f"disk {disk.where} has no path on this host")
    ro = "on" if disk.readonly else "off"
    # (both nodes, as -drive cache=MODE would set them; writeback is QEMU's default)
    cache = f"cache.direct={'on' if disk.cache.direct else 'off'}"
    if disk.cache == DiskCache.unsafe:
        cache += ",cache.no-flush=on"
    return [
        "-blockdev",
        f"driver=file,filename={disk.path},node-name={node}-file,read-only={ro},"
        f"{cache},auto-read-only=on",
        "-blockdev", f"driver={disk.format.value},file={node}-file,node-name={node},"
        f"read-only={ro}" + ("" if disk.cache == DiskCache.writeback else f",{cache}"),
    ]


def _write_cache(disk: Disk) -> str:
    """The device's write cache: off where every write is to be flushed."""
    return ",write-cache=off" if disk.cache in (DiskCache.writethrough,
                                                DiskCache.directsync) else ""


def _disk_args(config: DomainConfig) -> list[str]:
    args: list[str] = []
    if any(d.bus == DiskBus.scsi for d in config.disks):
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    ide_unit = 0
    for i, disk in enumerate(config.disks):
        node = f"disk{i}"
        args += _blockdev_args(i, disk)
        boot = f",bootindex={i}" if config.kernel is None else ""
        wc = _write_cache(disk)
        if disk.bus == DiskBus.virtio:
            args += ["-device", f"virtio-blk-pci,drive={node},id={node}-dev{boot}{wc}"]
        elif disk.bus == DiskBus.scsi:
            args += ["-device",
                     f"scsi-hd,drive={node},id={node}-dev,bus=scsi0.0{boot}{wc}"]
        else:
            args += ["-device",
                     f"ide-hd,drive={node},id={node}-dev,bus=ide.{ide_unit}{boot}{wc}"]
            ide_unit += 1
    return args


def _nic_args(config: DomainConfig, host_address: str, host_name: str) -> list[str]:
    args: list[str] = []
    for i, nic in enumerate(config.nics):
        dev = f"{nic.model.value},id=nic{i},mac={nic.mac}"
        if nic.mode == NicMode.user:
            fwd = "".join(f",hostfwd={_bind(f, host_address)}" for f in nic.forwards)
            args += ["-netdev", f"user,id=net{i}{fwd}", "-device", f"{dev},netdev=net{i}"]
        elif nic.mode == NicMode.bridge:
            args += ["-netdev",
                     f"tap,id=net{i},ifname={tap_name(config, i, host_name)},script=no,"
                     "downscript=no",
                     "-device", f"{dev},netdev=net{i}"]
        else:
            args += ["-device", dev]
    return args


def _bind(forward: str, host_address: str) -> str:
    proto, haddr, rest = forward.split(":", 2)
    return f"{proto}:{haddr or host_address}:{rest}"
