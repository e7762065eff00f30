"""The source's half of a migration, and the job that runs all five phases.

    CLI            source ferryd                       destination ferryd
     │ migrate ──▶ Begin: domain exists, not busy;
     │             hold it for the whole job
     │             Prepare ─────────── relocation/prepare ──▶ checks, reserve,
     │                                                        QEMU -incoming defer,
     │             ◀────────────────── uri ──────────────────  migrate-incoming
     │             Perform: [offline: stop] migrate uri ═══ QEMU stream ═══▶
     │               watch query-migrate, steer, heartbeat the destination
     │             Finish ──────────── relocation/finish ───▶ stream complete? cont,
     │                                                        announce-self, adopt
     │             Confirm: ── commit point ── stop the source QEMU, forget the domain
     ◀── job record (both hosts keep one)

Each phase registers its undo when it succeeds; a failure runs the undos in
reverse: cancel the stream and resume the source guest, tell the destination
to drop its QEMU and reservation. The source keeps the guest until the
destination has confirmed it runs there (Finish), so a domain is never lost,
and the destination only resumes after the source is paused, so it never runs
twice.
"""
from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import platform
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.client import FerryClient, peer_client
from ferry.console import ConsoleLog
from ferry.domains import Domain, DomainService
from ferry.errors import Busy, Failed, FerryError, InvalidInput, NotFound, Refused
from ferry.hostconfig import HostConfig
from ferry.migration import streamtls
from ferry.migration.models import (
    JobRecord,
    JobState,
    MigrateOptions,
    MigrateRequest,
    Mode,
    OnTimeout,
    Phase,
    RelocationRequest,
    StreamCreds,
)
from ferry.models import DomainState
from ferry.qemu.process import QemuProcess
from ferry.store import Store
from ferry.tls import client_context

log = logging.getLogger(__name__)

POLL_S = 0.1          # query-migrate interval
HEARTBEAT_S = 1.0     # how often the source asks the destination if it's alive
HEARTBEAT_MISSES = 2  # unanswered heartbeats before the source gives up
UNLIMITED_BPS = 1 << 40

Undo = Callable[[], Awaitable[None]]


class Aborted(Failed):
    code = "aborted"


@dataclass
class SourceJob:
    record: JobRecord
    options: MigrateOptions
    dom: Domain
    endpoint: tuple[str, int]
    abort_requested: str | None = None
    was_running: bool = False
    uri: str | None = None
    task: asyncio.Task[None] | None = None
    undo: list[tuple[Phase, Undo]] = field(default_factory=list)
    peer: FerryClient | None = None
    stream_creds: StreamCreds | None = field(default=None, repr=False)

    def client(self) -> FerryClient:
        assert self.peer is not None, "the job's peer client is open while it runs"
        return self.peer


