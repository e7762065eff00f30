"""Domain lifecycle on a real ferryd with real QEMU guests (TCG)."""
from __future__ import annotations

import time
from pathlib import Path

from conftest import RunningGuest
from helpers import Host, free_port, guest_config, wait_for


def test_boot_shows_banner_and_probe_answers(running: RunningGuest) -> None:
    """The guest boots: the agent's banner is in the console log, the probe answers."""
    log = running.host.ferry("console", running.name, "--log").stdout
    assert "FERRY-AGENT READY" in log
    reply = running.probe.ask(2.0)
    assert reply is not None and reply["seq"] == str(running.probe.seq)
    assert int(reply["mono_ns"]) > 0
    dom = running.host.domains()[running.name]
    assert dom["state"] == "running" and dom["pid"]


def test_memory_check_reports_no_corruption(running: RunningGuest) -> None:
    """The agent has scanned its whole pattern at least twice and found nothing wrong."""
    reply = wait_for(lambda: (r := running.probe.ask(1.0)) and int(r["scans"]) >= 2 and r,
                     60, "two full pattern scans")
    assert reply["corrupt"] == "0"
    assert int(reply["pattern_mib"]) > 0
    assert "CORRUPTION" not in running.host.ferry("console", running.name, "--log").stdout


def test_pause_stops_probe_replies_and_unpause_restores_them(running: RunningGuest) -> None:
    h, probe = running.host, running.probe
    before = probe.wait_up()
    h.ferry("pause", running.name)
    assert h.domains()[running.name]["state"] == "paused"
    assert all(probe.ask(0.3) is None for _ in range(5)), "a paused guest answered"
    h.ferry("unpause", running.name)
    assert h.domains()[running.name]["state"] == "running"
    after = probe.wait_up(10)
    assert int(after["mono_ns"]) > int(before["mono_ns"])
    assert after["boot_id"] == before["boot_id"]


def test_console_log_grows_with_ticks(running: RunningGuest) -> None:
    h = running.host
    first = h.ferry("console", running.name, "--log").stdout.count("tick=")
    wait_for(lambda: h.ferry("console", running.name, "--log").stdout.count("tick=") > first,
             10, "a new tick line")
    tail = h.ferry("console", running.name, "--log", "--tail", "100").stdout
    assert 0 < len(tail) <= 100


def _runtime_files(host: Host, name: str) -> list[Path]:
    root = host.state_dir / "domains" / name
    return [p for p in (root / "qmp.sock", root / "console.sock", root / "qemu.pid")
            if p.exists()]


def test_kill9_of_ferryd_keeps_domain_running(host: Host) -> None:
    """kill -9 of ferryd and a restart: still running, listed so, pausable, destroyable."""
    with host.booted("survivor") as probe:
        first = probe.wait_up()
        pid = host.domains()["survivor"]["pid"]
        host.kill9()
        # the guest doesn't notice its daemon died
        assert probe.wait_up(10)["boot_id"] == first["boot_id"]
        host.start()
        dom = host.domains()["survivor"]
        assert dom["state"] == "running" and dom["pid"] == pid
        host.ferry("pause", "survivor")
        assert all(probe.ask(0.3) is None for _ in range(3))
        host.ferry("unpause", "survivor")
        assert probe.wait_up(10)["boot_id"] == first["boot_id"]
        host.ferry("destroy", "survivor")
        assert host.domains()["survivor"]["state"] == "shutoff"
        assert pid not in host.qemu_pids()


def test_clean_restart_of_ferryd_keeps_paused_state(host: Host) -> None:
    with host.booted("keeper"):
        host.ferry("pause", "keeper")
        host.stop()
        host.start()
        assert host.domains()["keeper"]["state"] == "paused"


def test_destroy_leaves_no_process_socket_or_pidfile(host: Host) -> None:
    port = free_port()
    host.create(guest_config("doomed", port))
    pid = host.domains()["doomed"]["pid"]
    assert _runtime_files(host, "doomed"), "a running domain has its sockets"
    host.ferry("destroy", "doomed")
    dom = host.domains()["doomed"]
    assert dom["state"] == "shutoff" and dom["pid"] is None
    assert pid not in host.qemu_pids()
    assert _runtime_files(host, "doomed") == []
    host.ferry("undefine", "doomed")
    assert not (host.state_dir / "domains" / "doomed").exists()


def test_guest_poweroff_becomes_shutoff(host: Host) -> None:
    """A guest that powers itself off is recorded as shutoff, not crashed."""
    with host.booted("selfstop") as probe:
        probe.wait_up()
        pid = host.domains()["selfstop"]["pid"]
        probe.send("POWEROFF")
        dom = wait_for(lambda: (d := host.domains()["selfstop"])["state"] == "shutoff" and d,
                       30, "shutoff after guest poweroff")
        assert dom["state_reason"] == "the guest powered off"
        assert dom["pid"] is None and pid not in host.qemu_pids()


def test_acpi_shutdown_and_restart_and_reboot(host: Host) -> None:
    with host.booted("acpi") as probe:
        first = probe.wait_up()
        out = host.ferry("shutdown", "acpi", "--timeout", "30").stdout
        assert "shutoff" in out
        assert host.domains()["acpi"]["state_reason"] == "shut down by the operator"
        assert "FERRY-AGENT poweroff" in host.ferry("console", "acpi", "--log").stdout
        host.ferry("start", "acpi")
        second = probe.wait_up()
        assert second["boot_id"] != first["boot_id"]
        host.ferry("reboot", "acpi")
        third = wait_for(lambda: (r := probe.ask(0.5)) and r["boot_id"] != second["boot_id"]
                         and r, 90, "the guest to come back with a new boot id")
        assert host.domains()["acpi"]["state"] == "running"
        assert third["corrupt"] == "0"


def test_shutdown_timeout_destroys_a_deaf_guest(host: Host, workdir: Path) -> None:
    """A guest that ignores the power button is destroyed after the timeout."""
    cfg = guest_config("deaf", free_port())
    # without the 'button' driver's events the agent never sees the press:
    # a guest kernel with no initrd at all panics and ignores ACPI
    cfg.pop("initrd")
    host.create(cfg)
    start = time.monotonic()
    out = host.ferry("shutdown", "deaf", "--timeout", "2").stdout
    assert "shutoff" in out and "no shutdown within 2s" in out
    assert time.monotonic() - start < 30
    host.ferry("undefine", "deaf")


def test_disks_reach_the_guest(host: Host, workdir: Path) -> None:
    """A raw and a qcow2 disk on virtio-blk are seen by the guest with their sizes."""
    import subprocess
    raw, qcow = workdir / "data.raw", workdir / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "8M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "16M"], check=True)
    cfg = guest_config("disky", free_port(),
                       disks=[{"path": str(raw), "format": "raw"},
                              {"path": str(qcow), "format": "qcow2", "readonly": True}])
    host.create(cfg)
    try:
        line = wait_for(lambda: next((ln for ln in host.ferry("console", "disky", "--log")
                                      .stdout.splitlines() if "FERRY-INIT disks:" in ln), None),
                        60, "the guest's disk list")
        # sizes in 512-byte sectors
        assert "vda:16384" in line and "vdb:32768" in line, line
    finally:
        host.ferry("destroy", "disky", check=False)
        host.ferry("undefine", "disky", check=False)
