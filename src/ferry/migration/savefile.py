"""Save a running domain to a file and restore it (Xen's ``xm save``/``restore``).

The file is Ferry's header, then QEMU's own migration stream written with
QEMU's ``file:`` migration (``mapped-ram``: every page at a fixed offset, and
written by the multifd channels in parallel, where this QEMU has it). The
header (HEADER_SIZE bytes, JSON) carries the domain's definition, how the
stream was written, whether the guest was running, and — written last, once
QEMU is done — that the save completed and the file's size. So a file that is
not Ferry's, whose save was interrupted, or that was cut short is refused
before anything starts.

A save takes the domain off this host (as ``xm save`` does): its state lives
in the file. A restore, here or on any host that sees the file and the
domain's disks, defines it again and resumes it where it was. A failed save
deletes the file and lets the guest run on; a failed restore leaves nothing
defined and no QEMU.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ferry.domains import Domain, DomainService
from ferry.errors import Conflict, Failed, FerryError, InvalidInput, QemuError
from ferry.models import AbsPath, DomainConfig, DomainInfo, DomainState
from ferry.qemu.migrate import MigrationQmp
from ferry.storage import localize
from ferry.validation import describe

log = logging.getLogger(__name__)

MAGIC = b"FERRY-SAVE\n"
FORMAT = 1
HEADER_SIZE = 64 * 1024   # QEMU's stream starts here (page-aligned for mapped-ram)
STREAM_TIMEOUT_S = 3600.0


class SaveHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    config: DomainConfig
    running: bool                  # resume the guest after the restore
    host: str                      # where it was saved
    saved: float                   # when (epoch s)
    mapped_ram: bool
    channels: int = Field(default=0, ge=0, le=16)  # multifd (0: one stream)
    complete: bool = False         # QEMU finished writing; set last
    size: int | None = None        # the whole file's size once complete


class SaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: AbsPath  # absolute, no '..', ',' or newlines (as every path Ferry takes)


RestoreRequest = SaveRequest


def write_header(path: Path, header: SaveHeader, create: bool) -> None:
    """Write ``header`` at the start of ``path`` (``create``: a new file, refused
    if one is there), padded to HEADER_SIZE, and flush it to disk."""
    body = MAGIC + header.model_dump_json().encode() + b"\n"
    if len(body) > HEADER_SIZE:
        raise InvalidInput(f"domain {header.config.name}'s definition is too large to "
                           "save with it")
    flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.pwrite(fd, body.ljust(HEADER_SIZE, b" "), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: Path) -> SaveHeader:
    """The header of a complete save file; InvalidInput saying what is wrong."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
    if not head.startswith(MAGIC):
        raise InvalidInput(f"{path} is not a Ferry save file")
    try:
        raw: Any = json.loads(head[len(MAGIC):].rstrip(b" \n"))
        header = SaveHeader.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        why = describe(exc) if isinstance(exc, ValidationError) else str(exc)
        raise InvalidInput(f"{path}: its header is damaged ({why})") from exc
    if header.format != FORMAT:
        raise InvalidInput(f"{path} is a Ferry save file of format {header.format}; this "
                           f"Ferry reads format {FORMAT}")
    if not header.complete or header.size is None:
        raise InvalidInput(f"{path}: the save did not complete (it was interrupted); "
                           "there is no guest state to restore")
    if size != header.size:
        raise InvalidInput(f"{path} is truncated or altered: {size} bytes, the save "
                           f"wrote {header.size}")
    return header


