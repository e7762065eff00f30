"""The domain service: define, start, stop and watch this host's domains.

Every state change goes through ``DomainService._set_state``, which checks the
transition against ``models.TRANSITIONS``, persists it, logs it and publishes
an event. QEMU's own events (STOP, RESUME, SHUTDOWN) and its exit keep the
stored state in step with what really runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.blockers import Blocker, BlockerCode, cpu_feature_blockers, definition_blockers
from ferry.errors import (
    Busy,
    Conflict,
    FerryError,
    InsufficientResources,
    InvalidInput,
    NotFound,
    QemuError,
    Refused,
)
from ferry.events import EventBus
from ferry.hostconfig import HostConfig
from ferry.hostres import domain_memory_free, meminfo, rss_mib
from ferry.models import (
    ACTIVE_STATES,
    TRANSITIONS,
    DomainConfig,
    DomainInfo,
    DomainState,
)
from ferry.net import create_taps, delete_taps
from ferry.ownership import LocalOnly, Owners, RegistryUnavailable
from ferry.qemu.argv import RuntimePaths, build_argv, disk_server_argv, taps
from ferry.qemu.probe import kvm_cpu_unavailable, machine_aliases
from ferry.qemu.process import (
    QemuProcess,
    owns,
    pid_alive,
    read_pid,
    remove_runtime_files,
)
from ferry.storage import ImageIds, localize
from ferry.store import Store
from ferry.systemd import scoped_argv, want_scopes

log = logging.getLogger(__name__)

RECONCILE_RETRY_S = 10.0   # a registry that did not answer at start is asked again


@dataclass
class Domain:
    """A defined domain and, while it runs, its QEMU."""

    config: DomainConfig
    state: DomainState
    reason: str
    since: float
    accel: str | None = None
    proc: QemuProcess | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # why QEMU is about to exit, when Ferry asked it to (destroy, shutdown)
    expected_exit: str | None = None
    guest_powered_off: bool = False
    # why the next STOP/RESUME event happens, when Ferry caused it
    pending_reason: str | None = None
    watcher: asyncio.Task[None] | None = None
    job: str | None = None  # the migration holding this domain
    fenced: str | None = None  # why it must not run here (the registry names another owner)

    @property
    def name(self) -> str:
        return self.config.name

    def info(self, with_config: bool = False) -> DomainInfo:
        return DomainInfo(name=self.name, uuid=str(self.config.uuid), state=self.state,
                          memory=self.config.memory, vcpus=self.config.vcpus,
                          accel=self.accel, pid=self.proc.pid if self.proc else None,
                          state_reason=self.reason, state_since=self.since,
                          config=self.config if with_config else None)


@dataclass(frozen=True)
class Arrival:
    """A domain on its way here (an incoming migration from Prepare on): its name
    and UUID are taken, so nothing else can be defined under them meanwhile."""

    job_id: str
    name: str
    uuid: str
    source: str
    disks: tuple[Path, ...] = ()   # its images here (those copied are being made),
                                   # and the bases its copies overlay


class QemuLauncher:
    """How the domain service starts and finds QEMU processes (the fault-injection
    tier passes a fake one)."""

    def __init__(self, scopes: bool = False) -> None:
        self.scopes = scopes   # each QEMU in a systemd scope of its own (ferry.systemd)

    async def launch(self, name: str, paths: RuntimePaths, argv: list[str],
                     on_event: Any = None) -> QemuProcess:
        if self.scopes:
            argv = scoped_argv(name, argv)
        return await QemuProcess.launch(name, paths, argv, on_event)

    async def attach(self, name: str, paths: RuntimePaths,
                     on_event: Any = None) -> QemuProcess | None:
        return await QemuProcess.attach(name, paths, on_event)


class DomainService:
    def __init__(self, host: HostConfig, store: Store, accel: str, events: EventBus,
                 qemu: QemuLauncher | None = None, owners: Owners | None = None) -> None:
        self.host = host
        # the cluster's record of who owns each domain (the daemon sets the real one)
        self.owners: Owners = owners or LocalOnly(host.name)
        self._reconciler: asyncio.Task[None] | None = None
        self.store = store
        self.accel = accel
        self.events = events
        self.qemu = qemu or QemuLauncher(scopes=want_scopes(host.qemu_scope))
        self.domains: dict[str, Domain] = {}
        # MiB promised to incoming migrations, by job id
        self.reservations: dict[str, int] = {}
        # domains arriving by migration, by job id
        self.arrivals: dict[str, Arrival] = {}
        # base images' identities (an overlay's migration copies only its top
        # where the destination has the same base)
        self.image_ids = ImageIds(host.state_dir / "image-ids.json")

    # -- paths and lookups ------------------------------------------------------------
    def paths(self, name: str) -> RuntimePaths:
        return RuntimePaths(self.host.state_dir / "domains" / name)

    def get(self, name: str) -> Domain:
        dom = self.domains.get(name)
        if dom is None:
            raise NotFound(f"no domain named {name!r} on host {self.host.name}", domain=name)
        return dom

    def infos(self) -> list[DomainInfo]:
        return [d.info() for d in sorted(self.domains.values(), key=lambda d: d.name)]

    # -- startup and shutdown of the service ------------------------------------------
    async def recover(self) -> None:
        """Load every stored domain; re-attach to QEMUs still running; reconcile."""
        for rec in self.store.domains():
            dom = Domain(rec.config, rec.state, rec.state_reason, rec.state_since, rec.accel)
            self.domains[dom.name] = dom
            paths = self.paths(dom.name)
            try:
                proc = await self.qemu.attach(dom.name, paths, self._event_handler(dom))
            except QemuError as exc:
                # alive but deaf: don't guess, kill it and say so
                pid = read_pid(paths)
                log.error("%s: %s; killing pid %s", dom.name, exc, pid)
                if pid and pid_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc = None
            if proc is None:
                remove_runtime_files(paths)
                await self.remove_taps(dom.config)
                if dom.state in ACTIVE_STATES:
                    new = DomainState.shutoff if dom.state == DomainState.stopping \
                        else DomainState.crashed
                    self._set_state(dom, new, "QEMU was gone when ferryd started")
                continue
            dom.proc = proc
            status = await proc.qmp.execute("query-status")
            real = DomainState.running if status["running"] else DomainState.paused
            if status["status"] == "prelaunch":
                # died between launch and 'cont' in an earlier life: finish the start
                await proc.qmp.execute("cont")
                real = DomainState.running
            if dom.state != real and dom.state != DomainState.stopping:
                self._set_state(dom, real, f"re-attached: QEMU is {status['status']}")
            dom.watcher = asyncio.create_task(self._watch(dom))

    async def close(self) -> None:
        """Stop watching; QEMUs keep running for the next ferryd."""
        await self.image_ids.close()
        for dom in self.domains.values():
            if dom.watcher:
                dom.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dom.watcher
            if dom.proc:
                await dom.proc.close()

    # -- state ------------------------------------------------------------------------
    def _set_state(self, dom: Domain, new: DomainState, reason: str) -> None:
        """The one place a domain's state changes: check, persist, log, publish."""
        if new == dom.state:
            return
        if new not in TRANSITIONS[dom.state]:
            raise Conflict(f"domain {dom.name} cannot go from {dom.state.value} to "
                           f"{new.value}", domain=dom.name)
        self.store.set_state(dom.name, new, reason, dom.accel)
        log.info("domain %s: %s -> %s (%s)", dom.name, dom.state.value, new.value, reason)
        dom.state, dom.reason, dom.since = new, reason, time.time()
        self.events.publish("domain.state", domain=dom.name, state=new.value, reason=reason)

    def _event_handler(self, dom: Domain) -> Any:
        async def on_event(name: str, data: dict[str, Any]) -> None:
            log.debug("domain %s: QEMU event %s %s", dom.name, name, data)
            if name == "STOP" and dom.state == DomainState.running:
                self._set_state(dom, DomainState.paused,
                                dom.pending_reason or "QEMU stopped the guest")
            elif name == "RESUME" and dom.state == DomainState.paused:
                self._set_state(dom, DomainState.running,
                                dom.pending_reason or "QEMU resumed the guest")
            elif name == "SHUTDOWN" and data.get("guest"):
                dom.guest_powered_off = True
            self.events.publish("qemu." + name.lower(), domain=dom.name, data=data)
        return on_event

    async def _watch(self, dom: Domain) -> None:
        """Wait for the domain's QEMU to exit, then record why."""
        proc = dom.proc
        assert proc is not None
        await proc.wait_exit()
        async with dom.lock:
            await self._reap(dom, proc)

    async def _reap(self, dom: Domain, proc: QemuProcess) -> None:
        if dom.proc is not proc:
            return
        await proc.close()
        remove_runtime_files(proc.paths)
        await self.remove_taps(dom.config)
        dom.proc = None
        if dom.expected_exit:
            reason = dom.expected_exit
            new = DomainState.shutoff
        elif dom.guest_powered_off:
            reason, new = "the guest powered off", DomainState.shutoff
        else:
            reason, new = "QEMU exited unexpectedly", DomainState.crashed
        dom.expected_exit, dom.guest_powered_off = None, False
        self._set_state(dom, new, reason)

    # -- checks (change nothing) ------------------------------------------------------
    def memory_free(self) -> int:
        """MiB a new domain may use: the smaller of what is available now (less the
        part of running domains' memory they have not touched yet) and the
        host's total less its reserve and the memory of running domains; both
        less what incoming migrations were promised (``hostres.domain_memory_free``)."""
        mem = meminfo()
        running = [d for d in self.domains.values() if d.proc]
        return domain_memory_free(
            total=mem["MemTotal"] // 1024, available=mem["MemAvailable"] // 1024,
            reserve=self.host.memory_reserve,
            allocated=sum(d.config.memory for d in running),
            untouched=sum(max(0, d.config.memory - rss_mib(d.proc.pid))
                          for d in running if d.proc),
            reserved=sum(self.reservations.values()))

    def typed_blockers(self, config: DomainConfig, *, to_run: bool) -> list[Blocker]:
        """Every reason this host can't take ``config`` (run it, if ``to_run``).
        Changes nothing; an empty list means go."""
        out = definition_blockers(config, self.host)
        if to_run and self.accel_for(config) == "kvm":
            out += cpu_feature_blockers(config, kvm_cpu_unavailable(self.host.qemu),
                                        self.host.name)
        if to_run:
            free = self.memory_free()
            if config.memory > free:
                out.append(Blocker(BlockerCode.memory,
                                   f"domain {config.name} needs {config.memory} MiB but host "
                                   f"{self.host.name} has {free} MiB free"))
        return out

    def blockers(self, config: DomainConfig, *, to_run: bool) -> list[str]:
        """``typed_blockers`` as messages."""
        return [b.message for b in self.typed_blockers(config, to_run=to_run)]

    def _check(self, config: DomainConfig, *, to_run: bool) -> None:
        found = self.typed_blockers(config, to_run=to_run)
        if found:
            # memory is the one blocker that may clear by itself: a 409, not a 400
            cls = InsufficientResources if any(b.code == BlockerCode.memory for b in found) \
                else InvalidInput
            raise cls("; ".join(b.message for b in found), domain=config.name,
                      blockers=[b.to_json() for b in found])

    def arriving(self, config: DomainConfig) -> Arrival | None:
        """The incoming migration that holds ``config``'s name or UUID, if any."""
        for arrival in self.arrivals.values():
            if arrival.name == config.name or arrival.uuid == str(config.uuid):
                return arrival
        return None

    def _refuse_arriving(self, config: DomainConfig) -> None:
        arrival = self.arriving(config)
        if arrival is not None:
            raise Busy(f"domain {arrival.name} is busy: arriving from host {arrival.source} "
                       f"(migration {arrival.job_id}); its name and UUID are taken",
                       domain=config.name, job=arrival.job_id)

    def identity_conflicts(self, config: DomainConfig) -> list[str]:
        out = []
        if config.name in self.domains:
            out.append(f"a domain named {config.name!r} already exists on host "
                       f"{self.host.name}")
        other = self.store.find_uuid(str(config.uuid))
        if other is not None:
            out.append(f"UUID {config.uuid} is already used by domain {other!r} on host "
                       f"{self.host.name}")
        return out

    def refuse_identity(self, config: DomainConfig) -> None:
        """Busy or Conflict if ``config``'s name or UUID is taken here (defined, or
        held by an arriving migration or restore)."""
        self._refuse_arriving(config)
        conflicts = self.identity_conflicts(config)
        if conflicts:
            raise Conflict("; ".join(conflicts), domain=config.name)

    # -- lifecycle --------------------------------------------------------------------
    async def define(self, config: DomainConfig, start: bool = False) -> DomainInfo:
        """Add a domain (and start it if asked). Refuses duplicates, memory the host
        doesn't have, and whatever ``typed_blockers`` finds (boot files that are
        missing or not what they claim, disks, a machine type or CPU model this
        host's QEMU doesn't know, bridges); nothing is stored then."""
        self.refuse_in_maintenance("new domains")
        config = localize(config, self.host)
        self.refuse_identity(config)
        total = meminfo()["MemTotal"] // 1024 - self.host.memory_reserve
        if config.memory > total:
            raise InsufficientResources(
                f"domain {config.name} wants {config.memory} MiB but host {self.host.name} "
                f"has only {total} MiB for domains", domain=config.name)
        self._check(config, to_run=start)
        took = await self.owners.claim(config.name, str(config.uuid))
        try:
            # again: the claim waited on the registry, and a define or an arrival
            # of the same name may have come meanwhile (none can between here and
            # the insert)
            self.refuse_in_maintenance("new domains")
            self.refuse_identity(config)
            self.store.insert(config, DomainState.shutoff)
        except BaseException:
            if took:
                with contextlib.suppress(FerryError):
                    await self.owners.release(config.name, str(config.uuid))
            raise
        dom = Domain(config, DomainState.shutoff, "defined", time.time())
        self.domains[config.name] = dom
        self.events.publish("domain.defined", domain=config.name)
        log.info("defined domain %s (%s)", config.name, config.uuid)
        if start:
            try:
                await self.start(config.name)
            except FerryError:
                # create = define + start: a failed start leaves nothing behind
                try:
                    await self.undefine(config.name)
                except FerryError as exc:  # (the registry: the name stays ours there)
                    log.error("domain %s: its failed create is undone here, but %s",
                              config.name, exc.message)
                    self._forget(config.name)
                raise
        return dom.info(with_config=True)

    async def undefine(self, name: str) -> None:
        dom = self.get(name)
        async with self._locked(dom):
            if dom.state in ACTIVE_STATES:
                raise Conflict(f"domain {name} is {dom.state.value}: destroy or shut it "
                               "down first", domain=name)
            # the registry first: if it refuses, nothing changed
            await self.owners.release(name, str(dom.config.uuid))
            self._forget(name)

    def _forget(self, name: str) -> None:
        self.store.delete(name)
        self.domains.pop(name, None)
        shutil.rmtree(self.paths(name).root, ignore_errors=True)
        self.events.publish("domain.undefined", domain=name)
        log.info("undefined domain %s", name)

    async def start(self, name: str) -> DomainInfo:
        dom = self.get(name)
        async with self._locked(dom):
            if dom.state in ACTIVE_STATES:
                raise Conflict(f"domain {name} is already {dom.state.value}", domain=name)
            await self._refuse_fenced(dom)
            self._check(dom.config, to_run=True)
            self._pin_machine(dom, machine_aliases(self.host.qemu).get(dom.config.machine))
            argv = self.argv(dom.config)
            dom.expected_exit, dom.guest_powered_off = None, False
            proc = await self._launch(dom.config, argv, self._event_handler(dom))
            try:
                await proc.qmp.execute("cont")
            except QemuError:
                await proc.stop()
                await self.remove_taps(dom.config)
                raise
            dom.proc = proc
            dom.accel = self.accel_for(dom.config)
            self._set_state(dom, DomainState.running, "started")
            dom.watcher = asyncio.create_task(self._watch(dom))
            return dom.info()

    async def pause(self, name: str) -> DomainInfo:
        dom = self.get(name)
        async with self._locked(dom):
            proc = self._running(dom, {DomainState.running})
            await self._qmp_with_reason(dom, proc, "stop", "paused by the operator")
            self._set_state(dom, DomainState.paused, "paused by the operator")
            return dom.info()

    async def unpause(self, name: str) -> DomainInfo:
        dom = self.get(name)
        async with self._locked(dom):
            proc = self._running(dom, {DomainState.paused})
            await self._refuse_fenced(dom)
            await self._qmp_with_reason(dom, proc, "cont", "unpaused by the operator")
            self._set_state(dom, DomainState.running, "unpaused by the operator")
            return dom.info()

    async def reboot(self, name: str) -> DomainInfo:
        dom = self.get(name)
        async with self._locked(dom):
            proc = self._running(dom, {DomainState.running, DomainState.paused})
            await proc.qmp.execute("system_reset")
            return dom.info()

    async def shutdown(self, name: str, timeout: float | None = None) -> DomainInfo:
        """ACPI power button; destroy if the guest is still up after ``timeout``.

        The wait happens outside the domain's lock, so ``destroy`` still works
        while a shutdown is pending."""
        dom = self.get(name)
        timeout = self.host.shutdown_timeout if timeout is None else timeout
        async with self._locked(dom):
            proc = self._running(dom, {DomainState.running, DomainState.paused})
            if dom.state == DomainState.paused:
                await proc.qmp.execute("cont")  # a paused guest can't see the button
            dom.expected_exit = "shut down by the operator"
            await proc.qmp.execute("system_powerdown")
            self._set_state(dom, DomainState.stopping, "ACPI shutdown requested")
            watcher = dom.watcher
        if await proc.wait_exit(timeout):
            if watcher is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            return dom.info()
        with contextlib.suppress(Conflict):
            await self._destroy(dom, f"destroyed: no shutdown within {timeout:g}s")
        return dom.info()

    async def destroy(self, name: str) -> DomainInfo:
        """Stop QEMU at once (like pulling the plug)."""
        dom = self.get(name)
        await self._destroy(dom, "destroyed by the operator")
        return dom.info()

    async def _destroy(self, dom: Domain, reason: str) -> None:
        async with self._locked(dom):
            proc = self._running(dom, set(ACTIVE_STATES))
            dom.expected_exit = reason
            await proc.stop()
            await self._finish_watch(dom, proc)

    async def _refuse_fenced(self, dom: Domain) -> None:
        """Conflict if the registry gave the domain to another host; a fence the
        registry no longer backs (it names this host again) is lifted."""
        if not dom.fenced:
            return
        try:
            owner = await self.owners.owner(dom.name)
        except FerryError:
            owner = None
        if owner == self.host.name:
            log.info("domain %s: the registry names this host again: fence lifted",
                     dom.name)
            dom.fenced = None
            return
        raise Conflict(f"domain {dom.name} is not run here: {dom.fenced}", domain=dom.name)

    def start_reconcile(self) -> None:
        """Reconcile with the registry in the background (ferryd answers meanwhile),
        again every RECONCILE_RETRY_S while the registry does not answer."""
        self._reconciler = asyncio.create_task(self._reconcile_until_done())

    async def stop_reconcile(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            await asyncio.gather(self._reconciler, return_exceptions=True)

    async def _reconcile_until_done(self) -> None:
        while True:
            try:
                await self.reconcile()
                return
            except RegistryUnavailable as exc:
                log.error("cannot reconcile with the registry yet: %s", exc.message)
                await asyncio.sleep(RECONCILE_RETRY_S)

    async def reconcile(self) -> None:
        """With the cluster registry: a domain here the registry does not know is
        claimed; one it says another host owns is fenced — kept paused if it runs,
        never resumed or started here — and reported. RegistryUnavailable at the
        first domain the registry cannot answer for."""
        for dom in list(self.domains.values()):
            owner = await self.owners.owner(dom.name)
            if owner is None:
                await self.owners.claim(dom.name, str(dom.config.uuid))
                continue
            if owner == self.host.name:
                continue
            dom.fenced = (f"the cluster registry says host {owner} owns it; kept here "
                          "paused and never resumed (undefine it here once that host "
                          "runs it)")
            log.error("domain %s: %s", dom.name, dom.fenced)
            if dom.proc is not None and dom.state == DomainState.running:
                with contextlib.suppress(FerryError):
                    await self.stop_guest(dom, dom.fenced)
            self.note(dom, dom.fenced)

    def _pin_machine(self, dom: Domain, versioned: str | None) -> None:
        """Keep the versioned machine type an alias (``q35``) stands for: the
        guest's device model then stays the same wherever it goes, whichever
        QEMU version each host runs."""
        if not versioned or versioned == dom.config.machine:
            return
        log.info("domain %s: machine type %s pinned to %s", dom.name, dom.config.machine,
                 versioned)
        dom.config = dom.config.model_copy(update={"machine": versioned})
        self.store.set_config(dom.config)

    async def pin_running_machine(self, dom: Domain) -> None:
        """A running domain still named by an alias (started before Ferry pinned
        machine types): pin it to the type its QEMU really runs (QOM's /machine)."""
        if dom.proc is None or dom.config.machine not in machine_aliases(self.host.qemu):
            return
        try:
            qom = await dom.proc.qmp.execute("qom-get", {"path": "/machine",
                                                         "property": "type"})
        except QemuError:
            return  # (the destination checks the alias then, as before)
        if isinstance(qom, str) and qom.endswith("-machine"):
            self._pin_machine(dom, qom.removesuffix("-machine"))

    # -- for migrations ---------------------------------------------------------------
    async def hold_for_job(self, name: str, job_id: str) -> Domain:
        """Hold a domain for a whole migration job (every other operation on it gets
        Busy until ``let_go``); Busy at once if something holds it already."""
        dom = self.get(name)
        if dom.lock.locked():
            what = f"migration {dom.job}" if dom.job else "another operation"
            raise Busy(f"domain {name} is busy with {what}", domain=name, job=dom.job)
        await dom.lock.acquire()  # free (checked above): returns without yielding
        dom.job = job_id
        return dom

    def let_go(self, dom: Domain) -> None:
        """End ``hold_for_job``."""
        dom.job = None
        if dom.lock.locked():
            dom.lock.release()

    def reserve_arrival(self, job_id: str, config: DomainConfig, source: str,
                        memory: int, bases: tuple[Path, ...] = ()) -> None:
        """Take the arriving domain's name, UUID and (``memory`` MiB) memory; its
        images and ``bases`` (those its copies will overlay) are in use."""
        self.arrivals[job_id] = Arrival(job_id, config.name, str(config.uuid), source,
                                        (*(d.path for d in config.disks if d.path), *bases))
        if memory:
            self.reservations[job_id] = memory

    def release_arrival(self, job_id: str) -> None:
        self.arrivals.pop(job_id, None)
        self.reservations.pop(job_id, None)

    async def stop_guest(self, dom: Domain, reason: str) -> None:
        """Pause the guest's CPUs for a migration; the state change carries ``reason``."""
        assert dom.proc is not None
        await self._qmp_with_reason(dom, dom.proc, "stop", reason)

    async def resume_guest(self, dom: Domain, reason: str) -> None:
        """Resume a guest a migration paused (``cont``); carries ``reason``."""
        assert dom.proc is not None
        await self._qmp_with_reason(dom, dom.proc, "cont", reason)

    def note(self, dom: Domain, reason: str) -> None:
        """Say why the domain is as it is without changing its state (e.g. a
        migration in doubt), persisted and shown by ``ferry list``."""
        self.store.set_state(dom.name, dom.state, reason, dom.accel)
        dom.reason, dom.since = reason, time.time()
        self.events.publish("domain.state", domain=dom.name, state=dom.state.value,
                            reason=reason)

    def argv(self, config: DomainConfig, incoming: str | None = None) -> list[str]:
        return build_argv(config, self.paths(config.name), qemu=self.host.qemu,
                          accel=self.accel_for(config), incoming=incoming,
                          host_address=self.host.address, host_name=self.host.name)

    async def _launch(self, config: DomainConfig, argv: list[str],
                      on_event: Any = None) -> QemuProcess:
        """Create the domain's taps, then start its QEMU; no taps left if it fails."""
        # pyroute2's calls block (and run their own event loop): in a thread
        await asyncio.to_thread(create_taps, taps(config, self.host.name))
        try:
            return await self.qemu.launch(config.name, self.paths(config.name), argv,
                                          on_event)
        except BaseException:
            await self.remove_taps(config)
            raise

    async def remove_taps(self, config: DomainConfig) -> None:
        """Delete the domain's taps on this host (after its QEMU has exited)."""
        names = [tap for tap, _, _ in taps(config, self.host.name)]
        if names:
            await asyncio.to_thread(delete_taps, names)

    async def launch_incoming(self, config: DomainConfig) -> QemuProcess:
        """Start a paused QEMU waiting for a migration stream (``-incoming defer``).
        It is not a domain of this host until ``adopt``."""
        # no domain of that name is defined here (checked): whatever is left in
        # its directory is stale, e.g. a console log from an earlier visit
        shutil.rmtree(self.paths(config.name).root, ignore_errors=True)
        return await self._launch(config, self.argv(config, incoming="defer"))

    # -- maintenance mode ---------------------------------------------------------------
    @property
    def maintenance(self) -> bool:
        """While on, this host takes no new domains and no incoming migrations."""
        return self.store.setting("maintenance") is not None

    def set_maintenance(self, on: bool) -> None:
        self.store.set_setting("maintenance", "on" if on else None)
        self.events.publish("host.maintenance", host=self.host.name, on=on)
        log.info("host %s: maintenance mode %s", self.host.name, "on" if on else "off")

    def refuse_in_maintenance(self, what: str) -> None:
        if self.maintenance:
            raise Refused(f"host {self.host.name} is in maintenance mode: it takes no "
                          f"{what} (ferry host maintenance off ends it)",
                          host=self.host.name, blocker="maintenance")

    def disk_server_paths(self, job_id: str) -> RuntimePaths:
        return RuntimePaths(self.host.state_dir / "disk-servers" / job_id)

    async def launch_disk_server(self, config: DomainConfig, job_id: str) -> QemuProcess:
        """A QEMU with only the domain's disks (no machine, never run), to copy a
        shut-off domain's disks during migration ``job_id``."""
        paths = self.disk_server_paths(job_id)
        shutil.rmtree(paths.root, ignore_errors=True)
        paths.root.mkdir(parents=True)
        argv = disk_server_argv(config, paths, qemu=self.host.qemu)
        return await self.qemu.launch(f"disks-{config.name}", paths, argv)

    async def stop_disk_server(self, job_id: str, proc: QemuProcess | None = None) -> None:
        """Stop migration ``job_id``'s disk server, also one an earlier ferryd
        started (found by its pid file), and remove its directory."""
        paths = self.disk_server_paths(job_id)
        if proc is not None or paths.root.exists():
            await self.stop_qemu_at(f"disks-{job_id}", paths, proc)

    async def stop_qemu_at(self, name: str, paths: RuntimePaths,
                           proc: QemuProcess | None = None) -> None:
        """Stop the QEMU of ``paths`` (``proc``, or the one its pid file and QMP
        socket lead to, killed by its pid if it does not answer) and remove the
        directory."""
        if proc is None:
            try:
                proc = await self.qemu.attach(name, paths)
            except FerryError:  # alive but deaf: by its pid, before its files go
                pid = read_pid(paths)
                if pid is not None and pid_alive(pid) and owns(pid, paths):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if proc is not None:
            await proc.stop(grace=1.0)
        shutil.rmtree(paths.root, ignore_errors=True)

    def adopt(self, config: DomainConfig, proc: QemuProcess, state: DomainState,
              reason: str) -> Domain:
        """Make an incoming QEMU this host's domain: stored, watched, evented."""
        self.store.insert(config, DomainState.shutoff)
        dom = Domain(config, DomainState.shutoff, reason, time.time(),
                     accel=self.accel_for(config))
        self.domains[config.name] = dom
        dom.proc = proc
        proc.qmp.on_event = self._event_handler(dom)
        self._set_state(dom, state, reason)
        dom.watcher = asyncio.create_task(self._watch(dom))
        return dom

    def adopt_definition(self, config: DomainConfig, reason: str) -> Domain:
        self.store.insert(config, DomainState.shutoff)
        dom = Domain(config, DomainState.shutoff, reason, time.time())
        self.domains[config.name] = dom
        self.events.publish("domain.defined", domain=config.name)
        return dom

    async def release(self, dom: Domain, event: str = "domain.migrated") -> None:
        """The domain now lives elsewhere (another host, a save file): stop its QEMU
        here (if any) and forget it. Call with ``dom.lock`` held (a migration or a
        save holds it throughout)."""
        if dom.proc is not None:
            proc = dom.proc
            dom.expected_exit = "migrated away" if event == "domain.migrated" else "saved"
            await proc.stop()
            await self._finish_watch(dom, proc)
        self.store.delete(dom.name)
        self.domains.pop(dom.name, None)
        shutil.rmtree(self.paths(dom.name).root, ignore_errors=True)
        self.events.publish(event, domain=dom.name)

    async def lose(self, dom: Domain, reason: str) -> None:
        """A migration in post-copy lost the guest (a QEMU holding part of its
        memory died): stop the stale QEMU here, if any, and keep the definition,
        crashed with ``reason``, so the operator can boot it afresh. Call with
        ``dom.lock`` held."""
        if dom.proc is not None:
            proc = dom.proc
            dom.expected_exit, dom.guest_powered_off = None, False  # reaped as crashed
            await proc.stop(grace=1.0)
            await self._finish_watch(dom, proc)
        self.note(dom, reason)

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    async def _qmp_with_reason(dom: Domain, proc: QemuProcess, command: str,
                               reason: str) -> None:
        """Run a command whose QEMU event should carry the operator's reason."""
        dom.pending_reason = reason
        try:
            await proc.qmp.execute(command)
        finally:
            dom.pending_reason = None

    async def _finish_watch(self, dom: Domain, proc: QemuProcess) -> None:
        """After Ferry stopped QEMU itself: record the exit now, under our lock.

        The watcher is cancelled but not awaited: it may be queued on the lock we
        hold (awaiting it would deadlock if it missed the cancellation, which
        asyncio.wait_for can swallow on Python 3.11), and if it ever runs,
        ``_reap`` sees the process already reaped and does nothing."""
        if dom.watcher:
            dom.watcher.cancel()
            dom.watcher = None
        await self._reap(dom, proc)

    def _running(self, dom: Domain, allowed: set[DomainState]) -> QemuProcess:
        if dom.state not in allowed or dom.proc is None:
            raise Conflict(f"domain {dom.name} is {dom.state.value}", domain=dom.name,
                           state=dom.state.value)
        return dom.proc

    def accel_for(self, config: DomainConfig) -> str:
        return self.accel if config.accel.value == "auto" else config.accel.value

    @contextlib.asynccontextmanager
    async def _locked(self, dom: Domain) -> Any:
        if dom.lock.locked():
            # another operation on this domain runs: say so at once, don't queue
            what = f"migration {dom.job}" if dom.job else "another operation"
            raise Busy(f"domain {dom.name} is busy with {what}", domain=dom.name, job=dom.job)
        async with dom.lock:
            yield
