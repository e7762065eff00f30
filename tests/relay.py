"""A TCP relay between two QEMUs that a test can sever: run as its own process
(``python relay.py LISTEN_HOST LISTEN_PORT TARGET_FILE``), it accepts on
LISTEN_HOST:LISTEN_PORT and forwards each connection to the ``host:port`` that
TARGET_FILE names at the moment the connection arrives. Killing the process
cuts every connection at once, as a broken link does; starting it again on the
same port lets a recovery through. Loopback only."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int, target: Path) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        thost, tport = target.read_text().strip().rsplit(":", 1)
        if not thost.startswith("127."):
            w.close()
            return
        try:
            tr, tw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, tw), pipe(tr, w))

    server = await asyncio.start_server(handle, host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
