"""QMP for migration, in one place: capabilities and parameters, TLS, start,
status, cancel, incoming, the announcement after it. The services call these
typed methods, never raw command strings, so what Ferry asks of QEMU's
migration is all on this page.

Post-copy: ``postcopy-ram`` on both QEMUs before the stream starts, then
``migrate-start-postcopy`` on the source; after a broken link
``migrate-recover`` on the destination and ``migrate`` with ``resume`` on the
source.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from ferry.errors import QemuError
from ferry.stats import MigrationStats, MigrationStatus

log = logging.getLogger(__name__)

UNLIMITED_BPS = 1 << 40
CANCEL_WAIT_S = 5.0


class Qmp(Protocol):
    """What this module needs of a QMP connection (``ferry.qemu.qmp.QmpConnection``,
    or the fault-injection tier's fake)."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any: ...

    async def wait_event(self, name: str, timeout: float) -> bool: ...

    def event_time(self, name: str) -> float | None: ...


class MigrationQmp:
    """One QEMU's migration, over its QMP connection."""

    def __init__(self, qmp: Qmp) -> None:
        self.qmp = qmp

    # -- setup ------------------------------------------------------------------------
    async def set_capabilities(self, **caps: bool) -> None:
        """``events=True, auto_converge=False`` → migrate-set-capabilities."""
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name.replace("_", "-"), "state": state}
            for name, state in caps.items()]})

    async def set_limits(self, downtime_ms: int, bandwidth_bps: int | None) -> None:
        """Allowed downtime, and bandwidth (None: unlimited)."""
        await self.qmp.execute("migrate-set-parameters", {
            "downtime-limit": downtime_ms,
            "max-bandwidth": bandwidth_bps or UNLIMITED_BPS,
            "max-postcopy-bandwidth": bandwidth_bps or 0})  # (0: unlimited there)

    async def set_bandwidth(self, bandwidth_bps: int | None) -> None:
        """QEMU's ``max-bandwidth`` and ``max-postcopy-bandwidth`` (None:
        unlimited); takes effect mid-stream."""
        await self.qmp.execute("migrate-set-parameters", {
            "max-bandwidth": bandwidth_bps or UNLIMITED_BPS,
            "max-postcopy-bandwidth": bandwidth_bps or 0})  # (0: unlimited there)

    async def postcopy_with_multifd(self) -> bool:
        """Can this QEMU run post-copy on multifd channels? (QEMU 10.0 cannot:
        "Postcopy is not yet compatible with multifd".) Asked by setting both
        capabilities, then neither, on a QEMU that is not migrating."""
        try:
            await self.set_capabilities(multifd=True, postcopy_ram=True)
        except QemuError:
            return False
        finally:
            with contextlib.suppress(QemuError):
                await self.set_capabilities(postcopy_ram=False, multifd=False)
        return True

    async def capabilities(self) -> set[str]:
        """The migration capabilities this QEMU has (e.g. ``mapped-ram``)."""
        caps = await self.qmp.execute("query-migrate-capabilities")
        return {str(c.get("capability")) for c in caps}

    async def set_downtime(self, downtime_ms: int) -> None:
        """QEMU's downtime-limit: it switches over once it expects to send the
        rest within this many ms (may change while the stream runs)."""
        await self.qmp.execute("migrate-set-parameters", {"downtime-limit": downtime_ms})

    async def sample_dirty_rate(self, seconds: int = 1) -> int | None:
        """The guest's dirty rate (bytes/s) by QEMU's page sampling
        (``calc-dirty-rate``), which works beside a running migration; None if
        this QEMU can't say."""
        try:
            await self.qmp.execute("calc-dirty-rate", {"calc-time": seconds})
            for _ in range(seconds * 20 + 40):
                await asyncio.sleep(0.05)
                got = await self.qmp.execute("query-dirty-rate")
                if got.get("status") == "measured":
                    return int(got.get("dirty-rate", 0)) << 20  # MiB/s
        except QemuError as exc:
            log.debug("no dirty-rate sample: %s", exc.message)
        return None

    async def set_stream(self, channels: int, compression: str) -> None:
        """The stream's shape, the same on both QEMUs and before the stream starts:
        ``channels`` multifd channels (0: the single classic stream) and their
        compression (``none``, ``zstd``). Multifd channels are TLS like the main
        one when ``tls-creds`` is set."""
        await self.set_capabilities(multifd=channels > 0)
        if channels:
            await self.qmp.execute("migrate-set-parameters", {
                "multifd-channels": channels, "multifd-compression": compression})

    async def use_tls(self, creds_id: str, hostname: str | None) -> None:
        """Make the stream TLS with the ``tls-creds-x509`` object ``creds_id``
        (``hostname``: the name the server's certificate must carry, on the client);
        QemuError if QEMU did not switch (then nothing may be sent)."""
        params = {"tls-creds": creds_id}
        if hostname is not None:
            params["tls-hostname"] = hostname
        await self.qmp.execute("migrate-set-parameters", params)
        got = await self.qmp.execute("query-migrate-parameters")
        if got.get("tls-creds") != creds_id:
            raise QemuError("QEMU did not switch its migration stream to TLS")

    async def drop_tls(self, creds_id: str) -> None:
        await self.qmp.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
        await self.qmp.execute("object-del", {"id": creds_id})

    async def add_tls_creds(self, creds_id: str, directory: str, endpoint: str) -> None:
        await self.qmp.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": creds_id, "dir": directory,
            "endpoint": endpoint, "verify-peer": True})

    # -- the stream -------------------------------------------------------------------
    async def announce(self, params: dict[str, int]) -> None:
        """``announce-self``: the guest's NICs send RARP/gratuitous frames so the
        network learns where the guest runs now (after an incoming migration)."""
        await self.qmp.execute("announce-self", params)

    async def start(self, uri: str) -> None:
        await self.qmp.execute("migrate", {"uri": uri})

    async def start_postcopy(self) -> None:
        """Switch the running stream to post-copy: the source stops the guest,
        sends its devices, and from then on serves pages the destination asks for
        while it pushes the rest."""
        await self.qmp.execute("migrate-start-postcopy")

    async def resume(self, uri: str) -> None:
        """Reconnect a post-copy stream paused by a broken link (source side)."""
        await self.qmp.execute("migrate", {"uri": uri, "resume": True})

    async def pause(self) -> None:
        """Break a post-copy stream's connection on purpose (``migrate-pause``),
        so it can be recovered: for a side that has not noticed the link is gone."""
        await self.qmp.execute("migrate-pause")

    async def recover(self, uri: str) -> int:
        """Listen for a paused post-copy stream's reconnection on ``uri``
        (``tcp:ADDR:0``, destination side); the port QEMU opened."""
        await self.qmp.execute("migrate-recover", {"uri": uri})
        return await self._listening_port()

    async def incoming(self, uri: str) -> int:
        """Listen for the stream on ``uri`` (``tcp:ADDR:0``); the port QEMU opened."""
        await self.qmp.execute("migrate-incoming", {"uri": uri})
        return await self._listening_port()

    async def _listening_port(self) -> int:
        info = await self.qmp.execute("query-migrate")
        addrs = info.get("socket-address") or []
        if not addrs:
            raise QemuError("QEMU opened no incoming migration endpoint")
        return int(addrs[-1]["port"])

    async def incoming_file(self, uri: str) -> None:
        """Load the stream from a file (``file:PATH,offset=N``)."""
        await self.qmp.execute("migrate-incoming", {"uri": uri})

    async def devices_loaded(self) -> bool:
        """Destination in post-copy: has QEMU loaded the guest's devices (its run
        state left ``inmigrate``), so that the guest may run here?"""
        state = await self.qmp.execute("query-status")
        return bool(state.get("status") != "inmigrate")

    async def query(self, previous: MigrationStats | None = None) -> MigrationStats:
        info = await self.qmp.execute("query-migrate")
        return (previous or MigrationStats()).updated(info)

    async def status(self) -> MigrationStatus:
        info = await self.qmp.execute("query-migrate")
        return MigrationStatus.parse(info.get("status", "none"))

    async def wait_change(self, timeout: float) -> bool:
        """Wake at once on a MIGRATION event, else after ``timeout`` s."""
        return await self.qmp.wait_event("MIGRATION", timeout)

    async def cancel(self) -> MigrationStatus:
        """``migrate_cancel`` and wait (bounded) until the stream is no longer in
        flight; the status it ended in."""
        await self.qmp.execute("migrate_cancel")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        while True:
            status = await self.status()
            if not status.in_flight or loop.time() > deadline:
                return status
            await asyncio.sleep(0.05)


async def guest_running(qmp: Qmp) -> bool:
    """Does the guest's CPU run (``query-status``)?"""
    status = await qmp.execute("query-status")
    return bool(status.get("running"))
