"""The fault-injection tier's stand-ins: a fake QEMU (process + QMP) that plays
QEMU's migration state machine, and a world of hosts whose real services
(DomainService, MigrationService, RelocationService) talk to each other over
the real relocation API on Unix sockets — no QEMU, no TLS, no network.

A test injects a fault at a chosen QMP step of a chosen host (``World.fail``):
the command raises QEMU's error, or the QEMU process dies there, or it hangs.
Only this tier fakes anything; a test that claims a real migration is in the
integration tier.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ferry.api.consoles import Consoles
from ferry.api.relocation import make_relocation_app
from ferry.client import FerryClient
from ferry.domains import DomainService, QemuLauncher
from ferry.errors import QemuError
from ferry.events import EventBus
from ferry.hostconfig import HostConfig, Limits, Peer
from ferry.migration.destination import RelocationService
from ferry.migration.source import MigrationService
from ferry.qemu.argv import RuntimePaths
from ferry.store import Store

PAGE = 4096
GUEST_BYTES = 64 << 20
# a bzImage's setup header magic at 0x202 and a newc cpio: what define accepts
KERNEL_BYTES = b"\0" * 0x202 + b"HdrS" + b"\0" * 2048
INITRD_BYTES = b"070701" + b"0" * 200


@dataclass
class Fault:
    host: str
    command: str
    kind: str = "error"        # error: QEMU refuses; die: QEMU exits there; hang
    times: int = 1             # how many matching calls it hits
    when: Callable[[FakeQemu], bool] | None = None


class FakeQmp:
    """What ferry.qemu.qmp.QmpConnection offers, played by a FakeQemu."""

    def __init__(self, qemu: FakeQemu) -> None:
        self.q = qemu
        self.on_event: Any = None
        self.closed = asyncio.Event()
        self.event_times: dict[str, float] = {}

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        if self.closed.is_set() or not self.q.running_process:
            raise QemuError(f"QMP of {self.q.name} is closed (QEMU has exited)",
                            domain=self.q.name, command=command)
        self.q.calls.append(command)
        fault = self.q.world.take_fault(self.q, command)
        if fault is not None:
            if fault.kind == "die":
                self.q.exit()
                raise QemuError(f"QMP {command} on {self.q.name} failed: EOFError()",
                                domain=self.q.name, command=command)
            if fault.kind == "hang":
                await asyncio.sleep(timeout)
                raise QemuError(f"QMP {command} on {self.q.name} failed: TimeoutError()")
            raise QemuError(f"QEMU refused {command}: injected fault", domain=self.q.name,
                            command=command)
        handler = getattr(self.q, "cmd_" + command.replace("-", "_"))
        return await handler(arguments or {})

    async def wait_event(self, name: str, timeout: float) -> bool:
        await asyncio.sleep(min(timeout, 0.002))
        return False

    def event_time(self, name: str) -> float | None:
        return self.event_times.get(name)

    async def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.event_times[name] = time.time()
        if self.on_event is not None:
            await self.on_event(name, data or {})

    async def close(self) -> None:
        self.closed.set()


class FakeQemu:
    """One fake QEMU process: runstate, migration status, objects, the stream."""

    def __init__(self, world: World, host: str, name: str, paths: RuntimePaths,
                 argv: list[str], on_event: Any) -> None:
        self.world, self.host, self.name, self.paths, self.argv = world, host, name, paths, argv
        self.pid = os.getpid()  # a real pid, so /proc reads (RSS) work
        self.qmp = FakeQmp(self)
        self.qmp.on_event = on_event
        self.calls: list[str] = []
        self.incoming = "-incoming" in argv
        self.runstate = "inmigrate" if self.incoming else "prelaunch"
        self.mig_status = "none"
        self.objects: set[str] = set()
        self.params: dict[str, Any] = {}
        self.caps: dict[str, bool] = {}
        self.port: int | None = None
        self.peer: FakeQemu | None = None
        self.queries = 0
        self.running_process = True
        self.exited = asyncio.Event()

    # -- the process (what QemuProcess offers) ---------------------------------------
    def alive(self) -> bool:
        return self.running_process

    async def wait_exit(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout)
        return self.exited.is_set()

    async def stop(self, grace: float = 3.0) -> None:
        self.exit()

    def signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self.exit()

    async def close(self) -> None:
        await self.qmp.close()

    def exit(self) -> None:
        if not self.running_process:
            return
        self.running_process = False
        self.qmp.closed.set()
        self.exited.set()
        self.world.listeners.pop(self.port or -1, None)
        peer = self.peer
        if peer is not None and peer.mig_status == "postcopy-active":
            peer.mig_status = "postcopy-paused"  # as QEMU: it waits for a recovery
        elif peer is not None and peer.mig_status in ("setup", "active"):
            peer.mig_status = "failed"  # the other end of the stream is gone
            if peer.incoming:
                peer.exit()  # an incoming QEMU whose stream breaks exits

    # -- QMP commands -----------------------------------------------------------------
    async def cmd_cont(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.runstate == "inmigrate":
            raise QemuError("QEMU refused cont: guest expects an incoming migration")
        self.conts += 1
        self.runstate = "running"
        await self.qmp.emit("RESUME")
        return {}

    async def cmd_stop(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.runstate == "running":
            self.runstate = "paused"
            await self.qmp.emit("STOP")
        return {}

    async def cmd_query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"running": self.runstate == "running", "status": self.runstate}

    async def cmd_quit(self, _: dict[str, Any]) -> dict[str, Any]:
        self.exit()
        return {}

    async def cmd_system_powerdown(self, _: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def cmd_announce_self(self, _: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def cmd_migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        caps = {**self.caps, **{c["capability"]: c["state"] for c in args["capabilities"]}}
        if caps.get("multifd") and caps.get("postcopy-ram"):  # as QEMU 10.0
            raise QemuError("QEMU refused migrate-set-capabilities: Postcopy is not yet "
                            "compatible with multifd")
        self.caps = caps
        return {}

    async def cmd_migrate_start_postcopy(self, _: dict[str, Any]) -> dict[str, Any]:
        dest = self.peer
        if not self.caps.get("postcopy-ram") or dest is None or \
                not dest.caps.get("postcopy-ram"):
            raise QemuError("QEMU refused migrate-start-postcopy: postcopy-ram is off")
        if self.mig_status != "active":
            raise QemuError("QEMU refused migrate-start-postcopy: not migrating")
        self.runstate = "finish-migrate"
        await self.qmp.emit("STOP")
        self.mig_status = dest.mig_status = "postcopy-active"
        dest.runstate = "paused"  # its devices are loaded: it may run (cont)
        self.queries = 0
        return {}

    async def cmd_migrate_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("tls-creds") and args["tls-creds"] not in self.objects:
            raise QemuError(f"QEMU refused migrate-set-parameters: no object "
                            f"{args['tls-creds']}")
        self.params.update(args)
        return {}

    async def cmd_query_migrate_parameters(self, _: dict[str, Any]) -> dict[str, Any]:
        return dict(self.params)

    async def cmd_object_add(self, args: dict[str, Any]) -> dict[str, Any]:
        self.objects.add(args["id"])
        return {}

    async def cmd_object_del(self, args: dict[str, Any]) -> dict[str, Any]:
        self.objects.discard(args["id"])
        return {}

    async def cmd_calc_dirty_rate(self, _: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def cmd_query_dirty_rate(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"status": "measured", "dirty-rate": 10}  # MiB/s

    async def cmd_migrate_incoming(self, _: dict[str, Any]) -> dict[str, Any]:
        self.port = self.world.new_port(self)
        self.mig_status = "setup"
        return {}

    async def cmd_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        m = re.fullmatch(r"tcp:[0-9.]+:(\d+)", args["uri"])
        dest = self.world.listeners.get(int(m.group(1))) if m else None
        if not self.params.get("tls-creds"):
            raise QemuError("fake QEMU: Ferry sent a stream without TLS")
        self.queries = 0
        if dest is None or not dest.running_process:
            self.mig_status = "failed"
            self.error = "Connection refused"
            return {}
        shape = [(q.caps.get("multifd", False), q.params.get("multifd-channels"),
                  q.params.get("multifd-compression")) for q in (self, dest)]
        if shape[0] != shape[1]:  # as QEMU: the stream breaks on the first packet
            self.mig_status = dest.mig_status = "failed"
            self.error = f"fake QEMU: the two sides' multifd settings differ: {shape}"
            return {}
        self.peer, dest.peer = dest, self
        self.mig_status = dest.mig_status = "active"
        return {}

    async def cmd_migrate_cancel(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.mig_status in ("setup", "active"):
            self.mig_status = "cancelled"
            if self.peer is not None and self.peer.running_process:
                self.peer.mig_status = "failed"
                self.peer.exit()
        return {}

    error = ""
    conts = 0   # cont commands this QEMU took

    async def cmd_query_migrate(self, _: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.mig_status}
        if self.incoming and self.port is not None:
            info["socket-address"] = [{"type": "inet", "host": "127.0.0.1",
                                       "port": str(self.port)}]
        if self.mig_status == "failed" and self.error:
            info["error-desc"] = self.error
        if self.mig_status == "postcopy-active" and not self.incoming:
            self.queries += 1
            if self.queries >= self.world.queries_to_converge:  # the rest has arrived
                self.mig_status = "completed"
                self.runstate = "postmigrate"
                if self.peer is not None and self.peer.running_process:
                    self.peer.mig_status = "completed"
                    self.peer.incoming = False
        if self.incoming or self.mig_status != "active":
            if self.mig_status == "completed":
                info.update({"total-time": 500, "downtime": 40, "setup-time": 5})
            return info
        self.queries += 1
        world = self.world
        converged = (self.queries >= world.queries_to_converge
                     and (world.converges or self.runstate != "running"))
        passes = 1 + self.queries // 3
        info["ram"] = {"transferred": self.queries * (8 << 20), "total": GUEST_BYTES,
                       "remaining": 0 if converged else GUEST_BYTES // 2,
                       "mbps": 800.0, "dirty-pages-rate": 2560, "page-size": PAGE,
                       "dirty-sync-count": passes}
        info["expected-downtime"] = world.expected_downtime_ms
        info["cpu-throttle-percentage"] = min(99, 20 * (passes - 1)) \
            if self.caps.get("auto-converge") and not world.converges else 0
        if converged:
            await self._switch_over()
            info = {"status": "completed", "total-time": 500, "downtime": 40,
                    "setup-time": 5, "ram": info["ram"]}
        return info

    async def _switch_over(self) -> None:
        dest = self.peer
        if self.runstate == "running":
            self.runstate = "finish-migrate"
            await self.qmp.emit("STOP")
        self.runstate = "postmigrate"
        self.mig_status = "completed"
        if dest is not None and dest.running_process:
            dest.mig_status = "completed"
            dest.runstate = "paused"
            dest.incoming = False  # from now on an ordinary QEMU (it may migrate on)


class FakeLauncher(QemuLauncher):
    def __init__(self, world: World, host: str) -> None:
        self.world, self.host = world, host

    async def launch(self, name: str, paths: RuntimePaths, argv: list[str],
                     on_event: Any = None) -> Any:
        fault = self.world.take_fault_launch(self.host, name)
        if fault:
            raise QemuError(f"QEMU for {name} failed to start: injected fault", argv=argv)
        paths.root.mkdir(parents=True, exist_ok=True)
        q = FakeQemu(self.world, self.host, name, paths, argv, on_event)
        self.world.processes.append(q)
        return q

    async def attach(self, name: str, paths: RuntimePaths, on_event: Any = None) -> Any:
        for q in self.world.processes:
            if q.paths.root == paths.root and q.running_process:
                q.qmp = FakeQmp(q)
                q.qmp.on_event = on_event
                return q
        return None


class FakeHost:
    """One ferryd's services, as daemon.py composes them, over a fake QEMU."""

    def __init__(self, world: World, name: str, index: int) -> None:
        self.world, self.name = world, name
        self.address = f"127.0.0.{index}"
        self.root = world.root / name
        self.socket = self.root / "reloc.sock"
        self.silent = False          # the relocation API stops answering (a DROP)
        self.runner: web.AppRunner | None = None

    def config(self) -> HostConfig:
        peers = [Peer(name=h.name, address=f"{h.address}:7790")
                 for h in self.world.hosts.values() if h is not self]
        return HostConfig(name=self.name, state_dir=self.root, address=self.address,
                          memory_reserve=0, peers=peers, tls=self.world.tls(self),
                          storage_dirs=[self.world.root], accel="tcg",
                          limits=Limits(**self.world.limits.get(self.name, {})))

    async def start(self) -> None:
        cfg = self.config()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "domains").mkdir(exist_ok=True)
        self.store = Store(self.root / "ferry.db")
        self.events = EventBus()
        self.svc = DomainService(cfg, self.store, "tcg", self.events,
                                 qemu=FakeLauncher(self.world, self.name))
        await self.svc.recover()
        self.mig = MigrationService(cfg, self.svc, self.store, connect=self.world.connector)
        self.reloc = RelocationService(cfg, self.svc, self.store)
        await self.mig.recover()
        await self.reloc.recover()
        app = make_relocation_app(self.reloc, Consoles(cfg, self.svc, self.store))

        @web.middleware
        async def blackhole(request: web.Request, handler: Any) -> Any:
            while self.silent:
                await asyncio.sleep(0.05)
            return await handler(request)

        app.middlewares.insert(0, blackhole)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    shutdown_timeout=0.1)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.socket)).start()

    async def stop(self) -> None:
        """ferryd stops (or is killed: the record stays as it is); QEMUs go on."""
        await self.mig.close()
        await self.reloc.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for dom in self.svc.domains.values():
            if dom.watcher is not None:
                dom.watcher.cancel()
        self.store.close()

    # -- what a test looks at --------------------------------------------------------
    def qemus(self) -> list[FakeQemu]:
        return [q for q in self.world.processes if q.host == self.name and q.running_process]

    def record(self, job_id: str) -> dict[str, Any] | None:
        for rec in self.store.migrations():
            if rec["id"] == job_id:
                return rec
        return None


