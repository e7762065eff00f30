"""QMP for moving disks, in one place: the NBD server and its exports on the
destination, the NBD client node and the mirror job on the source.

The storage migration (copying a disk that only the source has) is built from
these: the destination exports a fresh image over NBD with the job's TLS
credentials (``serve_nbd`` + ``export``: the server refuses a client without
TLS), the source opens it as a block node (``open_nbd``) and mirrors its disk
into it (``mirror``) while the guest runs, then ends the mirror without
pivoting (``cancel_job`` once ``ready``) when the memory stream completes.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ferry.errors import QemuError
from ferry.qemu.migrate import Qmp

READY_POLL_S = 0.05


@dataclass(frozen=True)
class BlockJob:
    """One entry of ``query-block-jobs``."""

    id: str
    kind: str            # "mirror", ...
    status: str          # "running", "ready", "concluded", ...
    offset: int          # bytes copied
    length: int          # bytes to copy (grows if the guest writes meanwhile)
    ready: bool
    error: str | None = None

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> BlockJob:
        return cls(id=str(info["device"]), kind=str(info.get("type", "")),
                   status=str(info.get("status", "")), offset=int(info.get("offset", 0)),
                   length=int(info.get("len", 0)), ready=bool(info.get("ready")),
                   error=info.get("error"))


class BlockQmp:
    """One QEMU's block layer, over its QMP connection."""

    def __init__(self, qmp: Qmp) -> None:
        self.qmp = qmp

    # -- the destination: NBD server and exports ---------------------------------------
    async def serve_nbd(self, host: str, port: int, tls_creds: str) -> None:
        """Start QEMU's NBD server on ``host:port``, TLS only (``tls_creds``: a
        ``tls-creds-x509`` object with endpoint=server)."""
        await self.qmp.execute("nbd-server-start", {
            "addr": {"type": "inet", "data": {"host": host, "port": str(port)}},
            "tls-creds": tls_creds})

    async def stop_nbd(self) -> None:
        await self.qmp.execute("nbd-server-stop")

    async def export(self, export_id: str, node: str, name: str, writable: bool) -> None:
        """Export block node ``node`` as NBD export ``name``."""
        await self.qmp.execute("block-export-add", {
            "type": "nbd", "id": export_id, "node-name": node, "name": name,
            "writable": writable})

    async def remove_export(self, export_id: str) -> None:
        await self.qmp.execute("block-export-del", {"id": export_id})

    # -- the source: the NBD client node and the mirror ---------------------------------
    async def open_nbd(self, node: str, host: str, port: int, name: str, tls_creds: str,
                       tls_hostname: str) -> None:
        """Add block node ``node``: export ``name`` of the NBD server at
        ``host:port`` over TLS (the server's certificate must name
        ``tls_hostname``)."""
        await self.qmp.execute("blockdev-add", {
            "driver": "nbd", "node-name": node,
            "server": {"type": "inet", "host": host, "port": str(port)},
            "export": name, "tls-creds": tls_creds, "tls-hostname": tls_hostname})

    async def close_node(self, node: str) -> None:
        await self.qmp.execute("blockdev-del", {"node-name": node})

    async def mirror(self, job_id: str, device: str, target: str,
                     write_blocking: bool = False, speed: int = 0, top: bool = False
                     ) -> None:
        """Copy all of node ``device`` into node ``target`` and keep copying what
        the guest writes (``write_blocking``: a guest write completes only once it
        is on the target too, so a fast writer can't outrun the copy; ``speed``:
        bytes/s at most, 0: no limit; ``top``: only the top layer of a backing
        chain, for a target that has the same backing image)."""
        await self.qmp.execute("blockdev-mirror", {
            "job-id": job_id, "device": device, "target": target,
            "sync": "top" if top else "full",
            "copy-mode": "write-blocking" if write_blocking else "background",
            "auto-dismiss": False, "speed": speed})

    async def set_speed(self, job_id: str, speed: int) -> None:
        """A block job's rate limit, bytes/s (0: none); takes effect at once."""
        await self.qmp.execute("block-job-set-speed", {"device": job_id, "speed": speed})

    async def write_blocking(self, job_id: str) -> None:
        """Switch a running mirror to write-blocking (QEMU 8.2's block-job-change)."""
        await self.qmp.execute("block-job-change", {
            "id": job_id, "type": "mirror", "copy-mode": "write-blocking"})

    async def jobs(self) -> list[BlockJob]:
        return [BlockJob.from_qmp(j) for j in await self.qmp.execute("query-block-jobs")]

    async def job(self, job_id: str) -> BlockJob | None:
        return next((j for j in await self.jobs() if j.id == job_id), None)

    async def wait_ready(self, job_id: str, timeout: float) -> BlockJob:
        """Until the mirror has copied everything once (``ready``); QemuError if it
        fails, vanishes or takes longer than ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await self.job(job_id)
            if job is None:
                raise QemuError(f"block job {job_id} is gone")
            if job.error:
                raise QemuError(f"block job {job_id} failed: {job.error}")
            if job.ready:
                return job
            if loop.time() > deadline:
                raise QemuError(f"block job {job_id} not ready after {timeout:g}s "
                                f"({job.offset} of {job.length} bytes)")
            await asyncio.sleep(READY_POLL_S)

    async def cancel_job(self, job_id: str) -> None:
        """End a job. A ready mirror ends with the target complete and the guest
        still on its own disk (no pivot): what a migration wants."""
        await self.qmp.execute("block-job-cancel", {"device": job_id})

    async def dismiss(self, job_id: str, timeout: float = 10.0) -> None:
        """Wait for the job to conclude, then remove it from the list."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await self.job(job_id)
            if job is None:
                return
            if job.status == "concluded":
                await self.qmp.execute("job-dismiss", {"id": job_id})
                return
            if loop.time() > deadline:
                raise QemuError(f"block job {job_id} did not conclude ({job.status})")
            await asyncio.sleep(READY_POLL_S)
