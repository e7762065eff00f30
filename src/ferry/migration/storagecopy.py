"""Copying a domain's disks during its migration (live storage migration).

Disks in pools that are not shared (or every disk, ``--copy-storage all``) are
copied; the rest stay where both hosts see them.

    source                                        destination
    plan(): which disks, their sizes ── Prepare ─▶ blockers(): the pool, free space,
                                                   no image there yet
                                                   create(): empty images like them
                                                   (before its QEMU opens them)
                                                   serve(): NBD server, TLS with the
    ◀──────────────────────────── nbd_port ─────── job's credentials, one export each
    start(): an NBD client node per disk,
    blockdev-mirror (sync full) while the
    guest runs; ready → write-blocking, so a
    fast writer cannot outrun the copy; then
    the memory stream
    finish(): after the switch-over the
    mirrors are in sync: cancel (no pivot),   ── Finish ─▶ unserve(): exports and
    close the nodes                                        server gone before `cont`
    Confirm: the source's images are deleted
    (unless --keep-source-disks)

Undo: the source cancels its mirrors (the guest stays on its own disks); the
destination's undo kills its QEMU and deletes the images it made
(``images_created``, saved before each is made).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from ferry.errors import Failed, FerryError, QemuError
from ferry.hostconfig import HostConfig
from ferry.migration import streamtls
from ferry.migration.models import Blocker, CopyStorage, DiskCopy
from ferry.models import DiskFormat, DomainConfig
from ferry.qemu.block import BlockQmp
from ferry.qemu.migrate import Qmp
from ferry.storage import ImageIds, image_chain, qemu_img

log = logging.getLogger(__name__)

QCOW2_HEADROOM = 1.10      # a qcow2 copy may take this much more than on the source
READY_TIMEOUT_S = 3600.0   # for a mirror's first full copy
READY_POLL_S = 0.05
SYNC_TIMEOUT_S = 60.0      # for the mirrors to drain and end at the switch-over


def node(index: int) -> str:
    """The source QEMU's NBD client node for disk ``index``."""
    return f"ferry-nbd{index}"


def mirror_job(index: int) -> str:
    return f"ferry-mirror{index}"


def export_name(index: int) -> str:
    return f"disk{index}"


# -- the source ----------------------------------------------------------------------
async def plan(config: DomainConfig, host: HostConfig, copy: CopyStorage,
               ids: ImageIds, wait: float | None = None) -> list[DiskCopy]:
    """The disks this migration copies, with what the destination needs to make
    an image like each (and, for an overlay of a base image in the same pool,
    that base's identity: a destination with the same base gets only the top;
    ``wait``: at most that many seconds for an identity not computed yet, after
    which it is left out and the hash goes on)."""
    out = []
    deadline = None if wait is None else asyncio.get_running_loop().time() + wait
    for i, disk in enumerate(config.disks):
        if disk.path is None or copy == CopyStorage.none:
            continue
        pool = host.pool(disk.pool) if disk.pool else host.pool_of(disk.path)
        if copy == CopyStorage.auto and (pool is None or pool.shared):
            continue
        chain = await image_chain(disk.path)
        info = chain[0]
        copy_ = DiskCopy(index=i, format=disk.format, virtual_size=info.virtual_size,
                         allocated=info.actual_size,
                         base_allocated=sum(b.actual_size for b in chain[1:]))
        # (only a base without a backing of its own: its hash then covers
        # everything the overlay reads through)
        if len(chain) == 2 and info.backing and pool is not None \
                and disk.format == DiskFormat.qcow2:
            base = (disk.path.parent / info.backing).resolve()
            if pool.holds(base) and base.is_file():
                try:  # (unknown, or unreadable: the destination copies it in full)
                    base_id = await ids.get(base, _left(deadline))
                except OSError as exc:
                    log.warning("cannot hash base image %s: %s", base, exc)
                    base_id = None
                copy_ = copy_.model_copy(update={
                    "base": str(base.relative_to(os.path.realpath(pool.path))),
                    "base_id": base_id, "base_format": DiskFormat(chain[1].format)})
        out.append(copy_)
    return out


