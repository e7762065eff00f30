"""The destination's half of a migration: Prepare, Finish, and their undo.

Called by the source's ferryd over the relocation API. An incoming domain is
not a domain of this host until Finish has resumed it: before that it is an
``Incoming`` (a reservation and a paused ``-incoming defer`` QEMU), and every
failure path removes it without trace.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.console import ConsoleLog
from ferry.domains import DomainService
from ferry.errors import Conflict, Failed, FerryError, InvalidInput, NotFound, Refused
from ferry.failpoints import crash_point
from ferry.hostconfig import HostConfig
from ferry.migration import streamtls
from ferry.migration.models import (
    AbortRequest,
    FinishRequest,
    JobRecord,
    JobState,
    Phase,
    RelocationRequest,
)
from ferry.models import DomainState
from ferry.qemu.probe import cpu_models, machine_types
from ferry.qemu.process import QemuProcess
from ferry.store import Store

log = logging.getLogger(__name__)

INCOMING_TIMEOUT = 120.0  # s for the stream to complete once the source says it did


@dataclass
class Incoming:
    request: RelocationRequest
    record: JobRecord
    proc: QemuProcess | None = None
    lock: asyncio.Lock | None = None
    watcher: asyncio.Task[None] | None = None


class RelocationService:
    def __init__(self, host: HostConfig, domains: DomainService, store: Store) -> None:
        self.host = host
        self.domains = domains
        self.store = store
        self.incoming: dict[str, Incoming] = {}

    # -- checks -----------------------------------------------------------------------
    def blockers(self, req: RelocationRequest) -> list[str]:
        """Every reason this host can't take the domain; changes nothing."""
        cfg, out = req.config, []
        out += self.domains.identity_conflicts(cfg)
        for other in self.incoming.values():
            if other.request.config.name == cfg.name or other.request.config.uuid == cfg.uuid:
                out.append(f"domain {cfg.name} is already arriving on host {self.host.name} "
                           f"(job {other.record.id})")
        out += self.domains.blockers(cfg, to_run=req.running)
        if req.arch != platform.machine():
            out.append(f"architecture {req.arch} differs from host {self.host.name}'s "
                       f"{platform.machine()}")
        if req.running:
            accel = self.domains.accel_for(cfg)
            if req.accel is not None and accel != req.accel:
                out.append(f"the domain runs under {req.accel} but host {self.host.name} "
                           f"would use {accel}")
            machines = machine_types(self.host.qemu)
            if cfg.machine not in machines:
                out.append(f"machine type {cfg.machine} is unknown to the QEMU of host "
                           f"{self.host.name}")
            cpus = cpu_models(self.host.qemu)
            if cpus and cfg.cpu.split(",")[0] not in cpus:
                out.append(f"CPU model {cfg.cpu} is unknown to the QEMU of host "
                           f"{self.host.name}")
        return out

    def source_of(self, job_id: str) -> str | None:
        """The host that prepared job ``job_id`` here, if it is still open."""
        inc = self.incoming.get(job_id)
        return inc.request.source if inc is not None else None

    # -- Prepare ----------------------------------------------------------------------
    async def prepare(self, req: RelocationRequest) -> dict[str, object]:
        """Check, reserve, start the incoming QEMU, open its endpoint.
        Refused (nothing changed) or Failed (undone) on error."""
        if req.job_id in self.incoming:
            raise Conflict(f"job {req.job_id} is already prepared on {self.host.name}")
        found = self.blockers(req)
        if found:
            raise Refused("; ".join(found), blockers=found, host=self.host.name)
        if req.running and req.stream is None:
            raise Refused(f"source {req.source} sent no TLS credentials for the migration "
                          "stream; Ferry never migrates a guest in plaintext",
                          host=self.host.name)
        t0 = time.monotonic()
        record = JobRecord(id=req.job_id, domain=req.config.name, mode=req.mode,
                           role="destination", source=req.source, dest=self.host.name,
                           phase=Phase.prepare, started=time.time())
        inc = Incoming(req, record, lock=asyncio.Lock())
        self.incoming[req.job_id] = inc
        self._save(inc)
        if not req.running:
            record.phase_times["prepare"] = time.monotonic() - t0
            return {"uri": None}
        self.domains.reservations[req.job_id] = req.config.memory
        try:
            inc.proc = await self.domains.launch_incoming(req.config)
            # what a restarted ferryd needs to adopt a guest that Finish resumed
            self._request_file(req.config.name).write_text(
                req.model_dump_json(exclude={"stream"}))
            await inc.proc.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            assert req.stream is not None
            await streamtls.install(inc.proc.qmp, self.domains.paths(req.config.name).root,
                                    req.job_id, True, req.stream)
            await inc.proc.qmp.execute(
                "migrate-incoming", {"uri": f"tcp:{self.host.migration_ip}:0"})
            info = await inc.proc.qmp.execute("query-migrate")
            addrs = info.get("socket-address") or []
            if not addrs:
                raise Failed(f"QEMU on {self.host.name} opened no incoming endpoint")
            port = int(addrs[0]["port"])
        except (FerryError, OSError) as exc:
            why = exc.message if isinstance(exc, FerryError) else str(exc)
            await self._undo(inc, f"prepare failed: {why}")
            raise Failed(f"prepare on {self.host.name} failed: {why}",
                         host=self.host.name, phase="prepare") from exc
        record.phase_times["prepare"] = time.monotonic() - t0
        self._save(inc)
        inc.watcher = asyncio.create_task(self._watch(inc))
        log.info("job %s: ready to receive %s on %s:%d", req.job_id, req.config.name,
                 self.host.migration_ip, port)
        return {"uri": f"tcp:{self.host.migration_ip}:{port}"}

    async def _watch(self, inc: Incoming) -> None:
        """An incoming QEMU that exits before Finish (the stream broke, it was killed)
        is cleaned up at once, whether or not the source is still there to ask."""
        assert inc.proc is not None and inc.lock is not None
        proc = inc.proc
        await proc.wait_exit()
        async with inc.lock:
            if self.incoming.get(inc.record.id) is inc and inc.proc is proc:
                await self._undo(inc, "the incoming QEMU exited before Finish")

    # -- Finish -----------------------------------------------------------------------
    async def finish(self, req: FinishRequest) -> dict[str, object]:
        """The source says the stream completed: check that, resume, announce, adopt."""
        inc = self._get(req.job_id)
        assert inc.lock is not None
        async with inc.lock:
            t0 = time.monotonic()
            inc.record.phase = Phase.finish
            inc.record.stats = req.stats
            self._save(inc)
            cfg = inc.request.config
            try:
                history = base64.b64decode(req.console_b64, validate=True)
            except ValueError as exc:
                raise InvalidInput("console_b64 is not base64") from exc
            ConsoleLog(self.domains.paths(cfg.name).root).adopt(req.console_base, history)
            if inc.proc is None:  # a shut-off domain: only the definition moves
                self.domains.adopt_definition(cfg, f"migrated from {inc.request.source}")
            else:
                proc = inc.proc
                try:
                    await self._wait_incoming(proc)
                    await streamtls.remove(proc.qmp, req.job_id)
                    crash_point("finish-before-cont")
                    if req.resume:
                        await self._resume(proc)
                except FerryError as exc:
                    await self._undo(inc, f"finish failed: {exc.message}")
                    raise Failed(f"finish on {self.host.name} failed: {exc.message}",
                                 host=self.host.name, phase="finish") from exc
                # the guest has run here: from now on nothing may undo this side
                if req.resume:
                    crash_point("finish-after-cont")
                    # tell the network where the guest is now, only once it runs
                    try:
                        await proc.qmp.execute("announce-self", self.host.announce.qmp())
                    except FerryError as exc:
                        log.warning("job %s: announcing %s failed (it runs here anyway): "
                                    "%s", req.job_id, cfg.name, exc.message)
                if inc.watcher is not None:
                    inc.watcher.cancel()
                state = DomainState.running if req.resume else DomainState.paused
                self.domains.reservations.pop(req.job_id, None)
                # from here on the domain is this host's
                self.domains.adopt(cfg, proc, state, f"migrated from {inc.request.source}")
                self._request_file(cfg.name).unlink(missing_ok=True)
            inc.record.phase_times["finish"] = time.monotonic() - t0
            inc.record.phase = Phase.confirm
            inc.record.state = JobState.completed
            inc.record.ended = time.time()
            self._save(inc)
            del self.incoming[req.job_id]
            return {"finish_s": inc.record.phase_times["finish"]}

    @staticmethod
    async def _resume(proc: QemuProcess) -> None:
        """``cont``; if QEMU's answer is lost but the guest runs, that is success."""
        try:
            await proc.qmp.execute("cont")
        except FerryError:
            status = await proc.qmp.execute("query-status")
            if not status.get("running"):
                raise

    async def _wait_incoming(self, proc: QemuProcess) -> None:
        deadline = time.monotonic() + INCOMING_TIMEOUT
        while True:
            info = await proc.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise Failed(f"incoming migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise Failed(f"incoming migration still {status} after {INCOMING_TIMEOUT}s")
            await proc.qmp.wait_event("MIGRATION", 0.05)

    # -- undo -------------------------------------------------------------------------
    async def abort(self, req: AbortRequest) -> dict[str, object]:
        inc = self.incoming.get(req.job_id)
        if inc is None:
            return {"aborted": False}  # nothing here (never prepared, or already undone)
        assert inc.lock is not None
        async with inc.lock:
            if req.job_id not in self.incoming:
                return {"aborted": False}
            await self._undo(inc, req.reason or "aborted by the source",
                             state=JobState.aborted)
        return {"aborted": True}

    async def _undo(self, inc: Incoming, reason: str,
                    state: JobState = JobState.failed) -> None:
        """Kill the incoming QEMU, drop its files and the reservation."""
        if inc.watcher is not None and inc.watcher is not asyncio.current_task():
            inc.watcher.cancel()
        if inc.proc is not None:
            await inc.proc.stop(grace=1.0)
            shutil.rmtree(self.domains.paths(inc.request.config.name).root,
                          ignore_errors=True)
            await self.domains.remove_taps(inc.request.config)
            inc.proc = None
        self.domains.reservations.pop(inc.record.id, None)
        self.incoming.pop(inc.record.id, None)
        inc.record.state = state
        inc.record.error = {"phase": inc.record.phase.value, "host": self.host.name,
                            "message": reason}
        inc.record.ended = time.time()
        self._save(inc)
        log.info("job %s: incoming %s undone: %s", inc.record.id, inc.request.config.name,
                 reason)

    def status(self, job_id: str) -> dict[str, object]:
        inc = self.incoming.get(job_id)
        if inc is not None:
            alive = inc.proc is None or inc.proc.alive()
            return {"job_id": job_id, "state": "incoming", "qemu_alive": alive}
        for rec in self.store.migrations():
            if rec["id"] == job_id and rec["role"] == "destination":
                return {"job_id": job_id, "state": rec["state"]}
        raise NotFound(f"no job {job_id} on host {self.host.name}")

    async def recover(self) -> None:
        """At start: settle incoming jobs of an earlier life.

        A guest that Finish had already resumed is the newest copy (the source
        keeps its own paused when Finish goes unanswered): adopt it. Anything
        else never ran here: kill it and clean up."""
        for rec in self.store.migrations(state=JobState.running.value):
            if rec["role"] != "destination":
                continue
            name = rec["domain"]
            if name in self.domains.domains:
                continue
            paths = self.domains.paths(name)
            try:
                proc = await QemuProcess.attach(name, paths)
            except FerryError as exc:
                # alive but deaf: it may run a guest Finish resumed. Don't kill it and
                # don't call the job failed (the source would resume its copy):
                # leave it undecided, for an operator
                log.error("job %s: the incoming QEMU of %s is alive but does not answer "
                          "(%s); the job stays undecided: check that QEMU by hand",
                          rec["id"], name, exc.message)
                continue
            if proc is not None and rec["phase"] == Phase.finish.value \
                    and await self._adopt_resumed(rec, proc):
                continue
            if proc is not None:
                await proc.stop(grace=1.0)
            with contextlib.suppress(OSError, ValueError):
                req = RelocationRequest.model_validate_json(
                    self._request_file(name).read_text())
                await self.domains.remove_taps(req.config)
            shutil.rmtree(paths.root, ignore_errors=True)
            rec.update(state=JobState.failed.value, ended=time.time(),
                       error={"phase": rec["phase"], "host": self.host.name,
                              "message": "ferryd restarted during the migration"})
            self.store.save_migration(rec)

    async def _adopt_resumed(self, rec: dict[str, object], proc: QemuProcess) -> bool:
        name = str(rec["domain"])
        try:
            status = await proc.qmp.execute("query-status")
            req = RelocationRequest.model_validate_json(
                self._request_file(name).read_text())
        except (FerryError, OSError, ValueError) as exc:
            log.warning("job %s: cannot adopt %s after restart: %s", rec["id"], name, exc)
            return False
        if not status.get("running"):
            return False
        self.domains.adopt(req.config, proc, DomainState.running,
                           f"migrated from {req.source} (adopted after a ferryd restart)")
        self._request_file(name).unlink(missing_ok=True)
        rec.update(state=JobState.completed.value, ended=time.time(), phase="confirm")
        self.store.save_migration(rec)
        log.warning("job %s: adopted %s, resumed here before ferryd restarted", rec["id"], name)
        return True

    def _request_file(self, name: str) -> Path:
        return self.domains.paths(name).root / "incoming.json"

    def _get(self, job_id: str) -> Incoming:
        inc = self.incoming.get(job_id)
        if inc is None:
            raise NotFound(f"no incoming job {job_id} on host {self.host.name}")
        return inc

    def _save(self, inc: Incoming) -> None:
        self.store.save_migration(inc.record.model_dump(mode="json"))

