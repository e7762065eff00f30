"""Every dependency in pyproject.toml is bounded above, and what is installed fits."""
from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # packaging comes with pytest

PROJECT = tomllib.loads(
    (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in
                [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["test"]]]


@pytest.mark.parametrize("req", REQUIREMENTS, ids=[r.name for r in REQUIREMENTS])
def test_bounded_and_installed_version_fits(req: Requirement) -> None:
    assert any(spec.operator == "<" for spec in req.specifier), f"{req}: no upper bound"
    installed = version(req.name)
    assert req.specifier.contains(installed, prereleases=True), f"{req}: {installed} installed"