@dataclass
class World:
    """Hosts, their fake QEMUs and the faults to inject."""

    root: Path
    hosts: dict[str, FakeHost] = field(default_factory=dict)
    processes: list[FakeQemu] = field(default_factory=list)
    listeners: dict[int, FakeQemu] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    launch_faults: list[str] = field(default_factory=list)   # host names
    queries_to_converge: int = 5
    converges: bool = True         # False: pre-copy never ends while the guest runs
    expected_downtime_ms: int = 30  # what QEMU says the pause would take now
    _next_port: int = 40000
    pki: Path | None = None
    limits: dict[str, dict[str, int]] = field(default_factory=dict)  # host: [limits]

    def add(self, name: str) -> FakeHost:
        host = FakeHost(self, name, len(self.hosts) + 1)
        self.hosts[name] = host
        return host

    def fail(self, host: str, command: str, kind: str = "error", times: int = 1) -> Fault:
        fault = Fault(host, command, kind, times)
        self.faults.append(fault)
        return fault

    def take_fault(self, q: FakeQemu, command: str) -> Fault | None:
        for fault in self.faults:
            if fault.host == q.host and fault.command == command and fault.times > 0 \
                    and (fault.when is None or fault.when(q)):
                fault.times -= 1
                return fault
        return None

    def take_fault_launch(self, host: str, name: str) -> bool:
        if host in self.launch_faults:
            self.launch_faults.remove(host)
            return True
        return False

    def new_port(self, q: FakeQemu) -> int:
        self._next_port += 1
        self.listeners[self._next_port] = q
        return self._next_port

    def connector(self, name: str, endpoint: tuple[str, int], timeout: float | None
                  ) -> FerryClient:
        host = self.hosts.get(name)
        sock = host.socket if host is not None else self.root / "nobody.sock"
        return FerryClient(socket=sock, timeout=timeout)

    def tls(self, host: FakeHost) -> Any:
        from ferry import pki
        from ferry.tls import TlsFiles
        if self.pki is None:
            self.pki = Path(tempfile.mkdtemp(prefix="fypki", dir=self.root))
            pki.init_ca(self.pki)
        if not (self.pki / f"{host.name}.pem").exists():
            pki.issue(self.pki, host.name, "host", [host.address])
        return TlsFiles(ca=self.pki / "ca.pem", cert=self.pki / f"{host.name}.pem",
                        key=self.pki / f"{host.name}.key")


def domain(world: World, name: str = "web", **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": name, "memory": 64, "vcpus": 1, "accel": "tcg",
                           "machine": "q35", "cpu": "max",
                           "kernel": str(world.root / "vmlinuz"),
                           "initrd": str(world.root / "initrd"),
                           "nics": [{"mode": "none"}]}
    cfg.update(extra)
    return cfg
