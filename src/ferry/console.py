"""Serial consoles.

QEMU serves each domain's serial port on a Unix socket in the domain's state
directory and logs every byte the guest writes to ``console.log``, attached or
not. That log is the console's output stream: attached sessions follow it by
byte offset, so a session that reconnects (after ferryd restarts, or after the
domain moved to another host) continues exactly where it left off. The log is
logical across hosts: a migration hands the source's log to the destination
(``console.history``), so offsets keep counting wherever the domain runs.

ferryd is the socket's only client (``ConsoleHub``): it forwards what sessions
type and drains what QEMU sends, so the guest's serial port never blocks."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 1024  # per subscriber; a client that can't keep up loses output
# the websocket close code that says "the domain left this host: reconnect through
# your own ferryd from the offset you got to" (see ferry.api.consoles)
MOVED = 4001


class ConsoleHub:
    """One domain's console socket: connected while at least one session is
    attached; output read from it is dropped (sessions follow the log)."""

    def __init__(self, name: str, socket_path: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def sessions(self) -> int:
        """Sessions attached now."""
        return len(self._subscribers)

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
            while await reader.read(65536):
                pass  # the log has it; reading keeps the guest's serial port flowing
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


class ConsoleLog:
    """A domain's console output as one stream of bytes with stable offsets:
    ``base`` (bytes dropped long ago) + ``console.history`` (earlier hosts)
    + ``console.log`` (this host's QEMU)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "console.log"
        self.history = root / "console.history"
        self.base_file = root / "console.base"

    def base(self) -> int:
        try:
            return int(self.base_file.read_text())
        except (OSError, ValueError):
            return 0

    def _sizes(self) -> tuple[int, int, int]:
        sizes = []
        for path in (self.history, self.log):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return self.base(), sizes[0], sizes[1]

    def size(self) -> int:
        """The offset just past the newest byte."""
        return sum(self._sizes())

    def read(self, start: int, limit: int = 1 << 20) -> tuple[int, bytes]:
        """Bytes from offset ``start`` (at most ``limit``); returns (offset, data),
        where offset > start if the bytes before it are no longer kept."""
        base, hist, _ = self._sizes()
        start = max(start, base)
        out = b""
        if start < base + hist:
            out = _read_at(self.history, start - base, limit)
        if len(out) < limit:
            out += _read_at(self.log, max(0, start + len(out) - base - hist),
                            limit - len(out))
        return start, out

    def tail(self, count: int | None) -> bytes:
        size = self.size()
        start = self.base() if count is None else max(self.base(), size - count)
        return self.read(start, limit=1 << 30)[1]

    def export(self, max_bytes: int = 4 << 20) -> tuple[int, bytes]:
        """What a migration hands over: (offset of the first byte, bytes)."""
        size = self.size()
        return self.read(max(0, size - max_bytes), limit=max_bytes)

    def adopt(self, base: int, data: bytes) -> None:
        """Take over the log of a domain arriving from another host (before it runs)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.base_file.write_text(str(base))
        self.history.write_bytes(data)


def _read_at(path: Path, offset: int, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""
