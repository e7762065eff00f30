"""The one place that talks QMP (through ``qemu.qmp.QMPClient``).

``QmpConnection`` adds what Ferry needs on top of the library: errors
translated to ``QemuError``, an event callback, and ``closed`` — set when QEMU
hangs up (it exited, or was killed), so the owner can reap the process.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from ferry.errors import QemuError

log = logging.getLogger(__name__)

EventHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


class QmpConnection:
    """A connected QMP monitor; ``closed`` is set when the connection ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        # who hears QEMU's events; may be set or replaced after connecting
        self.on_event: EventHandler | None = None
        self._waiters: dict[str, asyncio.Event] = {}
        # QEMU's own timestamp (wall clock, s) of the latest event of each name
        self._event_times: dict[str, float] = {}

    async def connect(self, path: Path, on_event: EventHandler | None = None) -> None:
        """Connect to QEMU's QMP socket; raises QemuError if QEMU isn't there."""
        try:
            await self._client.connect(str(path))
        except (ConnectError, OSError) as exc:
            raise QemuError(f"cannot connect to QMP of {self.name} at {path}: {exc}",
                            domain=self.name) from exc
        self._client.register_listener(self._listener)
        self.on_event = on_event
        self._tasks.append(asyncio.create_task(self._watch_state()))
        self._tasks.append(asyncio.create_task(self._pump_events()))

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        """Run one QMP command; QEMU's own error text is in the QemuError."""
        if self.closed.is_set():
            raise QemuError(f"QMP of {self.name} is closed (QEMU has exited)",
                            domain=self.name, command=command)
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QemuError(f"QEMU refused {command}: {exc}",
                            domain=self.name, command=command) from exc
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP {command} on {self.name} failed: {exc!r}",
                            domain=self.name, command=command) from exc

    async def _watch_state(self) -> None:
        while True:
            state = await self._client.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                self.closed.set()
                return

    async def wait_event(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the next event called ``name``; True if it came.
        (Lets a poller wake at once on, e.g., a MIGRATION status change.)"""
        waiter = self._waiters.setdefault(name, asyncio.Event())
        fired = asyncio.ensure_future(waiter.wait())
        try:
            done, _ = await asyncio.wait({fired}, timeout=timeout)
            return bool(done)
        finally:
            fired.cancel()
            waiter.clear()

    def event_time(self, name: str) -> float | None:
        """When (QEMU's wall-clock timestamp) the latest ``name`` event happened."""
        return self._event_times.get(name)

    async def _pump_events(self) -> None:
        async for event in self._listener:
            stamp: Any = event.get("timestamp") or {}
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self._event_times[str(event["event"])] = (
                    int(stamp["seconds"]) + int(stamp["microseconds"]) / 1e6)
            waiter = self._waiters.get(str(event["event"]))
            if waiter is not None:
                waiter.set()
            on_event = self.on_event
            if on_event is None:
                continue
            try:
                data: dict[str, Any] = event.get("data") or {}  # type: ignore[assignment]
                await on_event(str(event["event"]), data)
            except Exception:  # one bad handler must not stop the pump
                log.exception("event handler failed for %s on %s", event["event"], self.name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        with contextlib.suppress(Exception):
            self._client.remove_listener(self._listener)
        self.closed.set()