class SaveService:
    """``ferry save`` and ``ferry restore`` on this host."""

    def __init__(self, domains: DomainService) -> None:
        self.domains = domains
        self.host = domains.host

    def _check_path(self, path: Path) -> Path:
        if not self.host.in_storage(path):
            raise InvalidInput(f"save file {path} is outside this host's storage pools ("
                               + ", ".join(str(p.path) for p in self.host.storage_pools)
                               + ")")
        return path

    # -- save -------------------------------------------------------------------------
    async def save(self, name: str, path: Path) -> dict[str, Any]:
        path = self._check_path(path)
        dom = self.domains.get(name)
        if dom.state not in (DomainState.running, DomainState.paused) or dom.proc is None:
            raise Conflict(f"domain {name} is {dom.state.value}: only a running or paused "
                           "domain has state to save", domain=name)
        if not path.parent.is_dir():
            raise InvalidInput(f"directory {path.parent} does not exist")
        if path.exists():
            raise Conflict(f"{path} exists; Ferry does not overwrite a file with a save")
        dom = await self.domains.hold_for_job(name, f"save-{secrets.token_hex(3)}")
        try:
            return await self._save(dom, path)
        finally:
            self.domains.let_go(dom)

    async def _save(self, dom: Domain, path: Path) -> dict[str, Any]:
        assert dom.proc is not None
        proc = dom.proc
        mig = MigrationQmp(proc.qmp)
        was_running = dom.state == DomainState.running
        t0 = time.monotonic()
        mapped = "mapped-ram" in await mig.capabilities()
        channels = max(2, min(4, os.cpu_count() or 1)) if mapped else 0
        header = SaveHeader(config=dom.config, running=was_running, host=self.host.name,
                            saved=time.time(), mapped_ram=mapped, channels=channels)
        write_header(path, header, create=True)
        try:
            await self._stream_shape(mig, mapped or None, channels)
            if was_running:
                await self.domains.stop_guest(dom, f"paused to save to {path}")
            await mig.start(f"file:{path},offset={HEADER_SIZE}")
            info = await self._wait(mig, f"saving {dom.name} to {path}")
            size = path.stat().st_size
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            write_header(path, header.model_copy(update={"complete": True, "size": size}),
                         create=False)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            await self._undo_save(dom, mig, was_running, mapped)
            if isinstance(exc, FerryError | OSError):
                why = exc.message if isinstance(exc, FerryError) else str(exc)
                raise Failed(f"saving {dom.name} failed: {why}; the file is removed and "
                             "the domain goes on here", domain=dom.name) from exc
            raise
        await self.domains.release(dom, event="domain.saved")
        try:  # (it lives in the file now, not on a host)
            await self.domains.owners.release(dom.name, str(dom.config.uuid))
        except FerryError as exc:
            log.error("%s: saved, but the registry still names this host: %s", dom.name,
                      exc.message)
        took = time.monotonic() - t0
        log.info("saved %s to %s (%d bytes, %.1fs)", dom.name, path, size, took)
        return {"domain": dom.name, "path": str(path), "bytes": size,
                "seconds": round(took, 3), "mapped_ram": mapped, "channels": channels,
                "downtime_ms": info.get("downtime")}

    async def _undo_save(self, dom: Domain, mig: MigrationQmp, was_running: bool,
                         mapped: bool) -> None:
        try:
            if (await mig.status()).in_flight:
                await mig.cancel()
            await self._stream_shape(mig, False if mapped else None, 0)
            if was_running and dom.proc is not None and dom.state == DomainState.paused:
                await self.domains.resume_guest(dom, "resumed: the save failed")
        except FerryError as exc:
            log.error("domain %s: undoing a failed save: %s", dom.name, exc.message)

    @staticmethod
    async def _stream_shape(mig: MigrationQmp, mapped: bool | None, channels: int) -> None:
        """Capabilities for a file stream (``mapped``: mapped-ram on or off; None:
        this QEMU has no such capability, leave it) and its multifd channels."""
        caps = {"events": True, "auto_converge": False}
        if mapped is not None:
            caps["mapped_ram"] = mapped
        await mig.set_capabilities(**caps)
        await mig.set_stream(channels, "none")

    @staticmethod
    async def _wait(mig: MigrationQmp, what: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STREAM_TIMEOUT_S
        while True:
            info: dict[str, Any] = await mig.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU's stream {status}: "
                                f"{info.get('error-desc', 'no reason given')}")
            if loop.time() > deadline:
                raise QemuError(f"{what} did not end within {STREAM_TIMEOUT_S:g}s")
            await mig.wait_change(0.1)

    # -- restore ----------------------------------------------------------------------
    async def restore(self, path: Path) -> DomainInfo:
        path = self._check_path(path)
        header = read_header(path)
        self.domains.refuse_in_maintenance("new domains (a restore is one)")
        cfg = localize(header.config, self.host)
        self.domains.refuse_identity(cfg)
        found = self.domains.typed_blockers(cfg, to_run=True)
        if found:
            raise InvalidInput("; ".join(b.message for b in found), domain=cfg.name)
        job = f"restore-{secrets.token_hex(3)}"
        # the name here first (no wait since the checks), then in the cluster
        self.domains.reserve_arrival(job, cfg, f"file {path}", cfg.memory)
        try:
            took = await self.domains.owners.claim(cfg.name, str(cfg.uuid))
        except BaseException:
            self.domains.release_arrival(job)
            raise
        proc = None
        try:
            proc = await self.domains.launch_incoming(cfg)
            mig = MigrationQmp(proc.qmp)
            await self._stream_shape(mig, header.mapped_ram or None, header.channels)
            await mig.incoming_file(f"file:{path},offset={HEADER_SIZE}")
            await self._wait(mig, f"restoring {cfg.name} from {path}")
            # a later live migration of this QEMU must not inherit the file's shape
            await self._stream_shape(mig, False if header.mapped_ram else None, 0)
        except BaseException as exc:
            if proc is not None:
                await proc.stop(grace=1.0)
                await self.domains.remove_taps(cfg)
            self.domains.release_arrival(job)
            if took:
                with contextlib.suppress(FerryError):
                    await self.domains.owners.release(cfg.name, str(cfg.uuid))
            if isinstance(exc, FerryError):
                raise Failed(f"restoring {cfg.name} from {path} failed: {exc.message}; "
                             "nothing was started", domain=cfg.name) from exc
            raise
        self.domains.release_arrival(job)
        dom = self.domains.adopt(cfg, proc, DomainState.paused, f"restored from {path}")
        if header.running:
            await self.domains.resume_guest(dom, f"restored from {path}")
        log.info("restored %s from %s", cfg.name, path)
        return dom.info()
