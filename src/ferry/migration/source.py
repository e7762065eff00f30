"""The source's half of a migration, and the job that runs all five phases.

    CLI            source ferryd                       destination ferryd
     │ migrate ──▶ Begin: domain exists, not busy;
     │             hold it for the whole job
     │             Prepare ─────────── relocation/prepare ──▶ checks; reserve name,
     │                                                        UUID, memory; QEMU
     │             ◀────────────────── uri ──────────────────  -incoming defer
     │             Perform: [offline: stop] migrate uri ═══ QEMU stream ═══▶
     │               watch query-migrate; the convergence policy decides;
     │               heartbeat the destination
     │             Finish ──────────── relocation/finish ───▶ stream complete? adopt,
     │                                                        cont, announce-self
     │             Confirm: ── commit point ── stop the source QEMU, forget the domain
     ◀── job record (both hosts keep one, with the same outcome)

The phases are a table (``STEPS``): each ``run`` saves what it is about to do in
the record's ``SourceFacts`` before doing it, each ``undo`` reads only those
facts. A failure runs the undos of the phases entered, newest first: cancel the
stream and resume the source guest, tell the destination to drop its side (and
the job's outcome, so both records agree). A restarted ferryd runs the same
undos from the stored record (``recover``).

The source keeps the guest until the destination has said it runs there
(Finish), so a domain is never lost; the destination resumes only on Finish,
after the source is paused, so it never runs twice. Once Finish was sent the
source resumes its copy only if the destination says its own is gone; if the
destination cannot be asked, the job is ``in_doubt`` and the source copy stays
paused until the destination answers (retried in the background).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import platform
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ferry.client import FerryClient, peer_client
from ferry.console import ConsoleLog
from ferry.domains import Domain, DomainService
from ferry.errors import (
    Aborted,
    Conflict,
    Failed,
    FerryError,
    InvalidInput,
    NotFound,
    QemuError,
    Refused,
    Unreachable,
)
from ferry.failpoints import crash_point, stream_uri
from ferry.hostconfig import HostConfig
from ferry.migration import storagecopy, streamtls
from ferry.migration.convergence import (
    HEARTBEAT_MISSES,
    Action,
    decide,
    initial_downtime,
    progress,
)
from ferry.migration.job import JobRecords, PhaseStep, run_steps, timeline_entries, undo_steps
from ferry.migration.models import (
    PROTOCOL_VERSION,
    AbortAnswer,
    AbortRequest,
    Blocker,
    CheckAnswer,
    DiskCopy,
    FinishAnswer,
    FinishRequest,
    JobRecord,
    JobState,
    JobStatus,
    MigrateOptions,
    MigrateRequest,
    Mode,
    Phase,
    PrepareAnswer,
    RecoverAnswer,
    RecoverRequest,
    RelocationRequest,
    Role,
    SourceFacts,
    SteerRequest,
    StoredOptions,
    StreamCreds,
    check_protocol,
)
from ferry.models import DomainState
from ferry.qemu.migrate import MigrationQmp, Qmp, guest_running
from ferry.stats import POSTCOPY, MigrationStats, MigrationStatus
from ferry.store import Store
from ferry.tls import client_context
from ferry.validation import describe

log = logging.getLogger(__name__)

POLL_S = 0.1            # query-migrate interval
ABORT_TRIES = 3         # an abort refused at once is sent again (a restarting
ABORT_RETRY_S = 0.5     # destination), this long after
HEARTBEAT_S = 1.0       # how often the source asks the destination if it's alive
PREPARE_TIMEOUT = 30.0  # s for the destination to answer Prepare (it starts a QEMU)
QUEUE_RETRY_S = 1.0     # a destination at its [limits] incoming is asked again this often
PROGRESS_EVENT_S = 1.0  # a running job's progress event, at most this often
CHECK_IDENTITY_WAIT_S = 10.0  # --check waits this long for a base image's identity
CALL_TIMEOUT = 5.0      # s for the small calls: status, abort
FINISH_TIMEOUT = 180.0  # s for Finish (the stream's tail, resume, announce)
VERDICT_TRIES = 10      # status questions (1 s apart) after an unanswered Finish
RESOLVE_EVERY_S = 10.0  # how often an in-doubt job asks the destination again
HISTORY = 600           # samples of the stream the policy sees
RECOVER_TRIES = 5       # post-copy: recoveries ferryd tries by itself after a cut
RECOVER_EVERY_S = 2.0   # between them (then `ferry migrate NAME --recover`)
RECOVER_WAIT_S = 10.0   # for a recovered stream to run again
NOTICE_CUT_S = 3.0      # the destination saw the link break and ours did not: pause

# (peer name, endpoint, timeout) -> a client to that peer's relocation API
PeerConnector = Callable[[str, tuple[str, int], float | None], FerryClient]


A = TypeVar("A", bound=BaseModel)


def parse_answer(model: type[A], data: object, peer: str) -> A:
    """A peer's answer as ``model``; Failed (never a bare ValidationError) when it
    does not fit, e.g. a peer running another version of Ferry."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Failed(f"host {peer} answered in a form this host does not understand "
                     f"({describe(exc)}): does it run the same version of Ferry?",
                     host=peer) from exc


class InDoubt(Failed):
    """The destination may run the guest and cannot be asked: keep ours paused."""

    code = "in_doubt"


class GuestLost(Failed):
    """In post-copy a QEMU holding part of the guest's memory died: no whole copy
    is left (``_lose`` has settled the job when this is raised from Confirm)."""

    code = "lost"


@dataclass
class SourceJob:
    record: JobRecord
    dom: Domain | None
    endpoint: tuple[str, int] | None
    abort_requested: str | None = None
    uri: str | None = None
    task: asyncio.Task[None] | None = None
    peer: FerryClient | None = None
    stream_creds: StreamCreds | None = field(default=None, repr=False)
    history: list[MigrationStats] = field(default_factory=list)
    outcome: JobState = JobState.failed   # what a failure ends as (undo tells the peer)
    failing: bool = False
    cancelled_by_abort: bool = False   # abort() cancelled the task (not a shutdown)
    complete_requested: str | None = None  # `ferry job complete`: finish now, why
    postcopy_refused: bool = False     # QEMU refused migrate-start-postcopy
    recover_requested: asyncio.Event = field(default_factory=asyncio.Event)  # --recover
    stream_status: MigrationStatus | None = None  # in the post-copy tail
    copies: list[DiskCopy] = field(default_factory=list)  # the disks this job copies
    nbd_port: int | None = None        # the destination's NBD server for them
    nbd_address: str | None = None
    top_only: list[int] = field(default_factory=list)  # copies of only their top layer
    steered: asyncio.Event = field(default_factory=asyncio.Event)  # limits changed
    bandwidth_applied: int = 0         # MiB/s QEMU was given (bandwidth_cap), 0: none
    queued_since: float | None = None  # monotonic time it began to wait
    progress_sent: float = 0.0         # monotonic time of its last progress event
    shutting_down: bool = False
    cleanup_error: str | None = None
    keep_held: bool = False            # a stale copy Confirm could not remove
    settling: asyncio.Lock = field(default_factory=asyncio.Lock)  # in doubt: one at once
    resolver: asyncio.Task[None] | None = None

    @property
    def facts(self) -> SourceFacts:
        return self.record.source_facts

    @property
    def options(self) -> MigrateOptions:
        return self.record.options or MigrateOptions()

    def client(self) -> FerryClient:
        assert self.peer is not None, "the job's peer client is open while it runs"
        return self.peer

    def domain(self) -> Domain:
        assert self.dom is not None, "a running job holds its domain"
        return self.dom


def older_peer(exc: FerryError, dest: str) -> FerryError:
    """A destination of an older protocol refuses the fields it doesn't know before
    it looks at the version: say that, not which fields."""
    if isinstance(exc, InvalidInput) and "unknown key" in exc.message:
        return Refused(f"host {dest} does not know this request's fields ({exc.message}): "
                       f"it runs an older Ferry, before relocation protocol "
                       f"{PROTOCOL_VERSION}; upgrade both to the same Ferry", host=dest,
                       blocker="protocol")
    return exc


