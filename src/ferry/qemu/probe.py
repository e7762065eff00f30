"""What this host's QEMU can do: version, machine types, a working accelerator."""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# A 64 KiB "BIOS" whose reset vector writes 0x31 to the isa-debug-exit port:
# QEMU then exits with (0x31 << 1) | 1 = 99 — proof the accelerator runs code.
_PROBE_EXIT = 99


def _probe_bios() -> bytes:
    blob = bytearray(b"\xf4" * 65536)  # hlt everywhere
    blob[0xFFF0:0xFFF5] = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4])  # mov al,0x31; out 0xf4,al
    return bytes(blob)


@functools.cache
def qemu_version(qemu: str) -> str:
    out = _ask(qemu, "-version")
    first = out.splitlines()[0] if out else ""
    return first.replace("QEMU emulator version ", "").strip() or "unavailable"


def _ask(qemu: str, *args: str) -> str:
    """What ``qemu ARGS`` prints; empty if QEMU can't be run."""
    try:
        return subprocess.run([qemu, *args], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


@functools.cache
def machine_types(qemu: str) -> frozenset[str]:
    """Machine types (and aliases) that ``qemu -machine help`` lists."""
    out = _ask(qemu, "-machine", "help")
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts:
            names.add(parts[0])
            if "(alias of" in line:
                names.add(line.split("(alias of", 1)[1].strip(" )"))
    return frozenset(names)


@functools.cache
def machine_aliases(qemu: str) -> dict[str, str]:
    """Each alias ``qemu -machine help`` lists, to the versioned machine type it
    stands for on this QEMU (``q35`` -> ``pc-q35-9.2``)."""
    out = _ask(qemu, "-machine", "help")
    aliases = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts and "(alias of" in line:
            aliases[parts[0]] = line.split("(alias of", 1)[1].strip(" )")
    return aliases


def parse_cpu_definitions(answer: object) -> dict[str, tuple[str, ...]]:
    """``query-cpu-definitions``' answer: each model's ``unavailable-features``
    (what this host's CPU lacks for it under the accelerator QEMU was started with)."""
    out: dict[str, tuple[str, ...]] = {}
    if not isinstance(answer, list):
        return out
    for d in answer:
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            missing = d.get("unavailable-features") or []
            out[d["name"]] = tuple(str(f) for f in missing if isinstance(f, str))
    return out


@functools.cache
def kvm_cpu_unavailable(qemu: str) -> dict[str, tuple[str, ...]]:
    """Under KVM, each CPU model's features this host's CPU lacks, as QEMU says
    (``-machine none -accel kvm`` and QMP on stdin, as libvirt probes). Empty if
    QEMU can't be asked."""
    script = "".join(json.dumps({"execute": c}) + "\n" for c in
                     ("qmp_capabilities", "query-cpu-definitions", "quit"))
    try:
        out = subprocess.run([qemu, "-machine", "none", "-accel", "kvm", "-nodefaults",
                              "-display", "none", "-qmp", "stdio"], input=script,
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and isinstance(msg.get("return"), list):
            return parse_cpu_definitions(msg["return"])
    return {}


@functools.cache
def cpu_models(qemu: str) -> frozenset[str]:
    """CPU model names that ``qemu -cpu help`` lists (empty if it can't tell)."""
    out = _ask(qemu, "-cpu", "help")
    if not out:
        return frozenset()
    names = {"host", "max"}
    for line in out.splitlines():
        if line.startswith("Recognized"):              # CPUID flags follow, not models
            break
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":      # QEMU <= 7: "x86 qemu64 ..."
            names.add(parts[1])
        elif parts and line[:1].isspace() and not line.strip().endswith(":"):
            names.add(parts[0])                        # QEMU >= 8: "  qemu64  ..."
    return frozenset(names)


def kvm_works(qemu: str) -> bool:
    """True only if KVM really runs a guest here.

    Opening /dev/kvm is not enough: nested KVM on some clouds runs real-mode
    code but then hangs a Linux kernel, and QEMU warns that the host lacks
    basic CPUID features (e.g. SSE3). Treat either as "no KVM"."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        bios = Path(tmp) / "probe.bin"
        bios.write_bytes(_probe_bios())
        try:
            out = subprocess.run(
                [qemu, "-accel", "kvm", "-machine", "q35", "-cpu", "qemu64", "-nodefaults",
                 "-display", "none", "-no-user-config", "-bios", str(bios),
                 "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
                capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
    if out.returncode != _PROBE_EXIT:
        return False
    if "doesn't support requested feature" in out.stderr:
        log.warning("KVM is present but incomplete (%s): using TCG",
                    out.stderr.strip().splitlines()[0])
        return False
    return True


def resolve_accel(wanted: str, qemu: str) -> str:
    """``auto`` → kvm if it really works, else tcg; ``kvm``/``tcg`` as given."""
    if wanted != "auto":
        return wanted
    return "kvm" if kvm_works(qemu) else "tcg"
