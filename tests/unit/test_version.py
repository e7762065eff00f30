"""The package root: its version, its public API, and the --version of both commands."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ferry
from ferry import daemon
from ferry.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_pyprojects() -> None:
    expected = PYPROJECT["project"]["version"]
    assert expected == ferry.PYPROJECT_VERSION  # bump both together
    assert ferry.__version__ == expected


def test_public_api() -> None:
    from ferry.client import FerryClient
    from ferry.errors import FerryError
    from ferry.models import DomainConfig
    assert ferry.FerryClient is FerryClient
    assert ferry.FerryError is FerryError and ferry.DomainConfig is DomainConfig
    assert set(ferry.__all__) <= set(dir(ferry))
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        ferry.nonesuch  # noqa: B018


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_models_do_not_load_aiohttp() -> None:
    out = run_python("import sys, ferry.models, ferry.errors; "
                     "print('aiohttp' in sys.modules, 'ferry.client' in sys.modules)")
    assert out == "False False"
    out = run_python("import sys, ferry; ferry.FerryClient; print('aiohttp' in sys.modules)")
    assert out == "True"


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "src" / "ferry" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ferry"]


def test_ferry_version() -> None:
    res = CliRunner().invoke(cli.app, ["--version"])
    assert res.exit_code == 0 and res.output == f"ferry {ferry.__version__}\n"


def test_ferryd_version_needs_no_root(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exc:
        daemon.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"ferryd {ferry.__version__}\n"
    with pytest.raises(SystemExit, match="must run as root"):
        daemon.main([])
