"""Mutual TLS on a real ferryd's TCP port: who gets in, and to which API."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry import pki
from helpers import (
    FERRY,
    Host,
    certificate,
    free_port,
    guest_config,
    pki_dir,
    tls_context,
    tls_request,
    to_toml,
    wait_for,
)


@pytest.fixture(scope="module")
def secured(guest: Any, workdir: Path) -> Iterator[Host]:
    h = Host(workdir, "secured", "127.0.0.2")
    h.start()
    yield h
    h.cleanup()


@pytest.fixture(scope="module")
def ca(secured: Host, workdir: Path) -> Path:
    return pki_dir(workdir) / "ca.pem"


def new_log(host: Host, before: str) -> str:
    time.sleep(0.2)
    return host.log.read_text()[len(before):]


def refused(host: Host, ctx: Any, why: str, source: str = "127.0.0.1") -> str:
    """Assert that a request with ``ctx`` to define a domain gets no answer, is
    logged as refused for ``why``, and defined nothing. Returns the client's error."""
    before = host.log.read_text()
    body = json.dumps({"config": guest_config("intruder", 9, memory=64)}).encode()
    status, err = tls_request(host, ctx, "POST", "/v1/domains", body, source=source)
    assert status is None, err
    log = new_log(host, before)
    assert f"refused a connection from {source}" in log and why in log, log
    assert host.domains() == {}  # the request never reached the API
    return err


def test_operator_certificate_reaches_the_management_api(secured: Host, workdir: Path) -> None:
    status, body = tls_request(secured, tls_context(*certificate(workdir, "alice", "operator")))
    assert status == 200 and json.loads(body) == []


def test_without_a_client_certificate_is_refused(secured: Host, ca: Path) -> None:
    refused(secured, tls_context(ca), "TLS handshake failed: no client certificate")


def test_plaintext_is_refused(secured: Host) -> None:
    refused(secured, None, "TLS handshake failed: plain HTTP, not TLS")


def test_certificate_from_another_ca_is_refused(secured: Host, ca: Path,
                                                workdir: Path) -> None:
    other = workdir / "other-ca"
    pki.init_ca(other)
    pki.issue(other, "mallory", "operator")
    refused(secured, tls_context(ca, other / "mallory.pem", other / "mallory.key"),
            "client certificate rejected: unable to get local issuer certificate")


def test_expired_certificate_is_refused(secured: Host, ca: Path, workdir: Path) -> None:
    d = pki_dir(workdir)
    pki.issue(d, "retired", "operator", days=1,
              not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    refused(secured, tls_context(ca, d / "retired.pem", d / "retired.key"),
            "client certificate rejected: certificate has expired")


def test_host_certificate_may_not_use_the_management_api(secured: Host,
                                                        workdir: Path) -> None:
    ctx = tls_context(*certificate(workdir, "peer3", "host", ["127.0.0.3"]))
    status, body = tls_request(secured, ctx, source="127.0.0.3")
    assert status == 403 and "only use the relocation API" in body
    status, body = tls_request(secured, ctx, "POST", "/v1/domains/x/destroy",
                               source="127.0.0.3")
    assert status == 403
    # the relocation API is open to it
    status, body = tls_request(secured, ctx, path="/v1/relocation/whereabouts/x",
                               source="127.0.0.3")
    assert status == 200 and json.loads(body) == {"here": False, "next": None}


def test_operator_certificate_may_not_use_the_relocation_api(secured: Host,
                                                            workdir: Path) -> None:
    ctx = tls_context(*certificate(workdir, "alice", "operator"))
    status, body = tls_request(secured, ctx, path="/v1/relocation/whereabouts/x")
    assert status == 403 and "not for operators" in body


def test_host_certificate_from_an_address_it_does_not_name(secured: Host,
                                                          workdir: Path) -> None:
    ctx = tls_context(*certificate(workdir, "peer9", "host", ["127.0.0.9"]))
    refused(secured, ctx, "names 127.0.0.9, but the connection comes from 127.0.0.3",
            source="127.0.0.3")


def test_host_may_not_act_for_another_host(secured: Host, workdir: Path) -> None:
    ctx = tls_context(*certificate(workdir, "peer3", "host", ["127.0.0.3"]))
    body = json.dumps({"job_id": "0123456789ab", "source": "someone-else",
                       "config": guest_config("x", 9, memory=64), "mode": "live",
                       "running": False, "accel": None, "arch": "x86_64"}).encode()
    status, answer = tls_request(secured, ctx, "POST", "/v1/relocation/prepare", body,
                                 source="127.0.0.3")
    assert status == 403 and "may not act for host someone-else" in answer
    assert secured.domains() == {}


def test_peer_presenting_another_hosts_certificate_is_refused(secured: Host,
                                                             workdir: Path) -> None:
    """A host that expects peer "impostor" at secured's address gets secured's
    certificate, which names another host: the check refuses to talk to it."""
    src = Host(workdir, "checker", "127.0.0.4", peers={"impostor": secured.endpoint})
    src.start()
    try:
        src.ferry("define", str(_definition(workdir)))
        res = src.ferry("migrate", "quiet", "impostor", "--check", "--json", check=False)
        out = json.loads(res.stdout)
        assert any("is not who we expected" in b and "impostor" in b
                   for b in out["blockers"]), out
        assert secured.domains() == {}
    finally:
        src.cleanup()


def _definition(workdir: Path) -> Path:
    path = workdir / "quiet.toml"
    path.write_text(to_toml(guest_config("quiet", 9, memory=64)))
    return path


def remote(host_arg: str, *args: str, env: dict[str, str] | None = None,
           creds: tuple[Path, Path, Path] | None = None) -> subprocess.CompletedProcess[str]:
    """``ferry --host HOST_ARG ARGS`` with operator files ``creds`` (as flags)."""
    flags = []
    if creds is not None:
        flags = ["--ca", str(creds[0]), "--cert", str(creds[1]), "--key", str(creds[2])]
    return subprocess.run([FERRY, "--host", host_arg, *flags, *args], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "FERRY_SOCKET": "/nonexistent", **(env or {})})


