"""Storage pools and their images: where a disk lives on this host, and the
images themselves (``qemu-img``, always with ``--output=json``).

A disk names a pool and an image in it (``pool = "local"``, ``image =
"web01.qcow2"``) or a path inside a pool. Each host maps the pool's name to
its own directory (``localize``), so a definition moves between hosts whose
pools live at different paths. A pool is *shared* when every host sees the same
files at its path (a migration leaves those disks where they are) and local
otherwise (a migration copies them).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ferry.errors import Conflict, Failed, InvalidInput, NotFound
from ferry.hostconfig import HostConfig, Pool
from ferry.models import DiskFormat, DomainConfig, ImageName

log = logging.getLogger(__name__)

QEMU_IMG_TIMEOUT = 120.0


class ImageInfo(BaseModel):
    """What ``qemu-img info --output=json`` says about an image."""

    name: str                  # inside its pool
    format: str
    virtual_size: int          # bytes the guest sees
    actual_size: int           # bytes it takes on the host
    backing: str | None = None  # the backing file, as the image names it


class DiskCreate(BaseModel):
    """``POST /v1/pools/POOL/disks``: a new image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ImageName
    size: int = Field(gt=0, le=64 << 40, description="bytes")
    format: DiskFormat = DiskFormat.qcow2
    backing: ImageName | None = None   # an image of the same pool it overlays


class PoolInfo(BaseModel):
    name: str
    path: str
    shared: bool
    capacity: int   # bytes of the file system it lives on
    free: int       # bytes free there (for this host's root)
    images: int


def localize(config: DomainConfig, host: HostConfig) -> DomainConfig:
    """``config`` with each disk located on this host: one naming a pool gets its
    path in this host's pool of that name (none if this host has no such pool);
    one given by a path inside a pool gets that pool and image too (so it can be
    located on another host)."""
    disks = []
    for disk in config.disks:
        if disk.pool is not None:
            assert disk.image is not None
            pool = host.pool(disk.pool)
            # (no such pool here: no path, and the disk blocker says so)
            disks.append(disk.model_copy(update={
                "path": pool.path / disk.image if pool is not None else None}))
        elif disk.path is not None and (pool := host.pool_of(disk.path)) is not None:
            image = Path(os.path.realpath(disk.path)).relative_to(
                os.path.realpath(pool.path))
            disks.append(disk.model_copy(update={"pool": pool.name, "image": str(image)}))
        else:
            disks.append(disk)  # outside every pool: the disk blocker says so
    return config.model_copy(update={"disks": disks})


async def qemu_img(*args: str) -> str:
    """Run ``qemu-img ARGS``; its stdout. Failed with its message if it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise Failed(f"cannot run qemu-img: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise Failed(f"qemu-img {args[0]} took longer than {QEMU_IMG_TIMEOUT:g}s") from exc
    if proc.returncode != 0:
        raise Failed(f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


def _info(data: dict[str, Any], name: str) -> ImageInfo:
    """One image of ``qemu-img info --output=json``'s answer."""
    return ImageInfo(name=name, format=str(data.get("format")),
                     virtual_size=int(data.get("virtual-size", 0)),
                     actual_size=int(data.get("actual-size", 0)),
                     backing=data.get("backing-filename"))


async def image_info(path: Path, name: str = "") -> ImageInfo:
    """The image at ``path`` (``-U``: also while a QEMU has it open)."""
    data = json.loads(await qemu_img("info", "-U", "--output=json", str(path)))
    return _info(data, name or path.name)


async def image_chain(path: Path) -> list[ImageInfo]:
    """The image at ``path`` and every image below it, top first."""
    data = json.loads(await qemu_img("info", "-U", "--backing-chain", "--output=json",
                                     str(path)))
    return [_info(d, Path(str(d.get("filename", path))).name)
            for d in (data if isinstance(data, list) else [data])]


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``1T``, ``4096`` (bytes) → bytes; InvalidInput if not."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    number = t[:-1] if unit else t
    try:
        size = int(float(number) * units[unit])
    except (ValueError, OverflowError):
        size = 0
    if size <= 0 or size > 64 << 40:
        raise InvalidInput(f"invalid size {text!r}: say e.g. 10G, 512M (at most 64T)")
    return size


def _sha256(path: Path, stop: threading.Event) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if stop.is_set():
                raise asyncio.CancelledError
            h.update(chunk)
    return h.hexdigest()