class MigrationService:
    def __init__(self, host: HostConfig, domains: DomainService, store: Store,
                 connect: PeerConnector | None = None) -> None:
        self.host = host
        self.domains = domains
        self.store = store
        self.records = JobRecords(store, domains.events, host.name)
        self.connect: PeerConnector = connect or (
            lambda name, endpoint, timeout: peer_client(host, name, endpoint, timeout))
        self.jobs: dict[str, SourceJob] = {}
        # outgoing slots ([limits] outgoing): the jobs holding one, those waiting
        self._slots: set[str] = set()
        self._slot_queue: list[str] = []          # job ids waiting, in order
        self._slot_free = asyncio.Event()         # a slot may have come free
        self._unlocking: set[asyncio.Task[None]] = set()
        self.steps: list[PhaseStep[SourceJob]] = [
            PhaseStep(Phase.prepare, self._prepare, self._undo_prepare),
            PhaseStep(Phase.perform, self._perform, self._undo_perform),
            PhaseStep(Phase.finish, self._finish),
            PhaseStep(Phase.confirm, self._confirm),
        ]

    async def close(self) -> None:
        """ferryd is stopping: interrupt running jobs where they are (their record
        keeps the phase and facts; recover() settles them at the next start) while
        the database is still open. The guests keep running."""
        for job in self.jobs.values():
            job.shutting_down = True
        tasks = [t for job in self.jobs.values() for t in (job.task, job.resolver)
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._unlocking, return_exceptions=True)

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

    def _relocation(self, job_id: str, dom: Domain, opts: MigrateOptions,
                    copies: list[DiskCopy] | None = None) -> RelocationRequest:
        return RelocationRequest(protocol=PROTOCOL_VERSION, job_id=job_id,
                                 source=self.host.name, config=dom.config, mode=opts.mode,
                                 running=dom.proc is not None, accel=dom.accel,
                                 arch=platform.machine(),
                                 channels=opts.parallel if opts.multifd else 0,
                                 compress=opts.compress,
                                 postcopy=opts.postcopy_allowed and dom.proc is not None,
                                 copies=copies or [])

    def options(self, dom: Domain, req: MigrateRequest) -> MigrateOptions:
        """The job's options: the request's, then the domain's and this host's
        ``[migration]`` defaults, then Ferry's."""
        opts = MigrateOptions.resolve(req.mode, req, dom.config.migration,
                                      self.host.migration)
        return opts.model_copy(update={"copy_storage": req.copy_storage,
                                       "keep_source_disks": req.keep_source_disks})

    async def _copies(self, dom: Domain, opts: MigrateOptions,
                      wait: float | None = None) -> list[DiskCopy]:
        """The disks this job copies (``wait``: at most for a base's identity)."""
        return await storagecopy.plan(dom.config, self.host, opts.copy_storage,
                                      self.domains.image_ids, wait)

    def begin_blockers(self, dom: Domain, req: MigrateRequest | None = None
                       ) -> list[Blocker]:
        """What refuses the job on this host before it starts (``req``: also its
        disks' cache modes, unless ``--unsafe``)."""
        out = []
        if req is not None and not req.unsafe:
            out += storagecopy.cache_blockers(dom.config, self.host, req.copy_storage,
                                              dom.proc is not None)
        if dom.lock.locked():
            what = f"migration {dom.job}" if dom.job else "another operation"
            out.append(Blocker(code="busy", message=f"domain {dom.name} is busy with {what}"))
        if dom.state in (DomainState.stopping, DomainState.crashed):
            out.append(Blocker(code="state",
                               message=f"domain {dom.name} is {dom.state.value}"))
        return out

    async def check(self, name: str, req: MigrateRequest) -> tuple[list[str], list[str]]:
        """Every pre-flight check on both hosts; all blockers at once, and notes
        (how each disk would be copied); no change."""
        notes: list[str] = []
        dom = self.domains.get(name)
        dest_name, endpoint = self._dest(req.dest)
        out = [b.message for b in self.begin_blockers(dom, req)]
        opts = self.options(dom, req)
        try:
            copies = await self._copies(dom, opts, CHECK_IDENTITY_WAIT_S)
        except FerryError as exc:
            out.append(exc.message)
            copies = []
        rel = self._relocation("0" * 12, dom, opts, copies)
        async with self.connect(dest_name, endpoint, 30) as peer:
            try:
                res = parse_answer(CheckAnswer, await peer.request(
                    "POST", "/v1/relocation/check", rel.model_dump(mode="json")), dest_name)
                check_protocol(res.protocol, dest_name, self.host.name)
            except FerryError as exc:
                out.append(f"host {dest_name}: {older_peer(exc, dest_name).message}")
            else:
                out += [b.message for b in res.blockers]
                notes = res.notes
        return out, notes

    async def start(self, name: str, req: MigrateRequest) -> JobRecord:
        """Begin (synchronously: a busy or unknown domain is refused at once), then run
        the other phases in the background. Returns the job's record."""
        dom = self.domains.get(name)
        dest_name, endpoint = self._dest(req.dest)
        self._check_tls()
        blockers = [b for b in self.begin_blockers(dom, req) if b.code != "busy"]
        t0 = time.monotonic()
        job_id = secrets.token_hex(6)
        dom = await self.domains.hold_for_job(name, job_id)  # Busy if held
        if blockers:
            self.domains.let_go(dom)
            raise Refused("; ".join(b.message for b in blockers), domain=name,
                          phase="begin")
        locked = False
        try:
            # the cluster's lock, for the whole job (refused: nothing changed)
            await self.domains.owners.lock(name, str(dom.config.uuid), job_id)
            locked = True
            await self.domains.pin_running_machine(dom)
            options = StoredOptions.model_validate(self.options(dom, req).model_dump())
            record = JobRecord(id=job_id, domain=name, mode=req.mode, role=Role.source,
                               source=self.host.name, dest=dest_name, started=time.time(),
                               options=options)
            job = SourceJob(record, dom, endpoint)
            job.record.phase_times["begin"] = time.monotonic() - t0
            self.records.enter(record, Phase.begin)
        except BaseException:
            if locked:
                with contextlib.suppress(Exception):
                    await self.domains.owners.unlock(name, job_id)
            self.domains.let_go(dom)
            raise
        self.jobs[job_id] = job
        job.task = asyncio.create_task(self._run(job))
        log.info("job %s: %s migration of %s to %s started", job_id, req.mode.value, name,
                 dest_name)
        return job.record

    def abort(self, job_id: str) -> JobRecord:
        """Abort a running job in any phase before Finish; a call to the destination
        that is outstanding (Prepare) is cancelled and the undo runs at once."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no running migration {job_id} on host {self.host.name}")
        if job.record.state == JobState.in_doubt:
            raise Refused(f"migration {job_id} is in doubt: host {job.record.dest} may run "
                          "the guest; Ferry asks it again every "
                          f"{RESOLVE_EVERY_S:g}s and settles the job when it answers (if "
                          "it is gone for good: ferry job resolve)")
        if job.record.phase in (Phase.finish, Phase.confirm):
            raise Refused(f"migration {job_id} is in {job.record.phase.value}: too late to "
                          "abort (the destination is taking over)")
        if job.facts.postcopy_started:
            raise Refused(f"migration {job_id} switched to post-copy: too late to abort "
                          "(the guest goes on at the destination)")
        if job.abort_requested is None:
            job.abort_requested = "aborted by the operator"
            # (in begin the task may not have started: Prepare checks the flag)
            if (job.record.phase == Phase.prepare or job.record.queued) and \
                    not job.failing and job.task is not None:
                job.cancelled_by_abort = True
                job.task.cancel()  # don't wait for the destination's answer
        return job.record

    def _steerable(self, job_id: str, what: str, in_tail: bool = False) -> SourceJob:
        """The running job ``job_id``, if it may still be steered (``in_tail``: also
        while it serves a post-copy's memory in Confirm)."""
        job = self.jobs.get(job_id)
        if job is None:
            incoming = [r for r in self.store.migrations() if r["id"] == job_id
                        and r["role"] == Role.destination.value and r["state"] == "running"]
            if incoming:
                raise Refused(f"migration {job_id} arrives here from host "
                              f"{incoming[0]['source']}: {what} there, on its source")
            raise NotFound(f"no running migration {job_id} on host {self.host.name}")
        tail = in_tail and job.record.phase == Phase.confirm and job.facts.dest_resumed \
            and job.facts.postcopy_started
        if job.record.state != JobState.running or job.failing or (job.record.phase in (
                Phase.finish, Phase.confirm) and not tail):
            raise Refused(f"migration {job_id} is {job.record.state.value}"
                          f"{' and failing' if job.failing else ''} in "
                          f"{job.record.phase.value}: too late to {what}")
        if job.abort_requested:
            raise Refused(f"migration {job_id} is being aborted")
        return job

    def steer(self, job_id: str, req: SteerRequest) -> JobRecord:
        """New bandwidth cap and/or allowed pause for a running job: they land in
        the job's options (and so in its record) at once, and in QEMU before the
        next sample (at once if the stream runs)."""
        job = self._steerable(job_id, "change its limits", in_tail=True)
        changes = req.model_dump(exclude_none=True)
        if not changes:
            raise InvalidInput("say what to change: --bandwidth and/or --max-downtime")
        before = job.options
        job.record.options = StoredOptions.model_validate(
            {**before.model_dump(), **changes})
        said = ", ".join(f"{k} {getattr(before, k)} → {v}" for k, v in changes.items())
        self._escalate(job, "set", f"the operator changed {said}")
        job.steered.set()
        return job.record

    def complete(self, job_id: str) -> JobRecord:
        """Make a running job finish now: in post-copy where the job allows it,
        else the guest is paused so the rest goes over as an offline copy."""
        job = self._steerable(job_id, "complete it")
        if job.facts.postcopy_started:
            raise Refused(f"migration {job_id} is in post-copy already: it completes as "
                          "fast as the link lets it (ferry job set --bandwidth 0 lifts "
                          "the cap)")
        if job.record.mode != Mode.live:
            raise Refused(f"migration {job_id} is offline: the guest is paused already")
        if job.complete_requested is None:
            job.complete_requested = "the operator asked to complete now (ferry job complete)"
            job.steered.set()
        return job.record

    async def resolve(self, job_id: str, runs_on: Role) -> JobRecord:
        """The operator settles a job in doubt because the destination will never
        answer (it is gone for good): ``runs_on`` is where the guest is to live.
        ``source``: the operator vouches that the destination does not run it; the
        copy here resumes. ``destination``: the copy here is released."""
        job = self.jobs.get(job_id)
        if job is not None and job.record.state == JobState.running and \
                job.facts.dest_resumed and job.stream_status == \
                MigrationStatus.postcopy_paused:
            return await self._resolve_tail(job, runs_on)
        if job is None or job.record.state != JobState.in_doubt:
            raise Conflict(f"migration {job_id} is not in doubt on host {self.host.name}: "
                           "only a job in doubt (or a post-copy whose stream is paused) "
                           "is settled by hand")
        async with job.settling:  # not while the resolver is settling it
            if job.record.state != JobState.in_doubt:
                return job.record  # the destination answered meanwhile: that stands
            # one last question: the destination's answer beats the operator's guess
            verdict = await self._settle(job)
            if await self._conclude(job, verdict, "once the destination answered"):
                self._end(job)
                return job.record
            who = f"the operator on {self.host.name}"
            if runs_on == Role.source and job.facts.postcopy_started:
                raise Refused(f"migration {job_id} had switched to post-copy: the copy "
                              f"here is stale and never runs again; if host "
                              f"{job.record.dest} is gone for good, the guest is lost "
                              "(ferry job resolve --runs-on destination releases it here)")
            if runs_on == Role.destination:
                await self._conclude(job, JobState.completed, f"by {who}")
            else:
                job.facts.dest_gone = True  # on the operator's word
                await self._conclude(job, JobState.failed,
                                     f"by {who}: the guest stays here")
            job.record.decided_by = who
            self.records.save(job.record)
            if job.resolver is not None:
                job.resolver.cancel()
            self._end(job)
            return job.record

    async def _resolve_tail(self, job: SourceJob, runs_on: Role) -> JobRecord:
        """The operator gives up a post-copy whose stream is paused (the destination
        is gone for good): the guest is lost; the stale copy here is stopped."""
        if runs_on == Role.source:
            raise Refused(f"migration {job.record.id} had switched to post-copy: the copy "
                          "here is stale and never runs again (--there gives the guest "
                          "up as lost)")
        if job.task is not None:
            job.shutting_down = True  # (its task ends without settling the job)
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await job.task
        await self._lose(job, {"phase": job.record.phase.value, "host": job.record.dest,
                               "message": f"the operator on {self.host.name} gave up the "
                               f"paused post-copy to {job.record.dest}"})
        job.record.decided_by = f"the operator on {self.host.name}"
        self.records.save(job.record)
        self._end(job)
        return job.record

    def records_json(self) -> list[dict[str, object]]:
        return self.store.migrations()

    def running(self) -> list[JobRecord]:
        """The jobs of this host that have not ended: its own as source, and
        incoming ones (from the store: the destination keeps them there)."""
        out = [j.record for j in self.jobs.values()]
        out += self.records.running(Role.destination.value)
        return out

    async def job_log(self, job_id: str) -> dict[str, Any]:
        """What happened in job ``job_id``, on this host and on the other one."""
        records = [JobRecord.model_validate(r) for r in self.store.migrations()
                   if r["id"] == job_id]
        if job_id in self.jobs:  # (the newest, in memory)
            records = [self.jobs[job_id].record,
                       *[r for r in records if r.role != Role.source]]
        if not records:
            raise NotFound(f"no migration {job_id} on host {self.host.name}")
        entries = [e for r in records for e in timeline_entries(r, self.host.name)]
        others = {r.dest if r.role == Role.source else r.source for r in records}
        others.discard(self.host.name)
        unreachable = []
        for other in sorted(others):
            try:
                _, endpoint = self._dest(other)
                async with self.connect(other, endpoint, CALL_TIMEOUT) as peer:
                    theirs = await peer.request("GET", f"/v1/relocation/jobs/{job_id}/log")
                entries += [e for e in theirs if isinstance(e, dict)]
            except FerryError as exc:
                unreachable.append({"host": other, "error": exc.message})
            except Exception as exc:  # (TLS files, the socket: one host's problem)
                unreachable.append({"host": other, "error": repr(exc)})
        entries.sort(key=lambda e: float(e.get("time") or 0))
        return {"job": job_id, "entries": entries, "unreachable": unreachable}

    def get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is not None:
            return job.record
        found = [r for r in self.store.migrations() if r["id"] == job_id]
        found.sort(key=lambda r: r["role"] != Role.source.value)  # ours first
        if found:
            return JobRecord.model_validate(found[0])
        raise NotFound(f"no migration {job_id} on host {self.host.name}")

    # -- the job ----------------------------------------------------------------------
    async def _run(self, job: SourceJob) -> None:
        assert job.endpoint is not None
        try:
            async with self.connect(job.record.dest, job.endpoint, 60) as peer:
                job.peer = peer  # open until the undo (which may need it) has run
                try:
                    await self._take_slot(job)
                    await run_steps(job, self.steps, self.records)
                except asyncio.CancelledError:
                    if not job.cancelled_by_abort or job.shutting_down:
                        raise  # ferryd is stopping: recover() settles the job
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    why = job.abort_requested or "aborted by the operator"
                    await self._fail(job, Aborted(why, host=self.host.name,
                                                  phase=job.record.phase.value))
                except Exception as exc:
                    await self._fail(job, exc)
                else:
                    self.records.set_state(job.record, JobState.completed,
                                           decided_by=self.host.name,
                                           cleanup_error=job.cleanup_error)
                    log.info("job %s: %s now runs on %s", job.record.id,
                             job.record.domain, job.record.dest)
        except FerryError as exc:  # no client at all (TLS files gone since start())
            await self._fail(job, exc)
        finally:
            job.peer = None  # closed with the `async with`
            self._give_slot(job)
            if job.record.state != JobState.in_doubt:
                self._end(job)

    # -- limits -----------------------------------------------------------------------
    def _queue(self, job: SourceJob, why: str | None) -> None:
        """The job waits (``why``) or goes on (None): in its record (the time it
        waited in all, as phase time ``queued``) and as an event."""
        if job.record.queued == why:
            return
        now = time.monotonic()
        if job.queued_since is not None:
            times = job.record.phase_times
            times["queued"] = times.get("queued", 0.0) + now - job.queued_since
        job.queued_since = None if why is None else now
        job.record.queued = why
        self.records.save(job.record)
        if why is not None:
            self._escalate(job, "queued", why)

    async def _take_slot(self, job: SourceJob) -> None:
        """One of this host's outgoing slots for the job: while ``[limits] outgoing``
        jobs hold one, it waits (queued), first come first served."""
        limit = self.host.limits.outgoing
        self._slot_queue.append(job.record.id)
        try:
            while len(self._slots) >= limit or self._slot_queue[0] != job.record.id:
                self._queue(job, f"waiting: host {self.host.name} runs at most {limit} "
                            "outgoing migration(s) at a time ([limits] outgoing)")
                self._slot_free.clear()
                await self._slot_free.wait()
        finally:
            self._slot_queue.remove(job.record.id)
            self._slot_free.set()   # (the next in line looks again)
        self._slots.add(job.record.id)
        self._queue(job, None)

    def _give_slot(self, job: SourceJob) -> None:
        if job.record.id in self._slots:
            self._slots.discard(job.record.id)
            self._slot_free.set()

    def bandwidth_cap(self, job: SourceJob) -> int:
        """MiB/s the job may use now (0: no cap): its own cap, within its share of
        the host's ``[limits] bandwidth_mibps`` among the jobs that are copying."""
        own, budget = job.options.bandwidth_mibps, self.host.limits.bandwidth_mibps
        if not budget:
            return own
        copying = sum(1 for j in self.jobs.values() if j.record.state == JobState.running
                      and (j.record.phase == Phase.perform or (
                          j.record.phase == Phase.confirm and j.facts.postcopy_started))
                      ) or 1
        share = max(1, budget // copying)
        return min(own, share) if own else share

    def _end(self, job: SourceJob) -> None:
        if job.record.queued is not None:  # (aborted while it waited)
            job.record.queued = None
            self.records.save(job.record)
        if job.dom is not None and not job.keep_held:
            self.domains.let_go(job.dom)
        self.jobs.pop(job.record.id, None)
        task = asyncio.create_task(self._unlock(job))
        self._unlocking.add(task)
        task.add_done_callback(self._unlocking.discard)

    async def _unlock(self, job: SourceJob) -> None:
        try:
            await self.domains.owners.unlock(job.record.domain, job.record.id)
        except Exception as exc:  # (the lease expires by itself)
            log.warning("job %s: releasing the cluster lock: %r", job.record.id, exc)

    async def _fail(self, job: SourceJob, exc: BaseException) -> None:
        job.failing = True
        if isinstance(exc, GuestLost) and job.record.state == JobState.lost:
            return  # settled by _lose
        if isinstance(exc, FerryError):
            message = exc.message
            host = str(exc.details.get("host", self.host.name))
            kind = exc.kind
        else:
            log.exception("job %s: internal error", job.record.id)
            message, host, kind = f"internal error: {exc!r}", self.host.name, "failed"
        error: dict[str, object] = {"phase": job.record.phase.value, "host": host,
                                    "message": message, "kind": kind}
        if isinstance(exc, InDoubt):
            self._in_doubt(job, error)
            return
        if job.facts.finish_sent and not job.facts.dest_gone:
            # the destination may run the guest: only its word decides what we do
            verdict = await self._verdict(job) if job.peer is not None else None
            if verdict == JobState.completed:
                log.warning("job %s: %s after Finish, but %s runs the guest: completed",
                            job.record.id, message, job.record.dest)
                job.facts.dest_resumed = True
                try:
                    await self._confirm(job)
                except GuestLost:
                    return
                self.records.set_state(job.record, JobState.completed,
                                       decided_by=self.host.name,
                                       cleanup_error=job.cleanup_error)
                return
            if verdict is None:
                self._in_doubt(job, error)
                return
            job.facts.dest_gone = True
            self.records.save(job.record)
        if await self._switched(job):
            await self._lose(job, error)
            return
        job.facts.postcopy_started = False  # asked, but QEMU never switched
        job.outcome = JobState.aborted if isinstance(exc, Aborted) else JobState.failed
        job.record.error = error  # the undo tells the destination why
        undo_errors = await undo_steps(job, self.steps)
        if undo_errors:
            error["undo_errors"] = undo_errors
        self.records.set_state(job.record, job.outcome, error=error, decided_by=host)

    async def _lose(self, job: SourceJob, error: dict[str, object]) -> None:
        """Post-copy had begun and the job cannot end with one whole copy of the
        guest: say so loudly; stop the stale copy here (never resume it); the
        definition stays where the guest last ran — the destination if it had
        resumed it, else here — crashed, to be booted afresh from its disks."""
        rec, dom = job.record, job.dom
        where = rec.dest if job.facts.dest_resumed else self.host.name
        message = (f"{error['message']}; THE GUEST IS LOST: post-copy had begun, so "
                   "its newest state was split between the two hosts' QEMUs and no "
                   f"whole copy is left; its definition stays on host {where} "
                   "(crashed): start it afresh from its disks")
        error = {**error, "message": message, "kind": "lost"}
        if dom is not None:
            try:
                if job.facts.dest_resumed:
                    await self.domains.release(dom, event="domain.lost")
                else:
                    await self.domains.lose(dom, f"lost in migration {rec.id} to {rec.dest}")
            except Exception:
                log.exception("job %s: stopping the stale source copy", rec.id)
        if job.endpoint is not None:
            body = AbortRequest(job_id=rec.id, reason=message[:4000],
                                outcome=JobState.lost, phase=rec.phase,
                                host=str(error.get("host", self.host.name)))
            try:
                await self._send_abort(job, body)
            except FerryError as exc:
                log.error("job %s: could not tell %s the guest is lost: %s", rec.id,
                          rec.dest, exc.message)
        job.outcome = JobState.lost
        self.records.set_state(rec, JobState.lost, error=error, decided_by=self.host.name)
        self.domains.events.publish("migration.lost", job=rec.id, domain=rec.domain,
                                    message=message)
        log.error("job %s: %s", rec.id, message)

    def _in_doubt(self, job: SourceJob, error: dict[str, object]) -> None:
        self.records.set_state(job.record, JobState.in_doubt, error=error,
                               decided_by=self.host.name)
        if job.dom is not None:
            self.domains.note(job.dom, f"in doubt: migration {job.record.id} to "
                              f"{job.record.dest} may have moved it; kept paused until "
                              f"{job.record.dest} answers")
        log.error("job %s: in doubt: %s", job.record.id, error["message"])
        job.resolver = asyncio.create_task(self._resolve(job))

    # -- Prepare ----------------------------------------------------------------------
    async def _prepare(self, job: SourceJob) -> None:
        peer, dom = job.client(), job.domain()
        if job.abort_requested:
            raise Aborted(job.abort_requested, host=self.host.name, phase="prepare")
        job.copies = await self._copies(dom, job.options)
        job.facts.copied_paths = [str(dom.config.disks[c.index].path) for c in job.copies]
        if job.copies and job.options.postcopy_allowed:
            # the mirrors must end in sync with the guest stopped at the source:
            # never with part of the guest already running elsewhere
            opts = job.options
            job.record.options = StoredOptions.model_validate(
                {**opts.model_dump(), "postcopy": "never",
                 "on_timeout": "pause" if opts.on_timeout == "postcopy"
                 else opts.on_timeout.value})
            self._escalate(job, "stream", "no post-copy: the job copies disks, which "
                           "must be in sync when the guest stops at the source")
        await self._fit_stream_to_postcopy(job)
        rel = self._relocation(job.record.id, dom, job.options, job.copies)
        if rel.running or job.copies:
            server, job.stream_creds = await asyncio.to_thread(streamtls.make_pair,
                                                               job.record.id)
            rel = rel.model_copy(update={"stream": server})
        job.facts.dest_contacted = True
        self.records.save(job.record)
        while True:
            try:
                answer = await peer.request("POST", "/v1/relocation/prepare",
                                            rel.model_dump(mode="json"),
                                            timeout=PREPARE_TIMEOUT)
                break
            except FerryError as exc:
                if exc.details.get("limit") != "incoming":
                    raise older_peer(exc, job.record.dest) from exc
                # the destination took nothing: ask again when one of its slots frees
                self._queue(job, f"waiting: {exc.message}")
                await asyncio.sleep(QUEUE_RETRY_S)
                if job.abort_requested:
                    raise Aborted(job.abort_requested, host=self.host.name,
                                  phase="prepare") from None
        self._queue(job, None)
        res = parse_answer(PrepareAnswer, answer, job.record.dest)
        check_protocol(res.protocol, job.record.dest, self.host.name)
        job.uri = _check_uri(res.uri, rel.running, job.record.dest)
        if job.copies and res.nbd_port is None:
            raise Failed(f"destination {job.record.dest} did not export the disks to copy",
                         host=job.record.dest, phase="prepare")
        job.nbd_port = res.nbd_port
        if job.copies:
            job.nbd_address = _check_address(res.nbd_address, job.record.dest)
        job.top_only = [i for i in res.top_only if i in {c.index for c in job.copies}]

    async def _fit_stream_to_postcopy(self, job: SourceJob) -> None:
        """A job that may switch to post-copy runs one stream where QEMU cannot
        combine post-copy with multifd channels (QEMU 10.0 cannot): the options
        and the record say so."""
        opts, dom = job.options, job.domain()
        if not (opts.postcopy_allowed and opts.multifd) or dom.proc is None:
            return
        if await MigrationQmp(dom.proc.qmp).postcopy_with_multifd():
            return
        job.record.options = StoredOptions.model_validate(
            {**opts.model_dump(), "parallel": 1, "compress": "none"})
        self._escalate(job, "stream", f"post-copy is allowed (--postcopy "
                       f"{opts.postcopy.value}, --on-timeout {opts.on_timeout.value}) and "
                       "this QEMU cannot run it with multifd channels: one stream, "
                       f"uncompressed (instead of {opts.parallel} channels, "
                       f"{opts.compress.value})")

    async def _undo_prepare(self, job: SourceJob) -> None:
        """Tell the destination to drop its side, and how the job ended."""
        if not job.facts.dest_contacted:
            return
        error = job.record.error or {}
        body = AbortRequest(job_id=job.record.id,
                            outcome=JobState.aborted if job.outcome == JobState.aborted
                            else JobState.failed,
                            reason=str(error.get("message", ""))[:4000],
                            phase=job.record.phase,
                            host=str(error.get("host", self.host.name)))
        for attempt in range(1, ABORT_TRIES + 1):
            sent = time.monotonic()
            try:
                await self._send_abort(job, body)
                return
            except Unreachable as exc:
                # refused or cut at once (not a timeout: that is a silent host):
                # a ferryd restarting answers again in a moment
                quick = time.monotonic() - sent < ABORT_RETRY_S
                if quick and attempt < ABORT_TRIES:
                    await asyncio.sleep(ABORT_RETRY_S)
                    continue
                raise Failed(f"host {job.record.dest} did not answer the abort "
                             f"({exc.message}); it drops its side by itself once the "
                             "source stops talking to it", host=job.record.dest) from exc

    async def _send_abort(self, job: SourceJob, body: AbortRequest) -> None:
        if job.peer is not None:
            await job.peer.request("POST", "/v1/relocation/abort",
                                   body.model_dump(mode="json"), timeout=CALL_TIMEOUT)
            return
        assert job.endpoint is not None
        async with self.connect(job.record.dest, job.endpoint, CALL_TIMEOUT) as peer:
            await peer.request("POST", "/v1/relocation/abort", body.model_dump(mode="json"))

    # -- Perform ----------------------------------------------------------------------
    async def _perform(self, job: SourceJob) -> None:
        dom, opts = job.domain(), job.options
        if dom.proc is None:  # shut off: only its disks, if any
            if job.copies:
                await self._copy_shut_off(job)
            return
        proc, facts = dom.proc, job.facts
        mig = MigrationQmp(proc.qmp)
        facts.was_running = dom.state == DomainState.running
        self.records.save(job.record)
        live = job.record.mode == Mode.live
        # (post-copy off first: QEMU refuses multifd while it is on)
        await mig.set_capabilities(events=True, auto_converge=live, postcopy_ram=False)
        channels = opts.parallel if opts.multifd else 0
        await mig.set_stream(channels, opts.compress.value)
        if opts.postcopy_allowed:
            await mig.set_capabilities(postcopy_ram=True)
        downtime = initial_downtime(opts)
        job.bandwidth_applied = self.bandwidth_cap(job)
        await mig.set_limits(downtime, job.bandwidth_applied * 1024 * 1024 or None)
        assert job.stream_creds is not None
        facts.tls_installed = True
        self.records.save(job.record)
        await streamtls.install(proc.qmp, self.domains.paths(dom.name).root, job.record.id,
                                False, job.stream_creds)
        job.record.stats = job.record.stats.model_copy(update={
            "stream_tls": True, "channels": channels, "compression": opts.compress.value,
            "downtime_limit_ms": downtime})
        if not live and facts.was_running:
            await self.domains.stop_guest(dom, "paused for an offline migration")
        if job.copies:
            await self._copy_disks(job, proc.qmp)
        facts.stream_started = True
        self.records.save(job.record)
        crash_point("source-before-migrate")
        await mig.start(stream_uri(str(job.uri)))
        await self._watch_stream(job, mig, opts)
        if job.copies:  # the guest is stopped: the copies are in sync, end the mirrors
            per = await storagecopy.copied(proc.qmp, job.copies)
            for d in job.record.disks:
                d["bytes"], d["total"] = per.get(int(d["index"]), (d["bytes"], d["total"]))
            await storagecopy.finish(proc.qmp, job.copies)
            facts.disks_copied = True
            self.records.save(job.record)

    async def _copy_shut_off(self, job: SourceJob) -> None:
        """A shut-off domain's disks go over the same TLS NBD path, mirrored by a
        QEMU that has only the disks and never runs a guest."""
        dom, facts = job.domain(), job.facts
        facts.disk_server = True
        self.records.save(job.record)
        proc = await self.domains.launch_disk_server(dom.config, job.record.id)
        try:
            assert job.stream_creds is not None
            await streamtls.load(proc.qmp, proc.paths.root,
                                 streamtls.object_id(job.record.id), False,
                                 job.stream_creds)
            await self._copy_disks(job, proc.qmp)
            await storagecopy.finish(proc.qmp, job.copies)
            facts.disks_copied = True
            self.records.save(job.record)
        finally:
            await self.domains.stop_disk_server(job.record.id, proc)

    async def _copy_disks(self, job: SourceJob, qmp: Qmp) -> None:
        """Mirror each disk to the destination's export until every copy is ready
        (with progress and heartbeats), then make the mirrors write-blocking so
        the memory stream can start with the disks in step."""
        assert job.nbd_port is not None and job.nbd_address is not None
        host = job.nbd_address
        self.records.save(job.record)
        speed = self.bandwidth_cap(job)
        await storagecopy.start(qmp, job.copies, host, job.nbd_port, job.record.id,
                                job.facts.mirrors, lambda: self.records.save(job.record),
                                speed << 20, job.top_only)
        self.records.save(job.record)
        t0, next_beat, misses = time.monotonic(), 0.0, 0
        disks = job.domain().config.disks
        job.record.disks = [{
            "index": c.index, "disk": disks[c.index].where,
            "mode": "top" if c.index in job.top_only else "full", "bytes": 0, "total": 0,
            "rate_mibps": 0.0, "saved_bytes": c.base_allocated
            if c.index in job.top_only else 0} for c in job.copies]
        last = (t0, {c.index: 0 for c in job.copies})
        while True:
            if self.bandwidth_cap(job) != speed:  # job set, or the host's budget
                speed = self.bandwidth_cap(job)
                await storagecopy.set_speed(qmp, job.copies, speed << 20)
            done, total, ready = await storagecopy.progress(qmp, job.copies)
            job.record.stats = job.record.stats.model_copy(
                update={"disk_bytes": done, "disk_total": total})
            self._progress_event(job)
            now = time.monotonic()
            if now - last[0] >= 1.0 or ready:  # each disk's copy and rate, per second
                per = await storagecopy.copied(qmp, job.copies)
                for d in job.record.disks:
                    got, of = per.get(int(d["index"]), (d["bytes"], d["total"]))
                    rate = (got - last[1].get(int(d["index"]), 0)) / (now - last[0]) \
                        if now > last[0] else 0.0
                    d.update(bytes=got, total=of, rate_mibps=round(rate / (1 << 20), 1))
                last = (now, {int(d["index"]): int(d["bytes"]) for d in job.record.disks})
            if ready:
                break
            if job.abort_requested:
                raise Aborted(job.abort_requested, host=self.host.name, phase="perform")
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                misses = 0 if await self._heartbeat(job, job.client()) else misses + 1
                if misses >= HEARTBEAT_MISSES:
                    raise Failed(f"destination ferryd stopped answering during the disk "
                                 f"copy ({misses} heartbeats missed)", host=job.record.dest,
                                 phase="perform")
            if now - t0 > storagecopy.READY_TIMEOUT_S:
                raise Failed(f"the disk copies did not complete a first pass within "
                             f"{storagecopy.READY_TIMEOUT_S:g}s ({done} of {total} bytes)",
                             host=self.host.name, phase="perform")
            await asyncio.sleep(storagecopy.READY_POLL_S)
        took = time.monotonic() - t0
        job.record.phase_times["disk_copy"] = took
        for d in job.record.disks:
            d["first_pass_s"] = round(took, 3)
        await storagecopy.write_blocking(qmp, job.copies)
        self._escalate(job, "disks", f"{len(job.copies)} disk(s) copied once "
                       f"({total >> 20} MiB in {time.monotonic() - t0:.1f}s); the mirrors "
                       "now write through to the destination")

    async def _watch_stream(self, job: SourceJob, mig: MigrationQmp,
                            applied: MigrateOptions) -> None:
        """Sample the stream until it completes; ``applied``: the options QEMU was
        given (the job's may have been steered since)."""
        start = time.monotonic()
        paused = job.record.mode == Mode.offline
        next_beat, misses = start + HEARTBEAT_S, 0
        # QEMU counts dirty pages only from the second pass: sample them meanwhile
        sampler = None if paused else asyncio.create_task(mig.sample_dirty_rate())
        try:
            await self._watch_samples(job, mig, applied, start, paused, next_beat, misses,
                                      sampler)
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(BaseException):
                    await sampler  # (its outcome no longer matters)

    async def _watch_samples(self, job: SourceJob, mig: MigrationQmp,
                             opts: MigrateOptions, start: float, paused: bool,
                             next_beat: float, misses: int,
                             sampler: asyncio.Task[int | None] | None) -> None:
        peer, dom = job.client(), job.domain()
        while True:
            stats = await mig.query(job.record.stats)
            if stats.passes <= 1 and not paused and sampler is not None and sampler.done() \
                    and not sampler.cancelled() and sampler.exception() is None:
                sampled = sampler.result()
                if sampled is not None:
                    stats = stats.model_copy(update={"dirty_rate": sampled,
                                                     "dirty_rate_sampled": True})
            elif stats.passes > 1 and stats.dirty_rate_sampled:
                stats = stats.model_copy(update={"dirty_rate_sampled": False})
            pct, eta = progress(stats, stats.progress_pct)
            stats = stats.model_copy(update={"progress_pct": pct, "eta_s": eta})
            job.record.stats = stats
            job.history = [*job.history[-(HISTORY - 1):], stats]
            self._progress_event(job)
            if stats.status == MigrationStatus.completed:
                return
            if stats.status in POSTCOPY:  # the destination takes over (Finish)
                return
            if stats.status in (MigrationStatus.failed, MigrationStatus.cancelled):
                raise Failed(f"QEMU's migration stream {stats.status.value}: "
                             f"{stats.qemu_error or 'no reason given'}",
                             host=self.host.name, phase=Phase.perform.value)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                misses = 0 if await self._heartbeat(job, peer) else misses + 1
            job.steered.clear()
            if job.facts.postcopy_started:
                # asked to switch: QEMU does at its next pass; nothing may cancel the
                # stream meanwhile (the guest would be lost for nothing)
                await mig.wait_change(POLL_S)
                continue
            if job.options != opts:  # steered (also while Perform was setting up)
                opts = await self._apply_steering(job, mig, opts)
            await self._sync_bandwidth(job, mig)
            decision = decide(job.history, now - start, opts, paused=paused,
                              abort_requested=job.abort_requested, peer_misses=misses,
                              downtime_ms=job.record.stats.downtime_limit_ms,
                              complete_requested=job.complete_requested,
                              postcopy_possible=not job.postcopy_refused)
            if decision.note:
                self._escalate(job, "throttle", decision.note)
            if decision.downtime_ms is not None:
                await mig.set_downtime(decision.downtime_ms)
                job.record.stats = job.record.stats.model_copy(
                    update={"downtime_limit_ms": decision.downtime_ms})
                self._escalate(job, "downtime", str(decision.downtime_note))
            if decision.action == Action.abort:
                await mig.cancel()
                raise Aborted(decision.reason, host=self.host.name, phase="perform")
            if decision.action == Action.fail:
                await mig.cancel()
                raise Failed(f"destination ferryd stopped answering ({decision.reason})",
                             host=job.record.dest, phase="perform")
            if decision.action == Action.postcopy:
                await self._start_postcopy(job, mig, decision.reason)
            if decision.action == Action.pause:
                self._escalate(job, "pause", decision.reason)
                await self.domains.stop_guest(dom, "paused to finish the migration")
                job.record.stats = job.record.stats.model_copy(
                    update={"forced_pause": True})
                paused = True
            # wake at once when QEMU reports a status change or the operator steers
            # the job, else poll for the stats
            crash_point("source-streaming")
            if not job.steered.is_set():
                await mig.wait_change(POLL_S)

    async def _start_postcopy(self, job: SourceJob, mig: MigrationQmp, why: str) -> None:
        """Switch to post-copy. The fact is saved first: from here on the source
        guest never resumes (the destination may hold its newest state). Before
        it, the commit point in the cluster registry (the guest's newest state
        moves with the switch): refused, the job goes on in pre-copy."""
        if not await self._commit_for_postcopy(job):
            return
        job.facts.postcopy_started = True
        self.records.save(job.record)
        crash_point("source-before-postcopy")
        try:
            await mig.start_postcopy()
        except QemuError as exc:
            if await self._switched(job):  # (its answer was lost, not the switch)
                return
            # refused at once: nothing switched, pre-copy goes on (and what would
            # have been post-copy becomes a pause)
            job.facts.postcopy_started = False
            job.postcopy_refused = True
            self._escalate(job, "postcopy", f"QEMU refused post-copy ({exc.message}); "
                           "pre-copy goes on")
            return
        job.record.stats = job.record.stats.model_copy(update={"postcopy": True})
        self._escalate(job, "postcopy", why)

    async def _commit_for_postcopy(self, job: SourceJob) -> bool:
        rec, dom, facts = job.record, job.domain(), job.facts
        facts.registry_committed = True
        self.records.save(rec)
        try:
            await self.domains.owners.commit(rec.domain, str(dom.config.uuid),
                                             self.host.name, rec.dest, rec.id)
            return True
        except FerryError as exc:
            if exc.details.get("outcome") != "unknown":
                facts.registry_committed = False
                self.records.save(rec)
            job.postcopy_refused = True
            self._escalate(job, "postcopy", f"no post-copy: the cluster registry did not "
                           f"commit the move ({exc.message}); pre-copy goes on")
            return False

    async def _give_back(self, job: SourceJob) -> None:
        """A commit before a post-copy that never happened: the owner is this host
        again (Failed if the registry does not answer: the guest stays paused)."""
        rec, facts = job.record, job.facts
        if not facts.registry_committed or job.dom is None:
            return
        try:
            await self.domains.owners.give_back(rec.domain, str(job.dom.config.uuid),
                                                self.host.name, rec.dest)
        except FerryError as exc:
            raise Failed(f"the cluster registry may still name host {rec.dest} the owner "
                         f"({exc.message}): the guest stays paused here; `ferry unpause "
                         f"{rec.domain}` once the registry names this host",
                         host=self.host.name) from exc
        facts.registry_committed = False
        self.records.save(rec)

    async def _owner(self, dom: Domain) -> str | None:
        """The host the cluster registry names for ``dom`` (None: nobody, or the
        registry does not answer: then the protocol alone decides)."""
        try:
            return await self.domains.owners.owner(dom.name)
        except FerryError as exc:
            log.warning("domain %s: the registry does not say who owns it: %s", dom.name,
                        exc.message)
            return None

    def _refuse_resume_owned_elsewhere(self, job: SourceJob, owner: str | None) -> None:
        """A source never resumes a guest the registry says runs elsewhere (say the
        destination committed and could not give it back yet): the guest stays
        paused here, fenced until the registry names this host again."""
        dom = job.domain()
        if owner in (None, self.host.name):
            return
        dom.fenced = (f"the cluster registry names host {owner} its owner; kept paused "
                      "here until it names this host again (then ferry unpause)")
        self.domains.note(dom, dom.fenced)
        raise Failed(f"not resumed on {self.host.name}: {dom.fenced}", host=self.host.name)

    async def _switched(self, job: SourceJob) -> bool:
        """Has the stream really switched to post-copy (or may it have)? Only the
        source QEMU can tell before Finish; if it can't say, assume it did."""
        if not job.facts.postcopy_started:
            return False
        dom = job.dom
        if job.facts.finish_sent or dom is None or dom.proc is None:
            return True
        try:
            status = await MigrationQmp(dom.proc.qmp).status()
        except FerryError:
            return True
        return status in POSTCOPY or status == MigrationStatus.completed

    async def _apply_steering(self, job: SourceJob, mig: MigrationQmp,
                              old: MigrateOptions) -> MigrateOptions:
        """Give QEMU the job's (changed) options; the options the stream now runs with."""
        new = job.options  # (the bandwidth: bandwidth_cap, in the sample loop)
        limit = job.record.stats.downtime_limit_ms
        if limit is not None and limit > new.max_downtime_ms:
            await mig.set_downtime(new.max_downtime_ms)
            job.record.stats = job.record.stats.model_copy(
                update={"downtime_limit_ms": new.max_downtime_ms})
        return new

    async def _sync_bandwidth(self, job: SourceJob, mig: MigrationQmp) -> None:
        """Give QEMU the job's bandwidth cap where it changed (``ferry job set``,
        or its share of the host's budget as other jobs start and end)."""
        cap = self.bandwidth_cap(job)
        if cap == job.bandwidth_applied:
            return
        job.bandwidth_applied = cap
        await mig.set_bandwidth(cap * 1024 * 1024 or None)
        if self.host.limits.bandwidth_mibps:
            self._escalate(job, "bandwidth", f"{cap} MiB/s: within its share of host "
                           f"{self.host.name}'s budget of "
                           f"{self.host.limits.bandwidth_mibps} MiB/s ([limits])")

    async def _heartbeat(self, job: SourceJob, peer: FerryClient) -> bool:
        """Is the destination there and still on the job? False: no answer; Failed
        if it answered that its side is gone (it decided the job failed)."""
        try:
            st = parse_answer(JobStatus, await peer.request(
                "GET", f"/v1/relocation/jobs/{job.record.id}", timeout=HEARTBEAT_S),
                job.record.dest)
        except Unreachable:
            return False
        except NotFound as exc:
            raise Failed(f"destination no longer knows the job: {exc.message}",
                         host=job.record.dest, phase="perform") from exc
        if st.state in (JobState.failed, JobState.aborted):
            why = (st.error or {}).get("message", "no reason given")
            raise Failed(f"destination dropped its side: {why}", host=job.record.dest,
                         phase="perform")
        return True

    def _progress_event(self, job: SourceJob) -> None:
        """``migration.progress``, at most once per PROGRESS_EVENT_S."""
        now = time.monotonic()
        if now - job.progress_sent < PROGRESS_EVENT_S:
            return
        job.progress_sent = now
        s = job.record.stats
        self.domains.events.publish(
            "migration.progress", job=job.record.id, domain=job.record.domain,
            role="source", dest=job.record.dest, phase=job.record.phase.value,
            status=s.status.value, progress_pct=s.progress_pct, eta_s=s.eta_s,
            transferred=s.transferred, remaining=s.remaining, total=s.total,
            mbps=s.mbps, dirty_rate=s.dirty_rate, passes=s.passes,
            expected_downtime_ms=s.expected_downtime_ms, throttle_pct=s.throttle_pct,
            disk_bytes=s.disk_bytes, disk_total=s.disk_total, postcopy=s.postcopy)

    def _escalate(self, job: SourceJob, action: str, why: str) -> None:
        job.record.escalations.append({"time": time.time(), "action": action,
                                       "reason": why})
        self.records.save(job.record)
        self.domains.events.publish("migration.escalation", job=job.record.id,
                                    domain=job.record.domain, action=action, reason=why)
        log.info("job %s: %s: %s", job.record.id, action, why)

    async def _undo_perform(self, job: SourceJob) -> None:
        """No stream left running; the guest as it was before, unless the
        destination may run it (Finish sent and not known to have failed)."""
        dom, facts = job.dom, job.facts
        if facts.disk_server:
            await self.domains.stop_disk_server(job.record.id)
        if dom is None or dom.proc is None or not dom.proc.alive():
            return
        if facts.postcopy_started:  # never resumed: `_lose` deals with this copy
            return
        mig = MigrationQmp(dom.proc.qmp)
        status = await mig.status()
        if status.in_flight:
            status = await mig.cancel()
        if facts.mirrors:  # the guest stays on its own disks
            await storagecopy.undo(dom.proc.qmp, facts.mirrors)
        if status.in_flight:  # QEMU did not wind the stream down in time
            raise Failed(f"the stream is still {status.value} after migrate_cancel: the "
                         "source guest is left as it is", host=self.host.name)
        may_resume = bool(facts.was_running) and (facts.dest_gone or not facts.finish_sent)
        if may_resume:
            await self._give_back(job)
            self._refuse_resume_owned_elsewhere(job, await self._owner(dom))
        if may_resume and not await guest_running(dom.proc.qmp):
            await self.domains.resume_guest(dom, "resumed: the migration did not complete")
        if facts.tls_installed:
            await streamtls.remove(dom.proc.qmp, job.record.id)

    # -- Finish -----------------------------------------------------------------------
    async def _finish(self, job: SourceJob) -> None:
        peer, dom = job.client(), job.domain()
        base, data = ConsoleLog(self.domains.paths(dom.name).root).export()
        body = FinishRequest(job_id=job.record.id, resume=bool(job.facts.was_running),
                             postcopy=job.facts.postcopy_started,
                             stats=job.record.stats, console_base=base,
                             console_b64=base64.b64encode(data).decode())
        job.facts.finish_sent = True
        self.records.save(job.record)
        try:
            res = parse_answer(FinishAnswer, await peer.request(
                "POST", "/v1/relocation/finish", body.model_dump(mode="json"),
                timeout=FINISH_TIMEOUT), job.record.dest)
        except Unreachable as exc:
            # no answer: what does the destination say once it is back?
            verdict = await self._verdict(job)
            if verdict == JobState.completed:
                return  # it took over before it went silent
            if verdict is not None:  # its copy is gone: ours may run again (undo)
                job.facts.dest_gone = True
                self.records.save(job.record)
                raise Failed(f"destination failed during Finish ({exc.message}) and "
                             "dropped its copy; the guest goes on here",
                             host=job.record.dest, phase="finish") from exc
            raise InDoubt(f"destination did not confirm the domain runs there "
                          f"({exc.message}); the source copy is kept paused until host "
                          f"{job.record.dest} answers", host=job.record.dest,
                          phase="finish") from exc
        except FerryError as exc:
            if exc.details.get("undone") is True:
                # the destination says it never resumed the guest and undid its side
                job.facts.dest_gone = True
                self.records.save(job.record)
                raise
            # any other answer (an internal error, a refusal of the request): it may
            # or may not run the guest, so ask what became of the job
            verdict = await self._verdict(job)
            if verdict == JobState.completed:
                return
            if verdict is not None:
                job.facts.dest_gone = True
                self.records.save(job.record)
                raise
            raise InDoubt(f"destination answered Finish with an error ({exc.message}) "
                          f"and then did not say how the job ended; the source copy is "
                          f"kept paused until host {job.record.dest} answers",
                          host=job.record.dest, phase="finish") from exc
        job.record.phase_times["dest_finish"] = res.finish_s
        job.facts.dest_resumed = True
        stopped_at = dom.proc.qmp.event_time("STOP") if dom.proc is not None else None
        if res.resumed_at is not None and stopped_at is not None \
                and res.resumed_at >= stopped_at:
            # the pause the guest saw: its CPU stopped here until it ran there
            # (both QEMUs' clocks; across hosts as good as their time sync)
            job.record.stats = job.record.stats.model_copy(
                update={"paused_ms": round((res.resumed_at - stopped_at) * 1000, 1)})
        self.records.save(job.record)
        crash_point("source-after-finish")

    async def _verdict(self, job: SourceJob) -> JobState | None:
        """Ask the destination about the job for ~10 s: completed (it runs the
        guest), failed (its copy is gone, or it never had the job), or None (no
        answer, or still undecided)."""
        for _ in range(VERDICT_TRIES):
            try:
                st = parse_answer(JobStatus, await job.client().request(
                    "GET", f"/v1/relocation/jobs/{job.record.id}", timeout=2),
                    job.record.dest)
            except NotFound:
                return JobState.failed
            except FerryError:
                await asyncio.sleep(1)
                continue
            if st.state == JobState.completed:
                return JobState.completed
            if st.state == JobState.lost:
                return JobState.lost
            if st.state in (JobState.failed, JobState.aborted):
                return JobState.failed
            await asyncio.sleep(1)
        return None

    # -- Confirm ----------------------------------------------------------------------
    async def _confirm(self, job: SourceJob) -> None:
        # The commit point: the destination runs the guest (Finish succeeded), so
        # the source lets go. From here on nothing is undone: a failure here is a
        # cleanup error of a completed migration, not a failed one. In post-copy
        # the source first serves the rest of the guest's memory until the stream
        # ends (GuestLost, settled, if a QEMU dies meanwhile).
        dom = job.domain()
        if job.facts.postcopy_started:
            try:
                await self._postcopy_tail(job)
            except GuestLost as exc:
                await self._lose(job, {"phase": Phase.confirm.value, "message": exc.message,
                                       "host": exc.details.get("host", self.host.name)})
                raise
        try:
            await self.domains.release(dom)
            crash_point("source-after-release")
            self._delete_copied(job)
        except Exception as exc:
            log.exception("job %s: confirm: releasing the source copy failed",
                          job.record.id)
            job.cleanup_error = f"the source copy on {self.host.name} was not fully " \
                                f"released: {exc}"
            # never let a stale copy run again: kill its QEMU, keep it held (Busy)
            # until a restarted ferryd finishes the cleanup
            if dom.proc is not None and dom.proc.alive():
                dom.proc.signal(signal.SIGKILL)
            job.keep_held = True
            job.facts.stale_copy = True
            self.records.save(job.record)
            if dom.name in self.domains.domains:
                with contextlib.suppress(Exception):
                    self.domains.note(dom, f"stale copy: migrated to {job.record.dest} "
                                      f"(job {job.record.id}); cleanup failed, ferryd "
                                      "retries it at its next start")

    def _delete_copied(self, job: SourceJob) -> None:
        """The source's images of the copied disks, once the destination runs the
        guest on its copies (unless --keep-source-disks); none another definition
        here still uses."""
        if not (job.facts.copied_paths and job.facts.disks_copied) \
                or job.options.keep_source_disks:
            return
        in_use = {os.path.realpath(d.path) for other in self.domains.domains.values()
                  for d in other.config.disks if d.path is not None}
        errors = storagecopy.delete_sources(job.facts.copied_paths, in_use)
        if errors:
            job.cleanup_error = "the source's copied disks were not all " \
                                f"deleted: {'; '.join(errors)}"

    # -- the post-copy tail -------------------------------------------------------------
    async def _postcopy_tail(self, job: SourceJob) -> None:
        """The guest runs at the destination; our QEMU pushes the rest of its memory
        and serves the pages it asks for, until the stream completes. A broken link
        pauses both QEMUs (``postcopy-paused``): ferryd recovers the stream by
        itself up to RECOVER_TRIES times, then on ``ferry migrate NAME --recover``.
        Never resumes the guest here; GuestLost if a QEMU with part of it dies."""
        dom, rec = job.domain(), job.record
        assert job.endpoint is not None
        tries, next_try, cut_seen, unanswered = 0, 0.0, None, 0
        applied = job.options
        async with self.connect(rec.dest, job.endpoint, CALL_TIMEOUT) as peer:
            while True:
                now = time.monotonic()
                there = await self._dest_status(job, peer)
                if dom.proc is None or not dom.proc.alive():
                    if there is not None and there.stream == MigrationStatus.completed:
                        return  # (it had sent everything before it went)
                    if there is None and unanswered < VERDICT_TRIES:
                        unanswered += 1  # ask again before calling it lost
                        await asyncio.sleep(1)
                        continue
                    raise GuestLost("the source QEMU exited during post-copy, with part "
                                    "of the guest's memory", host=self.host.name)
                if there is not None and there.qemu_alive is False:
                    raise GuestLost("the destination QEMU died during post-copy",
                                    host=rec.dest)
                mig = MigrationQmp(dom.proc.qmp)
                try:
                    if job.options != applied:  # `ferry job set`
                        applied = await self._apply_steering(job, mig, applied)
                    await self._sync_bandwidth(job, mig)
                    stats = await mig.query(rec.stats)
                except QemuError:
                    await asyncio.sleep(0.25)
                    continue  # (its QMP went: the check above decides next time)
                pct, eta = progress(stats, stats.progress_pct)
                rec.stats = stats.model_copy(update={"progress_pct": pct, "eta_s": eta})
                self._progress_event(job)
                job.stream_status = stats.status
                if stats.status == MigrationStatus.completed:
                    self.records.save(rec)
                    return
                if stats.status in (MigrationStatus.failed, MigrationStatus.cancelled):
                    raise GuestLost(f"the post-copy stream {stats.status.value} "
                                    f"({stats.qemu_error or 'no reason given'})",
                                    host=self.host.name)
                if stats.status == MigrationStatus.postcopy_paused:
                    if cut_seen is None:
                        cut_seen = now
                        self._escalate(job, "postcopy-paused", "the link to "
                                       f"{rec.dest} broke during post-copy: both QEMUs "
                                       "wait, the guest is paused at the destination "
                                       "until the stream is recovered")
                    manual = job.recover_requested.is_set()
                    if manual or (tries < RECOVER_TRIES and now >= next_try):
                        job.recover_requested.clear()
                        tries = 0 if manual else tries + 1
                        await self._try_recover(job, mig, peer, "by hand (--recover)"
                                                if manual else f"try {tries}/"
                                                f"{RECOVER_TRIES}")
                        next_try = time.monotonic() + RECOVER_EVERY_S
                        if job.stream_status != MigrationStatus.postcopy_paused:
                            cut_seen = None
                        continue
                elif stats.status == MigrationStatus.postcopy_active and there is not None \
                        and there.stream == MigrationStatus.postcopy_paused:
                    # the destination saw the link break before ours did
                    cut_seen = cut_seen or now
                    if now - cut_seen > NOTICE_CUT_S:
                        with contextlib.suppress(QemuError):
                            await mig.pause()
                else:
                    cut_seen = None
                if stats.status != MigrationStatus.postcopy_paused:
                    job.recover_requested.clear()  # (recovered meanwhile)
                job.steered.clear()
                waits = [asyncio.ensure_future(e.wait())
                         for e in (job.recover_requested, job.steered)]
                try:
                    await asyncio.wait(waits, timeout=0.25,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    async def _dest_status(self, job: SourceJob, peer: FerryClient) -> JobStatus | None:
        try:
            return parse_answer(JobStatus, await peer.request(
                "GET", f"/v1/relocation/jobs/{job.record.id}", timeout=HEARTBEAT_S),
                job.record.dest)
        except FerryError:
            return None

    async def _try_recover(self, job: SourceJob, mig: MigrationQmp, peer: FerryClient,
                           how: str) -> None:
        """One recovery of a paused post-copy stream, with fresh TLS credentials:
        the destination listens again (``migrate-recover``), ours reconnects
        (``migrate`` with ``resume``). Its outcome lands in the record."""
        rec = job.record
        gen = rec.stats.recoveries + 1
        try:
            server, client = await asyncio.to_thread(streamtls.make_pair, rec.id)
            res = parse_answer(RecoverAnswer, await peer.request(
                "POST", "/v1/relocation/recover",
                RecoverRequest(job_id=rec.id, generation=gen, stream=server)
                .model_dump(mode="json"), timeout=PREPARE_TIMEOUT), rec.dest)
            uri = _check_uri(res.uri, True, rec.dest)
            assert uri is not None and job.dom is not None and job.dom.proc is not None
            await streamtls.install(job.dom.proc.qmp, self.domains.paths(rec.domain).root,
                                    rec.id, False, client, gen)
            rec.stats = rec.stats.model_copy(update={"recoveries": gen})
            self.records.save(rec)
            await mig.resume(stream_uri(uri))
            t0 = time.monotonic()
            reconnecting = False
            while (status := await mig.status()) in (
                    MigrationStatus.postcopy_paused, MigrationStatus.postcopy_recover_setup,
                    MigrationStatus.postcopy_recover):
                waited = time.monotonic() - t0
                reconnecting = reconnecting or status != MigrationStatus.postcopy_paused
                if status == MigrationStatus.postcopy_paused and (reconnecting or
                                                                  waited > 1.0):
                    raise Failed("the source QEMU could not reconnect (still "
                                 "postcopy-paused)")
                if waited > RECOVER_WAIT_S:
                    raise Failed(f"the stream is still {status.value} after "
                                 f"{RECOVER_WAIT_S:g}s")
                await asyncio.sleep(0.05)
            job.stream_status = status
        except FerryError as exc:
            self._escalate(job, "recover", f"recovery {how} failed: {exc.message}")
            return
        self._escalate(job, "recover", f"post-copy stream recovered ({how}): {status.value}")

    def recover_postcopy(self, name: str) -> JobRecord:
        """``ferry migrate NAME --recover``: recover the domain's paused post-copy
        stream now (ferryd's own tries may be used up)."""
        jobs = [j for j in self.jobs.values() if j.record.domain == name]
        if not jobs:
            raise NotFound(f"domain {name} has no migration running from host "
                           f"{self.host.name} (a post-copy is recovered on its source)")
        job = jobs[0]
        if not job.facts.postcopy_started:
            raise Conflict(f"migration {job.record.id} of {name} is not in post-copy: "
                           "there is nothing to recover")
        if job.stream_status != MigrationStatus.postcopy_paused:
            status = job.stream_status.value if job.stream_status else "not started"
            raise Conflict(f"migration {job.record.id} of {name} is not paused (its stream "
                           f"is {status}): there is nothing to recover")
        job.recover_requested.set()
        return job.record

    # -- after a restart, and for jobs in doubt -----------------------------------------
    async def _settle(self, job: SourceJob) -> JobState | None:
        """Have the destination drop its side if it still can; then how the job
        ended there: completed, failed (its copy is gone), or None (no answer)."""
        if job.endpoint is None:
            return None
        path = f"/v1/relocation/jobs/{job.record.id}"
        try:
            async with self.connect(job.record.dest, job.endpoint, CALL_TIMEOUT) as peer:
                st = parse_answer(JobStatus, await peer.request("GET", path), job.record.dest)
                if st.state == JobState.running:
                    body = AbortRequest(job_id=job.record.id, outcome=JobState.failed,
                                        reason="the source ferryd restarted during the "
                                        "migration", phase=job.record.phase)
                    res = parse_answer(AbortAnswer, await peer.request(
                        "POST", "/v1/relocation/abort", body.model_dump(mode="json")),
                        job.record.dest)
                    if res.aborted:
                        return JobState.failed
                    # too late to abort (Finish got there first?): what is it now?
                    st = parse_answer(JobStatus, await peer.request("GET", path),
                                      job.record.dest)
        except NotFound:
            return JobState.failed
        except FerryError as exc:
            log.warning("job %s: cannot ask %s: %s", job.record.id, job.record.dest,
                        exc.message)
            return None
        if st.state == JobState.completed:
            return JobState.completed
        if st.state == JobState.lost:
            return JobState.lost
        if st.state in (JobState.failed, JobState.aborted):
            return JobState.failed
        return None

    async def _conclude(self, job: SourceJob, verdict: JobState | None, why: str) -> bool:
        """Settle a job from the destination's verdict; False if still in doubt."""
        rec, facts = job.record, job.facts
        if verdict == JobState.completed:
            facts.dest_resumed = True
            if job.dom is not None:
                try:
                    await self._confirm(job)
                except GuestLost:
                    return True  # settled by _lose
            else:  # (released before a crash: its copied images may be left)
                self._delete_copied(job)
            self.records.set_state(rec, JobState.completed, decided_by=self.host.name,
                                   cleanup_error=job.cleanup_error)
            log.info("job %s: confirmed %s: %s runs on %s", rec.id, why, rec.domain,
                     rec.dest)
            return True
        if verdict is None and facts.finish_sent:
            return False
        # the destination's copy is gone, or it never got Finish so never resumed
        facts.dest_gone = verdict is not None
        message = f"ferryd restarted during the migration ({why})" if \
            rec.state == JobState.running else f"settled {why}"
        if verdict is None:
            message += f"; destination {rec.dest} did not answer, but it never got " \
                       "Finish, so it never ran the guest"
        error: dict[str, object] = {"phase": rec.phase.value, "host": self.host.name,
                                    "message": message, "kind": "failed"}
        if verdict == JobState.lost or await self._switched(job):
            await self._lose(job, error)
            return True
        facts.postcopy_started = False  # asked, but QEMU never switched
        rec.error = error
        job.outcome = JobState.failed
        undo_errors = await undo_steps(job, self.steps)
        if undo_errors:
            error["undo_errors"] = undo_errors
        self.records.set_state(rec, JobState.failed, error=error,
                               decided_by=self.host.name)
        return True

    async def _resolve(self, job: SourceJob) -> None:
        """An in-doubt job asks the destination again until it can settle."""
        while True:
            await asyncio.sleep(RESOLVE_EVERY_S)
            try:
                async with job.settling:
                    if job.record.state != JobState.in_doubt:
                        return  # settled by the operator
                    verdict = await self._settle(job)
                    if await self._conclude(job, verdict, "once the destination answered"):
                        self._end(job)
                        return
            except Exception:  # keep asking: the domain stays held until it settles
                log.exception("job %s: settling the job in doubt failed", job.record.id)

    async def _settle_postcopy(self, job: SourceJob) -> None:
        """After a restart in post-copy: go on serving the guest's memory (Confirm
        runs the tail) once the destination says it runs the guest."""
        try:
            async with job.settling:
                verdict = await self._settle(job)
                settled = await self._conclude(job, verdict, "after a restart")
            if not settled and job.record.state == JobState.in_doubt:
                job.resolver = asyncio.create_task(self._resolve(job))
                return
            if not settled:
                self._in_doubt(job, {"phase": job.record.phase.value,
                                     "host": job.record.dest, "kind": "failed",
                                     "message": f"ferryd restarted in post-copy and host "
                                     f"{job.record.dest} does not answer"})
                return
        except Exception:
            log.exception("job %s: settling a post-copy after a restart", job.record.id)
            return
        self._end(job)

    async def recover(self) -> None:
        """At start: settle every source job an earlier ferryd left unsettled, with
        the same undos a failure runs, from the stored record; finish the cleanup of
        completed jobs whose Confirm failed."""
        for raw in self.store.migrations(state=JobState.completed.value):
            if raw.get("role") != Role.source.value or \
                    not (raw.get("source_facts") or {}).get("stale_copy"):
                continue
            done = JobRecord.from_stored(raw)
            stale = self.domains.domains.get(done.domain)
            if stale is not None:  # the fence holds: nothing else can have this name
                try:
                    await self.domains.hold_for_job(stale.name, done.id)
                    await self.domains.release(stale)
                except Exception as exc:
                    log.error("job %s: the stale copy of %s is still here: %s", done.id,
                              done.domain, exc)
                    continue  # left held: nothing may run it
                self.domains.let_go(stale)
            leftover = SourceJob(done, None, None)
            self._delete_copied(leftover)  # (never reached when the release failed)
            done.source_facts.stale_copy = False
            done.cleanup_error = f"{done.cleanup_error} (cleaned up at a ferryd restart" \
                f"{'; ' + leftover.cleanup_error if leftover.cleanup_error else ''})"
            self.records.save(done)
        for rec in self.records.running(Role.source.value):
            dom = self.domains.domains.get(rec.domain)
            try:
                endpoint: tuple[str, int] | None = self._dest(rec.dest)[1]
            except InvalidInput:
                endpoint = None
            job = SourceJob(rec, dom, endpoint)
            if dom is not None:
                await self.domains.hold_for_job(dom.name, rec.id)
            if rec.source_facts.postcopy_started and rec.source_facts.finish_sent:
                # the tail may still be serving the guest's memory: settle it in the
                # background (the domain stays held and is never resumed)
                self.jobs[rec.id] = job
                job.task = asyncio.create_task(self._settle_postcopy(job))
                continue
            verdict = await self._settle(job)
            if await self._conclude(job, verdict, "after a restart"):
                if dom is not None:
                    self.domains.let_go(dom)
                continue
            self.jobs[rec.id] = job
            if rec.state != JobState.in_doubt:
                self._in_doubt(job, {"phase": rec.phase.value, "host": rec.dest,
                                     "message": f"ferryd restarted after Finish was sent "
                                     f"and host {rec.dest} does not answer: it may run "
                                     "the guest, so the source copy stays paused",
                                     "kind": "failed"})
            else:
                job.resolver = asyncio.create_task(self._resolve(job))


_URI_RE = re.compile(r"tcp:(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})")


def _check_address(address: object, dest: str) -> str:
    """The destination's NBD server address: an IPv4 address, nothing else."""
    try:
        return str(ipaddress.IPv4Address(str(address)))
    except ValueError as exc:
        raise Failed(f"destination {dest} answered Prepare with an unusable NBD address "
                     f"{address!r}", host=dest, phase="prepare") from exc


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
