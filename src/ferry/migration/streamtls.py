"""TLS for QEMU's migration stream, with credentials made for one migration.

For each job the source makes a throw-away CA that signs exactly two
certificates: the destination QEMU's (server) and its own QEMU's (client). The
destination's half travels in the Prepare request, over the daemons' mutual-TLS
channel. Each QEMU loads its half as a ``tls-creds-x509`` object with
``verify-peer`` on; the files exist only while QEMU reads them, and the object is
deleted when the migration ends. So only these two QEMUs can talk to each other
(not even another host of the cluster can feed the incoming port), and nothing
of it outlives the job. There is no plaintext fallback: if a QEMU does not take
the credentials, the migration fails before a byte of guest memory is sent.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path

from cryptography import x509

from ferry import pki
from ferry.errors import Failed, FerryError
from ferry.migration.models import StreamCreds
from ferry.qemu.migrate import MigrationQmp, Qmp

log = logging.getLogger(__name__)

# RFC 7919's ffdhe2048 group (public, standard parameters). Without a dh-params.pem
# a server-side tls-creds-x509 makes QEMU generate DH parameters on the spot, which
# costs ~100 ms per migration; TLS 1.3 with ECDHE doesn't even use them.
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def tls_hostname(job_id: str) -> str:
    """The name in the destination QEMU's certificate, which the source checks."""
    return f"ferry-migration-{job_id}"


def object_id(job_id: str, generation: int = 0) -> str:
    """The credentials object's id; ``generation`` counts post-copy recoveries,
    each of which gets fresh credentials."""
    return f"ferry-tls-{job_id}" + (f"-{generation}" if generation else "")


def make_pair(job_id: str, days: float = 2) -> tuple[StreamCreds, StreamCreds]:
    """(destination's server half, source's client half) for job ``job_id``."""
    now = pki._now()
    ca_key = pki.new_key()
    ca = pki.ca_certificate(ca_key, f"Ferry migration {job_id} CA",
                            now + dt.timedelta(days=days))
    start = now - dt.timedelta(minutes=5)
    halves = []
    for server, name in ((True, tls_hostname(job_id)), (False, f"ferry-source-{job_id}")):
        key = pki.new_key()
        sans: list[x509.GeneralName] = [x509.DNSName(name)] if server else []
        cert = pki.leaf(ca, ca_key, key, name, "ferry-migration", server=server, sans=sans,
                        not_before=start, days=days)
        halves.append(StreamCreds(ca=pki.pem(ca), cert=pki.pem(cert), key=pki.pem(key)))
    return halves[0], halves[1]


async def load(qmp: Qmp, workdir: Path, creds_id: str, server: bool,
               creds: StreamCreds) -> None:
    """Load ``creds`` into QEMU as the ``tls-creds-x509`` object ``creds_id`` (for
    the migration stream, or an NBD server or client); the files exist only while
    QEMU reads them. Failed if QEMU does not take them."""
    endpoint = "server" if server else "client"
    tmp = workdir / f"tls-{creds_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, parents=True)
    files = [("ca-cert.pem", creds.ca), (f"{endpoint}-cert.pem", creds.cert),
             (f"{endpoint}-key.pem", creds.key)]
    if server:
        files.append(("dh-params.pem", FFDHE2048))
    try:
        for fname, text in files:
            fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        await MigrationQmp(qmp).add_tls_creds(creds_id, str(tmp), endpoint)
    except FerryError as exc:
        raise Failed(f"QEMU did not take the migration's TLS credentials: {exc.message}"
                     ) from exc
    except OSError as exc:
        raise Failed(f"cannot write the migration's TLS credentials: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # QEMU has read them


async def install(qmp: Qmp, workdir: Path, job_id: str, server: bool,
                  creds: StreamCreds, generation: int = 0) -> None:
    """Load ``creds`` into QEMU and make its migration use them; Failed if QEMU
    does not (then nothing must be sent)."""
    await load(qmp, workdir, object_id(job_id, generation), server, creds)
    try:
        await MigrationQmp(qmp).use_tls(object_id(job_id, generation),
                                        None if server else tls_hostname(job_id))
    except FerryError as exc:
        raise Failed(f"{exc.message}; refusing to send the guest in plaintext") from exc


async def remove(qmp: Qmp, job_id: str, generations: int = 0) -> None:
    """Forget the job's credentials, of every recovery up to ``generations`` too
    (QEMU may already be gone: then so are they)."""
    for gen in range(generations + 1):
        try:
            await MigrationQmp(qmp).drop_tls(object_id(job_id, gen))
        except FerryError as exc:
            log.debug("job %s: removing TLS credentials: %s", job_id, exc.message)
