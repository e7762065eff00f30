"""Interactive console attach: raw terminal, Ctrl-] detaches (as ``xm console``).

The session follows the domain: when it migrates, the server closes with
"moved" and we reconnect from the byte offset we got to, so the output goes on
without a gap or a repeat.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import termios
import tty
from typing import BinaryIO

import aiohttp

from ferry.client import FerryClient
from ferry.console import MOVED
from ferry.errors import FerryError

DETACH = b"\x1d"  # Ctrl-]
RECONNECT_S = 30.0


async def attach(client: FerryClient, name: str) -> None:
    stdin = sys.stdin.fileno()
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    loop = asyncio.get_running_loop()
    detach = asyncio.Event()
    typed: asyncio.Queue[bytes] = asyncio.Queue()

    def on_input() -> None:
        data = os.read(stdin, 1024)
        if not data or DETACH in data:
            data = data.split(DETACH, 1)[0]
            detach.set()
        if data:
            typed.put_nowait(data)

    ws = await client.console(name)
    if is_tty:
        sys.stderr.write(f"Connected to {name}'s console. Ctrl-] detaches.\r\n")
        tty.setraw(stdin)
    loop.add_reader(stdin, on_input)
    out = sys.stdout.buffer
    pos: int | None = None
    try:
        while True:
            pos, code = await _session(ws, out, typed, detach, pos)
            if code != MOVED or detach.is_set():
                break
            ws = await _reconnect(client, name, pos)
            sys.stderr.write(f"\r\n[{name} moved: console reconnected]\r\n")
    finally:
        loop.remove_reader(stdin)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            await ws.close()
    if detach.is_set():
        if is_tty:
            sys.stderr.write("\r\ndetached\r\n")
    elif ws.close_code == 1000:
        sys.stderr.write("\r\nconsole closed: the domain stopped\r\n")
    else:
        sys.stderr.write(f"\r\nconsole closed ({ws.close_code})\r\n")


async def _reconnect(client: FerryClient, name: str, pos: int | None
                     ) -> aiohttp.ClientWebSocketResponse:
    deadline = asyncio.get_running_loop().time() + RECONNECT_S
    while True:
        try:
            return await client.console(name, pos)
        except FerryError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _session(ws: aiohttp.ClientWebSocketResponse, out: BinaryIO,
                   typed: asyncio.Queue[bytes], detach: asyncio.Event,
                   pos: int | None) -> tuple[int | None, int | None]:
    async def receive() -> None:
        nonlocal pos
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                pos = int(json.loads(msg.data)["offset"])
            elif msg.type == aiohttp.WSMsgType.BINARY:
                out.write(msg.data)
                out.flush()
                if pos is not None:
                    pos += len(msg.data)
            else:
                break

    async def send() -> None:
        while True:
            await ws.send_bytes(await typed.get())

    tasks = [asyncio.create_task(receive()), asyncio.create_task(send()),
             asyncio.create_task(detach.wait())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return pos, ws.close_code