class MigrationService:
    def __init__(self, host: HostConfig, domains: DomainService, store: Store) -> None:
        self.host = host
        self.domains = domains
        self.store = store
        self.jobs: dict[str, SourceJob] = {}

    async def close(self) -> None:
        """ferryd is stopping: interrupt running jobs where they are (their record
        keeps the phase; recover() settles them at the next start) while the
        database is still open. The guests keep running."""
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- entry points -----------------------------------------------------------------
    def _dest(self, dest: str) -> tuple[str, tuple[str, int]]:
        try:
            name, endpoint = self.host.resolve_peer(dest)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        if name == self.host.name or endpoint == (self.host.address, self.host.control_port):
            raise InvalidInput(f"{dest} is this host ({self.host.name})")
        return name, endpoint

    def _check_tls(self) -> None:
        """Refuse a migration this host can't authenticate, before anything starts."""
        if self.host.tls is None:
            raise Refused(f"host {self.host.name} has no [tls] configured, so it cannot "
                          "migrate (Ferry's hosts talk mutual TLS only; see "
                          "docs/security.md)")
        client_context(self.host.tls)  # InvalidInput if its files are unreadable

    def _relocation(self, job_id: str, dom: Domain, mode: Mode) -> RelocationRequest:
        return RelocationRequest(job_id=job_id, source=self.host.name, config=dom.config,
                                 mode=mode, running=dom.proc is not None,
                                 accel=dom.accel, arch=platform.machine())

    def _begin_blockers(self, dom: Domain) -> list[str]:
        out = []
        if dom.lock.locked():
            what = f"migration {dom.job}" if dom.job else "another operation"
            out.append(f"domain {dom.name} is busy with {what}")
        if dom.state in (DomainState.stopping, DomainState.crashed):
            out.append(f"domain {dom.name} is {dom.state.value}")
        return out

    async def check(self, name: str, req: MigrateRequest) -> list[str]:
        """Every pre-flight check on both hosts; all blockers at once; no change."""
        dom = self.domains.get(name)
        dest_name, endpoint = self._dest(req.dest)
        out = self._begin_blockers(dom)
        rel = self._relocation("0" * 12, dom, req.mode)
        async with peer_client(self.host, dest_name, endpoint, timeout=30) as peer:
            try:
                res = await peer.request("POST", "/v1/relocation/check",
                                         rel.model_dump(mode="json"))
            except FerryError as exc:
                out.append(f"host {dest_name}: {exc.message}")
            else:
                out += res["blockers"]
        return out

    async def start(self, name: str, req: MigrateRequest) -> JobRecord:
        """Begin (synchronously: a busy or unknown domain is refused at once), then run
        the other phases in the background. Returns the job's record."""
        dom = self.domains.get(name)
        dest_name, endpoint = self._dest(req.dest)
        self._check_tls()
        if dom.lock.locked():
            what = f"migration {dom.job}" if dom.job else "another operation"
            raise Busy(f"domain {name} is busy with {what}", domain=name, job=dom.job)
        blockers = self._begin_blockers(dom)
        if blockers:
            raise Refused("; ".join(blockers), domain=name, phase="begin")
        t0 = time.monotonic()
        job_id = secrets.token_hex(6)
        await dom.lock.acquire()  # free (checked above): returns without yielding
        dom.job = job_id
        record = JobRecord(id=job_id, domain=name, mode=req.mode, role="source",
                           source=self.host.name, dest=dest_name, started=time.time())
        options = MigrateOptions.model_validate(req.model_dump(include=set(
            MigrateOptions.model_fields)))
        job = SourceJob(record, options, dom, endpoint)
        job.record.phase_times["begin"] = time.monotonic() - t0
        self.jobs[job_id] = job
        self._save(job)
        job.task = asyncio.create_task(self._run(job))
        log.info("job %s: %s migration of %s to %s started", job_id, req.mode.value, name,
                 dest_name)
        return job.record

    def abort(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no running migration {job_id} on host {self.host.name}")
        if job.record.phase in (Phase.finish, Phase.confirm):
            raise Refused(f"migration {job_id} is in {job.record.phase.value}: too late to "
                          "abort (the destination is taking over)")
        job.abort_requested = "aborted by the operator"
        return job.record

    def records(self) -> list[dict[str, Any]]:
        return self.store.migrations()

    def running(self) -> list[JobRecord]:
        return [j.record for j in self.jobs.values()]

    def get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is not None:
            return job.record
        for rec in self.store.migrations():
            if rec["id"] == job_id and rec["role"] == "source":
                return JobRecord.model_validate(rec)
        raise NotFound(f"no migration {job_id} on host {self.host.name}")

    # -- the job ----------------------------------------------------------------------
    async def _run(self, job: SourceJob) -> None:
        steps: list[tuple[Phase, Callable[[SourceJob], Awaitable[None]]]] = [
            (Phase.prepare, self._prepare), (Phase.perform, self._perform),
            (Phase.finish, self._finish), (Phase.confirm, self._confirm)]
        try:
            async with peer_client(self.host, job.record.dest, job.endpoint,
                                   timeout=60) as peer:
                job.peer = peer  # open until the undo (which may need it) has run
                try:
                    for phase, step in steps:
                        job.record.phase = phase
                        self._save(job)  # persisted before it runs
                        t0 = time.monotonic()
                        await step(job)
                        job.record.phase_times[phase.value] = time.monotonic() - t0
                    job.record.state = JobState.completed
                    log.info("job %s: %s now runs on %s", job.record.id,
                             job.record.domain, job.record.dest)
                except Exception as exc:
                    await self._fail(job, exc)
        except FerryError as exc:  # no client at all (TLS files gone since start())
            await self._fail(job, exc)
        finally:
            job.record.ended = time.time()
            job.dom.job = None
            if job.dom.lock.locked():
                job.dom.lock.release()
            self._save(job)
            self.jobs.pop(job.record.id, None)

    async def _fail(self, job: SourceJob, exc: BaseException) -> None:
        if isinstance(exc, FerryError):
            message = exc.message
            host = exc.details.get("host", self.host.name)
            kind = exc.kind
        else:
            log.exception("job %s: internal error", job.record.id)
            message, host, kind = f"internal error: {exc!r}", self.host.name, "failed"
        phase = job.record.phase.value
        job.record.state = JobState.aborted if isinstance(exc, Aborted) else JobState.failed
        job.record.error = {"phase": phase, "host": host, "message": message, "kind": kind}
        log.warning("job %s: %s in %s on %s: %s", job.record.id, job.record.state.value,
                    phase, host, message)
        for undo_phase, undo in reversed(job.undo):
            try:
                await undo()
            except Exception as undo_exc:  # keep undoing the rest; say what was left
                log.exception("job %s: undo of %s failed", job.record.id, undo_phase.value)
                job.record.error.setdefault("undo_errors", []).append(
                    f"{undo_phase.value}: {undo_exc!r}")

    # -- Prepare ----------------------------------------------------------------------
    async def _prepare(self, job: SourceJob) -> None:
        peer = job.client()
        rel = self._relocation(job.record.id, job.dom, job.record.mode)
        if rel.running:  # the stream's TLS credentials, made for this job alone
            server, job.stream_creds = await asyncio.to_thread(streamtls.make_pair,
                                                               job.record.id)
            rel = rel.model_copy(update={"stream": server})
        res = await peer.request("POST", "/v1/relocation/prepare", rel.model_dump(mode="json"))

        async def undo() -> None:
            await peer.request("POST", "/v1/relocation/abort", {
                "job_id": job.record.id, "reason": (job.record.error or {}).get("message", "")})
        job.undo.append((Phase.prepare, undo))
        job.uri = _check_uri(res.get("uri"), rel.running, job.record.dest)

    # -- Perform ----------------------------------------------------------------------
    async def _perform(self, job: SourceJob) -> None:
        dom, opts = job.dom, job.options
        if dom.proc is None:
            return  # shut off: nothing to copy
        proc = dom.proc
        qmp = proc.qmp
        job.was_running = dom.state == DomainState.running
        job.record.stats["was_running"] = job.was_running  # for recover() after a crash
        live = job.record.mode == Mode.live
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True},
            {"capability": "auto-converge", "state": live}]})
        bps = opts.bandwidth_mibps * 1024 * 1024 if opts.bandwidth_mibps else UNLIMITED_BPS
        await qmp.execute("migrate-set-parameters", {
            "downtime-limit": opts.max_downtime_ms, "max-bandwidth": bps})

        async def undo() -> None:
            await self._resume_source(job, proc)
            await streamtls.remove(qmp, job.record.id)
        job.undo.append((Phase.perform, undo))
        assert job.stream_creds is not None
        await streamtls.install(qmp, self.domains.paths(dom.name).root, job.record.id,
                                False, job.stream_creds)
        job.record.stats["stream_tls"] = True

        if not live and job.was_running:
            await self._pause_for_migration(job, proc, "paused for an offline migration")
        await qmp.execute("migrate", {"uri": job.uri})
        await self._watch_stream(job, proc)

    async def _pause_for_migration(self, job: SourceJob, proc: QemuProcess,
                                   reason: str) -> None:
        job.dom.pending_reason = reason
        try:
            await proc.qmp.execute("stop")
        finally:
            job.dom.pending_reason = None

    async def _watch_stream(self, job: SourceJob, proc: QemuProcess) -> None:
        peer = job.client()
        opts, stats = job.options, job.record.stats
        deadline = time.monotonic() + opts.timeout_s
        next_beat, misses, forced = time.monotonic() + HEARTBEAT_S, 0, False
        while True:
            info = await proc.qmp.execute("query-migrate")
            status = info.get("status", "none")
            _update_stats(stats, info)
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise Failed(f"QEMU's migration stream {status}: "
                             f"{info.get('error-desc', 'no reason given')}",
                             host=self.host.name, phase="perform")
            if job.abort_requested:
                await self._cancel_stream(proc)
                raise Aborted(job.abort_requested, host=self.host.name, phase="perform")
            now = time.monotonic()
            if now > deadline and not forced:
                if opts.on_timeout == OnTimeout.abort:
                    await self._cancel_stream(proc)
                    raise Aborted(f"did not converge within {opts.timeout_s:g}s "
                                  "(on_timeout=abort)", host=self.host.name, phase="perform")
                # on_timeout=pause: stop the guest, the rest goes over as offline
                await self._pause_for_migration(job, proc, "paused to finish the migration")
                stats["forced_pause"] = True
                forced = True
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                try:
                    await peer.request("GET", f"/v1/relocation/jobs/{job.record.id}",
                                       timeout=HEARTBEAT_S)
                    misses = 0
                except FerryError as exc:
                    misses += 1
                    if misses >= HEARTBEAT_MISSES:
                        await self._cancel_stream(proc)
                        raise Failed(f"destination ferryd stopped answering: {exc.message}",
                                     host=job.record.dest, phase="perform") from exc
            # wake at once when QEMU reports a status change, else poll for the stats
            await proc.qmp.wait_event("MIGRATION", POLL_S)

    async def _cancel_stream(self, proc: QemuProcess) -> None:
        await proc.qmp.execute("migrate_cancel")
        for _ in range(100):
            info = await proc.qmp.execute("query-migrate")
            if info.get("status") not in ("active", "setup", "cancelling", "pre-switchover",
                                          "device"):
                return
            await asyncio.sleep(0.05)

    async def _resume_source(self, job: SourceJob, proc: QemuProcess) -> None:
        """Undo of Perform: no stream left running, the guest as it was before."""
        if not proc.alive():
            return
        info = await proc.qmp.execute("query-migrate")
        if info.get("status") in ("active", "setup", "pre-switchover", "device"):
            await self._cancel_stream(proc)
        status = await proc.qmp.execute("query-status")
        if job.was_running and not status["running"]:
            job.dom.pending_reason = "resumed: the migration did not complete"
            try:
                await proc.qmp.execute("cont")
            finally:
                job.dom.pending_reason = None

    # -- Finish -----------------------------------------------------------------------
    async def _finish(self, job: SourceJob) -> None:
        peer = job.client()
        base, data = ConsoleLog(self.domains.paths(job.dom.name).root).export()
        body = {"job_id": job.record.id, "resume": job.was_running,
                "stats": job.record.stats, "console_base": base,
                "console_b64": base64.b64encode(data).decode()}
        try:
            await peer.request("POST", "/v1/relocation/finish", body, timeout=180)
        except FerryError as exc:
            if exc.code in ("failed", "not_found", "invalid", "refused", "conflict"):
                raise  # the destination answered: it undid its side, so may we
            # no answer: what does the destination say once it is back?
            verdict = await self._destination_verdict(peer, job)
            if verdict == "completed":
                return  # it took over before it went silent
            if verdict == "gone":  # its copy is dead: ours may run again (undo)
                raise Failed(f"destination failed during Finish ({exc.message}) and "
                             "dropped its copy; the guest goes on here",
                             host=job.record.dest, phase="finish") from exc
            # in doubt: keep the source paused rather than risk two running copies
            job.undo.clear()
            if job.dom.proc is not None:
                await streamtls.remove(job.dom.proc.qmp, job.record.id)
            raise Failed(f"destination did not confirm the domain runs there "
                         f"({exc.message}); the source copy is kept paused: check host "
                         f"{job.record.dest}, then unpause or destroy it here",
                         host=job.record.dest, phase="finish") from exc

    @staticmethod
    async def _settle(peer: FerryClient, job_id: str) -> str | None:
        """After a restart: have the destination drop its side if it still can;
        then its state of the job ("completed", "failed", "aborted", "incoming"),
        "failed" if it never had it, None if it does not answer."""
        path = f"/v1/relocation/jobs/{job_id}"
        try:
            state = (await peer.request("GET", path)).get("state")
            if state == "incoming":
                res = await peer.request("POST", "/v1/relocation/abort", {
                    "job_id": job_id, "reason": "source ferryd restarted"})
                if res.get("aborted") is True:
                    return JobState.aborted.value
                # too late to abort (Finish got there first?): what is it now?
                state = (await peer.request("GET", path)).get("state")
        except NotFound:
            return JobState.failed.value
        except FerryError:
            return None
        return str(state) if state is not None else None

    async def _destination_verdict(self, peer: FerryClient, job: SourceJob) -> str | None:
        """Ask the destination about the job for ~10 s: "completed" (it runs the
        guest), "gone" (it failed the job or never had it: no copy there), or None
        (no answer, or still undecided)."""
        for _ in range(10):
            try:
                res = await peer.request("GET", f"/v1/relocation/jobs/{job.record.id}",
                                         timeout=2)
            except NotFound:
                return "gone"
            except FerryError:
                await asyncio.sleep(1)
                continue
            state = res.get("state")
            if state == JobState.completed.value:
                return "completed"
            if state in (JobState.failed.value, JobState.aborted.value):
                return "gone"
            await asyncio.sleep(1)
        return None

    # -- Confirm ----------------------------------------------------------------------
    async def _confirm(self, job: SourceJob) -> None:
        # The commit point: the destination runs the guest (Finish succeeded), so
        # the source lets go. From here on nothing is undone.
        job.undo.clear()
        await self.domains.release(job.dom)

    def _save(self, job: SourceJob) -> None:
        self.store.save_migration(job.record.model_dump(mode="json"))

    async def recover(self) -> None:
        """At start: finish or undo a source job that an earlier ferryd left running.

        If the destination completed Finish, the domain is there: confirm (stop our
        copy). Otherwise tell the destination to drop its side and resume ours."""
        for rec in self.store.migrations(state=JobState.running.value):
            if rec["role"] != "source":
                continue
            job_id, dom = rec["id"], self.domains.domains.get(rec["domain"])
            try:
                dest_name, endpoint = self._dest(rec["dest"])
            except InvalidInput:
                endpoint = None
            dest_state = None
            if endpoint is not None:
                try:
                    async with peer_client(self.host, dest_name, endpoint,
                                           timeout=10) as peer:
                        dest_state = await self._settle(peer, job_id)
                except FerryError as exc:
                    log.warning("job %s: cannot ask %s after restart: %s", job_id,
                                rec["dest"], exc.message)
            if dest_state == JobState.completed.value and dom is not None:
                await self.domains.release(dom)
                rec.update(state=JobState.completed.value, ended=time.time())
                self.store.save_migration(rec)
                log.info("job %s: confirmed after restart: %s runs on %s", job_id,
                         rec["domain"], rec["dest"])
                continue
            # only a destination that says its side is gone lets our copy run again
            gone = dest_state in (JobState.failed.value, JobState.aborted.value)
            if dom is not None and dom.proc is not None:
                proc = dom.proc
                status = await proc.qmp.execute("query-migrate")
                if status.get("status") in ("active", "setup", "pre-switchover", "device"):
                    await self._cancel_stream(proc)
                run = await proc.qmp.execute("query-status")
                if rec.get("stats", {}).get("was_running") and not run["running"] and gone:
                    await proc.qmp.execute("cont")
                await streamtls.remove(proc.qmp, job_id)
            rec.update(state=JobState.failed.value, ended=time.time(),
                       error={"phase": rec["phase"], "host": self.host.name,
                              "message": "ferryd restarted during the migration"
                              + ("" if gone else
                                 f"; destination {rec['dest']} did not say its copy is "
                                 f"gone ({dest_state or 'no answer'}): the source copy "
                                 "is left as QEMU has it")})
            self.store.save_migration(rec)


