#!/usr/bin/env python3
"""Build (and cache) Ferry's test guest: a Debian kernel and a busybox initramfs.

The kernel is taken out of Debian's ``linux-image-<version>-amd64`` package with
``apt-get download`` + ``dpkg-deb -x`` (nothing is installed into /boot). The
initramfs holds a static busybox, the virtio drivers with their dependencies
(resolved from the kernel's own ``modules.dep``), ``/init`` and the agent
(``agent.c``, compiled statically).

Output: ``<out>/vmlinuz`` and ``<out>/initrd.img``; ``<out>/stamp`` records the
inputs, so a second run with the same inputs does nothing.

Usage: build.py [--out DIR] [--force]      (default DIR: $FERRY_GUEST_DIR or
/var/cache/ferry/guest). Prints the output directory on success.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# drivers the guest needs; their dependencies are added from modules.dep
WANTED_MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "button", "evdev"]
BUSYBOX = Path("/bin/busybox")


def run(*argv: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"build.py: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package that Debian's linux-image-amd64 points at."""
    out = run("apt-cache", "depends", "linux-image-amd64")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    sys.exit("build.py: cannot find the kernel package behind linux-image-amd64 "
             "(run 'apt-get update' first)")


def fetch_kernel(pkg: str, cache: Path) -> Path:
    """Download and unpack the kernel package into cache/<pkg>; return that dir."""
    root = cache / pkg
    if (root / "boot").is_dir():
        return root
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user must be able to write here
        run("apt-get", "download", pkg, cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            sys.exit(f"build.py: apt-get download {pkg} gave {debs}")
        unpack = Path(tmp) / "x"
        run("dpkg-deb", "-x", str(debs[0]), str(unpack))
        unpack.rename(root)
    return root


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` list from a module's .modinfo strings.

    Debian's package ships no modules.dep (depmod makes it at install time),
    so read the dependency list that modpost wrote into each module."""
    for field in ko.read_bytes().split(b"\0"):
        if field.startswith(b"depends="):
            return [d for d in field[8:].decode().split(",") if d]
    return []


def module_order(moddir: Path) -> list[Path]:
    """Wanted modules plus their dependencies, each after what it needs."""
    by_name = {ko.name.split(".ko")[0].replace("-", "_"): ko
               for ko in moddir.rglob("*.ko*")}
    order: list[Path] = []

    def visit(name: str) -> None:
        if name not in by_name:
            sys.exit(f"build.py: module {name} not found under {moddir}")
        ko = by_name[name]
        if ko in order:
            return
        for dep in module_depends(ko):
            visit(dep.replace("-", "_"))
        order.append(ko)

    for name in WANTED_MODULES:
        visit(name)
    return order


def cpio_newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories have no data."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(files + [("TRAILER!!!", 0, b"")], 1):
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def build(out: Path, force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pkg = kernel_package()
    sources = [HERE / "agent.c", HERE / "init", Path(__file__)]
    stamp = hashlib.sha256(pkg.encode() + BUSYBOX.read_bytes()
                           + b"".join(p.read_bytes() for p in sources)).hexdigest()
    if not force and (out / "stamp").exists() and (out / "stamp").read_text() == stamp \
            and (out / "vmlinuz").exists() and (out / "initrd.img").exists():
        print(out)
        return
    kroot = fetch_kernel(pkg, out)
    (vmlinuz,) = (kroot / "boot").glob("vmlinuz-*")
    (moddir,) = (kroot / "lib" / "modules").iterdir()

    with tempfile.TemporaryDirectory() as tmp:
        agent = Path(tmp) / "ferry-agent"
        run("gcc", "-static", "-O2", "-Wall", "-o", str(agent), str(HERE / "agent.c"))
        run("strip", str(agent))
        order = module_order(moddir)
        files: list[tuple[str, int, bytes]] = [
            (d, 0o040755, b"") for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib",
                                         "lib/modules", "etc")]
        files += [("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
                  ("init", 0o100755, (HERE / "init").read_bytes()),
                  ("sbin/ferry-agent", 0o100755, agent.read_bytes())]
        for mod in order:
            data = mod.read_bytes()
            name = mod.name
            if name.endswith(".xz") or name.endswith(".zst"):
                sys.exit(f"build.py: compressed module {name} is not supported")
            files.append((f"lib/modules/{name}", 0o100644, data))
        files.append(("modules.order", 0o100644,
                      "".join(m.name + "\n" for m in order).encode()))
        initrd = gzip.compress(cpio_newc(files), compresslevel=6, mtime=0)

    (out / "initrd.img.tmp").write_bytes(initrd)
    shutil.copyfile(vmlinuz, out / "vmlinuz.tmp")
    os.replace(out / "initrd.img.tmp", out / "initrd.img")
    os.replace(out / "vmlinuz.tmp", out / "vmlinuz")
    (out / "stamp").write_text(stamp)
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("FERRY_GUEST_DIR", "/var/cache/ferry/guest")))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    build(args.out, args.force)


if __name__ == "__main__":
    main()
