"""The cluster CA and its certificates, checked with cryptography's verifier."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ferry import pki
from ferry.errors import Conflict, InvalidInput, NotFound

FERRY = str(Path(sys.executable).parent / "ferry")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify_server(ca: Path, leaf: Path, name: str) -> None:
    verifier = PolicyBuilder().store(Store([load(ca)])).build_server_verifier(
        x509.DNSName(name))
    verifier.verify(load(leaf), [])


def test_host_certificate_chains_to_the_ca_and_names_its_host(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path)
    cert = pki.issue(tmp_path, "host-a", "host", ["192.0.2.1"])
    verify_server(ca, cert, "host-a")
    with pytest.raises(VerificationError):
        verify_server(ca, cert, "host-b")  # a host certificate naming another host
    leaf = load(cert)
    assert pki.role_of(leaf) == "host"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.0.2.1") in sans.get_values_for_type(x509.IPAddress)
    assert oct(os.stat(tmp_path / "host-a.key").st_mode & 0o777) == "0o600"


def test_other_ca_and_expired_certificates_do_not_verify(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path / "one")
    pki.init_ca(tmp_path / "two")
    foreign = pki.issue(tmp_path / "two", "host-a", "host", ["192.0.2.1"])
    with pytest.raises(VerificationError):
        verify_server(ca, foreign, "host-a")
    old = pki.issue(tmp_path / "one", "old", "host", ["192.0.2.2"], days=1,
                    not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    with pytest.raises(VerificationError):
        verify_server(ca, old, "old")


def test_operator_certificate_role(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    assert pki.role_of(load(pki.issue(tmp_path, "alice", "operator"))) == "operator"


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        pki.issue(tmp_path, "a", "host", ["192.0.2.1"])
    pki.init_ca(tmp_path)
    with pytest.raises(Conflict):
        pki.init_ca(tmp_path)
    for args in (("../x", "host", ["192.0.2.1"]), ("a", "root", []), ("a", "host", []),
                 ("a", "host", ["not-an-ip"])):
        with pytest.raises(InvalidInput):
            pki.issue(tmp_path, *args)
    pki.issue(tmp_path, "a", "operator")
    with pytest.raises(Conflict):
        pki.issue(tmp_path, "a", "operator")


def test_cli(tmp_path: Path) -> None:
    d = str(tmp_path / "pki")
    assert subprocess.run([FERRY, "pki", "init", "--dir", d]).returncode == 0
    ok = subprocess.run([FERRY, "pki", "issue", "hb", "--host", "--address", "127.0.0.2",
                         "--dir", d], capture_output=True, text=True)
    assert ok.returncode == 0 and "hb.pem" in ok.stdout
    bad = subprocess.run([FERRY, "pki", "issue", "x", "--dir", d], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "exactly one of --host or --operator" in bad.stderr


def test_show_says_what_a_certificate_is(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "host-a", "host", ["192.0.2.11"])
    res = subprocess.run([FERRY, "pki", "show", "host-a", "--dir", str(tmp_path), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "host-a" and info["role"] == "host"
    assert info["addresses"] == ["192.0.2.11"] and info["dns_names"] == ["host-a"]
    assert info["valid_now"] is True and info["signed_by_ca"] is True
    other = tmp_path / "other"
    pki.init_ca(other)
    info = pki.describe(tmp_path / "host-a.pem", other / "ca.pem")
    assert info["signed_by_ca"] is False
    res = subprocess.run([FERRY, "pki", "show", "nobody", "--dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no certificate" in res.stderr
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(InvalidInput, match="not a PEM certificate"):
        pki.describe(tmp_path / "junk.pem")
