"""The destination's half of a migration: Prepare, Finish, and their undo.

Called by the source's ferryd over the relocation API. From Prepare on, the
arriving domain's name, UUID and memory are reserved here (nothing else may be
defined under them). It becomes a domain of this host in Finish, when the
stream has completed: first adopted paused (stored and listed), then resumed —
the commit point of this side, after which nothing here is undone.

The undo reads only the record's ``DestinationFacts`` (saved before each step),
so it is the same after a restart: kill the incoming QEMU, drop its files and
taps, release the reservation. An incoming side that its source stops talking
to for ``INCOMING_LEASE_S`` (no heartbeat, no call) is undone by itself, so a
dead source never holds a reservation here.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import platform
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from ferry.console import ConsoleLog
from ferry.domains import Domain, DomainService
from ferry.errors import Busy, Conflict, Failed, FerryError, InvalidInput, NotFound, Refused
from ferry.failpoints import crash_point
from ferry.hostconfig import HostConfig
from ferry.migration import storagecopy, streamtls
from ferry.migration.job import JobRecords
from ferry.migration.models import (
    FINAL_STATES,
    PROTOCOL_VERSION,
    AbortAnswer,
    AbortRequest,
    Blocker,
    DestinationFacts,
    FinishAnswer,
    FinishRequest,
    JobRecord,
    JobState,
    JobStatus,
    Phase,
    PrepareAnswer,
    RecoverAnswer,
    RecoverRequest,
    RelocationRequest,
    Role,
    check_protocol,
)
from ferry.models import DomainConfig, DomainState
from ferry.qemu.migrate import MigrationQmp, guest_running
from ferry.qemu.process import QemuProcess
from ferry.stats import POSTCOPY, MigrationStatus
from ferry.storage import localize
from ferry.store import Store

log = logging.getLogger(__name__)

INCOMING_TIMEOUT = 120.0  # s for the stream to complete once the source says it did
INCOMING_LEASE_S = 30.0   # s without a word from the source before its side is dropped
GIVE_BACK_EVERY_S = 5.0   # a registry that did not answer a give-back is asked again
# s a check or a Prepare waits for a base image's identity to be computed here
# (longer: that disk goes in full this time, the hash goes on for the next)
IDENTITY_WAIT_S = 10.0


@dataclass
class Incoming:
    record: JobRecord
    source: str
    proc: QemuProcess | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    adopted: Domain | None = None       # adopted in Finish, not yet resumed
    committed: bool = False             # Finish's cont succeeded: never undone
    last_contact: float = field(default_factory=time.monotonic)
    disk_server: QemuProcess | None = None  # a shut-off domain's disks, served

    @property
    def facts(self) -> DestinationFacts:
        return self.record.dest_facts

    @property
    def config(self) -> DomainConfig:
        assert self.facts.config is not None
        return self.facts.config


@dataclass
class Tail:
    """A post-copy after Finish: the guest runs here (held, so nothing else
    touches it) while the rest of its memory arrives from the source."""

    record: JobRecord
    dom: Domain
    source: str
    status: MigrationStatus = MigrationStatus.postcopy_active
    task: asyncio.Task[None] | None = None


class RelocationService:
    def __init__(self, host: HostConfig, domains: DomainService, store: Store) -> None:
        self.host = host
        self.domains = domains
        self.store = store
        self.records = JobRecords(store, domains.events, host.name)
        self.incoming: dict[str, Incoming] = {}
        self.tails: dict[str, Tail] = {}
        # job ids whose abort came before their Prepare (monotonic time of the abort)
        self.aborted_early: dict[str, float] = {}
        # jobs whose ownership is being given back to their source (registry away)
        self.giving_back: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        for task in list(self.giving_back.values()):
            task.cancel()
        for inc in self.incoming.values():
            if inc.watcher is not None:
                inc.watcher.cancel()
        for tail in self.tails.values():
            if tail.task is not None:
                tail.task.cancel()

    # -- checks -----------------------------------------------------------------------
    def typed_blockers(self, req: RelocationRequest, tops: Collection[int] = ()
                       ) -> list[Blocker]:
        """Every reason this host can't take the domain (``tops``: the copies that
        bring only their top layer); changes nothing."""
        cfg, out = localize(req.config, self.host), []
        if req.protocol != PROTOCOL_VERSION:
            out.append(Blocker(code="protocol", message=(
                f"host {req.source} speaks relocation protocol {req.protocol}, host "
                f"{self.host.name} speaks {PROTOCOL_VERSION}: upgrade both to the same "
                "Ferry")))
        if self.domains.maintenance:
            out.append(Blocker(code="maintenance", message=(
                f"host {self.host.name} is in maintenance mode: it takes no incoming "
                "migrations")))
        arrival = self.domains.arriving(cfg)
        if arrival is not None:
            out.append(Blocker(code="arriving", message=(
                f"domain {cfg.name} is already arriving on host {self.host.name} from "
                f"{arrival.source} (job {arrival.job_id})")))
        out += [Blocker(code="name", message=m) for m in self.domains.identity_conflicts(cfg)]
        # (the disks to copy are not here yet: their own checks instead)
        copied = {c.index for c in req.copies}
        present = cfg.model_copy(update={"disks": [d for i, d in enumerate(cfg.disks)
                                                   if i not in copied]})
        out += [Blocker(code=b.code.value, message=b.message)
                for b in self.domains.typed_blockers(present, to_run=req.running)]
        out += storagecopy.blockers(cfg, self.host, req.copies, tops, self._promised())
        if req.arch != platform.machine():
            out.append(Blocker(code="arch", message=(
                f"architecture {req.arch} differs from host {self.host.name}'s "
                f"{platform.machine()}")))
        if req.running:
            accel = self.domains.accel_for(cfg)
            if req.accel is not None and accel != req.accel:
                out.append(Blocker(code="accel", message=(
                    f"the domain runs under {req.accel} but host {self.host.name} "
                    f"would use {accel}")))
        return out

    def _promised(self) -> dict[str, int]:
        """Bytes the copies arriving now may still take, by pool."""
        out: dict[str, int] = {}
        for inc in self.incoming.values():
            f = inc.facts
            if f.config is not None and f.copies:
                for pool, size in storagecopy.still_to_land(
                        f.config, f.copies, f.top_only, f.images_created).items():
                    out[pool] = out.get(pool, 0) + size
        return out

    async def _tops(self, req: RelocationRequest) -> tuple[list[int], list[int]]:
        """(the copies that bring only their top layer, those whose base's identity
        is still being computed here)."""
        if not req.copies:
            return [], []
        try:
            return await storagecopy.top_only(localize(req.config, self.host), self.host,
                                              req.copies, self.domains.image_ids,
                                              IDENTITY_WAIT_S)
        except FerryError:
            return [], []

    async def check(self, req: RelocationRequest) -> tuple[list[Blocker], list[str]]:
        """Every blocker here, and how each disk would be copied (``--check``)."""
        tops, pending = await self._tops(req)
        notes = storagecopy.notes(localize(req.config, self.host), self.host, req.copies,
                                  tops, pending) if req.copies else []
        return self.typed_blockers(req, tops), notes

    def source_of(self, job_id: str) -> str | None:
        """The host that prepared job ``job_id`` here (open or ended)."""
        inc = self.incoming.get(job_id)
        if inc is not None:
            return inc.source
        rec = self._stored(job_id)
        return rec.source if rec is not None else None

    # -- Prepare ----------------------------------------------------------------------
    async def prepare(self, req: RelocationRequest) -> PrepareAnswer:
        """Check, reserve, start the incoming QEMU, open its endpoint.
        Refused (nothing changed) or Failed (undone) on error."""
        check_protocol(req.protocol, req.source, self.host.name)
        tops, _ = await self._tops(req)
        # (no await from here to the arrival's entry: checks and promises hold)
        now = time.monotonic()
        self.aborted_early = {j: t for j, t in self.aborted_early.items()
                              if now - t < INCOMING_LEASE_S}
        if req.job_id in self.aborted_early:
            raise Conflict(f"job {req.job_id} was aborted before its Prepare arrived on "
                           f"{self.host.name}")
        if req.job_id in self.incoming or self._stored(req.job_id) is not None:
            raise Conflict(f"job {req.job_id} is already known on {self.host.name}")
        found = self.typed_blockers(req, tops)
        if found:
            raise Refused("; ".join(b.message for b in found),
                          blockers=[b.model_dump() for b in found], host=self.host.name)
        if (req.running or req.copies) and req.stream is None:
            raise Refused(f"source {req.source} sent no TLS credentials for the migration "
                          "stream; Ferry never migrates a guest or a disk in plaintext",
                          host=self.host.name)
        limit = self.host.limits.incoming
        if len(self.incoming) >= limit:  # (no await since: the count holds)
            raise Busy(f"host {self.host.name} takes at most {limit} incoming "
                       f"migration(s) at a time ([limits] incoming); "
                       f"{len(self.incoming)} arriving now", limit="incoming",
                       host=self.host.name)
        t0 = time.monotonic()
        cfg = localize(req.config, self.host)
        memory = cfg.memory if req.running else 0
        record = JobRecord(id=req.job_id, domain=cfg.name, mode=req.mode,
                           role=Role.destination, source=req.source, dest=self.host.name,
                           phase=Phase.prepare, started=time.time(),
                           dest_facts=DestinationFacts(config=cfg, reserved_mib=memory,
                                                       copies=req.copies, top_only=tops))
        inc = Incoming(record, req.source)
        self.incoming[req.job_id] = inc
        bases = tuple(b for c in req.copies if c.index in tops
                      and (b := storagecopy.base_here(cfg, self.host, c)) is not None)
        self.domains.reserve_arrival(req.job_id, cfg, req.source, memory, bases)
        self.records.enter(record, Phase.prepare)
        port, nbd_port = 0, None
        # under the job's lock: an abort (or the lease) that arrives meanwhile, say
        # because the source gave up waiting, undoes this side once it is complete
        async with inc.lock:
            try:
                if req.running:
                    port, nbd_port = await self._start_incoming(inc, req, cfg)
                elif req.copies:
                    nbd_port = await self._serve_shut_off(inc, req, cfg)
            except Exception as exc:
                why = exc.message if isinstance(exc, FerryError) else repr(exc)
                if not isinstance(exc, (FerryError, OSError)):
                    log.exception("job %s: prepare failed", req.job_id)
                await self._undo(inc, f"prepare failed: {why}")
                raise Failed(f"prepare on {self.host.name} failed: {why}",
                             host=self.host.name, phase="prepare") from exc
            record.phase_times["prepare"] = time.monotonic() - t0
            self.records.save(record)
            inc.watcher = asyncio.create_task(self._watch(inc))
        if not req.running:
            return PrepareAnswer(protocol=PROTOCOL_VERSION, uri=None, nbd_port=nbd_port,
                                 nbd_address=self.host.migration_ip if nbd_port else None,
                                 top_only=inc.facts.top_only)
        log.info("job %s: ready to receive %s on %s:%d", req.job_id, cfg.name,
                 self.host.migration_ip, port)
        return PrepareAnswer(protocol=PROTOCOL_VERSION,
                             uri=f"tcp:{self.host.migration_ip}:{port}", nbd_port=nbd_port,
                             nbd_address=self.host.migration_ip if nbd_port else None,
                             top_only=inc.facts.top_only)

    async def _make_images(self, inc: Incoming, req: RelocationRequest,
                           cfg: DomainConfig) -> None:
        """The empty images the copies go into (each path saved before it is made)."""
        await storagecopy.create(cfg, req.copies, inc.facts.images_created,
                                 lambda: self.records.save(inc.record), inc.facts.top_only,
                                 self.host)

    async def _start_incoming(self, inc: Incoming, req: RelocationRequest,
                              cfg: DomainConfig) -> tuple[int, int | None]:
        """The images to copy, the incoming QEMU on them with the stream's shape and
        TLS, the NBD exports of the copies; (stream port, NBD port or None)."""
        record, nbd_port = inc.record, None
        await self._make_images(inc, req, cfg)
        inc.facts.qemu_started = True
        self.records.save(record)
        inc.proc = await self.domains.launch_incoming(cfg)
        mig = MigrationQmp(inc.proc.qmp)
        await mig.set_capabilities(events=True)
        await mig.set_stream(req.channels, req.compress.value)
        if req.postcopy:
            await mig.set_capabilities(postcopy_ram=True)
        assert req.stream is not None
        await streamtls.install(inc.proc.qmp, self.domains.paths(cfg.name).root,
                                req.job_id, True, req.stream)
        if req.copies:
            inc.facts.nbd_started = True
            self.records.save(record)
            nbd_port = await storagecopy.serve(inc.proc.qmp, req.copies,
                                               self.host.migration_ip, req.job_id)
        return await mig.incoming(f"tcp:{self.host.migration_ip}:0"), nbd_port

    async def _serve_shut_off(self, inc: Incoming, req: RelocationRequest,
                              cfg: DomainConfig) -> int:
        """A shut-off domain's disks arrive over NBD too: empty images, served by a
        QEMU with only the disks (never run); its port."""
        record = inc.record
        await self._make_images(inc, req, cfg)
        inc.facts.disk_server = True
        self.records.save(record)
        inc.disk_server = await self.domains.launch_disk_server(cfg, req.job_id)
        assert req.stream is not None
        await streamtls.load(inc.disk_server.qmp, inc.disk_server.paths.root,
                             streamtls.object_id(req.job_id), True, req.stream)
        inc.facts.nbd_started = True
        self.records.save(record)
        return await storagecopy.serve(inc.disk_server.qmp, req.copies,
                                       self.host.migration_ip, req.job_id)

    async def _watch(self, inc: Incoming) -> None:
        """Undo this side at once when its QEMU exits before Finish (the stream broke,
        it was killed), or when the source has been silent for the lease."""
        while True:
            if inc.proc is not None:
                exited = await inc.proc.wait_exit(1.0)
            else:
                exited = False
                await asyncio.sleep(1.0)
            silent = time.monotonic() - inc.last_contact > INCOMING_LEASE_S
            if not exited and not silent:
                continue
            async with inc.lock:
                if self.incoming.get(inc.record.id) is not inc or inc.facts.resumed:
                    return
                if exited:
                    await self._undo(inc, "the incoming QEMU exited before Finish")
                    return
                if time.monotonic() - inc.last_contact > INCOMING_LEASE_S:
                    await self._undo(inc, f"source {inc.source} said nothing for "
                                     f"{INCOMING_LEASE_S:g}s")
                    return

    # -- Finish -----------------------------------------------------------------------
    async def finish(self, req: FinishRequest) -> FinishAnswer:
        """The source says the stream completed: check that, adopt, resume, announce.
        An error answer with ``undone`` in its details means this side is gone and
        never ran the guest; after the commit point (the guest runs here) the answer
        is always success."""
        inc = self._get(req.job_id)
        async with inc.lock:
            if self.incoming.get(req.job_id) is not inc:
                raise Failed(f"job {req.job_id} was undone on {self.host.name}: "
                             f"{(inc.record.error or {}).get('message', '')}",
                             host=self.host.name, phase="finish", undone=True)
            inc.last_contact = time.monotonic()
            t0 = time.monotonic()
            self.records.enter(inc.record, Phase.finish)
            inc.record.stats = req.stats
            try:
                await self._take_over(inc, req)
            except Exception as exc:
                if not inc.committed:
                    await self._fail_finish(inc, exc)
                log.exception("job %s: after the commit point", req.job_id)
            try:
                await self._committed(inc, req, t0)
            except Exception:  # the guest runs here: that stands, whatever this was
                log.exception("job %s: recording the completed job", req.job_id)
            self.incoming.pop(req.job_id, None)
            resumed_at = None
            if inc.facts.resumed and inc.proc is not None:
                resumed_at = inc.proc.qmp.event_time("RESUME")
            return FinishAnswer(finish_s=inc.record.phase_times.get("finish", 0.0),
                                resumed=inc.facts.resumed, resumed_at=resumed_at)

    async def _fail_finish(self, inc: Incoming, exc: BaseException) -> None:
        why = exc.message if isinstance(exc, FerryError) else repr(exc)
        if not isinstance(exc, FerryError):
            log.exception("job %s: finish failed", inc.record.id)
        try:
            await self._undo(inc, f"finish failed: {why}")
        except Exception as undo_exc:
            # not known to be gone: no `undone`, so the source asks again
            log.exception("job %s: undo after a failed finish", inc.record.id)
            raise Failed(f"finish on {self.host.name} failed ({why}) and so did its "
                         f"undo ({undo_exc!r})", host=self.host.name,
                         phase="finish") from exc
        raise Failed(f"finish on {self.host.name} failed: {why}", host=self.host.name,
                     phase="finish", undone=True) from exc

    async def _committed(self, inc: Incoming, req: FinishRequest, t0: float) -> None:
        """The commit point of this side is behind: the domain is this host's. (In
        post-copy its memory is still arriving: the tail holds it until then.)"""
        tail = None
        if req.postcopy and inc.proc is not None and inc.adopted is not None:
            try:
                done = await MigrationQmp(inc.proc.qmp).status() == MigrationStatus.completed
            except FerryError:
                done = False  # (the tail finds out)
            if not done:
                tail = Tail(inc.record, inc.adopted, inc.source)
        if tail is None and inc.proc is not None:  # (after cont: not part of the guest's pause)
            await streamtls.remove(inc.proc.qmp, req.job_id)
        if req.resume and inc.proc is not None:
            await self._announce(inc)
        if inc.watcher is not None:
            inc.watcher.cancel()
        self.domains.release_arrival(req.job_id)
        if inc.adopted is not None and tail is None:
            self.domains.let_go(inc.adopted)
        inc.record.phase_times["finish"] = time.monotonic() - t0
        inc.record.phase = Phase.confirm
        self.records.set_state(inc.record, JobState.completed, decided_by=inc.source)
        if tail is not None:
            self.tails[req.job_id] = tail
            tail.task = asyncio.create_task(self._tail(tail))

    async def _tail(self, tail: Tail) -> None:
        """Watch a post-copy's incoming stream until it completes; if this QEMU dies
        (or its stream fails) first, the guest is lost: the record says so and the
        domain stays defined here, crashed."""
        rec, dom = tail.record, tail.dom
        proc = dom.proc
        why = None
        try:
            while proc is not None:
                if not proc.alive():
                    why = "the destination QEMU died during post-copy"
                    break
                try:
                    status = await MigrationQmp(proc.qmp).status()
                except FerryError:
                    await proc.wait_exit(0.25)
                    continue
                if status != tail.status:  # (the record shows a paused stream here)
                    tail.status = status
                    rec.stats = rec.stats.model_copy(update={"status": status})
                    self.records.save(rec)
                if tail.status == MigrationStatus.completed:
                    await streamtls.remove(proc.qmp, rec.id, rec.stats.recoveries)
                    log.info("job %s: post-copy of %s complete", rec.id, rec.domain)
                    return
                if tail.status in (MigrationStatus.failed, MigrationStatus.cancelled):
                    why = f"the incoming post-copy stream {tail.status.value}"
                    await self.domains.lose(dom, f"lost in migration {rec.id}: {why}")
                    break
                await proc.wait_exit(0.25)
            if why is not None:
                self._lost(rec, why)
        finally:
            if self.tails.get(rec.id) is tail:
                self.tails.pop(rec.id, None)
                self.domains.let_go(dom)

    def _lost(self, rec: JobRecord, why: str) -> None:
        if rec.state == JobState.lost:
            return
        message = (f"{why}: THE GUEST IS LOST (part of its memory was still on host "
                   f"{rec.source}); its definition stays here, crashed: start it "
                   "afresh from its disks")
        self.records.set_state(rec, JobState.lost, error=self._error(rec, message))
        self.domains.events.publish("migration.lost", job=rec.id, domain=rec.domain,
                                    message=message)
        log.error("job %s: %s", rec.id, message)

    async def recover_stream(self, req: RecoverRequest) -> RecoverAnswer:
        """The source asks to reconnect a post-copy stream a broken link paused:
        load the fresh credentials, listen again (``migrate-recover``)."""
        tail = self.tails.get(req.job_id)
        if tail is None or tail.dom.proc is None:
            raise NotFound(f"no post-copy of job {req.job_id} is arriving on host "
                           f"{self.host.name}")
        proc = tail.dom.proc
        mig = MigrationQmp(proc.qmp)
        status = await mig.status()
        if status != MigrationStatus.postcopy_paused:
            raise Conflict(f"the incoming stream of job {req.job_id} is {status.value}, "
                           "not paused: nothing to recover")
        with contextlib.suppress(FerryError):  # (a try of the same generation before)
            await mig.drop_tls(streamtls.object_id(req.job_id, req.generation))
        await streamtls.install(proc.qmp, self.domains.paths(tail.dom.name).root,
                                req.job_id, True, req.stream, req.generation)
        port = await mig.recover(f"tcp:{self.host.migration_ip}:0")
        tail.record.stats = tail.record.stats.model_copy(
            update={"recoveries": max(req.generation, tail.record.stats.recoveries)})
        self.records.save(tail.record)
        log.info("job %s: recovering post-copy on %s:%d", req.job_id,
                 self.host.migration_ip, port)
        return RecoverAnswer(uri=f"tcp:{self.host.migration_ip}:{port}")

    async def _take_over(self, inc: Incoming, req: FinishRequest) -> None:
        cfg = inc.config
        try:
            history = base64.b64decode(req.console_b64, validate=True)
        except ValueError as exc:
            raise InvalidInput("console_b64 is not base64") from exc
        ConsoleLog(self.domains.paths(cfg.name).root).adopt(req.console_base, history)
        if inc.proc is None:  # a shut-off domain: the definition (its disks are here)
            if inc.facts.disk_server:
                await self.domains.stop_disk_server(inc.record.id, inc.disk_server)
                inc.disk_server = None
            await self._commit(inc)
            self.domains.adopt_definition(cfg, f"migrated from {inc.source}")
            inc.committed = True
            return
        proc = inc.proc
        await self._wait_incoming(MigrationQmp(proc.qmp), req.postcopy)
        if inc.facts.copies:  # no export of the guest's disks once it may run
            await storagecopy.unserve(proc.qmp, inc.facts.copies)
        if inc.watcher is not None:
            inc.watcher.cancel()  # its QEMU is the domain's now: the domain watches it
        # listed (paused) before it may run: a guest never runs unlisted here
        dom = self.domains.adopt(cfg, proc, DomainState.paused,
                                 f"migrated from {inc.source}")
        await self.domains.hold_for_job(dom.name, req.job_id)
        inc.adopted = dom
        if not req.postcopy:  # (a post-copy's source committed before the switch)
            await self._commit(inc)
        crash_point("finish-before-cont")
        if req.resume:
            inc.facts.resumed = True  # from here the guest may have run: never undone
            self.records.save(inc.record)
            try:
                await self._resume(dom, inc.source)
            except FerryError:
                # cont failed, or its answer was lost and QEMU can't say: stop that
                # QEMU for sure, so that the source's paused copy is the only one
                await proc.stop(grace=1.0)
                inc.facts.resumed = False
                self.records.save(inc.record)
                raise
        inc.committed = True  # the guest runs here (or, paused before, is here)
        if req.resume:
            crash_point("finish-after-cont")

    async def _commit(self, inc: Incoming) -> None:
        """The commit point in the cluster registry: this host owns the domain
        from here on, if the source still does and holds the job's lock (Failed,
        nothing changed, otherwise). Saved first: an undo gives it back."""
        inc.facts.registry_committed = True
        self.records.save(inc.record)
        try:
            await self.domains.owners.commit(inc.config.name, str(inc.config.uuid),
                                             inc.source, self.host.name, inc.record.id)
        except FerryError as exc:
            if exc.details.get("outcome") != "unknown":  # (unknown: it may have been)
                inc.facts.registry_committed = False
                self.records.save(inc.record)
            raise

    async def _give_back(self, rec: JobRecord) -> None:
        """The registry names the source the owner again; if it does not answer,
        asked again in the background (and at the next start) until it does."""
        cfg = rec.dest_facts.config
        assert cfg is not None
        try:
            await self.domains.owners.give_back(cfg.name, str(cfg.uuid), rec.source,
                                                self.host.name)
        except FerryError as exc:
            log.error("job %s: the registry may still name this host the owner of %s "
                      "(%s): asking again", rec.id, cfg.name, exc.message)
            if rec.id not in self.giving_back:
                self.giving_back[rec.id] = asyncio.create_task(self._give_back_later(rec))
            return
        rec.dest_facts.registry_committed = False
        self.records.save(rec)

    async def _give_back_later(self, rec: JobRecord) -> None:
        try:
            while rec.dest_facts.registry_committed:
                await asyncio.sleep(GIVE_BACK_EVERY_S)
                cfg = rec.dest_facts.config
                assert cfg is not None
                try:
                    await self.domains.owners.give_back(cfg.name, str(cfg.uuid), rec.source,
                                                        self.host.name)
                except FerryError:
                    continue
                rec.dest_facts.registry_committed = False
                self.records.save(rec)
        finally:
            self.giving_back.pop(rec.id, None)

    async def _resume(self, dom: Domain, source: str) -> None:
        """``cont``; if QEMU's answer is lost but the guest runs, that is success."""
        try:
            await self.domains.resume_guest(dom, f"migrated from {source}")
        except FerryError:
            assert dom.proc is not None
            if not await guest_running(dom.proc.qmp):
                raise

    async def _announce(self, inc: Incoming) -> None:
        """Tell the network where the guest is now (only once it runs here)."""
        dom = inc.adopted
        if dom is None or dom.proc is None:
            return
        try:
            await MigrationQmp(dom.proc.qmp).announce(self.host.announce.qmp())
        except FerryError as exc:
            log.warning("job %s: announcing %s failed (it runs here anyway): %s",
                        inc.record.id, dom.name, exc.message)

    async def _wait_incoming(self, mig: MigrationQmp, postcopy: bool = False) -> None:
        """Until the stream completed; in post-copy, until the guest's devices are
        loaded (QEMU's run state leaves ``inmigrate``: it may run now)."""
        deadline = time.monotonic() + INCOMING_TIMEOUT
        while True:
            stats = await mig.query()
            if stats.status == MigrationStatus.completed:
                return
            if postcopy and stats.status in POSTCOPY and await mig.devices_loaded():
                return
            if stats.status in (MigrationStatus.failed, MigrationStatus.cancelled):
                raise Failed(f"incoming migration {stats.status.value}: "
                             f"{stats.qemu_error or ''}")
            if time.monotonic() > deadline:
                raise Failed(f"incoming migration still {stats.status.value} after "
                             f"{INCOMING_TIMEOUT:g}s")
            await mig.wait_change(0.05)

    # -- undo -------------------------------------------------------------------------
    async def abort(self, req: AbortRequest) -> AbortAnswer:
        """The source ended the job (``req.outcome``): drop this side if it is still
        here, and record the source's outcome so both records agree. ``lost`` for
        a guest that runs here: post-copy broke, so its copy here is stopped (kept
        defined, crashed)."""
        if req.outcome == JobState.lost:
            lost = await self._abort_lost(req)
            if lost is not None:
                return lost
        inc = self.incoming.get(req.job_id)
        if inc is not None:
            inc.last_contact = time.monotonic()
            async with inc.lock:
                if self.incoming.get(req.job_id) is inc:
                    await self._undo(inc, req.reason or "aborted by the source",
                                     state=req.outcome, phase=req.phase, host=req.host,
                                     decided_by=inc.source)
                    return AbortAnswer(aborted=True, state=inc.record.state)
        rec = self._stored(req.job_id)
        if rec is None:
            # never prepared here, or its Prepare is still on its way: refuse it then
            self.aborted_early[req.job_id] = time.monotonic()
            return AbortAnswer(aborted=False)
        if rec.state in FINAL_STATES and rec.state != JobState.completed \
                and (rec.state != req.outcome or rec.decided_by != rec.source):
            # this side ended first (its own decision); the source's outcome rules
            self.records.set_state(rec, req.outcome, decided_by=rec.source,
                                   error=self._error(rec, req.reason, req.phase, req.host))
        return AbortAnswer(aborted=False, state=rec.state)

    async def _abort_lost(self, req: AbortRequest) -> AbortAnswer | None:
        tail = self.tails.pop(req.job_id, None)
        rec = tail.record if tail is not None else self._stored(req.job_id)
        if rec is None or rec.state not in (JobState.completed, JobState.lost):
            return None  # not resumed here: the usual undo
        if tail is None and rec.stats.status == MigrationStatus.completed:
            # its whole memory had arrived: the guest here is whole, it stays
            return AbortAnswer(aborted=False, state=rec.state)
        if tail is not None and tail.task is not None:
            tail.task.cancel()
        dom = tail.dom if tail is not None else self.domains.domains.get(rec.domain)
        if dom is not None and dom.proc is not None:
            held = tail is not None
            if not held:
                try:
                    dom = await self.domains.hold_for_job(dom.name, req.job_id)
                except FerryError:  # busy with something else: not ours to stop
                    self._lost(rec, req.reason or "the source says the guest is lost")
                    return AbortAnswer(aborted=False, state=rec.state)
            try:
                await self.domains.lose(dom, f"lost in migration {rec.id}: the source "
                                        "said so")
            finally:
                self.domains.let_go(dom)
        elif tail is not None:
            self.domains.let_go(tail.dom)
        self._lost(rec, req.reason or "the source says the guest is lost")
        return AbortAnswer(aborted=True, state=rec.state)

    def _error(self, rec: JobRecord, message: str, phase: Phase | None = None,
               host: str | None = None) -> dict[str, object]:
        return {"phase": (phase or rec.phase).value, "host": host or self.host.name,
                "message": message}

    async def _undo(self, inc: Incoming, reason: str, state: JobState = JobState.failed,
                    phase: Phase | None = None, host: str | None = None,
                    decided_by: str | None = None) -> None:
        """Kill the incoming QEMU, drop its files, taps and reservations. Reads only
        the record's facts; never undoes a side that resumed the guest."""
        facts, rec = inc.facts, inc.record
        if inc.committed:
            log.error("job %s: refusing to undo %s: its guest runs here", rec.id,
                      rec.domain)
            return
        if inc.watcher is not None and inc.watcher is not asyncio.current_task():
            inc.watcher.cancel()
        if inc.adopted is not None:  # adopted in Finish, never resumed
            await self.domains.release(inc.adopted)
            self.domains.let_go(inc.adopted)
            inc.adopted, inc.proc = None, None
        elif facts.qemu_started:
            await self._drop_qemu(inc.config.name, inc.config, inc.proc)
            inc.proc = None
        if facts.disk_server:
            await self.domains.stop_disk_server(rec.id, inc.disk_server)
            inc.disk_server = None
        storagecopy.delete_created(facts.images_created)
        if facts.registry_committed:  # the guest does not run here: the source's again
            await self._give_back(rec)
        self.domains.release_arrival(rec.id)
        self.incoming.pop(rec.id, None)
        self.records.set_state(rec, state, error=self._error(rec, reason, phase, host),
                               decided_by=decided_by or self.host.name)
        log.info("job %s: incoming %s undone: %s", rec.id, rec.domain, reason)

    async def _drop_qemu(self, name: str, cfg: DomainConfig | None,
                         proc: QemuProcess | None) -> None:
        await self.domains.stop_qemu_at(name, self.domains.paths(name), proc)
        if cfg is not None:
            await self.domains.remove_taps(cfg)

    def status(self, job_id: str) -> JobStatus:
        tail = self.tails.get(job_id)
        if tail is not None:
            alive = tail.dom.proc is not None and tail.dom.proc.alive()
            return JobStatus(job_id=job_id, state=tail.record.state,
                             phase=tail.record.phase, qemu_alive=alive, stream=tail.status)
        inc = self.incoming.get(job_id)
        if inc is not None:
            inc.last_contact = time.monotonic()  # the source's heartbeat renews the lease
            alive = inc.proc is None or inc.proc.alive()
            return JobStatus(job_id=job_id, state=inc.record.state, phase=inc.record.phase,
                             qemu_alive=alive)
        rec = self._stored(job_id)
        if rec is None:
            raise NotFound(f"no job {job_id} on host {self.host.name}")
        # (in post-copy the tail saved each status change of the incoming stream)
        return JobStatus(job_id=job_id, state=rec.state, phase=rec.phase, error=rec.error,
                         qemu_alive=False if rec.state == JobState.lost else None,
                         stream=rec.stats.status if rec.stats.postcopy else None)

    async def recover(self) -> None:
        """At start: settle incoming jobs of an earlier life from their records.

        A side whose guest was resumed is the newest copy (the source keeps its own
        paused when Finish goes unanswered): it stays, and the job is completed.
        Anything else never ran here: undone. A post-copy whose memory was still
        arriving gets its tail back (or, its QEMU gone, is lost)."""
        await self._recover_tails()
        for raw in self.store.migrations():  # ownership an undo could not give back
            if raw.get("role") == Role.destination.value and raw.get("state") in (
                    JobState.failed.value, JobState.aborted.value) and \
                    (raw.get("dest_facts") or {}).get("registry_committed"):
                await self._give_back(JobRecord.model_validate(raw))
        for rec in self.records.running(Role.destination.value):
            facts = rec.dest_facts
            if facts.config is None:  # a record of Ferry 0.1
                await self._recover_old(rec)
                continue
            dom = self.domains.domains.get(rec.domain)
            if facts.resumed and dom is not None:
                if dom.state == DomainState.paused and dom.proc is not None:
                    # died between saving `resumed` and QEMU running `cont`: the
                    # source keeps its copy paused until we answer, so go on
                    with contextlib.suppress(FerryError):
                        await self.domains.resume_guest(dom, f"migrated from {rec.source} "
                                                        "(resumed after a ferryd restart)")
                if dom.proc is not None:  # the stream's credentials die with the job
                    await streamtls.remove(dom.proc.qmp, rec.id)
                rec.phase = Phase.confirm
                self.records.set_state(rec, JobState.completed, decided_by=rec.source)
                log.warning("job %s: kept %s, resumed here before ferryd restarted",
                            rec.id, rec.domain)
                continue
            inc = Incoming(rec, rec.source)
            if dom is not None and not facts.resumed:
                await self.domains.hold_for_job(dom.name, rec.id)
                inc.adopted = dom
            await self._undo(inc, "ferryd restarted during the migration")

    async def _recover_tails(self) -> None:
        for raw in self.store.migrations(state=JobState.completed.value):
            if raw.get("role") != Role.destination.value:
                continue
            rec = JobRecord.model_validate(raw)
            if not rec.stats.postcopy or rec.stats.status == MigrationStatus.completed:
                continue
            dom = self.domains.domains.get(rec.domain)
            if dom is None or dom.proc is None or not dom.proc.alive():
                self._lost(rec, "the destination QEMU was gone at a ferryd restart "
                           "during post-copy")
                continue
            try:
                await self.domains.hold_for_job(dom.name, rec.id)
            except FerryError:
                log.error("job %s: cannot hold %s to watch its post-copy", rec.id, dom.name)
                continue
            tail = Tail(rec, dom, rec.source, rec.stats.status)
            self.tails[rec.id] = tail
            tail.task = asyncio.create_task(self._tail(tail))
            log.warning("job %s: watching the post-copy of %s again after a restart",
                        rec.id, rec.domain)

    async def _recover_old(self, rec: JobRecord) -> None:
        """An incoming job of Ferry 0.1 (its request in ``incoming.json``, no facts):
        adopt a guest its Finish resumed, remove anything else."""
        request = self.domains.paths(rec.domain).root / "incoming.json"
        if rec.domain in self.domains.domains:  # 0.1's Finish had adopted it: it stays
            request.unlink(missing_ok=True)
            rec.phase = Phase.confirm
            self.records.set_state(rec, JobState.completed, decided_by=rec.source)
            return
        cfg: DomainConfig | None
        try:
            cfg = RelocationRequest.model_validate_json(request.read_text()).config
        except (OSError, ValueError):
            cfg = None  # nothing to adopt it by: whatever runs there goes
        paths = self.domains.paths(rec.domain)
        try:
            proc = await self.domains.qemu.attach(rec.domain, paths)
        except FerryError:
            proc = None
        if cfg is None:
            await self._drop_qemu(rec.domain, None, proc)
        elif proc is not None and rec.phase == Phase.finish \
                and await self._running_or_false(proc):
            self.domains.adopt(cfg, proc, DomainState.running,
                               f"migrated from {rec.source} (adopted after a ferryd restart)")
            request.unlink(missing_ok=True)
            rec.phase = Phase.confirm
            self.records.set_state(rec, JobState.completed, decided_by=rec.source)
            return
        else:
            await self._drop_qemu(rec.domain, cfg, proc)
        self.records.set_state(rec, JobState.failed, error=self._error(
            rec, "ferryd restarted during the migration"))

    @staticmethod
    async def _running_or_false(proc: QemuProcess) -> bool:
        try:
            return await guest_running(proc.qmp)
        except FerryError:
            return False

    def _get(self, job_id: str) -> Incoming:
        inc = self.incoming.get(job_id)
        if inc is None:
            rec = self._stored(job_id)
            if rec is not None and rec.state == JobState.completed:
                raise Conflict(f"job {job_id} already completed on {self.host.name}")
            why = f": it {rec.state.value} ({(rec.error or {}).get('message', '')})" \
                if rec is not None else ""
            raise NotFound(f"no incoming job {job_id} on host {self.host.name}{why}",
                           undone=True)
        return inc

    def _stored(self, job_id: str) -> JobRecord | None:
        for raw in self.store.migrations():
            if raw["id"] == job_id and raw["role"] == Role.destination.value:
                return JobRecord.model_validate(raw)
        return None
