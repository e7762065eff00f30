"""Serial consoles: QEMU serves each domain's serial port on a Unix socket in
the domain's state directory (and logs everything it writes to console.log,
even while nobody is attached). ferryd is that socket's only client and fans
it out to any number of attached ``ferry console`` sessions."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 1024  # per subscriber; a client that can't keep up loses output


class ConsoleHub:
    """One domain's console: connected while at least one client is attached."""

    def __init__(self, name: str, socket_path: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def attach(self) -> asyncio.Queue[bytes | None]:
        """Subscribe to output; ``None`` in the queue means the console closed."""
        async with self._lock:
            if self._writer is None:
                reader, self._writer = await asyncio.open_unix_connection(
                    str(self.socket_path))
                self._reader_task = asyncio.create_task(self._pump(reader))
            q: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
            self._subscribers.add(q)
            return q

    async def detach(self, q: asyncio.Queue[bytes | None]) -> None:
        async with self._lock:
            self._subscribers.discard(q)
            if not self._subscribers:
                await self._disconnect()

    async def send(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
            await self._writer.drain()

    async def close(self) -> None:
        async with self._lock:
            await self._disconnect()
            for q in self._subscribers:
                _offer(q, None)
            self._subscribers.clear()

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(4096):
                for q in self._subscribers:
                    _offer(q, chunk)
        except (ConnectionError, OSError) as exc:
            log.debug("console of %s: %s", self.name, exc)
        for q in self._subscribers:
            _offer(q, None)
        # QEMU hung up (it exited): the next attach connects afresh
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._reader_task = None

    async def _disconnect(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None


def _offer(q: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        q.put_nowait(item)


def read_log(path: Path, tail: int | None = None) -> bytes:
    """The console log (or its last ``tail`` bytes); empty if there is none yet."""
    try:
        with open(path, "rb") as f:
            if tail is not None:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - tail))
            return f.read()
    except FileNotFoundError:
        return b""