_URI_RE = re.compile(r"tcp:(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})")


def _check_uri(uri: object, running: bool, dest: str) -> str | None:
    """The destination's incoming URI goes to QEMU's ``migrate``: only
    ``tcp:IPv4:PORT`` (an ``exec:`` or ``fd:`` URI from a compromised peer would
    run a command here, and would not be upgraded to TLS)."""
    if not running:
        return None
    m = _URI_RE.fullmatch(uri) if isinstance(uri, str) else None
    try:
        ok = m is not None and 0 < int(m.group(2)) < 65536 and \
            bool(ipaddress.IPv4Address(m.group(1)))
    except ValueError:
        ok = False
    if not ok:
        raise Failed(f"destination {dest} answered Prepare with an unusable migration "
                     f"URI {uri!r} (only tcp:IPv4:PORT is accepted)", host=dest,
                     phase="prepare")
    return str(uri)


def _update_stats(stats: dict[str, Any], info: dict[str, Any]) -> None:
    """query-migrate → the numbers the CLI shows and the record keeps."""
    ram = info.get("ram", {})
    page = ram.get("page-size", 4096)
    stats.update({
        "status": info.get("status"),
        "transferred": ram.get("transferred", stats.get("transferred", 0)),
        "total": ram.get("total", stats.get("total", 0)),
        "remaining": ram.get("remaining", stats.get("remaining", 0)),
        "mbps": ram.get("mbps", stats.get("mbps", 0.0)),
        "dirty_rate": ram.get("dirty-pages-rate", 0) * page,
        "passes": ram.get("dirty-sync-count", stats.get("passes", 0)),
        "expected_downtime_ms": info.get("expected-downtime",
                                         stats.get("expected_downtime_ms")),
        "throttle_pct": info.get("cpu-throttle-percentage", 0),
    })
    for key, ours in (("total-time", "total_time_ms"), ("downtime", "downtime_ms"),
                      ("setup-time", "setup_time_ms")):
        if key in info:
            stats[ours] = info[key]
