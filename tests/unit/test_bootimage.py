"""The boot-file sniffers, on synthetic bytes (pure)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ferry.bootimage import HEAD_BYTES, INITRD_MAGICS, initrd_format, is_linux_kernel, read_head


def bzimage_head() -> bytes:
    head = bytearray(HEAD_BYTES)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = b"\x0f\x02"  # boot protocol 2.15
    return bytes(head)


def test_a_bzimage_is_a_kernel() -> None:
    assert is_linux_kernel(bzimage_head())


@pytest.mark.parametrize("head", [
    b"", b"web01\n", bytes(HEAD_BYTES),
    bzimage_head()[:0x204],                       # cut inside the signature
    b"\x7fELF" + bytes(HEAD_BYTES - 4),           # a vmlinux, not a boot image
    bytes(0x200) + b"HdrS" + bytes(100),          # the signature two bytes early
])
def test_anything_else_is_not(head: bytes) -> None:
    assert not is_linux_kernel(head)


@pytest.mark.parametrize("magic,name", INITRD_MAGICS)
def test_every_initrd_format_is_known(magic: bytes, name: str) -> None:
    assert initrd_format(magic + b"\x00rest of the archive") == name


def test_real_world_heads() -> None:
    assert initrd_format(b"070701000000010000" + bytes(100)) == "cpio (newc)"
    assert initrd_format(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03") == "gzip"
    assert initrd_format(b"\xfd7zXZ\x00\x00\x01") == "xz"
    assert initrd_format(b"\x5d\x00\x00\x80\x00") == "lzma"


@pytest.mark.parametrize("head", [b"", b"web01\n", b"0707", b"07070", b"\x1f", b"BZ",
                                  b"\x5d\x00\x01", bzimage_head()])
def test_not_an_initrd(head: bytes) -> None:
    assert initrd_format(head) is None


def test_read_head_reads_only_the_head(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bzimage_head() + b"x" * (1 << 20))
    assert read_head(big) == bzimage_head()
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert read_head(small) == b"abc"
