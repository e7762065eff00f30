"""The CLI refuses bad input itself: a definition file, naming the file; an
option outside its choices, as a usage error. No ferryd: the socket given does
not exist, so anything that got past the CLI fails to connect."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.validation import where

FERRY = str(Path(sys.executable).parent / "ferry")
GOOD = 'name = "web01"\nmemory = 64\nkernel = "/boot/vmlinuz"\n'


def ferry(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FERRY_SOCKET": str(tmp_path / "no-ferryd.sock"), "COLUMNS": "200"}
    return subprocess.run([FERRY, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=60)


def define(tmp_path: Path, text: str | bytes, command: str = "define"
           ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "web01.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return ferry(tmp_path, command, "web01.toml")


@pytest.mark.parametrize("text,expect", [
    (GOOD + 'kernal = "/boot/vmlinuz"\n', "web01.toml: kernal: unknown key"),
    (GOOD + '[[nics]]\nmode = "user"\nspeed = 1\n', "web01.toml: nics[0].speed: unknown key"),
    (GOOD + '[[nics]]\nmode = "bridge"\n', "web01.toml: nics[0]: a bridge NIC needs 'bridge'"),
    ('memory = 64\nkernel = "/k"\n', "web01.toml: name: missing (required)"),
    (GOOD.replace("64", '"lots"'), "web01.toml: memory: Input should be a valid integer"),
])
@pytest.mark.parametrize("command", ["define", "create"])
def test_a_bad_key_or_value_names_the_file(tmp_path: Path, text: str, expect: str,
                                           command: str) -> None:
    res = define(tmp_path, text, command)
    assert res.returncode == 1
    assert res.stderr.startswith(f"ferry: error: {expect}"), res.stderr
    assert res.stderr.count("\n") == 1 and "config." not in res.stderr


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    res = define(tmp_path, 'name = "web01"\nmemory = = 3\n')
    assert res.returncode == 1
    assert res.stderr.startswith("ferry: error: web01.toml: malformed TOML: "), res.stderr
    assert "line 2" in res.stderr


def test_a_binary_file_is_not_a_traceback(tmp_path: Path) -> None:
    res = define(tmp_path, b"\x7fELF\xff\xfe\x00")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("ferry: error: web01.toml: not a text file"), res.stderr


def test_a_good_file_goes_to_ferryd(tmp_path: Path) -> None:
    res = define(tmp_path, GOOD)
    assert res.returncode == 1 and "web01.toml" not in res.stderr
    assert "no-ferryd.sock" in res.stderr, res.stderr


@pytest.mark.parametrize("loc,text", [((), ""), (("kernal",), "kernal"),
                                      (("nics", 0, "speed"), "nics[0].speed"),
                                      (("config", "disks", 1), "config.disks[1]")])
def test_locations_read_as_written(loc: tuple[int | str, ...], text: str) -> None:
    assert where(loc) == text


def test_on_timeout_outside_its_choices_is_a_usage_error(tmp_path: Path) -> None:
    res = ferry(tmp_path, "migrate", "web01", "hb", "--on-timeout", "wait")
    assert res.returncode == 2, res.stderr
    assert "--on-timeout" in res.stderr and "'wait'" in res.stderr
    assert "'pause'" in res.stderr and "'abort'" in res.stderr
    assert "no-ferryd.sock" not in res.stderr


def test_on_timeout_choices_show_in_help(tmp_path: Path) -> None:
    res = ferry(tmp_path, "migrate", "--help")
    assert res.returncode == 0 and "pause|abort" in res.stdout


@pytest.mark.parametrize("value", ["pause", "abort"])
def test_on_timeout_choices_get_to_ferryd(tmp_path: Path, value: str) -> None:
    res = ferry(tmp_path, "migrate", "web01", "hb", "--on-timeout", value)
    assert res.returncode == 1 and "no-ferryd.sock" in res.stderr, res.stderr
