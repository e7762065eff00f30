"""The source's checks of what a destination answers (pure logic)."""
from __future__ import annotations

import pytest

from ferry.errors import Failed
from ferry.migration.source import _check_uri


@pytest.mark.parametrize("uri", ["tcp:192.0.2.7:4444", "tcp:127.0.0.2:1"])
def test_tcp_uris_pass(uri: str) -> None:
    assert _check_uri(uri, True, "b") == uri


@pytest.mark.parametrize("uri", [
    "exec:touch /tmp/pwned", "fd:3", "unix:/tmp/x", "tcp:192.0.2.7:0",
    "tcp:192.0.2.7:70000", "tcp:999.0.0.1:4444", "tcp:host-b:4444", None, 42,
    "tcp:192.0.2.7:4444,exec:x"])
def test_anything_else_fails_the_migration(uri: object) -> None:
    with pytest.raises(Failed, match="unusable migration URI"):
        _check_uri(uri, True, "b")


def test_shut_off_domain_needs_no_uri() -> None:
    assert _check_uri(None, False, "b") is None
