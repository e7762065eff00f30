"""Bad input is refused with a clear one-line reason and changes nothing."""
from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers import KERNEL, Host, free_port, guest_config, to_toml


def snapshot(host: Host) -> tuple[Any, list[str]]:
    doms = host.domains()
    for d in doms.values():
        d.pop("state_since")
    return doms, sorted(os.listdir(host.state_dir / "domains"))


def refuse(host: Host, cfg_text: str, workdir: Path, command: str = "create") -> str:
    before = snapshot(host)
    path = workdir / "bad.toml"
    path.write_text(cfg_text)
    res = host.ferry(command, str(path), check=False)
    assert res.returncode != 0, f"accepted: {cfg_text}"
    err = res.stderr.strip()
    assert err.startswith("ferry: error: ") and "\n" not in err, err
    assert "Traceback" not in res.stderr
    assert snapshot(host) == before
    assert host.qemu_pids() == [] or all(
        p in [d["pid"] for d in host.domains().values()] for p in host.qemu_pids())
    return err


@pytest.fixture(scope="module")
def base(host: Host) -> dict[str, Any]:
    # a valid definition, defined once, so that duplicates can be tried
    cfg = guest_config("existing", free_port(), uuid=str(uuid.uuid4()))
    path = host.root / "existing.toml"
    path.write_text(to_toml(cfg))
    host.ferry("define", str(path))
    return cfg


@pytest.mark.parametrize("name", ["", "-lead", ".dot", "has space", "semi;colon", "a/b",
                                  "../up", "x" * 64, "ünï", "$(reboot)"])
def test_invalid_names(host: Host, workdir: Path, base: dict[str, Any], name: str) -> None:
    err = refuse(host, to_toml(guest_config(name, 1)), workdir)
    assert "name" in err


