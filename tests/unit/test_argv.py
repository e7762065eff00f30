"""Domain definition → QEMU argv, against golden files (--regen-golden rewrites them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ferry.models import DomainConfig
from ferry.qemu.argv import RuntimePaths, build_argv

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UUID = "6c1a4a52-3b0c-4e2a-9f1e-0d7f6a1b2c3d"

CASES: dict[str, dict[str, Any]] = {
    "kernel-user-net": {
        "name": "tiny", "uuid": UUID, "memory": 256, "accel": "tcg",
        "kernel": "/img/vmlinuz", "initrd": "/img/initrd.img",
        "cmdline": "console=ttyS0 quiet ferry.ip=10.0.2.15/24",
        "nics": [{"mac": "52:54:00:12:34:56", "mode": "user",
                  "forwards": ["udp:127.0.0.1:7777-:7777", "tcp::2222-:22"]}],
    },
    "disk-boot-bridge": {
        "name": "web01", "uuid": UUID, "memory": 2048, "vcpus": 4, "machine": "pc",
        "cpu": "Haswell-noTSX", "accel": "kvm", "serial": False,
        "disks": [{"path": "/pool/web01.qcow2", "pool": "local", "image": "web01.qcow2",
                   "cache": "none"},
                  {"path": "/pool/data.raw", "format": "raw", "bus": "scsi", "readonly": True,
                   "cache": "directsync"},
                  {"path": "/pool/legacy.raw", "format": "raw", "bus": "ide", "cache": "unsafe"}],
        "nics": [{"mac": "52:54:00:aa:bb:cc", "mode": "bridge", "bridge": "br0"},
                 {"mac": "52:54:00:aa:bb:cd", "mode": "none", "model": "e1000"},
                 {"mac": "52:54:00:aa:bb:ce", "mode": "bridge", "bridge": "br1",
                  "model": "rtl8139"}],
        # migration defaults leave the command line as it is
        "migration": {"parallel": 2, "compress": "zstd", "max_downtime_ms": 100},
    },
}


def render(case: str) -> str:
    cfg = DomainConfig.model_validate(CASES[case])
    accel = cfg.accel.value
    argv = build_argv(cfg, RuntimePaths(Path("/state/domains") / cfg.name),
                      qemu="qemu-system-x86_64", accel=accel)
    return json.dumps(argv, indent=1) + "\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_argv_matches_golden(case: str, request: pytest.FixtureRequest) -> None:
    path = GOLDEN / f"{case}.argv.json"
    text = render(case)
    if request.config.getoption("--regen-golden"):
        path.write_text(text)
    assert path.read_text() == text, f"argv changed for {case}: rerun with --regen-golden"


def test_incoming_is_last() -> None:
    cfg = DomainConfig.model_validate(CASES["kernel-user-net"])
    argv = build_argv(cfg, RuntimePaths(Path("/s")), qemu="q", accel="tcg", incoming="defer")
    assert argv[-2:] == ["-incoming", "defer"]


def test_every_config_field_is_exercised() -> None:
    """A field that no golden case sets is a field whose QEMU mapping is untested."""
    top = set(DomainConfig.model_fields)
    used = set().union(*(c.keys() for c in CASES.values()))
    assert top - used == set()
    for sub in ("disks", "nics"):
        model = DomainConfig.model_fields[sub].annotation.__args__[0]  # type: ignore[union-attr]
        used_sub = {k for c in CASES.values() for item in c.get(sub, []) for k in item}
        assert set(model.model_fields) - used_sub == set(), sub
