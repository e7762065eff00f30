"""Why this host can't take a domain definition: typed blockers, and the checks
that find them.

Each check reads the host (files, the QEMU binary's lists, network devices) but
changes nothing. A ``Blocker`` carries a ``code`` so that callers classify by
what is wrong, never by parsing the message.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ferry.bootimage import initrd_format, is_linux_kernel, read_head
from ferry.hostconfig import HostConfig
from ferry.models import DomainConfig, NicMode
from ferry.net import bridge_exists
from ferry.qemu.probe import cpu_models, machine_types


class BlockerCode(enum.StrEnum):
    memory = "memory"     # not enough free now (the only one that can pass by waiting)
    kernel = "kernel"
    initrd = "initrd"
    disk = "disk"
    machine = "machine"
    cpu = "cpu"
    bridge = "bridge"


@dataclass(frozen=True)
class Blocker:
    code: BlockerCode
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def definition_blockers(config: DomainConfig, host: HostConfig) -> list[Blocker]:
    """Everything about ``config`` itself that this host can't run, whatever else
    runs here: boot files, disks, machine type, CPU model, bridges."""
    return [*boot_file_blockers(config, host.name), *disk_blockers(config, host),
            *qemu_blockers(config, host.qemu, machine_types(host.qemu),
                           cpu_models(host.qemu), host.name),
            *bridge_blockers(config, host.bridges, host.name)]


def boot_file_blockers(config: DomainConfig, host_name: str) -> list[Blocker]:
    """The kernel must be a Linux boot image, the initrd an archive the kernel
    can unpack; only the files' first few KiB are read."""
    out = []
    for code, path in ((BlockerCode.kernel, config.kernel),
                       (BlockerCode.initrd, config.initrd)):
        if path is None:
            continue
        if not path.is_file():
            out.append(Blocker(code, f"{code} {path}: no such file on host {host_name}"))
            continue
        try:
            head = read_head(path)
        except OSError as exc:
            out.append(Blocker(code, f"{code} {path}: cannot read it on host {host_name}: "
                                     f"{exc.strerror}"))
            continue
        if code == BlockerCode.kernel and not is_linux_kernel(head):
            out.append(Blocker(code, f"kernel {path} on host {host_name} is not a Linux "
                                     "boot image (an x86 bzImage with its 'HdrS' header)"))
        elif code == BlockerCode.initrd and initrd_format(head) is None:
            out.append(Blocker(code, f"initrd {path} on host {host_name} is not an "
                                     "initramfs: neither a cpio archive nor one compressed "
                                     "with gzip, xz, zstd, lz4, bzip2 or lzma"))
    return out


def disk_blockers(config: DomainConfig, host: HostConfig) -> list[Blocker]:
    """Disks only inside the host's storage pools, and present there (``config``
    located on this host: ``ferry.storage.localize``)."""
    out = []
    for disk in config.disks:
        if disk.path is None or (disk.pool is not None and host.pool(disk.pool) is None):
            names = ", ".join(p.name for p in host.storage_pools) or "none"
            out.append(Blocker(BlockerCode.disk,
                               f"disk {disk.where}: host {host.name} has no storage pool "
                               f"{disk.pool!r} (its pools: {names})"))
        elif not host.in_storage(disk.path):
            pools = ", ".join(f"{p.name} ({p.path})" for p in host.storage_pools)
            out.append(Blocker(BlockerCode.disk,
                               f"disk {disk.path} is outside every storage pool of "
                               f"host {host.name} ({pools})"))
        elif not disk.path.is_file() and not disk.path.is_block_device():
            out.append(Blocker(BlockerCode.disk,
                               f"disk {disk.path}: no such file on host {host.name}"))
    return out


def qemu_blockers(config: DomainConfig, qemu: str, machines: Collection[str],
                  cpus: Collection[str], host_name: str) -> list[Blocker]:
    """The machine type and CPU model (its name before the first ',') must be
    ones that ``qemu`` lists. An empty list means QEMU could not be asked: no
    blocker then, and starting the domain reports QEMU's own error."""
    out = []
    if machines and config.machine not in machines:
        out.append(Blocker(BlockerCode.machine,
                           f"machine type {config.machine} is unknown to the QEMU of host "
                           f"{host_name} ('{qemu} -machine help' lists the known ones)"))
    model = config.cpu.split(",", 1)[0]
    if cpus and model not in cpus:
        out.append(Blocker(BlockerCode.cpu,
                           f"CPU model {model} is unknown to the QEMU of host {host_name} "
                           f"('{qemu} -cpu help' lists the known ones)"))
    return out


def cpu_feature_blockers(config: DomainConfig, unavailable: dict[str, tuple[str, ...]],
                         host_name: str) -> list[Blocker]:
    """Under KVM the CPU model runs on the host's own CPU: every feature the model
    has must be there (``unavailable``: ``query-cpu-definitions``' answer). The
    models ``host`` and ``max`` take what the host has, so they are not checked."""
    model = config.cpu.split(",", 1)[0]
    missing = unavailable.get(model, ())
    if not missing or model in ("host", "max"):
        return []
    return [Blocker(BlockerCode.cpu,
                    f"CPU model {model} needs CPU features host {host_name} lacks under "
                    f"KVM: {', '.join(missing)}")]


def bridge_blockers(config: DomainConfig, allowed: Collection[str] | None, host_name: str,
                    exists: Callable[[str], bool] = bridge_exists) -> list[Blocker]:
    """Each bridged NIC's bridge must be allowed (``allowed`` None: any) and exist."""
    out = []
    for nic in config.nics:
        if nic.mode != NicMode.bridge:
            continue
        if allowed is not None and nic.bridge not in allowed:
            out.append(Blocker(BlockerCode.bridge,
                               f"bridge {nic.bridge} is not one of host {host_name}'s "
                               f"bridges ({', '.join(allowed) or 'none'})"))
        elif not exists(str(nic.bridge)):
            out.append(Blocker(BlockerCode.bridge,
                               f"bridge {nic.bridge} does not exist on host {host_name}"))
    return out