def _left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline)."""
    if deadline is None:
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


def cache_blockers(config: DomainConfig, host: HostConfig, copy: CopyStorage,
                   running: bool) -> list[Blocker]:
    """A running guest's writable disk that stays on a shared pool must bypass the
    host's page cache (``cache = "none"`` or ``"directsync"``): otherwise what this
    host still caches, or the destination cached before, may be read stale there
    after the switch-over. (Copied disks and a shut-off domain's are safe.)"""
    out: list[Blocker] = []
    if not running or copy == CopyStorage.all:
        return out
    for disk in config.disks:
        if disk.readonly or disk.cache.direct or disk.path is None:
            continue
        pool = host.pool(disk.pool) if disk.pool else host.pool_of(disk.path)
        if pool is not None and pool.shared:
            out.append(Blocker(code="cache", message=(
                f"disk {disk.where} stays on shared pool {pool.name} with cache "
                f"{disk.cache.value}: the destination could read stale data through the "
                "hosts' page caches; give the disk cache = \"none\" (or directsync), or "
                "pass --unsafe if the pool's file system keeps the hosts' caches coherent")))
    return out


async def start(qmp: Qmp, copies: list[DiskCopy], host: str, port: int, job_id: str,
                started: list[int], save: Callable[[], None], speed: int = 0,
                top_only: list[int] | None = None) -> None:
    """Open each destination export and mirror the disk into it (``started``: the
    indices whose mirror may run, appended before each starts; ``speed``: the
    job's bandwidth cap in bytes/s, shared by the mirrors, 0: none)."""
    block = BlockQmp(qmp)
    for c in copies:
        started.append(c.index)
        save()
        await block.open_nbd(node(c.index), host, port, export_name(c.index),
                             streamtls.object_id(job_id), streamtls.tls_hostname(job_id))
        await block.mirror(mirror_job(c.index), f"disk{c.index}", node(c.index),
                           speed=speed // len(copies), top=c.index in (top_only or []))


async def set_speed(qmp: Qmp, copies: list[DiskCopy], speed: int) -> None:
    """A new bandwidth cap (bytes/s, 0: none) for the mirrors, shared."""
    for c in copies:
        await BlockQmp(qmp).set_speed(mirror_job(c.index), speed // len(copies))


async def progress(qmp: Qmp, copies: list[DiskCopy]) -> tuple[int, int, bool]:
    """(bytes copied, bytes to copy, all ready) over every mirror; QemuError if
    one failed or is gone."""
    block = BlockQmp(qmp)
    jobs = {j.id: j for j in await block.jobs()}
    done = total = 0
    ready = True
    for c in copies:
        job = jobs.get(mirror_job(c.index))
        if job is None:
            raise QemuError(f"the mirror of disk{c.index} is gone")
        if job.error:
            raise QemuError(f"the mirror of disk{c.index} failed: {job.error}")
        done, total, ready = done + job.offset, total + job.length, ready and job.ready
    return done, total, ready


async def copied(qmp: Qmp, copies: list[DiskCopy]) -> dict[int, tuple[int, int]]:
    """(bytes copied, bytes to copy) of each disk's mirror so far, by disk index."""
    jobs = {j.id: j for j in await BlockQmp(qmp).jobs()}
    return {c.index: (jobs[mirror_job(c.index)].offset, jobs[mirror_job(c.index)].length)
            for c in copies if mirror_job(c.index) in jobs}


async def write_blocking(qmp: Qmp, copies: list[DiskCopy]) -> None:
    """From now on each guest write completes only once it is on the copy too."""
    for c in copies:
        await BlockQmp(qmp).write_blocking(mirror_job(c.index))


async def finish(qmp: Qmp, copies: list[DiskCopy]) -> None:
    """The guest is stopped and every mirror in sync: end them without pivoting
    (the copies are complete), close the NBD nodes. Failed if a copy is not
    complete."""
    block = BlockQmp(qmp)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SYNC_TIMEOUT_S
    while True:  # (what was dirty before write-blocking may still be in flight)
        done, total, ready = await progress(qmp, copies)
        if ready and done == total:
            break
        if loop.time() > deadline:
            raise Failed(f"the disk copies are not in sync at the switch-over ({done} of "
                         f"{total} bytes after {SYNC_TIMEOUT_S:g}s)")
        await asyncio.sleep(READY_POLL_S)
    for c in copies:
        job_id = mirror_job(c.index)
        await block.cancel_job(job_id)
        while (job := await block.job(job_id)) is not None and job.status != "concluded":
            if loop.time() > deadline + SYNC_TIMEOUT_S:
                raise Failed(f"the mirror of disk{c.index} did not end ({job.status})")
            await asyncio.sleep(READY_POLL_S)
        if job is None or job.error:
            raise Failed(f"the mirror of disk{c.index} failed at its end: "
                         f"{job.error if job else 'it is gone'}")
        await block.dismiss(job_id)
        await block.close_node(node(c.index))


async def undo(qmp: Qmp, started: list[int]) -> None:
    """Stop every mirror that may run and close its node (the guest stays on its
    own disks); what is already gone is skipped."""
    block = BlockQmp(qmp)
    for i in started:
        with contextlib.suppress(FerryError):
            await qmp.execute("block-job-cancel", {"device": mirror_job(i), "force": True})
        with contextlib.suppress(FerryError):
            await block.dismiss(mirror_job(i), timeout=5.0)
        with contextlib.suppress(FerryError):
            await block.close_node(node(i))


def delete_sources(paths: list[str], in_use: set[str]) -> list[str]:
    """Remove the source's copied images after Confirm, but none that another
    definition here still uses (``in_use``: real paths); the errors, if any."""
    errors = []
    for p in paths:
        if os.path.realpath(p) in in_use:
            continue
        try:
            Path(p).unlink(missing_ok=True)
        except OSError as exc:
            errors.append(f"{p}: {exc.strerror}")
    return errors


# -- the destination -----------------------------------------------------------------
async def top_only(config: DomainConfig, host: HostConfig, copies: list[DiskCopy],
                   ids: ImageIds, wait: float | None = None) -> tuple[list[int], list[int]]:
    """(the copies whose base image this host has, in the pool of the same name,
    with the same identity: they get only their top layer; those whose base is
    here but whose identity is still being computed after ``wait`` seconds: they
    go in full this time). ``wait`` bounds the whole call."""
    tops, pending = [], []
    deadline = None if wait is None else asyncio.get_running_loop().time() + wait
    for c in copies:
        base = base_here(config, host, c)
        if base is None:
            continue
        try:
            if c.base_id is None:  # (the source's is not known yet: for next time)
                ids.warm(base)
                continue
            found = await ids.get(base, _left(deadline))
        except OSError:
            continue
        if found is None:
            pending.append(c.index)
        elif found == c.base_id:
            tops.append(c.index)
    return tops, pending


def base_here(config: DomainConfig, host: HostConfig, c: DiskCopy) -> Path | None:
    """The copy's base image in this host's pool of the disk's pool name, if it is
    there."""
    disk = config.disks[c.index] if c.index < len(config.disks) else None
    pool = host.pool(disk.pool) if disk is not None and disk.pool else None
    if c.base is None or pool is None:
        return None
    base = pool.path / c.base
    return base if base.is_file() and pool.holds(base) else None


def notes(config: DomainConfig, host: HostConfig, copies: list[DiskCopy],
          tops: Collection[int], pending: Collection[int] = ()) -> list[str]:
    """How each disk will be copied, for ``ferry migrate --check``."""
    out = []
    for c in copies:
        disk = config.disks[c.index]
        pool = host.pool(disk.pool) if disk.pool else None
        free = ""
        if pool is not None:
            with contextlib.suppress(OSError):
                st = os.statvfs(pool.path)
                free = f"; pool {pool.name} on {host.name} has " \
                       f"{st.f_bavail * st.f_frsize >> 20} MiB free"
        if c.index in tops:
            how = (f"only its top layer ({c.allocated >> 20} MiB; base {c.base} is on "
                   f"{host.name} already, {c.base_allocated >> 20} MiB not sent)")
        else:
            why = ""
            if c.base and base_here(config, host, c) is None:
                why = f", base {c.base} not on {host.name}"
            elif c.base and c.base_id is None:
                why = (f", the source is still computing the identity of its base "
                       f"{c.base}: ask again for a copy of only the top layer")
            elif c.index in pending:
                why = (f", {host.name} is still computing the identity of its base "
                       f"{c.base}: ask again for a copy of only the top layer")
            elif c.base:
                why = f", base {c.base} on {host.name} differs from the source's"
            how = f"in full ({c.virtual_size >> 20} MiB virtual, {c.allocated >> 20} " \
                  f"MiB allocated{why})"
        out.append(f"disk {disk.where} copies {how}{free}")
    return out


def need(copy: DiskCopy, top: bool) -> int:
    """Bytes a copy may take on the destination: raw, its virtual size; qcow2, what
    it takes on the source (its top only, or with every image below it flattened
    in) plus 10 %."""
    if copy.format == DiskFormat.raw:
        return copy.virtual_size
    below = 0 if top else copy.base_allocated
    return int((copy.allocated + below) * QCOW2_HEADROOM) + (1 << 20)


def allocated(path: str) -> int:
    """Bytes the file at ``path`` takes now (0 if it is not there)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def still_to_land(config: DomainConfig, copies: list[DiskCopy], tops: Collection[int],
                  created: list[str]) -> dict[str, int]:
    """Bytes an arriving job's copies may still take, by pool: what each needs less
    what its image already takes."""
    out: dict[str, int] = {}
    for c in copies:
        disk = config.disks[c.index] if c.index < len(config.disks) else None
        if disk is None or disk.pool is None or disk.path is None:
            continue
        landed = allocated(str(disk.path)) if str(disk.path) in created else 0
        out[disk.pool] = out.get(disk.pool, 0) + max(0, need(c, c.index in tops) - landed)
    return out


def blockers(config: DomainConfig, host: HostConfig, copies: list[DiskCopy],
             tops: Collection[int] = (), promised: Mapping[str, int] | None = None
             ) -> list[Blocker]:
    """Why this host can't take the copies (``config`` located here): a missing
    pool, an image already there, not enough free space (raw: its virtual size;
    qcow2: what it takes on the source plus 10 %, its top only for the ``tops``),
    less what other arriving copies may still take (``promised``, by pool)."""
    out: list[Blocker] = []
    wanted: dict[str, int] = {}
    for c in copies:
        if c.index >= len(config.disks):
            out.append(Blocker(code="disk", message=f"no disk{c.index} to copy"))
            continue
        disk = config.disks[c.index]
        pool = host.pool(disk.pool) if disk.pool else None
        if pool is None or disk.path is None:
            names = ", ".join(p.name for p in host.storage_pools) or "none"
            out.append(Blocker(code="pool", message=(
                f"disk {disk.where}: host {host.name} has no storage pool "
                f"{disk.pool!r} to copy it to (its pools: {names})")))
            continue
        if disk.path.exists() or disk.path.is_symlink():
            out.append(Blocker(code="disk", message=(
                f"disk {disk.where}: image {disk.path} already exists on host "
                f"{host.name}; Ferry never overwrites one (--copy-storage none uses it)")))
            continue
        wanted[pool.name] = wanted.get(pool.name, 0) + need(c, c.index in tops)
    for name, size in wanted.items():
        pool = host.pool(name)
        assert pool is not None
        try:
            st = os.statvfs(pool.path)
            free = st.f_bavail * st.f_frsize
        except OSError as exc:
            out.append(Blocker(code="pool", message=f"pool {name} on host {host.name}: "
                               f"{exc.strerror}"))
            continue
        others = (promised or {}).get(name, 0)
        if size > free - others:
            held = f", {others >> 20} MiB of it promised to copies arriving now" \
                if others else ""
            out.append(Blocker(code="space", message=(
                f"pool {name} on host {host.name} has {free >> 20} MiB free{held}; the "
                f"copies need {size >> 20} MiB (raw: the virtual size; qcow2: what it "
                "takes on the source, with the images below it unless only its top "
                "goes, plus 10 %)")))
    return out


async def create(config: DomainConfig, copies: list[DiskCopy], created: list[str],
                 save: Callable[[], None], tops: list[int] | None = None,
                 host: HostConfig | None = None) -> None:
    """An empty image like each copy's, at its path here (``created``: appended
    with each path, and ``save``d, before it is made, for the undo)."""
    for c in copies:
        disk = config.disks[c.index]
        path = disk.path
        pool = host.pool(disk.pool) if host is not None and disk.pool else None
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        if pool is not None and not pool.holds(path.parent):
            raise Failed(f"image {path} would lie outside pool {pool.name} (a symlink?)")
        created.append(str(path))
        save()
        try:  # ours from here: nobody else's image is ever truncated
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600))
        except FileExistsError as exc:
            created.remove(str(path))
            save()
            raise Failed(f"image {path} already exists; Ferry never overwrites one") from exc
        backing: list[str] = []
        if c.index in (tops or []) and pool is not None and c.base is not None:
            base = pool.path / c.base
            backing = ["-b", os.path.relpath(base, path.parent), "-F",
                       (c.base_format or DiskFormat.qcow2).value]
        await qemu_img("create", "-q", "-f", c.format.value, *backing, str(path),
                       str(c.virtual_size))


def delete_created(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            Path(p).unlink(missing_ok=True)


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (QEMU's NBD server can't pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


async def serve(qmp: Qmp, copies: list[DiskCopy], address: str, job_id: str) -> int:
    """Export each copy's disk node, writable, over QEMU's NBD server (TLS with the
    job's server credentials); the port."""
    block = BlockQmp(qmp)
    for attempt in range(3):
        port = free_port(address)
        try:
            await block.serve_nbd(address, port, streamtls.object_id(job_id))
            break
        except QemuError:
            if attempt == 2:
                raise
            await asyncio.sleep(0.1)  # (taken in between: another port)
    for c in copies:
        await block.export(f"ferry-export{c.index}", f"disk{c.index}",
                           export_name(c.index), writable=True)
    return port


async def unserve(qmp: Qmp, copies: list[DiskCopy]) -> None:
    """No export and no NBD server left (before the guest runs here)."""
    block = BlockQmp(qmp)
    for c in copies:
        with contextlib.suppress(QemuError):
            await block.remove_export(f"ferry-export{c.index}")
    await block.stop_nbd()
