"""ferryd: the host daemon.

    ferryd [--config FILE] [--state-dir DIR] [--socket PATH] [--name NAME]
           [--accel auto|kvm|tcg] [--log-level LEVEL]
    ferryd --version

One ferryd per state directory (a lock file makes sure); several can run side
by side on one machine with different state directories. Stopping ferryd
(SIGTERM, SIGINT, or kill -9) leaves its domains running; the next ferryd
re-attaches to them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import io
import logging
import os
import platform
import signal
import sys
from pathlib import Path

from aiohttp import web

from ferry import __version__, tls
from ferry.api.consoles import Consoles
from ferry.api.metrics import Metrics
from ferry.api.relocation import make_relocation_app
from ferry.api.server import METRICS, make_app
from ferry.api.server import metrics as serve_metrics
from ferry.domains import DomainService
from ferry.errors import FerryError
from ferry.events import EventBus
from ferry.fleet.cluster import ClusterView
from ferry.fleet.evacuate import Evacuator
from ferry.fleet.registry import Registry, make_registry
from ferry.hostconfig import HostConfig, load_host_config, parse_endpoint
from ferry.hostres import meminfo
from ferry.hostsallow import AllowGate, HostsAllow, Target
from ferry.migration.destination import RelocationService
from ferry.migration.source import MigrationService
from ferry.models import HostInfo
from ferry.qemu.probe import (
    cpu_models,
    kvm_cpu_unavailable,
    machine_aliases,
    machine_types,
    qemu_version,
    resolve_accel,
)
from ferry.store import Store
from ferry.systemd import notify

log = logging.getLogger("ferryd")

DEFAULT_CONFIG = Path("/etc/ferry/ferryd.toml")


def default_config(given: Path | None, default: Path = DEFAULT_CONFIG) -> Path | None:
    """The configuration file: the one given, else /etc/ferry/ferryd.toml if there
    is one, else none (every key has a default)."""
    if given is not None:
        return given
    return default if default.is_file() else None


class Daemon:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self._lockfile: int | None = None
        self._runner: web.AppRunner | None = None
        self._reloc_runner: web.AppRunner | None = None
        self._remote_runner: web.AppRunner | None = None
        self._reloc_server: asyncio.Server | None = None
        self.svc: DomainService | None = None
        self.migrations: MigrationService | None = None
        self.store: Store | None = None
        self.evacuator: Evacuator | None = None
        self.metrics: Metrics | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._ui_runner: web.AppRunner | None = None
        self.registry: Registry | None = None

    def _take_lock(self) -> None:
        path = self.config.state_dir / "ferryd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise FerryError(f"another ferryd already uses {self.config.state_dir}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lockfile = fd

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cfg.state_dir, 0o700)
        (cfg.state_dir / "domains").mkdir(exist_ok=True, mode=0o700)
        self._take_lock()
        # first: a store from a newer ferryd is refused before anything else happens
        self.store = Store(cfg.state_dir / "ferry.db")
        if cfg.control_port and cfg.tls is not None:  # refuse a wrong certificate early
            tls.check_own(cfg.tls, cfg.name, "host", cfg.address)
        accel = await asyncio.to_thread(resolve_accel, cfg.accel.value, cfg.qemu)
        # asked once here (cached), so that define doesn't wait for QEMU in the loop
        await asyncio.to_thread(machine_types, cfg.qemu)
        await asyncio.to_thread(cpu_models, cfg.qemu)
        await asyncio.to_thread(machine_aliases, cfg.qemu)
        if accel == "kvm":  # (what the host's CPU lacks for each model, asked once)
            await asyncio.to_thread(kvm_cpu_unavailable, cfg.qemu)
        log.info("ferryd %s, host %s: state in %s, accelerator %s, %s", __version__, cfg.name,
                 cfg.state_dir, accel, qemu_version(cfg.qemu))
        self.svc = DomainService(cfg, self.store, accel, EventBus())
        self.cluster = ClusterView(cfg, self.svc, self.host_info,
                                   lambda: len(self.migrations.running())
                                   if self.migrations is not None else 0)
        # the registry before any recovery: an undo there may have to give
        # ownership back
        self.svc.owners = self.registry = make_registry(cfg, self.svc, self.cluster)
        await self.svc.recover()
        self.migrations = MigrationService(cfg, self.svc, self.store)
        self.relocation = RelocationService(cfg, self.svc, self.store)
        await self.migrations.recover()
        await self.relocation.recover()
        self.consoles = Consoles(cfg, self.svc, self.store)
        self.evacuator = Evacuator(self.cluster, self.migrations)
        if cfg.cluster.backend == "etcd":
            self.svc.start_reconcile()
        self.metrics = Metrics(self.svc, self.migrations, self.consoles, self.host_info)
        self.metrics.start()
        app = make_app(self.svc, self.host_info, self.migrations, self.consoles,
                       cluster=self.cluster, evacuator=self.evacuator, metrics_=self.metrics)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        sock = cfg.socket_path
        sock.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        old = os.umask(0o177)  # the socket is born root-only: no window for others
        try:
            await web.UnixSite(self._runner, str(sock)).start()
        finally:
            os.umask(old)
        log.info("listening on %s", sock)
        if cfg.control_port:
            await self._listen_tcp()
        if cfg.metrics_address:
            await self._listen_metrics()
        if cfg.ui_address:
            await self._listen_ui()

    async def _listen_tcp(self) -> None:
        """The TCP port: mutual TLS; host certificates reach the relocation API,
        operator certificates the management API, nothing else gets in."""
        cfg = self.config
        assert cfg.tls is not None and self.svc is not None  # HostConfig insists
        assert self.migrations is not None
        migrations = self.migrations
        self._reloc_runner = web.AppRunner(make_relocation_app(
            self.relocation, self.consoles, self.host_info,
            lambda: len(migrations.running())),
                                           handle_signals=False, access_log=None,
                                           shutdown_timeout=2.0)
        self._remote_runner = web.AppRunner(
            make_app(self.svc, self.host_info, self.migrations, self.consoles, remote=True,
                     cluster=self.cluster, evacuator=self.evacuator, metrics_=self.metrics),
            handle_signals=False, access_log=None, shutdown_timeout=2.0)
        for runner in (self._reloc_runner, self._remote_runner):
            await runner.setup()
        reloc, remote = self._reloc_runner.server, self._remote_runner.server
        assert reloc is not None and remote is not None

        def route(who: tls.Identity | None, address: str) -> Target | str:
            if who is None:
                return "no client certificate"
            if who.role == "host":
                if address not in who.addresses:
                    return (f"{who} names {', '.join(who.addresses) or 'no address'}, "
                            f"but the connection comes from {address}")
                return reloc
            if who.role == "operator":
                return remote
            return f"{who} carries no Ferry role"

        allow = HostsAllow(cfg.hosts_allow)
        where = f"{cfg.address}:{cfg.control_port}"
        context = tls.server_context(cfg.tls)
        try:
            # not web.TCPSite: hosts_allow must act before TLS or aiohttp read a byte
            self._reloc_server = await asyncio.get_running_loop().create_server(
                lambda: AllowGate(allow, route, where, context), cfg.address,
                cfg.control_port, reuse_address=True)
        except OSError as exc:
            raise FerryError(f"cannot listen on {where}: {exc.strerror}") from exc
        log.info("TCP API on %s (mutual TLS, CA %s), hosts_allow %s", where, cfg.tls.ca,
                 cfg.hosts_allow)

    async def _serve_plain(self, app: web.Application, address: str, default_port: int,
                           what: str) -> tuple[web.AppRunner, str, int]:
        """``app`` over plain HTTP at ``address`` (a loopback listener)."""
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=1.0)
        await runner.setup()
        host, port = parse_endpoint(address, default_port)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise FerryError(f"cannot listen on {host}:{port} for {what}: "
                             f"{exc.strerror}") from exc
        return runner, host, port

    async def _listen_ui(self) -> None:
        """``ui_address``: the dashboard and the management API over plain HTTP on
        loopback, for the demo (anyone on this machine may drive ferryd there)."""
        assert self.svc is not None and self.migrations is not None and self.config.ui_address
        app = make_app(self.svc, self.host_info, self.migrations, self.consoles, remote=True,
                       cluster=self.cluster, evacuator=self.evacuator,
                       metrics_=self.metrics, plain_http=self.config.ui_address)
        self._ui_runner, host, port = await self._serve_plain(
            app, self.config.ui_address, 7780, "the dashboard")
        log.warning("dashboard on http://%s:%d/ui/ (plain HTTP, no certificates: anyone "
                    "on this machine may drive ferryd there)", host, port)

    async def _listen_metrics(self) -> None:
        """``metrics_address``: plain HTTP with ``/metrics`` only, for a scraper on
        this host (Prometheus' usual way); localhost unless configured otherwise."""
        assert self.metrics is not None and self.config.metrics_address
        app = web.Application()
        app[METRICS] = self.metrics
        app.router.add_get("/metrics", serve_metrics)   # (the API's own handler)
        self._metrics_runner, host, port = await self._serve_plain(
            app, self.config.metrics_address, 9790, "metrics")
        log.info("metrics on http://%s:%d/metrics", host, port)

    def host_info(self) -> HostInfo:
        assert self.svc is not None
        mem = meminfo()
        domains = self.svc.infos()
        return HostInfo(name=self.config.name, version=__version__, accel=self.svc.accel,
                        qemu=self.config.qemu,
                        qemu_version=qemu_version(self.config.qemu), arch=platform.machine(),
                        memory_total=mem["MemTotal"] // 1024,
                        memory_free=self.svc.memory_free(),
                        memory_reserved=self.config.memory_reserve
                        + sum(self.svc.reservations.values()),
                        domains=len(domains),
                        running=sum(1 for d in domains if d.pid),
                        state_dir=str(self.config.state_dir), tcp_api=self._tcp_api(),
                        maintenance=self.svc.maintenance,
                        registry=self.config.cluster.backend)

    def _tcp_api(self) -> str:
        cfg = self.config
        if not cfg.control_port or self._reloc_server is None:
            return "closed"
        return (f"{cfg.address}:{cfg.control_port} (mutual TLS; hosts_allow "
                f"{', '.join(cfg.hosts_allow)})")

    async def stop(self) -> None:
        if self._reloc_server is not None:
            self._reloc_server.close()
        for runner in (self._reloc_runner, self._remote_runner, self._metrics_runner,
                       self._ui_runner):
            if runner is not None:
                await runner.cleanup()
        if self.metrics is not None:
            await self.metrics.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.evacuator is not None:
            await self.evacuator.close()
        if self.migrations is not None:
            await self.migrations.close()
            await self.relocation.close()
        if self.svc is not None:
            await self.svc.stop_reconcile()
        if self.registry is not None:  # (after the jobs: their locks are released)
            await self.registry.close()
        if self.svc is not None:
            await self.svc.close()
        if self.store is not None:
            self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
        if self._lockfile is not None:
            os.close(self._lockfile)


def dump_tasks() -> None:
    """SIGUSR1: log every asyncio task's stack (what is ferryd waiting on?)."""
    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(file=buf)
        log.warning("task %s:\n%s", task.get_name(), buf.getvalue())


async def serve(config: HostConfig) -> None:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        await daemon.start()
        print(f"ferryd {config.name} ready on {config.socket_path}", flush=True)
        notify(f"READY=1\nSTATUS=host {config.name} ready")
        await stop.wait()
        log.info("stopping (domains keep running)")
        notify("STOPPING=1")
    finally:
        await daemon.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferryd", description=__doc__.splitlines()[0],
                                 epilog="Domains keep running when ferryd stops.")
    ap.add_argument("--config", type=Path, help="TOML configuration file (default: "
                    f"{DEFAULT_CONFIG} if it exists)")
    ap.add_argument("--state-dir", type=Path, help="all of this host's state (default "
                    "/var/lib/ferry)")
    ap.add_argument("--socket", type=Path, help="Unix socket of the API "
                    "(default STATE_DIR/ferryd.sock)")
    ap.add_argument("--name", help="this host's name (default: the machine's host name)")
    ap.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="accelerator")
    ap.add_argument("--address", help="this host's IPv4 address (relocation API, "
                    "migration streams)")
    ap.add_argument("--control-port", type=int, help="TCP port of the API for peers and "
                    "remote operators, mutual TLS only (needs [tls] in the config; 0 "
                    "closes it)")
    ap.add_argument("--log-level", default="INFO",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # answered while parsing: before the root check, so anyone may ask
    ap.add_argument("--version", action="version", version=f"ferryd {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        sys.exit("ferryd: must run as root")
    try:
        config = load_host_config(
            default_config(args.config),
            state_dir=str(args.state_dir.resolve()) if args.state_dir else None,
            socket=str(args.socket.resolve()) if args.socket else None, name=args.name,
            accel=args.accel, address=args.address, control_port=args.control_port)
        asyncio.run(serve(config))
    except FerryError as exc:
        sys.exit(f"ferryd: {exc.message}")


if __name__ == "__main__":
    main()
