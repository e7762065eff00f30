"""Validation of definitions: pure, no QEMU."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from ferry.errors import Conflict, FerryError, InvalidInput, NotFound
from ferry.models import TRANSITIONS, DomainConfig, DomainState, check_name

OK = {"name": "a", "memory": 64, "kernel": "/k"}


@pytest.mark.parametrize("name", ["a", "A1", "web-01.prod_x", "9lives", "a" * 63])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "_a", ".a", "a b", "a/b", "a" * 64, "a\n",
                                  "ä", "a;b", "a$b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        check_name(name)


def test_defaults_generate_uuid_and_mac_once() -> None:
    cfg = DomainConfig.model_validate({**OK, "nics": [{}]})
    again = DomainConfig.model_validate_json(cfg.model_dump_json())
    assert again.uuid == cfg.uuid and again.nics[0].mac == cfg.nics[0].mac
    assert cfg.nics[0].mac.startswith("52:54:00:")


@pytest.mark.parametrize("patch,msg", [
    ({"memory": 8}, "greater than or equal"),
    ({"extra": 1}, "Extra inputs"),
    ({"kernel": "rel/path"}, "absolute"),
    ({"kernel": "/a/../b"}, "'..'"),
    ({"kernel": "/a,b"}, "','"),
    ({"kernel": None}, "nothing to boot"),
    ({"cmdline": "a\nb"}, "one line"),
    ({"cpu": "host;rm"}, "CPU model"),
    ({"nics": [{"mode": "bridge"}]}, "bridge"),
    ({"nics": [{"mode": "user", "bridge": "br0"}]}, "only for mode"),
    ({"nics": [{"mode": "user", "forwards": ["udp:1.2.3.4:99999-:1"]}]}, "out of range"),
    ({"nics": [{"mode": "bridge", "bridge": "br0", "forwards": ["udp::1-:1"]}]}, "only for"),
    ({"nics": [{"mac": "52:54:00:00:00:01"}, {"mac": "52:54:00:00:00:01"}]}, "share a MAC"),
    ({"disks": [{"path": "/d"}, {"path": "/d"}]}, "share a path"),
    ({"disks": [{"path": "/d", "format": "vmdk"}]}, "format"),
])
def test_bad_definitions(patch: dict[str, object], msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        DomainConfig.model_validate({**OK, **patch})


def test_transitions_cover_every_state() -> None:
    assert set(TRANSITIONS) == set(DomainState)
    for state, targets in TRANSITIONS.items():
        assert state not in targets


def test_errors_round_trip_as_json() -> None:
    for err in (InvalidInput("bad", field="x"), NotFound("gone"), Conflict("dup")):
        back = FerryError.from_json(err.to_json())
        assert type(back) is type(err) and back.message == err.message
        assert back.details == err.details
    assert InvalidInput("x").kind == "refused"


def test_cpu_models_parses_old_and_new_qemu_help(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from ferry.qemu import probe
    outputs = {
        "old": "x86 qemu64  QEMU Virtual CPU version 2.5+\nx86 Haswell  Intel Core\n\n"
               "Recognized CPUID flags:\n  3dnow 3dnowext\n",
        "new": "Available CPUs:\n  qemu64                (alias configured by machine type)\n"
               "  Haswell-v1            Intel Core Processor (Haswell)\n\n"
               "Recognized CPUID flags:\n  3dnow 3dnowext\n",
    }
    for key, text in outputs.items():
        monkeypatch.setattr(subprocess, "run", lambda *a, _t=text, **k:
                            subprocess.CompletedProcess(a, 0, stdout=_t, stderr=""))
        probe.cpu_models.cache_clear()
        models = probe.cpu_models(f"qemu-{key}")
        assert "qemu64" in models and "3dnow" not in models, (key, models)
    probe.cpu_models.cache_clear()
