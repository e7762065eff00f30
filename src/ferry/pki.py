"""The cluster's certificates: one CA, a certificate per host and per operator.

    ferry pki init  [--dir D]                       → D/ca.pem, D/ca.key
    ferry pki issue NAME --host --address IP [...]  → D/NAME.pem, D/NAME.key
    ferry pki issue NAME --operator                 → D/NAME.pem, D/NAME.key
    ferry pki show NAME|FILE                        what a certificate says

A certificate's role is in its subject's organizational unit (``ferry-host`` or
``ferry-operator``); a host certificate names its host (CN and a DNS
subjectAltName) and its addresses (IP subjectAltNames), so a peer can check it
talks to the host it meant. Keys are ECDSA P-256 and written mode 0600.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.errors import Conflict, InvalidInput, NotFound
from ferry.models import check_name

ROLES = ("host", "operator")
ROLE_OU = {"host": "ferry-host", "operator": "ferry-operator"}


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(directory: Path, days: int = 3650) -> Path:
    """Create the cluster CA in ``directory``; refuses to overwrite one."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() or key_path.exists():
        raise Conflict(f"a CA already exists in {directory}")
    key = new_key()
    cert = ca_certificate(key, "Ferry cluster CA", _now() + dt.timedelta(days=days))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(directory: Path, name: str, role: str, addresses: list[str] | None = None,
          days: int = 825, not_before: dt.datetime | None = None) -> Path:
    """Issue a ``role`` certificate for ``name``, signed by the CA in ``directory``."""
    try:
        check_name(name)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    try:
        ips = [ipaddress.ip_address(a) for a in addresses or []]
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    if role == "host" and not ips:
        raise InvalidInput("a host certificate needs at least one --address")
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise NotFound(f"no CA in {directory}: run 'ferry pki init' first") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{directory / 'ca.key'} is not an ECDSA key made by ferry pki")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise Conflict(f"a certificate for {name} already exists in {directory}")
    key = new_key()
    sans: list[x509.GeneralName] = []
    if role == "host":
        sans = [x509.DNSName(name), *(x509.IPAddress(ip) for ip in ips)]
    cert = leaf(ca_cert, ca_key, key, name, ROLE_OU[role], server=role == "host", sans=sans,
                not_before=not_before or _now() - dt.timedelta(minutes=5),
                days=days)
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str,
                   not_valid_after: dt.datetime) -> x509.Certificate:
    """A self-signed CA certificate that may sign leaf certificates only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(not_valid_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))


def leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
         key: ec.EllipticCurvePrivateKey, common_name: str, unit: str, server: bool,
         sans: list[x509.GeneralName], not_before: dt.datetime,
         days: float) -> x509.Certificate:
    """A certificate for ``key`` signed by the CA: client auth, and server auth too
    if ``server``. (Key usage non-critical with key encipherment: GnuTLS, and so
    QEMU's tls-creds-x509, insist on it for leaf certificates.)"""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)])
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_before + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True,
                                            key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=True,
                                            data_encipherment=False, encipher_only=False,
                                            decipher_only=False), critical=False)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def role_of(cert: x509.Certificate) -> str | None:
    """``host``, ``operator`` or None, from the subject's organizational unit."""
    ous = [a.value for a in cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)]
    for role, ou in ROLE_OU.items():
        if ou in ous:
            return role
    return None


def describe(path: Path, ca_path: Path | None = None) -> dict[str, object]:
    """What a certificate says, for an operator: name, role, addresses, validity,
    and (given the CA) whether the CA signed it."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise NotFound(f"no certificate {path}") from exc
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path} is not a PEM certificate: {exc}") from exc
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    now = _now()
    info: dict[str, object] = {
        "file": str(path), "name": str(cn[0].value) if cn else None, "role": role_of(cert),
        "dns_names": dns, "addresses": ips, "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "valid_now": cert.not_valid_before_utc <= now <= cert.not_valid_after_utc,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
    }
    if ca_path is not None and ca_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
            info["signed_by_ca"] = True
        except Exception:  # cryptography raises several kinds for "not signed by"
            info["signed_by_ca"] = False
    return info
