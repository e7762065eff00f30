"""`ferry host`: what it prints, from a canned answer (no ferryd)."""
from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from ferry.cli import main as cli
from ferry.models import HostInfo

HOST = {"name": "a", "version": "0.1.0", "arch": "x86_64", "accel": "tcg",
        "qemu": "qemu-system-x86_64",
        "qemu_version": "10.0.0", "memory_total": 4000, "memory_free": 1200, "domains": 0,
        "running": 0, "state_dir": "/var/lib/ferry", "tcp_api": "closed", "maintenance": False,
        "memory_reserved": 512, "registry": "embedded"}


def host_output(monkeypatch: pytest.MonkeyPatch, data: dict[str, Any],
                *args: str) -> str:
    # the client's typed answer, as an older ferryd's JSON would parse too
    monkeypatch.setattr(cli, "call", lambda fn: HostInfo.model_validate(data))
    res = CliRunner().invoke(cli.app, ["host", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_shows_version(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "version       0.1.0\n" in host_output(monkeypatch, HOST)
    older = {k: v for k, v in HOST.items() if k != "version"}
    assert "version       unknown\n" in host_output(monkeypatch, older)


def test_says_how_free_memory_is_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    out = host_output(monkeypatch, HOST)
    assert "memory_total  4000 MiB\n" in out
    assert ("memory_free   1200 MiB (at most total - reserve - allocated to domains, at "
            "most what is available now)\n") in out


def test_json_is_the_answer_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    assert json.loads(host_output(monkeypatch, HOST, "--json")) == HOST
