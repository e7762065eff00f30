"""What a boot file is, told from its first bytes (pure; no QEMU).

QEMU's ``-kernel`` and ``-initrd`` take any file and fail only when the guest
boots; these sniffers let ``define`` refuse a wrong file at once. They read a
file's head, never the whole file.
"""
from __future__ import annotations

from pathlib import Path

HEAD_BYTES = 4096  # the x86 setup header and every archive magic are well inside

# x86 Linux boot protocol: the setup header's "HdrS" signature at 0x202
# (Documentation/arch/x86/boot.rst); every bzImage since 2.0 carries it
_HDRS_OFFSET = 0x202
_HDRS = b"HdrS"

# what the kernel's initramfs unpacker takes (init/initramfs.c, lib/decompress.c)
INITRD_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"070701", "cpio (newc)"),
    (b"070702", "cpio (newc, with checksums)"),
    (b"070707", "cpio (odc)"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of ``path`` (fewer if it is shorter).
    Raises OSError."""
    with path.open("rb") as f:
        return f.read(size)


def is_linux_kernel(head: bytes) -> bool:
    """Is ``head`` the start of an x86 Linux boot image (a bzImage)?"""
    return head[_HDRS_OFFSET:_HDRS_OFFSET + len(_HDRS)] == _HDRS


def initrd_format(head: bytes) -> str | None:
    """The archive format ``head`` starts with (``"gzip"``, ``"cpio (newc)"``, ...),
    or None if it is none the kernel can unpack."""
    for magic, name in INITRD_MAGICS:
        if head.startswith(magic):
            return name
    return None
