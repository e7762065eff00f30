"""The save file's header: what `ferry restore` refuses before starting anything."""
from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import InvalidInput
from ferry.migration.savefile import HEADER_SIZE, SaveHeader, read_header, write_header
from ferry.models import DomainConfig

CFG = DomainConfig.model_validate({"name": "web", "memory": 64, "kernel": "/k",
                                   "initrd": "/i"})


def saved(path: Path, stream: bytes = b"Q" * 10000, complete: bool = True) -> SaveHeader:
    header = SaveHeader(config=CFG, running=True, host="a", saved=1.0, mapped_ram=True,
                        channels=2)
    write_header(path, header, create=True)
    with open(path, "ab") as f:
        f.write(stream)
    if complete:
        header = header.model_copy(update={"complete": True,
                                           "size": path.stat().st_size})
        write_header(path, header, create=False)
    return header


def test_a_complete_save_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "web.save"
    written = saved(path)
    assert path.stat().st_size == HEADER_SIZE + 10000
    got = read_header(path)
    assert got == written and got.config.name == "web" and got.running


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "web.save"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write_header(path, SaveHeader(config=CFG, running=False, host="a", saved=1.0,
                                      mapped_ram=False), create=True)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b"\x7fELF" + b"\0" * 100), "is not a Ferry save file"),
    (lambda p: p.write_bytes(b"FERRY-SAVE\n{not json"), "header is damaged"),
    (lambda p: p.write_bytes(b""), "is not a Ferry save file"),
])
def test_what_is_not_a_save_is_refused(tmp_path: Path, damage: object, message: str) -> None:
    path = tmp_path / "x.save"
    damage(path)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=message):
        read_header(path)


def test_an_interrupted_save_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.save"
    saved(path, complete=False)
    with pytest.raises(InvalidInput, match="did not complete"):
        read_header(path)


@pytest.mark.parametrize("cut", [1, 9999])
def test_a_truncated_or_grown_save_is_refused(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "web.save"
    saved(path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(InvalidInput, match="truncated or altered"):
        read_header(path)
    path.write_bytes(data + b"x")
    with pytest.raises(InvalidInput, match="truncated or altered"):
        read_header(path)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        read_header(tmp_path / "nope.save")
