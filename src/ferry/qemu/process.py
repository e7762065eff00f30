"""One class owns one QEMU process: launch, attach, stop softly then hard, clean up.

QEMU runs in its own session with stdout/stderr going to ``qemu.log``, so it
outlives ferryd (clean stop or ``kill -9``); a restarted ferryd finds it again
with ``QemuProcess.attach`` from the pid file and the QMP socket.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from ferry.errors import QemuError
from ferry.qemu.argv import RuntimePaths
from ferry.qemu.qmp import EventHandler, QmpConnection

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 30.0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state letter follows the parenthesised command name
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def read_pid(paths: RuntimePaths) -> int | None:
    try:
        return int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def owns(pid: int, paths: RuntimePaths) -> bool:
    """Is ``pid`` the QEMU of these paths (and not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(paths.qmp).encode() in cmdline


class QemuProcess:
    """A domain's QEMU. Create with ``launch`` or ``attach``."""

    def __init__(self, name: str, paths: RuntimePaths, pid: int, qmp: QmpConnection,
                 child: subprocess.Popen[bytes] | None = None) -> None:
        self.name = name
        self.paths = paths
        self.pid = pid
        self.qmp = qmp
        self._child = child

    # -- start ------------------------------------------------------------------------
    @classmethod
    async def launch(cls, name: str, paths: RuntimePaths, argv: list[str],
                     on_event: EventHandler | None = None) -> QemuProcess:
        """Start QEMU from ``argv`` (never through a shell) and connect QMP.

        Raises QemuError with argv, exit code and QEMU's own stderr if QEMU
        exits or never opens its monitor; nothing is left running then."""
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_runtime_files(paths)
        with open(paths.qemu_log, "ab") as logf:
            offset = logf.tell()
            try:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         close_fds=True)
            except OSError as exc:
                raise QemuError(f"cannot run {argv[0]}: {exc.strerror}", argv=argv) from exc
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        qmp = QmpConnection(name)
        while True:
            code = child.poll()
            if code is not None:
                raise _launch_error(name, argv, code, paths, offset)
            if paths.qmp.exists():
                try:
                    await qmp.connect(paths.qmp, on_event)
                    break
                except QemuError:
                    pass
            if time.monotonic() > deadline:
                child.kill()
                child.wait()
                remove_runtime_files(paths)
                raise QemuError(f"QEMU for {name} did not open its monitor in "
                                f"{LAUNCH_TIMEOUT:.0f}s", argv=argv, domain=name)
            await asyncio.sleep(0.02)
        proc = cls(name, paths, child.pid, qmp, child)
        log.info("launched QEMU for %s, pid %d", name, child.pid)
        return proc

    @classmethod
    async def attach(cls, name: str, paths: RuntimePaths,
                     on_event: EventHandler | None = None) -> QemuProcess | None:
        """Re-attach to a QEMU left running by an earlier ferryd; None if none runs."""
        pid = read_pid(paths)
        if pid is None or not pid_alive(pid) or not owns(pid, paths):
            return None
        qmp = QmpConnection(name)
        try:
            await qmp.connect(paths.qmp, on_event)
        except QemuError:
            log.warning("QEMU %d of %s runs but its QMP does not answer", pid, name)
            raise
        log.info("re-attached to QEMU of %s, pid %d", name, pid)
        return cls(name, paths, pid, qmp)

    # -- stop -------------------------------------------------------------------------
    def alive(self) -> bool:
        if self._child is not None:
            return self._child.poll() is None
        return pid_alive(self.pid)

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait until the process is gone; True if it is, False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() > deadline:
                return False
            if not self.qmp.closed.is_set():
                # QMP hanging up is the fast signal that QEMU is exiting (asyncio.wait,
                # not wait_for: on 3.11 wait_for can swallow our own cancellation)
                closed = asyncio.ensure_future(self.qmp.closed.wait())
                await asyncio.wait({closed}, timeout=0.5)
                closed.cancel()
            else:
                await asyncio.sleep(0.005)  # QMP is gone: exit is a matter of ms
        return True

    async def stop(self, grace: float = 3.0) -> None:
        """Stop QEMU now: QMP ``quit``, then SIGTERM, then SIGKILL. Always cleans up."""
        try:
            if self.alive() and not self.qmp.closed.is_set():
                with contextlib.suppress(QemuError):
                    await self.qmp.execute("quit", timeout=grace)
            if not await self.wait_exit(grace):
                self.signal(signal.SIGTERM)
            if not await self.wait_exit(grace):
                self.signal(signal.SIGKILL)
                await self.wait_exit(10)
        finally:
            await self.close()
            remove_runtime_files(self.paths)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this QEMU, and only to it: an attached QEMU's pid is
        checked first (it may have exited and its pid been reused)."""
        if self._child is None and not owns(self.pid, self.paths):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def close(self) -> None:
        """Drop the QMP connection (QEMU keeps running if it was)."""
        await self.qmp.close()


def remove_runtime_files(paths: RuntimePaths) -> None:
    for path in (paths.qmp, paths.console, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _launch_error(name: str, argv: list[str], code: int, paths: RuntimePaths,
                  offset: int) -> QemuError:
    try:
        with open(paths.qemu_log, "rb") as f:
            f.seek(offset)
            stderr = f.read().decode(errors="replace").strip()
    except OSError:
        stderr = ""
    remove_runtime_files(paths)
    lines = [line for line in stderr.splitlines() if line.strip()]
    # QEMU prefixes with a timestamp (-msg timestamp=on): keep its own words
    first = lines[-1].split(" ", 1)[-1] if lines else f"exit code {code}"
    errors = [ln for ln in lines if "qemu-system" in ln or "error" in ln.lower()]
    if errors:
        first = errors[0].split(" ", 1)[-1] if errors[0][:4].isdigit() else errors[0]
    return QemuError(f"QEMU for {name} failed to start: {first}", argv=argv,
                     exit_code=code, stderr=stderr, domain=name)