def test_remote_operation_with_an_operator_certificate(secured: Host, workdir: Path) -> None:
    """ferry --host drives a ferryd over TCP: create a guest, read its console,
    destroy and undefine it; the local socket is not used at all."""
    alice = certificate(workdir, "alice", "operator")
    res = remote(secured.endpoint, "host", "--json", creds=alice)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "secured"
    assert info["tcp_api"].startswith(f"{secured.endpoint} (mutual TLS; hosts_allow")
    # by name, from the client configuration, with the files from there too
    config = workdir / "client.toml"
    config.write_text(f'ca = "{alice[0]}"\ncert = "{alice[1]}"\nkey = "{alice[2]}"\n'
                      f'[[hosts]]\nname = "secured"\naddress = "{secured.endpoint}"\n')
    env = {"FERRY_CLIENT_CONFIG": str(config)}
    path = workdir / "remote-guest.toml"
    path.write_text(to_toml(guest_config("remote-guest", free_port())))
    assert remote("secured", "create", str(path), env=env).returncode == 0
    try:
        assert secured.domains()["remote-guest"]["state"] == "running"
        wait_for(lambda: "FERRY-AGENT READY" in remote(
            "secured", "console", "remote-guest", "--log", env=env).stdout, 60, "the agent")
        assert remote("secured", "destroy", "remote-guest", env=env).returncode == 0
        assert remote("secured", "undefine", "remote-guest", env=env).returncode == 0
        assert secured.domains() == {}
    finally:
        secured.ferry("destroy", "remote-guest", check=False)
        secured.ferry("undefine", "remote-guest", check=False)


def test_remote_operation_refusals(secured: Host, workdir: Path) -> None:
    alice = certificate(workdir, "alice", "operator")
    # no certificate at all: a clear error, nothing sent
    res = remote(secured.endpoint, "list", env={"FERRY_CLIENT_CONFIG": "/nonexistent"})
    assert res.returncode == 1 and "needs an operator certificate" in res.stderr
    # a host certificate is not an operator's
    res = remote(secured.endpoint, "list",
                 creds=certificate(workdir, "peer1", "host", ["127.0.0.1"]))
    assert res.returncode == 1 and "only use the relocation API" in res.stderr
    # a name whose host presents another name's certificate
    config = workdir / "wrong.toml"
    config.write_text(f'ca = "{alice[0]}"\ncert = "{alice[1]}"\nkey = "{alice[2]}"\n'
                      f'[[hosts]]\nname = "elsewhere"\naddress = "{secured.endpoint}"\n')
    res = remote("elsewhere", "list", env={"FERRY_CLIENT_CONFIG": str(config)})
    assert res.returncode == 1 and "is not who we expected" in res.stderr, res.stderr
    res = remote("no-such-host.invalid", "list", creds=alice)
    assert res.returncode == 1 and "unknown host" in res.stderr
    # an operator certificate from another CA: ferryd hangs up in the handshake, and
    # the CLI says what most likely happened (not "Server disconnected")
    other = workdir / "pki-other"
    if not (other / "ca.pem").exists():
        pki.init_ca(other)
        pki.issue(other, "mallory", "operator")
    res = remote(secured.endpoint, "list",
                 creds=(alice[0], other / "mallory.pem", other / "mallory.key"))
    assert res.returncode == 1, res
    assert "hosts_allow" in res.stderr and "signed by its CA" in res.stderr, res.stderr


@pytest.mark.parametrize("cert_of,why", [
    (("peer9", "host", ["127.0.0.5"]), "names host 'peer9', but this host is 'wrongcert'"),
    (("wrongcert", "host", ["127.0.0.9"]), "not this host's address 127.0.0.5"),
    (("alice", "operator", None), "has the role 'operator', not 'host'"),
])
def test_ferryd_refuses_a_certificate_that_is_not_its_own(
        secured: Host, workdir: Path, cert_of: tuple[str, str, list[str] | None],
        why: str) -> None:
    name, role, addrs = cert_of
    if name == "wrongcert":  # a second certificate of that name: its own directory
        d = workdir / "pki-wrong"
        if not d.exists():
            d.mkdir()
            for f in ("ca.pem", "ca.key"):
                (d / f).write_bytes((pki_dir(workdir) / f).read_bytes())
            pki.issue(d, name, role, addrs)
        files = (d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")
    else:
        files = certificate(workdir, name, role, addrs)
    h = Host(workdir, "wrongcert", "127.0.0.5", tls=files)
    before = h.log.read_text() if h.log.exists() else ""
    try:
        with pytest.raises(RuntimeError, match="exited"):
            h.start()
        assert why in h.log.read_text()[len(before):]
    finally:
        h.cleanup()


def test_host_without_tls_keeps_its_port_closed_and_refuses_to_migrate(
        guest: Any, workdir: Path) -> None:
    h = Host(workdir, "loner", "127.0.0.6", tls="none")
    h.start()
    try:
        assert h.json("host")["tcp_api"] == "closed"
        path = workdir / "lonely.toml"
        path.write_text(to_toml(guest_config("lonely", free_port(), memory=64)))
        h.ferry("define", str(path))
        res = h.ferry("migrate", "lonely", "127.0.0.2:7790", check=False)
        assert res.returncode == 1 and "has no [tls] configured" in res.stderr
        # refused before anything: the domain is not left busy
        h.ferry("undefine", "lonely")
        assert h.domains() == {}
    finally:
        h.cleanup()