def test_longest_valid_name_is_accepted(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    name = "a" + "b" * 62
    path = workdir / "long.toml"
    path.write_text(to_toml(guest_config(name, 1)))
    host.ferry("define", str(path))
    host.ferry("undefine", name)


def test_duplicate_name(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    err = refuse(host, to_toml(guest_config("existing", 1)), workdir)
    assert "already exists" in err


def test_duplicate_uuid(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    err = refuse(host, to_toml(guest_config("other", 1, uuid=base["uuid"])), workdir)
    assert base["uuid"] in err and "existing" in err


def test_memory_beyond_host(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    err = refuse(host, to_toml(guest_config("huge", 1, memory=8 * 1024 * 1024)), workdir)
    assert "MiB" in err


@pytest.mark.parametrize("key", ["kernel", "initrd"])
def test_missing_boot_files(host: Host, workdir: Path, base: dict[str, Any], key: str) -> None:
    cfg = guest_config("nofile", 1, **{key: "/nonexistent/file"})
    err = refuse(host, to_toml(cfg), workdir)
    assert key in err and "/nonexistent/file" in err


def test_missing_disk(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    cfg = guest_config("nodisk", 1, disks=[{"path": "/nonexistent/disk.qcow2"}])
    err = refuse(host, to_toml(cfg), workdir)
    assert "/nonexistent/disk.qcow2" in err


def test_malformed_toml(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    err = refuse(host, 'name = "x"\nmemory = = 3\n', workdir)
    assert f"{workdir}/bad.toml: malformed TOML" in err and "line 2" in err


@pytest.mark.parametrize("extra,key", [({"colour": "blue"}, "colour"),
                                       ({"nics": [{"mode": "user", "speed": 1}]}, "nics[0].speed")])
def test_unknown_keys(host: Host, workdir: Path, base: dict[str, Any],
                      extra: dict[str, Any], key: str) -> None:
    """Named as in the user's file, not as in the API request that wraps it."""
    cfg = guest_config("unknown", 1)
    cfg.update(extra)
    err = refuse(host, to_toml(cfg), workdir)
    assert err == f"ferry: error: {workdir}/bad.toml: {key}: unknown key"


@pytest.mark.parametrize("field,value,word", [
    ("memory", -5, "memory"), ("vcpus", 0, "vcpus"), ("memory", "lots", "memory"),
    ("accel", "warp", "accel"), ("machine", "q35,foo=bar", "machine"),
    ("kernel", "relative/../../etc/passwd", "kernel"),
])
def test_bad_values(host: Host, workdir: Path, base: dict[str, Any], field: str, value: Any,
                    word: str) -> None:
    cfg = guest_config("values", 1)
    cfg[field] = value
    err = refuse(host, to_toml(cfg), workdir)
    assert word in err


def test_bad_mac_and_bad_bus(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    cfg = guest_config("macs", 1)
    cfg["nics"] = [{"mode": "user", "mac": "01:00:00:00:00:01"}]
    assert "multicast" in refuse(host, to_toml(cfg), workdir)
    cfg["nics"] = [{"mode": "user", "mac": "zz:00:00:00:00:01"}]
    assert "MAC" in refuse(host, to_toml(cfg), workdir)


@pytest.mark.parametrize("field,value,expect", [
    ("machine", "q99", "machine type q99 is unknown to the QEMU of host ha"),
    ("cpu", "pentium9", "CPU model pentium9 is unknown to the QEMU of host ha"),
    ("cpu", "pentium9,+sse2", "CPU model pentium9 is unknown"),
    ("kernel", "/etc/hostname", "kernel /etc/hostname on host ha is not a Linux boot image"),
    ("initrd", "/etc/hostname", "initrd /etc/hostname on host ha is not an initramfs"),
    ("initrd", str(KERNEL), f"initrd {KERNEL} on host ha is not an initramfs"),
    ("nics", [{"mode": "bridge", "bridge": "fynobr0"}],
     "bridge fynobr0 does not exist on host ha"),
])
def test_what_the_host_cannot_run_is_refused_at_define(
        host: Host, workdir: Path, base: dict[str, Any], field: str, value: Any,
        expect: str) -> None:
    """Checked against this host's QEMU and files when defined, not at the first
    start. (``base`` defined the real test guest: its kernel and initrd pass.)"""
    cfg = guest_config("hostbad", 1, **{field: value})
    err = refuse(host, to_toml(cfg), workdir, command="define")
    assert err.startswith(f"ferry: error: {workdir}/bad.toml: ") and expect in err, err


def test_a_qemu_start_error_reaches_the_cli_in_qemus_words(
        host: Host, workdir: Path, base: dict[str, Any]) -> None:
    """A CPU property QEMU doesn't have passes define (the model is known) and
    fails at start; create leaves nothing."""
    cfg = guest_config("badprop", 1, cpu="qemu64,nosuchprop=on")
    err = refuse(host, to_toml(cfg), workdir)
    assert "QEMU" in err and "nosuchprop" in err and "not found" in err


def test_start_error_keeps_definition_shutoff(host: Host, workdir: Path,
                                              base: dict[str, Any]) -> None:
    cfg = guest_config("badprop2", 1, cpu="qemu64,nosuchprop=on")
    path = workdir / "bp.toml"
    path.write_text(to_toml(cfg))
    host.ferry("define", str(path))
    res = host.ferry("start", "badprop2", check=False)
    assert res.returncode != 0 and "nosuchprop" in res.stderr
    dom = host.domains()["badprop2"]
    assert dom["state"] == "shutoff" and dom["pid"] is None
    host.ferry("undefine", "badprop2")


def test_actions_on_unknown_or_wrong_state(host: Host, base: dict[str, Any]) -> None:
    for args in (["start", "ghost"], ["pause", "existing"], ["unpause", "existing"],
                 ["destroy", "existing"], ["info", "bad/name"], ["console", "existing"]):
        before = snapshot(host)
        res = host.ferry(*args, check=False)
        assert res.returncode == 1, args
        assert res.stderr.startswith("ferry: error: ") and res.stderr.count("\n") == 1, res.stderr
        assert snapshot(host) == before


def test_undefine_running_domain_is_refused(host: Host, base: dict[str, Any]) -> None:
    res = host.ferry("undefine", "ghost", check=False)
    assert res.returncode == 1 and "no domain" in res.stderr


def test_disk_outside_storage_dirs(host: Host, workdir: Path, base: dict[str, Any]) -> None:
    """Disk images only below the host's storage directories, symlinks resolved."""
    import tempfile
    with tempfile.NamedTemporaryFile(prefix="fy-outside-", suffix=".raw", dir="/var/tmp") as f:
        err = refuse(host, to_toml(guest_config("outside", 1, disks=[
            {"path": f.name, "format": "raw"}])), workdir)
        assert "outside every storage pool" in err
        link = workdir / "sneaky.raw"
        link.symlink_to(f.name)
        try:
            err = refuse(host, to_toml(guest_config("sneaky", 1, disks=[
                {"path": str(link), "format": "raw"}])), workdir)
            assert "outside every storage pool" in err
        finally:
            link.unlink()


def post(host: Host, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A raw POST to ferryd's Unix socket, to send what the CLI never would."""
    request = (f"POST {path} HTTP/1.1\r\nHost: ferryd\r\nConnection: close\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(host.socket))
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


@pytest.mark.parametrize("change,message", [
    ({"start": "yes"}, "start: Input should be a valid boolean"),
    ({"config": {"memory": "128"}}, "config.memory: Input should be a valid integer"),
    ({"config": {"vcpus": True}}, "config.vcpus: Input should be a valid integer"),
])
def test_api_types_are_strict(host: Host, base: dict[str, Any], change: dict[str, Any],
                              message: str) -> None:
    """Types are not coerced: "yes" is no bool, "128" no number, true no vCPU count."""
    req: dict[str, Any] = {"config": guest_config("strict", 1), "start": True}
    req["config"].update(change.pop("config", {}))
    req.update(change)
    before = snapshot(host)
    status, answer = post(host, "/v1/domains", json.dumps(req).encode())
    assert status == 400 and answer["error"]["code"] == "invalid", answer
    assert answer["error"]["message"].startswith(message), answer
    assert snapshot(host) == before


def test_deeply_nested_body(host: Host, base: dict[str, Any]) -> None:
    """~200 KB of brackets: refused as input (once HTTP 500 and a RecursionError)."""
    before = host.log.read_text()
    status, answer = post(host, "/v1/domains", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nests deeper than 32 levels" in answer["error"]["message"]
    new_log = host.log.read_text()[len(before):]
    assert "RecursionError" not in new_log and "internal error" not in new_log
