"""ferryd's configuration: what it refuses, and the secure defaults."""
from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import InvalidInput
from ferry.hostconfig import HostConfig, load_host_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ferryd.toml"
    path.write_text(text)
    return path


def test_tcp_port_closed_by_default() -> None:
    cfg = HostConfig()
    assert cfg.control_port == 0 and cfg.tls is None
    assert cfg.hosts_allow == ["127.0.0.0/8", "::1"]


def test_open_port_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="mutual TLS only"):
        load_host_config(write(tmp_path, "control_port = 7790\n"))
    cfg = load_host_config(write(tmp_path, 'control_port = 7790\n[tls]\nca = "/p/ca.pem"\n'
                                           'cert = "/p/a.pem"\nkey = "/p/a.key"\n'))
    assert cfg.tls is not None and cfg.tls.cert == Path("/p/a.pem")


@pytest.mark.parametrize("text,match", [
    ("[announce]\nrounds = 0\n", "rounds"),
    ("[announce]\nstep_ms = -1\n", "step_ms"),
    ("[announce]\nburst = 3\n", "burst"),
    ('[tls]\nca = "relative.pem"\ncert = "/a"\nkey = "/b"\n', "tls.ca: .*absolute"),
    ("bridges = [1]\n", "bridges"),
])
def test_bad_settings_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        load_host_config(write(tmp_path, text))


def test_announce_maps_to_qmp(tmp_path: Path) -> None:
    cfg = load_host_config(write(tmp_path, "[announce]\nrounds = 3\ninitial_ms = 20\n"))
    assert cfg.announce.qmp() == {"rounds": 3, "initial": 20, "max": 550, "step": 100}
