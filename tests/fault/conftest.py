from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fault.fakes import INITRD_BYTES, KERNEL_BYTES, World


@pytest.fixture
async def world(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    # the probes of the host's QEMU binary: this tier runs without QEMU
    import ferry.blockers as blockers
    import ferry.domains as domains
    monkeypatch.setattr(blockers, "machine_types",
                        lambda _q: frozenset({"q35", "pc", "pc-q35-9.9"}))
    monkeypatch.setattr(domains, "machine_aliases", lambda _q: {"q35": "pc-q35-9.9"})
    monkeypatch.setattr(blockers, "cpu_models", lambda _q: frozenset({"max", "qemu64"}))
    root = Path(tempfile.mkdtemp(prefix="fyf", dir="/tmp"))  # short: Unix socket paths
    (root / "vmlinuz").write_bytes(KERNEL_BYTES)
    (root / "initrd").write_bytes(INITRD_BYTES)
    w = World(root)
    for name in ("a", "b"):
        w.add(name)
    for host in w.hosts.values():
        await host.start()
    try:
        yield w
    finally:
        for host in w.hosts.values():
            if host.runner is not None:
                await host.stop()
        for q in w.processes:
            q.exit()
        shutil.rmtree(root, ignore_errors=True)

