"""ferryd under systemd: readiness (``Type=notify``) and each QEMU in its own
scope, so that ``systemctl restart ferryd`` — which stops every process in the
service's cgroup — leaves the domains running (libvirt does the same through
machined). Nothing here is needed without systemd: every call is a no-op then.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from ferry.errors import FerryError

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Tell systemd ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) when it
    started us with ``Type=notify``; False when there is no one to tell."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            s.sendall(state.encode())
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", where, exc.strerror)
            return False
    return True


def systemd_runs(root: Path = Path("/")) -> bool:
    """Is systemd the init system here (sd_booted)?"""
    return (root / "run/systemd/system").is_dir()


def want_scopes(setting: str) -> bool:
    """``qemu_scope``: ``auto`` (when systemd runs and systemd-run is there),
    ``always`` or ``never``."""
    if setting == "never":
        return False
    found = systemd_runs() and shutil.which("systemd-run") is not None
    if setting == "always" and not found:
        raise FerryError("qemu_scope = \"always\", but systemd does not run this machine "
                         "or systemd-run is missing: ferryd will not start QEMUs a restart "
                         "of its service would kill (qemu_scope = \"auto\" or \"never\")")
    return found


def scope_unit(name: str) -> str:
    """A transient scope unit name for a domain's QEMU: the domain's name made
    safe for systemd, and a random tail (a restarted domain gets a new scope)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    return f"ferry-qemu-{safe}-{secrets.token_hex(3)}.scope"


def scoped_argv(name: str, argv: list[str], slice_: str = "machine.slice") -> list[str]:
    """``argv`` run in a scope of its own: systemd-run registers the scope and then
    execs QEMU, so QEMU keeps systemd-run's pid (the one ferryd started)."""
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--slice={slice_}",
            f"--unit={scope_unit(name)}", f"--description=Ferry domain {name}",
            "--property=KillMode=mixed", "--", *argv]
