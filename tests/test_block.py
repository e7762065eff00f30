"""qemu/block.py against real QEMU: a disk mirrored over NBD with TLS from one QEMU
to another arrives complete, and the NBD server refuses a client without TLS.
The base of the storage migration; two paused QEMUs, no guest needed."""
from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.migration import streamtls
from ferry.qemu.block import BlockQmp
from ferry.qemu.qmp import QmpConnection
from helpers import free_port

pytestmark = pytest.mark.qemu
ADDR = "127.0.0.1"


def image(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


class PlainQemu:
    """A paused QEMU with one qcow2 image as block node ``disk0``."""

    def __init__(self, root: Path, tag: str, disk: Path) -> None:
        self.root, self.tag = root, tag
        self.sock = root / f"{tag}.qmp"
        self.log = open(root / f"{tag}.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults",
             "-display", "none", "-S", "-qmp", f"unix:{self.sock},server=on,wait=off",
             "-blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,"
                          f"file.filename={disk}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = QmpConnection(tag)

    async def connect(self) -> BlockQmp:
        for _ in range(200):
            if self.sock.exists():
                try:
                    await self.qmp.connect(self.sock)
                    return BlockQmp(self.qmp)
                except Exception:  # not listening yet
                    pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"QEMU {self.tag} did not start")

    async def close(self) -> None:
        await self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()  # by the pid we started
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    src_img, dst_img = image(tmp_path / "src.qcow2"), image(tmp_path / "dst.qcow2")
    # something to copy: 8 MiB of a pattern at 1 MiB, and 1 MiB at the end
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 8M",
                    "-c", "write -P 0x5c 63M 1M", str(src_img)], check=True,
                   capture_output=True)
    src, dst = PlainQemu(tmp_path, "src", src_img), PlainQemu(tmp_path, "dst", dst_img)
    try:
        yield {"src": src, "dst": dst, "src_img": src_img, "dst_img": dst_img,
               "root": tmp_path}
    finally:
        await src.close()
        await dst.close()


async def test_a_disk_mirrored_over_tls_nbd_arrives_complete(pair: dict[str, Any]) -> None:
    src, dst, root = pair["src"], pair["dst"], pair["root"]
    sblock, dblock = await src.connect(), await dst.connect()
    job_id = "0123456789ab"
    server, client = await asyncio.to_thread(streamtls.make_pair, job_id)
    await streamtls.load(dst.qmp, root, "nbd-tls", True, server)
    await streamtls.load(src.qmp, root, "nbd-tls", False, client)
    port = free_port(kind=1, addr=ADDR)  # SOCK_STREAM
    await dblock.serve_nbd(ADDR, port, "nbd-tls")
    await dblock.export("exp0", "disk0", "disk0", writable=True)
    await sblock.open_nbd("target0", ADDR, port, "disk0", "nbd-tls",
                          streamtls.tls_hostname(job_id))
    await sblock.mirror("mirror0", "disk0", "target0")
    job = await sblock.wait_ready("mirror0", timeout=60)
    assert job.kind == "mirror" and job.offset == job.length > 0
    await sblock.write_blocking("mirror0")  # what a migration does before switch-over
    await sblock.cancel_job("mirror0")  # ready: ends with the target complete, no pivot
    await sblock.dismiss("mirror0")
    assert await sblock.jobs() == []
    await sblock.close_node("target0")
    await dblock.remove_export("exp0")
    await dblock.stop_nbd()
    await src.close()
    await dst.close()
    res = subprocess.run(["qemu-img", "compare", "-q", str(pair["src_img"]),
                          str(pair["dst_img"])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr  # identical contents


async def test_the_nbd_server_refuses_a_client_without_tls(pair: dict[str, Any]) -> None:
    dst, root = pair["dst"], pair["root"]
    dblock = await dst.connect()
    server, _ = await asyncio.to_thread(streamtls.make_pair, "0123456789ab")
    await streamtls.load(dst.qmp, root, "nbd-tls", True, server)
    port = free_port(kind=1, addr=ADDR)
    await dblock.serve_nbd(ADDR, port, "nbd-tls")
    await dblock.export("exp0", "disk0", "disk0", writable=False)
    res = await asyncio.to_thread(subprocess.run, [
        "qemu-img", "info", f"nbd://{ADDR}:{port}/disk0"], capture_output=True, text=True,
        timeout=30)
    assert res.returncode != 0 and "TLS" in res.stderr, res.stderr
