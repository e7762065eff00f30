"""hosts_allow on a real ferryd: a refused peer is cut off before anything is parsed."""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.hostsallow import HostsAllow
from helpers import Host, certificate, listening_ports, tls_context, tls_request


def test_patterns() -> None:
    allow = HostsAllow(["192.0.2.7", "198.51.100.0/24", r"^localhost$"])
    assert allow.permits("192.0.2.7") and not allow.permits("192.0.2.8")
    assert allow.permits("198.51.100.200")
    assert allow.permits("127.0.0.1")  # by its reverse name, "localhost"
    assert not allow.permits("not an address")
    default = HostsAllow(["127.0.0.0/8", "::1"])
    assert default.permits("127.0.0.3") and not default.permits("192.0.2.1")
    with pytest.raises(ValueError, match="neither"):
        HostsAllow(["(unclosed"])


@pytest.fixture(scope="module")
def guarded(guest: Any, workdir: Path) -> Iterator[Host]:
    h = Host(workdir, "guarded", "127.0.0.2", hosts_allow=["127.0.0.1", "127.0.0.2"])
    h.start()
    yield h
    h.cleanup()


def exchange(host: Host, source: str) -> bytes:
    """Send a whole HTTP request from ``source``; return whatever comes back."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect((host.address, host.control_port))
        body = b'{"job_id": "0123456789ab", "reason": "x"}'
        try:
            s.sendall(b"POST /v1/relocation/abort HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            return s.recv(4096)
        except ConnectionResetError:
            return b""


def test_refused_peer_is_cut_off_and_logged(guarded: Host) -> None:
    before = guarded.log.read_text()
    assert exchange(guarded, "127.0.0.3") == b""
    time.sleep(0.2)
    new = guarded.log.read_text()[len(before):]
    assert "refused a connection from 127.0.0.3" in new
    assert "POST" not in new and "relocation/abort" not in new  # nothing was parsed
    assert guarded.domains() == {} and guarded.qemu_pids() == []
    assert listening_ports("127.0.0.2") == {guarded.control_port}


def test_allowed_peer_gets_an_answer(guarded: Host, workdir: Path) -> None:
    ctx = tls_context(*certificate(workdir, "allowed", "host", ["127.0.0.1"]))
    status, body = tls_request(guarded, ctx, "POST", "/v1/relocation/abort",
                               b'{"job_id": "0123456789ab", "reason": "x"}')
    assert status == 200 and json.loads(body)["aborted"] is False, body


def test_refused_before_the_tls_handshake(guarded: Host, workdir: Path) -> None:
    """An address outside hosts_allow is cut off before the TLS handshake: a client
    without a certificate (which a handshake would log as such) is logged only as
    not allowed."""
    ca, _, _ = certificate(workdir, "outsider", "host", ["127.0.0.3"])
    ctx = tls_context(ca)
    before = guarded.log.read_text()
    status, err = tls_request(guarded, ctx, source="127.0.0.3")
    assert status is None, err
    time.sleep(0.2)
    new = guarded.log.read_text()[len(before):]
    assert "refused a connection from 127.0.0.3" in new and "not in hosts_allow" in new
    assert "TLS handshake" not in new