class ImageIds:
    """Base images' identities: the SHA-256 of each file, computed once and cached
    (in ``cache_file``) by its path and a stamp of its size, times and inode, so
    two hosts can tell they hold the same base without sending it. A file is hashed at most once
    at a time, in the background, so a caller may wait a while and go on without
    the answer (``get(..., wait=)``) while the hash completes for next time."""

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file
        self._hashing: dict[str, asyncio.Task[str]] = {}   # by path and stamp
        self._stop = threading.Event()

    @staticmethod
    def _key(path: Path) -> tuple[str, str]:
        """(the file's real path, a stamp that changes with its contents: another
        file put in its place, even with the same size and mtime, has another
        inode or change time, which no one can set by hand)."""
        st = path.stat()
        return os.path.realpath(path), \
            f"{st.st_size}:{st.st_mtime_ns}:{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"

    def _cache(self) -> dict[str, Any]:
        try:
            cache = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return {}
        return cache if isinstance(cache, dict) else {}

    def known(self, path: Path) -> str | None:
        """The identity of ``path`` if it is cached and the file unchanged since."""
        key, stamp = self._key(path)
        hit = self._cache().get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp:
            return str(hit["sha256"])
        return None

    async def get(self, path: Path, wait: float | None = None) -> str | None:
        """The identity of ``path``; computed if need be, waiting at most ``wait``
        seconds (None: as long as it takes). None if it is not known by then (the
        hash goes on and is cached)."""
        found = self.known(path)
        if found is not None:
            return found
        try:
            return await asyncio.wait_for(asyncio.shield(self._start(path)), wait)
        except TimeoutError:
            return None

    def warm(self, path: Path) -> None:
        """Start computing ``path``'s identity now, for later."""
        if self.known(path) is None:
            self._start(path)

    def _start(self, path: Path) -> asyncio.Task[str]:
        key, stamp = self._key(path)
        slot = f"{key}|{stamp}"
        task = self._hashing.get(slot)
        if task is None:
            task = asyncio.ensure_future(self._compute(path, key, stamp))
            self._hashing[slot] = task

            def forget(t: asyncio.Task[str]) -> None:
                self._hashing.pop(slot, None)
                if not t.cancelled() and (exc := t.exception()) is not None:
                    log.warning("cannot hash %s: %s", path, exc)  # (retrieved: no noise)
            task.add_done_callback(forget)
        return task

    async def _compute(self, path: Path, key: str, stamp: str) -> str:
        digest = await asyncio.to_thread(_sha256, path, self._stop)
        cache = self._cache()
        cache[key] = {"stamp": stamp, "sha256": digest}
        tmp = self.cache_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(cache))
            tmp.replace(self.cache_file)
        except OSError:
            pass  # (a cache: computed again next time)
        return digest

    async def close(self) -> None:
        self._stop.set()
        for task in list(self._hashing.values()):
            task.cancel()
        await asyncio.gather(*self._hashing.values(), return_exceptions=True)


class Storage:
    """This host's pools and images."""

    def __init__(self, host: HostConfig, ids: ImageIds | None = None) -> None:
        self.host = host
        self.ids = ids

    def pool(self, name: str) -> Pool:
        pool = self.host.pool(name)
        if pool is None:
            names = ", ".join(p.name for p in self.host.storage_pools) or "none"
            raise NotFound(f"host {self.host.name} has no storage pool {name!r} (its "
                           f"pools: {names})")
        return pool

    def image_path(self, pool: Pool, image: str) -> Path:
        """``image`` in ``pool``; InvalidInput for a bad name or one that leads out
        of the pool (through a symlink)."""
        from ferry.models import check_image_name
        try:
            check_image_name(image)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        path = pool.path / image
        if not pool.holds(path.parent) or (path.is_symlink() and not pool.holds(path)):
            raise InvalidInput(f"image {image} leads out of pool {pool.name}")
        return path

    def pools(self) -> list[PoolInfo]:
        out = []
        for pool in self.host.storage_pools:
            try:
                st = os.statvfs(pool.path)
                capacity, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
                images = sum(1 for p in pool.path.rglob("*") if p.is_file())
            except OSError:
                capacity = free = images = 0
            out.append(PoolInfo(name=pool.name, path=str(pool.path), shared=pool.shared,
                                capacity=capacity, free=free, images=images))
        return out

    def free(self, pool: Pool) -> int:
        st = os.statvfs(pool.path)
        return st.f_bavail * st.f_frsize

    async def images(self, pool_name: str | None = None) -> list[tuple[str, ImageInfo]]:
        """(pool, image) of every image in ``pool_name`` (or every pool)."""
        pools = [self.pool(pool_name)] if pool_name else self.host.storage_pools
        out = []
        for pool in pools:
            if not pool.path.is_dir():
                continue
            for path in sorted(p for p in pool.path.rglob("*") if p.is_file()):
                name = str(path.relative_to(pool.path))
                try:
                    out.append((pool.name, await image_info(path, name)))
                except Failed:
                    continue  # not an image qemu-img reads (a save file, a kernel)
        return out

    async def create(self, pool_name: str, image: str, size: int,
                     fmt: DiskFormat = DiskFormat.qcow2, backing: str | None = None
                     ) -> ImageInfo:
        """A new image ``image`` in ``pool_name`` (``backing``: an image of the same
        pool it overlays); Conflict if one exists there."""
        pool = self.pool(pool_name)
        path = self.image_path(pool, image)
        if path.exists():
            raise Conflict(f"image {image} already exists in pool {pool.name} of host "
                           f"{self.host.name}")
        args = ["create", "-q", "-f", fmt.value]
        if backing is not None:
            if fmt != DiskFormat.qcow2:
                raise InvalidInput("only a qcow2 image can have a backing image")
            base = self.image_path(pool, backing)
            if not base.is_file():
                raise NotFound(f"no image {backing} in pool {pool.name} to back {image}")
            info = await image_info(base, backing)
            args += ["-b", os.path.relpath(base, path.parent), "-F", info.format]
            if self.ids is not None and not info.backing:
                with contextlib.suppress(OSError):  # (a base: its overlay's migration
                    self.ids.warm(base)             # asks for its identity)
        path.parent.mkdir(parents=True, exist_ok=True)
        await qemu_img(*args, str(path), str(size))
        return await image_info(path, image)

    async def delete(self, pool_name: str, image: str, in_use: list[str]) -> None:
        """Remove ``image``; Conflict while a domain's definition uses it
        (``in_use``: those domains) or another image is backed by it."""
        pool = self.pool(pool_name)
        path = self.image_path(pool, image)
        if not path.is_file():
            raise NotFound(f"no image {image} in pool {pool.name} of host {self.host.name}")
        if in_use:
            raise Conflict(f"image {pool.name}:{image} is a disk of domain "
                           f"{', '.join(in_use)}: undefine it or remove the disk first")
        for _, other in await self.images(pool.name):
            if other.backing and ((pool.path / other.name).parent /
                                  other.backing).resolve() == path.resolve():
                raise Conflict(f"image {pool.name}:{image} backs {other.name}: delete that "
                               "first")
        path.unlink()
