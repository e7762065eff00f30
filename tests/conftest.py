from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import GUEST_DIR, INITRD, KERNEL, Host, Probe, free_port, guest_config

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite the golden files of the argv builder")


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    """The test guest (built and cached by guest/build.py). Missing QEMU or guest is a
    failure, never a skip."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed: run scripts/setup.sh")
    subprocess.run([sys.executable, str(ROOT / "guest" / "build.py"), "--out",
                    str(GUEST_DIR)], check=True, capture_output=True)
    assert KERNEL.is_file() and INITRD.is_file()
    return KERNEL, INITRD


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # short path: Unix socket paths are limited to 107 bytes
    path = Path(tempfile.mkdtemp(prefix="fy", dir="/tmp"))
    yield path
    if not os.environ.get("FERRY_KEEP_WORKDIR"):  # set it to read the ferryd logs
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def host(guest: tuple[Path, Path], workdir: Path) -> Iterator[Host]:
    h = Host(workdir, "ha", storage_dirs=[str(workdir)])
    h.start()
    yield h
    h.cleanup()


class RunningGuest:
    def __init__(self, host: Host, name: str, probe: Probe) -> None:
        self.host, self.name, self.probe = host, name, probe


@pytest.fixture(scope="module")
def running(host: Host) -> Iterator[RunningGuest]:
    """One booted test guest shared by the tests of a module that don't stop it."""
    port = free_port()
    host.create(guest_config("shared", port))
    probe = Probe(port)
    probe.wait_up()
    yield RunningGuest(host, "shared", probe)
    probe.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that boots the test guest (directly or through a fixture) is
    marked ``qemu``: ``pytest -m "not qemu"`` runs the pure and fault tiers alone."""
    for item in items:
        if "guest" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qemu)
