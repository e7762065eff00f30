"""``ferry host evacuate``: every domain off this host, each where placement says.

This host goes into maintenance mode first (nothing new arrives while it
empties). Every reachable peer not in maintenance (or those ``--to`` names) is
a candidate; each domain's pre-flight check runs against each candidate, and
``placement.place`` plans the moves from the checks and the memory the
candidates have free. Running domains move live (``--offline``: paused), shut-off
ones move their definition (and disks that are not shared). At most
``parallel`` jobs run at once (the host's own limit on outgoing migrations
applies as well); each move is an ordinary migration job, with its record.
What fits nowhere stays, with every host's reason.

The evacuation itself lives in memory: a ferryd restarted meanwhile settles the
jobs that were running (as for any migration) and leaves maintenance mode on;
``ferry host evacuate`` again moves what is left.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time

from pydantic import BaseModel, Field, field_validator

from ferry.errors import Conflict, FerryError, InvalidInput, NotFound
from ferry.fleet.cluster import ClusterView
from ferry.fleet.placement import Candidate, Moving, place
from ferry.migration.models import FINAL_STATES, JobState, MigrateRequest, Mode, Strict
from ferry.migration.source import MigrationService
from ferry.models import check_name

log = logging.getLogger(__name__)

CHECKS_AT_ONCE = 4     # pre-flight checks asked of peers at a time
POLL_S = 0.5           # how often a move's job is looked at


class EvacuateRequest(Strict):
    """``POST /v1/host/evacuate``."""

    to: list[str] = Field(default_factory=list, max_length=64,
                          description="only these peers (default: every peer)")
    parallel: int = Field(default=2, ge=1, le=16)
    offline: bool = False
    dry_run: bool = False
    unsafe: bool = False   # as ferry migrate --unsafe, for every move

    @field_validator("to")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            check_name(name)
        if len(set(names)) != len(names):
            raise ValueError("a host is named twice")
        return names


class MoveState(enum.StrEnum):
    planned = "planned"      # will move (dry run: would move)
    stays = "stays"          # fits nowhere: see reason
    running = "running"      # its job runs
    completed = "completed"
    failed = "failed"        # its job failed or was refused (the domain stays here)


class Move(BaseModel):
    domain: str
    memory_mib: int           # what it needs at the destination (0: shut off)
    running: bool
    dest: str | None = None
    mode: Mode | None = None
    state: MoveState = MoveState.planned
    job: str | None = None
    reason: str | None = None


class EvacState(enum.StrEnum):
    planned = "planned"      # a dry run
    running = "running"
    done = "done"            # every move ended (see each move's state)


class Evacuation(BaseModel):
    id: str
    host: str
    started: float
    ended: float | None = None
    state: EvacState
    dry_run: bool
    parallel: int
    unsafe: bool = False
    candidates: dict[str, int] = Field(default_factory=dict)   # host -> MiB free
    refused_hosts: dict[str, str] = Field(default_factory=dict)  # host -> why not
    moves: list[Move] = Field(default_factory=list)


class Evacuator:
    def __init__(self, cluster: ClusterView, mig: MigrationService) -> None:
        self.cluster = cluster
        self.mig = mig
        self.current: Evacuation | None = None
        self.task: asyncio.Task[None] | None = None
        self.planning = False

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def status(self) -> Evacuation:
        if self.current is None:
            raise NotFound(f"no evacuation of host {self.mig.host.name} since its ferryd "
                           "started")
        return self.current

    async def start(self, req: EvacuateRequest) -> Evacuation:
        """Plan (and, unless a dry run, begin) evacuating this host."""
        if self.planning or (self.current is not None and
                             self.current.state == EvacState.running):
            raise Conflict(f"host {self.mig.host.name} is being evacuated already: "
                           "ferry host evacuate --status")
        peers = {p.name for p in self.mig.host.peers}
        unknown = sorted(set(req.to) - peers)
        if unknown:
            raise InvalidInput(f"--to names no peer of host {self.mig.host.name}: "
                               f"{', '.join(unknown)} (its peers: "
                               f"{', '.join(sorted(peers)) or 'none'})")
        was = self.mig.domains.maintenance
        self.planning = True
        try:
            if not req.dry_run:
                self.mig.domains.set_maintenance(True)   # nothing new arrives meanwhile
            evac = await self.plan(req)
        except BaseException:
            if not req.dry_run and not was:
                self.mig.domains.set_maintenance(False)  # (a failed plan changes nothing)
            raise
        finally:
            self.planning = False
        if req.dry_run:
            return evac
        evac.state = EvacState.running
        self.current = evac
        self.task = asyncio.create_task(self._run(evac))
        return evac

    async def plan(self, req: EvacuateRequest) -> Evacuation:
        evac = Evacuation(id=secrets.token_hex(6), host=self.mig.host.name,
                          started=time.time(), state=EvacState.planned,
                          dry_run=req.dry_run, parallel=req.parallel,
                          unsafe=req.unsafe)
        hosts: list[Candidate] = []
        for view in (await self.cluster.hosts())[1:]:   # (the first is this host)
            if req.to and view.name not in req.to:
                continue
            if not view.reachable or view.info is None:
                evac.refused_hosts[view.name] = f"unreachable ({view.error})"
            elif view.info.maintenance:
                evac.refused_hosts[view.name] = "in maintenance mode"
            else:
                hosts.append(Candidate(view.name, view.info.memory_free))
        evac.candidates = {h.name: h.free_mib for h in hosts}
        doms = sorted(self.mig.domains.domains.values(), key=lambda d: d.name)
        gate = asyncio.Semaphore(CHECKS_AT_ONCE)

        async def verdict(name: str, dest: str, mode: Mode) -> str | None:
            async with gate:
                try:
                    blockers, _ = await self.mig.check(name, MigrateRequest(
                        dest=dest, mode=mode, unsafe=req.unsafe))
                except FerryError as exc:
                    return exc.message
                except Exception as exc:  # (TLS files, the socket: one peer's problem)
                    return f"cannot ask: {exc!r}"
                return "; ".join(blockers) or None

        moving, mode_of, own = [], {}, {}
        for dom in doms:
            mode = Mode.live if dom.proc is not None and not req.offline else Mode.offline
            mode_of[dom.name] = mode
            blockers = [b.message for b in self.mig.begin_blockers(
                dom, MigrateRequest(auto=True, mode=mode, unsafe=req.unsafe))]
            if blockers:  # (this host's reasons, once, not once per peer)
                own[dom.name] = "; ".join(blockers)
        checks = {(d.name, h.name): asyncio.ensure_future(verdict(d.name, h.name,
                                                                  mode_of[d.name]))
                  for d in doms if d.name not in own for h in hosts}
        await asyncio.gather(*checks.values())
        for dom in doms:
            need = dom.config.memory if dom.proc is not None else 0
            if dom.name in own:
                evac.moves.append(Move(domain=dom.name, memory_mib=need,
                                       running=dom.proc is not None,
                                       state=MoveState.stays, reason=own[dom.name]))
                continue
            refused = {h.name: why for h in hosts
                       if (why := checks[(dom.name, h.name)].result()) is not None}
            refused.update(evac.refused_hosts)
            moving.append(Moving(dom.name, need,
                                 frozenset(h.name for h in hosts if h.name not in refused),
                                 refused))
        plan = place(moving, hosts)
        for m in moving:
            found = self.mig.domains.domains.get(m.name)
            if found is None:  # (undefined while the checks ran)
                continue
            move = Move(domain=m.name, memory_mib=m.memory_mib,
                        running=found.proc is not None,
                        mode=mode_of[m.name])
            if m.name in plan.moves:
                move.dest = plan.moves[m.name]
            else:
                move.state, move.reason, move.mode = MoveState.stays, plan.stays[m.name], None
            evac.moves.append(move)
        # in the order they go: largest first, as planned
        evac.moves.sort(key=lambda mv: (mv.state == MoveState.stays, -mv.memory_mib,
                                        mv.domain))
        return evac

    async def _run(self, evac: Evacuation) -> None:
        gate = asyncio.Semaphore(evac.parallel)

        async def one(move: Move) -> None:
            async with gate:
                assert move.dest is not None and move.mode is not None
                move.state = MoveState.running
                try:
                    rec = await self.mig.start(move.domain, MigrateRequest(
                        dest=move.dest, mode=move.mode, unsafe=evac.unsafe))
                except FerryError as exc:
                    move.state, move.reason = MoveState.failed, exc.message
                    return
                move.job = rec.id
                while True:
                    rec = self.mig.get(rec.id)
                    if rec.state in FINAL_STATES:
                        break
                    await asyncio.sleep(POLL_S)
                if rec.state == JobState.completed:
                    move.state = MoveState.completed
                else:
                    move.state = MoveState.failed
                    move.reason = f"job {rec.id} {rec.state.value}: " + str(
                        (rec.error or {}).get("message", ""))

        try:
            await asyncio.gather(*(one(m) for m in evac.moves
                                   if m.state == MoveState.planned))
        finally:
            evac.state, evac.ended = EvacState.done, time.time()
            left = [m.domain for m in evac.moves if m.state != MoveState.completed]
            log.info("evacuation %s of %s done: %d moved, left here: %s", evac.id,
                     evac.host, sum(m.state == MoveState.completed for m in evac.moves),
                     ", ".join(left) or "nothing")
