"""Interactive console attach: raw terminal, Ctrl-] detaches (as ``xm console``)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty

import aiohttp

from ferry.api.client import FerryClient

DETACH = b"\x1d"  # Ctrl-]


async def attach(client: FerryClient, name: str) -> None:
    ws = await client.console(name)
    stdin = sys.stdin.fileno()
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    loop = asyncio.get_running_loop()
    detach = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()
    if is_tty:
        sys.stderr.write(f"Connected to {name}'s console. Ctrl-] detaches.\r\n")
        tty.setraw(stdin)

    def on_input() -> None:
        data = os.read(stdin, 1024)
        if not data or DETACH in data:
            data = data.split(DETACH, 1)[0]
            detach.set()
        if data:
            task = asyncio.ensure_future(ws.send_bytes(data))
            pending.add(task)
            task.add_done_callback(pending.discard)

    loop.add_reader(stdin, on_input)
    out = sys.stdout.buffer
    try:
        receiver = asyncio.create_task(_receive(ws, out))
        waiter = asyncio.create_task(detach.wait())
        await asyncio.wait({receiver, waiter}, return_when=asyncio.FIRST_COMPLETED)
        for task in (receiver, waiter):
            task.cancel()
    finally:
        loop.remove_reader(stdin)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            await ws.close()
    if ws.close_code and ws.close_code != 1000:
        sys.stderr.write(f"\r\nconsole closed ({ws.close_code})\r\n")
    elif is_tty:
        sys.stderr.write("\r\ndetached\r\n")


async def _receive(ws: aiohttp.ClientWebSocketResponse, out: object) -> None:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            out.write(msg.data)  # type: ignore[attr-defined]
            out.flush()  # type: ignore[attr-defined]
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
            break
