"""A definition checked against the host: typed blockers (no QEMU: the probes'
lists are given or faked)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry import blockers as blockers_mod
from ferry.blockers import (
    Blocker,
    BlockerCode,
    boot_file_blockers,
    bridge_blockers,
    disk_blockers,
    qemu_blockers,
)
from ferry.domains import DomainService
from ferry.errors import InsufficientResources, InvalidInput
from ferry.events import EventBus
from ferry.hostconfig import HostConfig
from ferry.models import DomainConfig
from ferry.store import Store

MACHINES = frozenset({"q35", "pc-q35-10.0", "pc", "microvm"})
CPUS = frozenset({"qemu64", "max", "host", "Haswell-v1"})


@pytest.fixture
def boot(tmp_path: Path) -> tuple[Path, Path]:
    kernel = tmp_path / "vmlinuz"
    head = bytearray(8192)
    head[0x202:0x206] = b"HdrS"
    kernel.write_bytes(bytes(head))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    return kernel, initrd


def config(boot: tuple[Path, Path], **patch: Any) -> DomainConfig:
    data: dict[str, Any] = {"name": "web01", "memory": 64, "kernel": str(boot[0]),
                            "initrd": str(boot[1])}
    return DomainConfig.model_validate({**data, **patch})


def codes(found: list[Blocker]) -> list[BlockerCode]:
    return [b.code for b in found]


def test_good_boot_files_pass(boot: tuple[Path, Path]) -> None:
    assert boot_file_blockers(config(boot), "ha") == []


def test_text_files_are_neither_kernel_nor_initrd(tmp_path: Path) -> None:
    text = tmp_path / "hostname"
    text.write_text("ha\n")
    found = boot_file_blockers(config((text, text)), "ha")
    assert codes(found) == [BlockerCode.kernel, BlockerCode.initrd]
    assert f"kernel {text} on host ha is not a Linux boot image" in found[0].message
    assert f"initrd {text} on host ha is not an initramfs" in found[1].message


def test_missing_and_unreadable_boot_files(tmp_path: Path, boot: tuple[Path, Path]) -> None:
    found = boot_file_blockers(config(boot, kernel=str(tmp_path / "gone"),
                                      initrd=str(tmp_path)), "ha")
    assert [b.message for b in found] == [
        f"kernel {tmp_path / 'gone'}: no such file on host ha",
        f"initrd {tmp_path}: no such file on host ha"]


def test_machine_and_cpu_must_be_known() -> None:
    cfg = DomainConfig(name="a", memory=64, kernel=Path("/k"), machine="q99", cpu="pentium9")
    found = qemu_blockers(cfg, "qemu-x", MACHINES, CPUS, "ha")
    assert codes(found) == [BlockerCode.machine, BlockerCode.cpu]
    assert found[0].message.startswith("machine type q99 is unknown to the QEMU of host ha")
    assert "'qemu-x -machine help'" in found[0].message
    assert found[1].message.startswith("CPU model pentium9 is unknown")


@pytest.mark.parametrize("machine,cpu", [("q35", "qemu64"), ("pc-q35-10.0", "max"),
                                         ("microvm", "Haswell-v1,+avx2,-x2apic"),
                                         ("pc", "host,migratable=off")])
def test_known_machines_and_cpus_pass(machine: str, cpu: str) -> None:
    cfg = DomainConfig(name="a", memory=64, kernel=Path("/k"), machine=machine, cpu=cpu)
    assert qemu_blockers(cfg, "qemu-x", MACHINES, CPUS, "ha") == []


def test_a_qemu_that_cannot_tell_blocks_nothing() -> None:
    cfg = DomainConfig(name="a", memory=64, kernel=Path("/k"), machine="q99", cpu="pentium9")
    assert qemu_blockers(cfg, "qemu-x", frozenset(), frozenset(), "ha") == []


def test_bridges_allowed_and_present() -> None:
    cfg = DomainConfig(name="a", memory=64, kernel=Path("/k"), nics=[
        {"mode": "bridge", "bridge": "br0", "mac": "52:54:00:00:00:01"},
        {"mode": "bridge", "bridge": "br1", "mac": "52:54:00:00:00:02"},
        {"mode": "bridge", "bridge": "br2", "mac": "52:54:00:00:00:03"},
        {"mode": "user"}])
    present = {"br0", "br1"}.__contains__
    found = bridge_blockers(cfg, ["br0", "br2"], "ha", exists=present)
    assert [b.message for b in found] == [
        "bridge br1 is not one of host ha's bridges (br0, br2)",
        "bridge br2 does not exist on host ha"]
    assert codes(found) == [BlockerCode.bridge] * 2
    assert bridge_blockers(cfg, None, "ha", exists=present)[0].message == \
        "bridge br2 does not exist on host ha"
    assert "(none)" in bridge_blockers(cfg, [], "ha", exists=present)[0].message


def test_disks_inside_storage_and_present(tmp_path: Path) -> None:
    (tmp_path / "ok.qcow2").write_bytes(b"")
    host = HostConfig(name="ha", state_dir=tmp_path, storage_dirs=[tmp_path])
    cfg = DomainConfig(name="a", memory=64, disks=[
        {"path": str(tmp_path / "ok.qcow2")}, {"path": str(tmp_path / "gone.qcow2")},
        {"path": "/etc/shadow", "format": "raw"}])
    found = disk_blockers(cfg, host)
    assert codes(found) == [BlockerCode.disk] * 2
    assert "gone.qcow2: no such file on host ha" in found[0].message
    assert "/etc/shadow is outside every storage pool of host ha" in found[1].message


# -- the domain service classifies by code -------------------------------------------
@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DomainService]:
    monkeypatch.setattr(blockers_mod, "machine_types", lambda qemu: MACHINES)
    monkeypatch.setattr(blockers_mod, "cpu_models", lambda qemu: CPUS)
    store = Store(tmp_path / "ferry.db")
    host = HostConfig(name="ha", state_dir=tmp_path, storage_dirs=[tmp_path],
                      memory_reserve=0)
    yield DomainService(host, store, "tcg", EventBus())
    store.close()


def test_memory_short_is_insufficient_resources(svc: DomainService,
                                                boot: tuple[Path, Path]) -> None:
    cfg = config(boot, memory=8 * 1024 * 1024)
    assert svc.typed_blockers(cfg, to_run=False) == []
    with pytest.raises(InsufficientResources, match="MiB free") as exc:
        svc._check(cfg, to_run=True)
    assert [b["code"] for b in exc.value.details["blockers"]] == ["memory"]


def test_a_bad_definition_is_invalid_input(svc: DomainService, boot: tuple[Path, Path]) -> None:
    cfg = config(boot, machine="q99", cpu="pentium9")
    with pytest.raises(InvalidInput, match="machine type q99") as exc:
        svc._check(cfg, to_run=False)
    assert [b["code"] for b in exc.value.details["blockers"]] == ["machine", "cpu"]


async def test_define_stores_nothing_when_blocked(svc: DomainService, tmp_path: Path,
                                                  boot: tuple[Path, Path]) -> None:
    text = tmp_path / "hostname"
    text.write_text("ha\n")
    with pytest.raises(InvalidInput, match="is not a Linux boot image"):
        await svc.define(config(boot, kernel=str(text)))
    assert svc.domains == {} and svc.store.domains() == []


def test_string_blockers_are_the_typed_ones_as_messages(
        svc: DomainService, boot: tuple[Path, Path]) -> None:
    cfg = config(boot, machine="q99", cpu="pentium9", kernel=str(boot[1]))
    typed = svc.typed_blockers(cfg, to_run=True)
    assert svc.blockers(cfg, to_run=True) == [b.message for b in typed]
    assert [b.code.value for b in typed] == ["kernel", "machine", "cpu"]


# an excerpt of QEMU 10.0's query-cpu-definitions under KVM on a host without AVX2
CPU_DEFINITIONS = [
    {"name": "Haswell-v1", "typename": "Haswell-v1-x86_64-cpu", "static": False,
     "migration-safe": True, "deprecated": False,
     "unavailable-features": ["avx2", "bmi2", "hle"]},
    {"name": "qemu64", "typename": "qemu64-x86_64-cpu", "static": False,
     "migration-safe": True, "deprecated": False, "unavailable-features": []},
    {"name": "max", "typename": "max-x86_64-cpu", "static": False,
     "migration-safe": False, "deprecated": False},
]


def test_cpu_definitions_parse_into_missing_features_per_model() -> None:
    from ferry.qemu.probe import parse_cpu_definitions
    got = parse_cpu_definitions(CPU_DEFINITIONS)
    assert got == {"Haswell-v1": ("avx2", "bmi2", "hle"), "qemu64": (), "max": ()}
    assert parse_cpu_definitions({"error": "x"}) == {}


@pytest.mark.parametrize("cpu,blocked", [("Haswell-v1", True), ("Haswell-v1,+pdpe1gb", True),
                                         ("qemu64", False), ("max", False),
                                         ("host", False)])
def test_a_cpu_model_whose_features_the_host_lacks_is_named_with_them(
        cpu: str, blocked: bool) -> None:
    from ferry.blockers import cpu_feature_blockers
    from ferry.qemu.probe import parse_cpu_definitions
    config = DomainConfig.model_validate({"name": "web", "memory": 128, "cpu": cpu,
                                          "kernel": "/boot/vmlinuz"})
    out = cpu_feature_blockers(config, parse_cpu_definitions(CPU_DEFINITIONS), "hb")
    if blocked:
        assert [b.code for b in out] == [BlockerCode.cpu]
        assert "host hb lacks" in out[0].message and "avx2, bmi2, hle" in out[0].message
    else:
        assert out == []
