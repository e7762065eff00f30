"""Mutual TLS between Ferry's daemons and operators.

Every TCP connection to ferryd is TLS 1.3 with certificates on both sides, all
signed by the cluster CA (``ferry pki``). What a peer may do follows from its
certificate's role (see ferry.pki): a *host* certificate reaches only the
relocation API, and only from one of the addresses it names; an *operator*
certificate reaches only the management API. A client checks that the server's
certificate names the host it meant to reach (``server_name``).
"""
from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from pydantic import BaseModel, ConfigDict

from ferry import pki
from ferry.errors import InvalidInput
from ferry.models import AbsPath


class TlsFiles(BaseModel):
    """The CA that signs the cluster, and this party's certificate and key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: AbsPath
    cert: AbsPath
    key: AbsPath


@dataclass(frozen=True)
class Identity:
    """Who is at the other end of a TLS connection, from its certificate."""

    name: str
    role: str | None
    addresses: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.role or 'unknown'} certificate {self.name!r}"


def identity(peercert: dict[str, Any] | None) -> Identity | None:
    """The Identity in ``ssl``'s dict form of a verified peer certificate."""
    if not peercert:
        return None
    subject = {k: v for rdn in peercert.get("subject", ()) for k, v in rdn}
    ous = [v for rdn in peercert.get("subject", ()) for k, v in rdn
           if k == "organizationalUnitName"]
    role = next((r for r, ou in pki.ROLE_OU.items() if ou in ous), None)
    addrs = tuple(v for k, v in peercert.get("subjectAltName", ()) if k == "IP Address")
    return Identity(subject.get("commonName", "?"), role, addrs)


def _stamp(files: TlsFiles) -> tuple[float, ...]:
    try:
        return tuple(os.stat(p).st_mtime for p in (files.ca, files.cert, files.key))
    except OSError as exc:
        raise InvalidInput(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc


def _load(ctx: ssl.SSLContext, files: TlsFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load TLS files (ca {files.ca}, cert {files.cert}, "
                           f"key {files.key}): {exc}") from exc
    return ctx


@functools.lru_cache(maxsize=16)
def _server(files: TlsFiles, stamp: tuple[float, ...]) -> ssl.SSLContext:
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@functools.lru_cache(maxsize=16)
def _client(files: TlsFiles, stamp: tuple[float, ...]) -> ssl.SSLContext:
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files)  # checks host names


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """Presents our certificate, requires one signed by the CA."""
    return _server(files, _stamp(files))


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Presents our certificate, requires the server's to be signed by the CA and to
    name the host asked for (``server_hostname``)."""
    return _client(files, _stamp(files))


def check_own(files: TlsFiles, name: str, role: str, address: str | None = None) -> None:
    """Refuse to run with a certificate that is not this party's: wrong CA, role,
    name or address, or outside its validity. Raises InvalidInput saying which."""
    if role == "host":
        server_context(files)  # loads: files readable, key matches the certificate
    else:
        client_context(files)
    try:
        cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
        ca = x509.load_pem_x509_certificate(Path(files.ca).read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read certificate {files.cert}: {exc}") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # cryptography raises several kinds for "not signed by"
        raise InvalidInput(f"{files.cert} is not signed by the CA in {files.ca}") from exc
    if pki.role_of(cert) != role:
        raise InvalidInput(f"{files.cert} has the role {pki.role_of(cert)!r}, not {role!r}")
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if role == "host" and (not cn or cn[0].value != name):
        raise InvalidInput(f"{files.cert} names host {cn[0].value if cn else '?'!r}, "
                           f"but this host is {name!r}")
    if address is not None:
        ips = [str(ip) for ip in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)]
        if address not in ips:
            raise InvalidInput(f"{files.cert} names the addresses {', '.join(ips)}, not "
                               f"this host's address {address}")
    now = pki._now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidInput(f"{files.cert} is valid only from {cert.not_valid_before_utc} "
                           f"to {cert.not_valid_after_utc}")
