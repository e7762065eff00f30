"""ferryd under systemd: the readiness message, the scope wrapping of QEMU's
argv, the default configuration file (no systemd needed: a socket of the test's
own stands for systemd's)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ferry import systemd
from ferry.daemon import default_config


def test_notify_sends_the_state_to_notify_socket(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1\nSTATUS=host a ready")
        assert listener.recv(4096) == b"READY=1\nSTATUS=host a ready"


def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_qemu_runs_in_a_scope_of_its_own() -> None:
    argv = ["qemu-system-x86_64", "-name", "web 01", "-S"]
    out = systemd.scoped_argv("web 01", argv)
    assert out[:2] == ["systemd-run", "--scope"] and out[-4:] == argv
    unit = next(a for a in out if a.startswith("--unit="))
    assert unit.startswith("--unit=ferry-qemu-web_01-") and unit.endswith(".scope")
    assert "--slice=machine.slice" in out and out[out.index("--") + 1] == argv[0]
    assert systemd.scope_unit("a") != systemd.scope_unit("a")   # a new scope each start


def test_scopes_only_where_systemd_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd, "systemd_runs", lambda root=Path("/"): False)
    assert systemd.want_scopes("auto") is False
    assert systemd.want_scopes("never") is False
    monkeypatch.setattr(systemd, "systemd_runs", lambda root=Path("/"): True)
    monkeypatch.setattr(systemd.shutil, "which", lambda _: "/usr/bin/systemd-run")
    assert systemd.want_scopes("auto") is True
    assert systemd.want_scopes("never") is False


def test_the_default_configuration_file(tmp_path: Path) -> None:
    given = tmp_path / "mine.toml"
    assert default_config(given, tmp_path / "etc.toml") == given
    assert default_config(None, tmp_path / "etc.toml") is None
    (tmp_path / "etc.toml").write_text("")
    assert default_config(None, tmp_path / "etc.toml") == tmp_path / "etc.toml"


def test_the_unit_file_is_type_notify_and_hardened() -> None:
    unit = (Path(__file__).resolve().parents[2] / "contrib/systemd/ferryd.service").read_text()
    assert "Type=notify" in unit and "NoNewPrivileges=yes" in unit
    assert "ProtectSystem=full" in unit and "/etc/ferry/ferryd.toml" in unit
