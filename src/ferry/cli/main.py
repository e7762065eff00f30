"""ferry: drive ferryd from the command line.

Human tables by default, ``--json`` on every read command; every error is one
line on stderr and a non-zero exit status (1: refused or failed, 2: usage).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from ferry import __version__
from ferry.cli.target import Target
from ferry.client import DEFAULT_SOCKET, FerryClient
from ferry.errors import FerryError, InvalidInput
from ferry.migration.models import CopyStorage, JobRecord, JobState, Mode
from ferry.models import (
    MAX_CHANNELS,
    Compression,
    DiskFormat,
    DomainInfo,
    OnTimeout,
    Postcopy,
)

T = TypeVar("T")

app = typer.Typer(
    name="ferry", no_args_is_help=True, add_completion=True,
    help="Run QEMU domains on this host and move them between hosts.",
    context_settings={"help_option_names": ["-h", "--help"]})

SocketOpt = Annotated[Path, typer.Option(
    "--socket", envvar="FERRY_SOCKET", help="ferryd's API socket.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
def _valid_name(value: str) -> str:
    from ferry.models import check_name
    try:
        return check_name(value)
    except ValueError as exc:
        fail(str(exc))
        raise AssertionError("unreachable") from exc


NameArg = Annotated[str, typer.Argument(help="The domain's name.", show_default=False,
                                        callback=_valid_name)]

HostOpt = Annotated[str | None, typer.Option(
    "--host", envvar="FERRY_HOST", show_default=False,
    help="Drive another host over TCP (mutual TLS, operator certificate): a name "
         "from the client config, a DNS name, or ADDRESS[:PORT]. Default: the local "
         "ferryd over --socket.")]
CaOpt = Annotated[Path | None, typer.Option(
    "--ca", envvar="FERRY_CA", show_default=False, help="With --host: the cluster CA.")]
CertOpt = Annotated[Path | None, typer.Option(
    "--cert", envvar="FERRY_CERT", show_default=False,
    help="With --host: your operator certificate.")]
KeyOpt = Annotated[Path | None, typer.Option(
    "--key", envvar="FERRY_KEY", show_default=False, help="With --host: its key.")]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"ferry {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[bool, typer.Option(
    "--version", callback=_show_version, is_eager=True,
    help="Print ferry's version and exit.")]

_state: dict[str, Target] = {"target": Target(DEFAULT_SOCKET)}


@app.callback()
def main(socket: SocketOpt = DEFAULT_SOCKET, host: HostOpt = None, ca: CaOpt = None,
         cert: CertOpt = None, key: KeyOpt = None, version: VersionOpt = False) -> None:
    """Ferry: run QEMU domains ("xm" for QEMU hosts).

    Without --host, ferry talks to the local ferryd over its root-only socket.
    With --host it reaches any ferryd's TCP port with an operator certificate
    (--ca/--cert/--key, or ~/.config/ferry/client.toml; see docs/security.md)."""
    _state["target"] = Target(socket, host or None, ca, cert, key)


def fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"ferry: error: {message}\n")
    raise typer.Exit(code)


def call(fn: Callable[[FerryClient], Awaitable[T]], about: Path | None = None) -> T:
    """Run one API call against the chosen ferryd; errors become one line.
    ``about``: the file the request came from, named in front of InvalidInput."""
    async def go() -> T:
        async with _state["target"].client() as client:
            return await fn(client)
    try:
        return asyncio.run(go())
    except FerryError as err:
        fail(f"{about}: {err.message}" if about and isinstance(err, InvalidInput)
             else err.message)
        raise AssertionError("unreachable") from err


def print_json(data: Any) -> None:
    """JSON on stdout: a model (or a list of them) as the API gave it."""
    from pydantic import BaseModel

    def plain(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, list):
            return [plain(o) for o in obj]
        return obj
    sys.stdout.write(json.dumps(plain(data), indent=2, sort_keys=True) + "\n")


def _console() -> Any:
    from rich.console import Console  # imported late: keeps `ferry list --json` quick
    return Console()


def _since(ts: float) -> str:
    secs = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


# -- reading ---------------------------------------------------------------------------
@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List this host's domains and their states."""
    doms = call(lambda c: c.domains())
    if as_json:
        return print_json([d.model_dump(mode="json", exclude={"config"}) for d in doms])
    from rich.table import Table
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "STATE", "MEM", "VCPUS", "PID", "SINCE", "REASON"):
        table.add_column(col)
    for d in doms:
        table.add_row(d.name, d.state.value, f"{d.memory}M", str(d.vcpus),
                      str(d.pid or "-"), _since(d.state_since), d.state_reason)
    _console().print(table)


@app.command()
def info(name: NameArg, as_json: JsonOpt = False) -> None:
    """Show one domain: state, resources, definition."""
    dom = call(lambda c: c.domain(name))
    if as_json:
        return print_json(dom)
    cfg = dom.config
    if cfg is None:
        fail(f"ferryd did not send the definition of {name}")
    rows = [("name", dom.name), ("uuid", dom.uuid), ("state", dom.state.value),
            ("reason", dom.state_reason), ("since", _since(dom.state_since) + " ago"),
            ("pid", str(dom.pid or "-")), ("accel", dom.accel or "-"),
            ("memory", f"{cfg.memory} MiB"), ("vcpus", str(cfg.vcpus)),
            ("machine", cfg.machine), ("cpu", cfg.cpu)]
    if cfg.kernel:
        rows += [("kernel", str(cfg.kernel)), ("initrd", str(cfg.initrd or "-")),
                 ("cmdline", cfg.cmdline)]
    for i, disk in enumerate(cfg.disks):
        where = f"{disk.where} ({disk.path})" if disk.pool else str(disk.path)
        rows.append((f"disk{i}", f"{where} ({disk.format.value}, {disk.bus.value})"))
    for i, nic in enumerate(cfg.nics):
        where = nic.bridge or nic.mode.value
        rows.append((f"nic{i}", f"{nic.mac} {nic.model.value} on {where}"))
    from rich.table import Table
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    _console().print(table)


host_app = typer.Typer(help="This host: `ferry host` shows it; `ferry host maintenance`.",
                       invoke_without_command=True)
app.add_typer(host_app, name="host")


@host_app.command("maintenance")
def host_maintenance(state: Annotated[str, typer.Argument(
        help="on: take no new domains and no incoming migrations; off: take them again.",
        show_default=False)]) -> None:
    """Turn this host's maintenance mode on or off (domains already here run on)."""
    if state not in ("on", "off"):
        fail(f"say on or off, not {state!r}", 2)
    info = call(lambda c: c.set_maintenance(state == "on"))
    typer.echo(f"host {info.name}: maintenance {'on' if info.maintenance else 'off'}")


@host_app.command("evacuate")
def host_evacuate(
    to: Annotated[list[str] | None, typer.Option(
        "--to", help="Only to this peer (give it again for more); default: every peer "
        "that answers and is not in maintenance.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option(
        help="Migrations at a time (the host's [limits] outgoing applies as well).",
        min=1, max=16)] = 2,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Pause running domains while they move (default: live).")
    ] = False,
    unsafe: Annotated[bool, typer.Option(
        "--unsafe", help="As ferry migrate --unsafe, for every domain.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show where each domain would go and why some can't; change "
        "nothing (not even maintenance mode).")] = False,
    status: Annotated[bool, typer.Option(
        "--status", help="Show the evacuation under way (or the last one) and follow it.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move every domain off this host: maintenance mode on first, then each
    domain to the peer that passes its pre-flight check and has the most memory
    free after the moves already planned (largest domain first). Running domains
    move live, shut-off ones move their definition. A domain that fits nowhere
    stays, with the reason. Exits 1 if any domain is left here."""
    from ferry.cli.evacuation import follow_evacuation, plan_table
    if status:
        evac = call(lambda c: c.evacuation())
    else:
        body = {"to": to or [], "parallel": parallel, "offline": offline,
                "dry_run": dry_run, "unsafe": unsafe}
        evac = call(lambda c: c.evacuate(body))
    if evac["state"] == "running":
        if not as_json:
            _console().print(plan_table(evac))
        evac = asyncio.run(follow_evacuation(_state["target"], evac, quiet=as_json))
    if as_json:
        print_json(evac)
    else:
        _console().print(plan_table(evac))
    if not evac["dry_run"] and any(m["state"] != "completed" for m in evac["moves"]):
        raise typer.Exit(1)


@host_app.callback()
def host(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show this host: name, accelerator, QEMU, memory, its TCP API."""
    if ctx.invoked_subcommand is not None:
        return
    info = call(lambda c: c.host())
    if as_json:
        return print_json(info)
    data: dict[str, Any] = info.model_dump(mode="json")
    # how ferryd computes it (DomainService.memory_free), so the number can be checked
    data["memory_free"] = (f"{data['memory_free']} MiB (at most total - reserve - "
                           "allocated to domains, at most what is available now)")
    data["memory_total"] = f"{data['memory_total']} MiB"
    for key in ("name", "version", "arch", "accel", "qemu_version", "memory_total",
                "memory_free", "domains", "running", "state_dir", "tcp_api",
                "maintenance"):
        typer.echo(f"{key:<13} {data[key]}")


# -- defining --------------------------------------------------------------------------
def load_definition(path: Path) -> dict[str, Any]:
    """Read a domain's TOML and check it as ferryd will, so that a mistake is
    reported against the file (``web01.toml: kernal: unknown key``), not
    against the API request. Relative paths are taken from the file's folder.
    What is sent is the file's content: ferryd fills in the defaults."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except UnicodeDecodeError as exc:
        fail(f"{path}: not a text file ({exc.reason} at byte {exc.start})")
    except tomllib.TOMLDecodeError as exc:
        fail(f"{path}: malformed TOML: {exc}")  # the reason ends "(at line L, column C)"
    base = path.resolve().parent
    for key in ("kernel", "initrd"):
        if isinstance(data.get(key), str) and not os.path.isabs(data[key]):
            data[key] = str(base / data[key])
    for disk in data.get("disks", []) if isinstance(data.get("disks"), list) else []:
        if isinstance(disk, dict) and isinstance(disk.get("path"), str) \
                and not os.path.isabs(disk["path"]):
            disk["path"] = str(base / disk["path"])
    from pydantic import ValidationError

    from ferry.models import DomainConfig
    from ferry.validation import describe
    try:
        DomainConfig.model_validate(data)
    except ValidationError as exc:
        fail(f"{path}: {describe(exc)}")
    return data


FileArg = Annotated[Path, typer.Argument(help="The domain's TOML definition.",
                                         show_default=False)]


@app.command()
def define(file: FileArg) -> None:
    """Define a domain from a TOML file (it stays shut off)."""
    cfg = load_definition(file)
    dom = call(lambda c: c.define(cfg), about=file)
    typer.echo(f"defined {dom.name} ({dom.uuid})")


@app.command()
def create(file: FileArg) -> None:
    """Define a domain from a TOML file and start it."""
    cfg = load_definition(file)
    dom = call(lambda c: c.define(cfg, start=True), about=file)
    typer.echo(f"created {dom.name} ({dom.uuid}), running")


@app.command()
def undefine(name: NameArg) -> None:
    """Forget a shut-off domain (its definition and logs)."""
    call(lambda c: c.undefine(name))
    typer.echo(f"undefined {name}")


# -- lifecycle -------------------------------------------------------------------------
def _action(name: str, action: str, **body: Any) -> DomainInfo:
    return call(lambda c: c.action(name, action, **body))


@app.command()
def start(name: NameArg) -> None:
    """Start a defined domain."""
    _action(name, "start")
    typer.echo(f"started {name}")


@app.command()
def pause(name: NameArg) -> None:
    """Pause a running domain (its vCPUs stop; memory stays)."""
    _action(name, "pause")
    typer.echo(f"paused {name}")


@app.command()
def unpause(name: NameArg) -> None:
    """Resume a paused domain."""
    _action(name, "unpause")
    typer.echo(f"unpaused {name}")


@app.command()
def shutdown(name: NameArg, timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the guest before destroying it.")] = 60.0) -> None:
    """Shut a domain down (ACPI power button), destroying it after --timeout."""
    dom = _action(name, "shutdown", timeout=timeout)
    typer.echo(f"{name}: {dom.state.value} ({dom.state_reason})")


@app.command()
def destroy(name: NameArg) -> None:
    """Stop a domain at once, like pulling the plug."""
    _action(name, "destroy")
    typer.echo(f"destroyed {name}")


@app.command()
def reboot(name: NameArg) -> None:
    """Reset a domain (a hard reset: the guest is not asked first)."""
    _action(name, "reboot")
    typer.echo(f"rebooted {name}")


@app.command()
def console(name: NameArg, log: Annotated[bool, typer.Option(
        "--log", help="Print the console log instead of attaching.")] = False,
        tail: Annotated[int | None, typer.Option(
            help="With --log: only the last TAIL bytes.", min=1)] = None) -> None:
    """Attach to a domain's serial console (Ctrl-] detaches)."""
    if log:
        data = call(lambda c: c.console_log(name, tail))
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    from ferry.cli.console import attach
    call(lambda c: attach(c, name))


# -- migration -------------------------------------------------------------------------
DestArg = Annotated[str | None, typer.Argument(
    help="Destination host: a peer's name or an IPv4 address[:port] (not with "
    "--recover).", show_default=False)]


@app.command()
def migrate(
    name: NameArg, dest: DestArg = None,
    live: Annotated[bool, typer.Option(
        "--live", "-l", help="Copy memory while the guest runs (pre-copy). Without it "
        "the guest is paused, copied and resumed on DEST (offline).")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Run every pre-flight check, list all blockers, change "
        "nothing.")] = False,
    max_downtime: Annotated[int | None, typer.Option(
        help="Longest pause the guest may see at switch-over, in ms [default: the "
        "domain's or the host's \\[migration] setting, else 300].", min=1,
        show_default=False)] = None,
    bandwidth: Annotated[int | None, typer.Option(
        help="Cap on the migration stream in MiB/s, 0: no cap [default: \\[migration], "
        "else 0].", min=0, show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds of pre-copy before --on-timeout applies [default: \\[migration], "
        "else 600].", min=0.1, show_default=False)] = None,
    on_timeout: Annotated[OnTimeout | None, typer.Option(
        help="At the timeout: 'pause' the guest and finish offline, 'postcopy' (the "
        "guest runs on at DEST while the rest follows), or 'abort' [default: "
        "\\[migration], else pause].", show_default=False)] = None,
    postcopy: Annotated[Postcopy | None, typer.Option(
        help="Post-copy: 'never'; 'auto' when pre-copy does not converge within "
        "--max-downtime; 'now' at once. In post-copy a broken link pauses the guest "
        "until it is recovered, and a host that dies loses it [default: "
        "\\[migration], else never].", show_default=False)] = None,
    parallel: Annotated[int | None, typer.Option(
        help="Encrypted channels for the memory stream (QEMU multifd over TLS); 1: one "
        "stream (one compressed channel with --compress zstd) [default: \\[migration], "
        "else one per core, at most 4].", min=1,
        max=MAX_CHANNELS, show_default=False)] = None,
    compress: Annotated[Compression | None, typer.Option(
        help="Compress the channels: none or zstd (costs CPU; pays off only on a slow "
        "link) [default: \\[migration], else none].", show_default=False)] = None,
    copy_storage: Annotated[CopyStorage, typer.Option(
        help="Which disks to copy to DEST while the guest runs: 'auto' those in pools "
        "that are not shared, 'all', or 'none' (DEST has them).")] = CopyStorage.auto,
    keep_source_disks: Annotated[bool, typer.Option(
        "--keep-source-disks", help="Keep the copied disks on this host after the "
        "migration (by default they are deleted once the guest runs on DEST).")] = False,
    unsafe: Annotated[bool, typer.Option(
        "--unsafe", help="Migrate a running guest although a disk that stays on a "
        "shared pool is cached by the host (cache writeback, writethrough or unsafe): "
        "only safe where the pool's file system keeps the hosts' caches coherent.")
    ] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Print the job id and return; `ferry jobs` follows it.")] = False,
    auto: Annotated[bool, typer.Option(
        "--auto", help="Pick DEST: the peer that passes the pre-flight check and has "
        "the most memory free (give no DEST).")] = False,
    recover: Annotated[bool, typer.Option(
        "--recover", help="Reconnect NAME's post-copy stream that a broken link paused "
        "(ferryd tries a few times by itself), then follow the job.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move a domain to another host, offline or --live."""
    if recover:
        if dest is not None or live or check:
            fail("--recover takes only the domain's name (on its source host)")
        job = call(lambda c: c.recover_migration(name))
        return _follow_job(job, detach, as_json)
    if dest is None and not auto:
        fail("say where to: ferry migrate NAME DEST (or --auto, or --recover)")
        return
    if dest is not None and auto:
        fail("--auto picks DEST itself: give one or the other")
    given = {"max_downtime_ms": max_downtime, "bandwidth_mibps": bandwidth,
             "timeout_s": timeout, "on_timeout": on_timeout, "postcopy": postcopy,
             "parallel": parallel, "compress": compress}
    body = {"mode": (Mode.live if live else Mode.offline).value,
            **({"auto": True} if auto else {"dest": dest}),
            "copy_storage": copy_storage.value, "keep_source_disks": keep_source_disks,
            **({"unsafe": True} if unsafe else {}),
            **{k: getattr(v, "value", v) for k, v in given.items() if v is not None}}
    if check:
        res = call(lambda c: c.check_migration(name, **body))
        if as_json:
            print_json(res)
        elif res.blockers:
            typer.echo(f"{name} cannot migrate to {res.dest}:")
            for b in res.blockers:
                typer.echo(f"  - {b}")
        else:
            typer.echo(f"{name} can migrate to {res.dest}: no blockers")
        if not as_json:
            for note in res.notes:
                typer.echo(f"  {note}")
        if res.blockers:
            raise typer.Exit(1)
        return
    job = call(lambda c: c.migrate(name, **body))
    _follow_job(job, detach, as_json)


def _follow_job(job: JobRecord, detach: bool, as_json: bool) -> None:
    if detach:
        return print_json(job) if as_json else typer.echo(job.id)
    from ferry.cli.progress import follow
    try:
        final = follow(_state["target"], job, quiet=as_json)
    except FerryError as exc:
        fail(exc.message)
        raise AssertionError("unreachable") from exc
    if as_json:
        print_json(final)
    if final.state != JobState.completed:
        err = final.error or {}
        fail(f"migration {final.id} {final.state.value} in {err.get('phase')} on host "
             f"{err.get('host')}: {err.get('message')}")


def _abs(file: str) -> str:
    return str(Path(file) if Path(file).is_absolute() else Path.cwd() / file)


@app.command()
def save(
        name: NameArg,
        file: Annotated[str, typer.Argument(
            help="Where ferryd writes the save: a new file below one of its "
            "storage_dirs (a relative path is taken from this directory).",
            metavar="FILE")],
) -> None:
    """Save a running or paused domain's whole state to FILE and take it off this
    host (`ferry restore FILE` brings it back, here or on a host that sees FILE
    and the domain's disks)."""
    res = call(lambda c: c.save(name, _abs(file)))
    typer.echo(f"saved {name} to {res['path']}: {res['bytes'] / 1048576:,.1f} MiB in "
               f"{res['seconds']:.2f} s")


@app.command()
def restore(
        file: Annotated[str, typer.Argument(
            help="A file written by `ferry save`, below one of ferryd's storage_dirs.",
            metavar="FILE")],
        as_json: JsonOpt = False,
) -> None:
    """Define and resume the domain saved in FILE; a damaged, unfinished or
    truncated file is refused and nothing is started."""
    info = call(lambda c: c.restore(_abs(file)))
    if as_json:
        return print_json(info)
    typer.echo(f"restored {info.name}: {info.state.value}")


@app.command()
def jobs(as_json: JsonOpt = False) -> None:
    """List running migration jobs on this host."""
    data = call(lambda c: c.jobs())
    if as_json:
        return print_json(data)
    from ferry.cli.progress import jobs_table
    _console().print(jobs_table(data))


job_app = typer.Typer(help="Act on one migration job.", no_args_is_help=True)
app.add_typer(job_app, name="job")


@job_app.command("abort")
def job_abort(job_id: Annotated[str, typer.Argument(help="The job's id (`ferry jobs`).")]
              ) -> None:
    """Cancel a running migration; the guest keeps running on the source."""
    call(lambda c: c.abort_job(job_id))
    typer.echo(f"aborting {job_id}")


@job_app.command("set")
def job_set(
        job_id: Annotated[str, typer.Argument(help="The job's id (`ferry jobs`).")],
        bandwidth: Annotated[int | None, typer.Option(
            help="New cap on the stream in MiB/s (0: no cap).", min=0,
            show_default=False)] = None,
        max_downtime: Annotated[int | None, typer.Option(
            help="New longest pause allowed at switch-over, in ms.", min=1,
            show_default=False)] = None,
) -> None:
    """Change a running migration's limits; the change lands in its record."""
    limits = {k: v for k, v in (("bandwidth_mibps", bandwidth),
                                ("max_downtime_ms", max_downtime)) if v is not None}
    if not limits:
        fail("say what to change: --bandwidth and/or --max-downtime", code=2)
    rec = call(lambda c: c.steer_job(job_id, **limits))
    opts = rec.options
    assert opts is not None
    cap = f"{opts.bandwidth_mibps} MiB/s" if opts.bandwidth_mibps else "unlimited"
    typer.echo(f"{job_id}: bandwidth {cap}, max downtime {opts.max_downtime_ms} ms")


@job_app.command("complete")
def job_complete(
        job_id: Annotated[str, typer.Argument(help="The job's id (`ferry jobs`).")]
) -> None:
    """Make a live migration finish now: in post-copy if the job allows it
    (--postcopy auto|now, --on-timeout postcopy), else the guest is paused and the
    rest goes over as an offline copy."""
    job = call(lambda c: c.complete_job(job_id))
    how = "post-copy: the guest runs on at the destination" if job.options is not None \
        and job.options.postcopy_allowed else "the guest is paused for the rest of the copy"
    typer.echo(f"completing {job_id}: {how}")


@job_app.command("resolve")
def job_resolve(
        job_id: Annotated[str, typer.Argument(help="The job's id (`ferry jobs`).")],
        here: Annotated[bool, typer.Option(
            "--here", help="The destination is gone for good and does not run the guest: "
            "resume the paused copy on this (the source) host.")] = False,
        there: Annotated[bool, typer.Option(
            "--there", help="The destination runs the guest: release the copy here.")
        ] = False) -> None:
    """Settle a migration that is in doubt, when its destination will never answer.
    Ferry settles such a job by itself as soon as the destination answers; use this
    only when it never will. Choose wrongly and the guest runs twice (--here) or
    nowhere (--there)."""
    if here == there:
        fail("say where the guest is to run: --here or --there", code=2)
    runs_on = "source" if here else "destination"
    rec = call(lambda c: c.resolve_job(job_id, runs_on))
    from ferry.cli.progress import summary
    typer.echo(summary(rec))
    if (rec.error or {}).get("undo_errors") or rec.cleanup_error:
        fail(f"migration {job_id} settled, but not everything went as asked (above)")


@job_app.command("show")
def job_show(job_id: Annotated[str, typer.Argument(help="The job's id.")],
             as_json: JsonOpt = False) -> None:
    """Show one migration job or record."""
    data = call(lambda c: c.job(job_id))
    if as_json:
        return print_json(data)
    from ferry.cli.progress import summary
    typer.echo(summary(data))


@job_app.command("log")
def job_log(job_id: Annotated[str, typer.Argument(help="The job's id.")],
            as_json: JsonOpt = False) -> None:
    """What happened in a migration, on both hosts, in time order: its phases,
    state changes, escalations (throttle, pause steps, post-copy, queued) and
    errors. The other host is asked too; if it does not answer, that is said."""
    data = call(lambda c: c.job_log(job_id))
    if as_json:
        return print_json(data)
    import datetime
    for e in data["entries"]:
        when = datetime.datetime.fromtimestamp(float(e.get("time") or 0))
        typer.echo(f"{when:%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"  {e.get('host', '?'):<10} "
                   f"{e.get('role', ''):<11} {e.get('what', ''):<10} {e.get('detail', '')}")
    for u in data["unreachable"]:
        typer.echo(f"host {u['host']} did not answer, so its part is missing: {u['error']}",
                   err=True)


@app.command()
def events(
    domain: Annotated[str | None, typer.Option(
        "--domain", help="Only this domain's events (and the host's own).",
        show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow this host's events as they happen (until Ctrl-C): domain state
    changes, migration phases, progress and escalations, maintenance mode. One
    line each; --json: one JSON object per line (docs/events.md)."""
    from ferry.cli.events import follow_events
    try:
        asyncio.run(follow_events(_state["target"], domain, as_json))
    except FerryError as err:
        fail(err.message)
    except KeyboardInterrupt:
        pass


@app.command()
def migrations(as_json: JsonOpt = False) -> None:
    """List every migration this host took part in, with its statistics."""
    data = call(lambda c: c.migrations())
    if as_json:
        return print_json(data)
    from ferry.cli.progress import records_table
    _console().print(records_table(data))


# -- the cluster --------------------------------------------------------------------------
cluster_app = typer.Typer(help="Every host of the cluster: this one and its [[peers]].",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("hosts")
def cluster_hosts(as_json: JsonOpt = False) -> None:
    """Each host: reachable or not (within 3 s), Ferry and QEMU versions,
    accelerator, memory, domains, running migrations."""
    from rich.table import Table
    hosts = call(lambda c: c.cluster_hosts())
    if as_json:
        return print_json(hosts)
    table = Table(box=None, header_style="bold")
    for col in ("HOST", "ADDRESS", "STATE", "FERRY", "QEMU", "ACCEL", "MEMORY FREE/TOTAL",
                "RESERVED", "DOMAINS", "RUNNING", "JOBS", "MAINTENANCE"):
        table.add_column(col)
    for h in hosts:
        info = h.get("info") or {}
        if not h["reachable"]:
            table.add_row(h["name"], h["address"], f"unreachable: {h.get('error')}",
                          *[""] * 9)
            continue
        table.add_row(h["name"], h["address"], "up", info.get("version", "?"),
                      info.get("qemu_version", "?"), info.get("accel", "?"),
                      f"{info.get('memory_free')}/{info.get('memory_total')} MiB",
                      f"{info.get('memory_reserved', '?')} MiB", str(info.get("domains")),
                      str(info.get("running")), str(h["jobs"]),
                      "on" if info.get("maintenance") else "off")
    _console().print(table)


@cluster_app.command("list")
def cluster_list(as_json: JsonOpt = False) -> None:
    """Every domain on every host that answers, with its state; the hosts that
    did not answer."""
    from rich.table import Table
    data = call(lambda c: c.cluster_domains())
    if as_json:
        return print_json(data)
    table = Table(box=None, header_style="bold")
    for col in ("HOST", "NAME", "STATE", "MEMORY", "VCPUS", "REASON"):
        table.add_column(col)
    for d in data["domains"]:
        dom = d["domain"]
        table.add_row(d["host"], dom["name"], dom["state"], f"{dom.get('memory')} MiB",
                      str(dom.get("vcpus")), dom.get("state_reason") or "")
    _console().print(table)
    for h in data["unreachable"]:
        typer.echo(f"host {h['name']} ({h['address']}) did not answer: {h['error']}",
                   err=True)


# -- storage pools and disks --------------------------------------------------------------
pool_app = typer.Typer(help="This host's storage pools ([[pools]], storage_dirs).",
                       no_args_is_help=True)
app.add_typer(pool_app, name="pool")
disk_app = typer.Typer(help="Disk images in this host's storage pools (qemu-img).",
                       no_args_is_help=True)
app.add_typer(disk_app, name="disk")
PoolArg = Annotated[str, typer.Argument(help="A storage pool's name (`ferry pool list`).",
                                        show_default=False)]
ImageArg = Annotated[str, typer.Argument(help="The image's name inside the pool, e.g. "
                                         "web01.qcow2.", show_default=False)]


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return str(n)


@pool_app.command("list")
def pool_list(as_json: JsonOpt = False) -> None:
    """Each pool: its path, shared or not, capacity, free space, images."""
    from rich.table import Table
    pools = call(lambda c: c.pools())
    if as_json:
        return print_json(pools)
    table = Table(box=None, header_style="bold")
    for col in ("POOL", "PATH", "SHARED", "CAPACITY", "FREE", "IMAGES"):
        table.add_column(col)
    for p in pools:
        table.add_row(p["name"], p["path"], "yes" if p["shared"] else "no",
                      _size(p["capacity"]), _size(p["free"]), str(p["images"]))
    _console().print(table)


@disk_app.command("list")
def disk_list(pool: Annotated[str | None, typer.Argument(
        help="Only this pool.", show_default=False)] = None,
        as_json: JsonOpt = False) -> None:
    """The images in one pool or in all: format, virtual size, allocated, backing."""
    from rich.table import Table
    disks = call(lambda c: c.disks(pool))
    if as_json:
        return print_json(disks)
    table = Table(box=None, header_style="bold")
    for col in ("POOL", "IMAGE", "FORMAT", "SIZE", "ALLOCATED", "BACKING"):
        table.add_column(col)
    for d in disks:
        table.add_row(d["pool"], d["name"], d["format"], _size(d["virtual_size"]),
                      _size(d["actual_size"]), d["backing"] or "")
    _console().print(table)


@disk_app.command("create")
def disk_create(
        pool: PoolArg, name: ImageArg,
        size: Annotated[str, typer.Option(help="Virtual size: 10G, 512M, ...",
                                          show_default=False)],
        fmt: Annotated[DiskFormat, typer.Option("--format", help="Image format.")] =
        DiskFormat.qcow2,
        backing: Annotated[str | None, typer.Option(
            help="An image of the same pool this one overlays (qcow2 only): reads of "
            "what was never written come from it.", show_default=False)] = None,
        as_json: JsonOpt = False) -> None:
    """Create an empty image in a pool (refused if one of that name exists)."""
    from ferry.storage import parse_size
    try:
        nbytes = parse_size(size)
    except FerryError as exc:
        fail(exc.message, 2)
    body: dict[str, Any] = {"name": name, "size": nbytes, "format": fmt.value}
    if backing is not None:
        body["backing"] = backing
    info = call(lambda c: c.create_disk(pool, **body))
    if as_json:
        return print_json(info)
    typer.echo(f"created {pool}:{info['name']} ({info['format']}, "
               f"{_size(info['virtual_size'])})")


@disk_app.command("delete")
def disk_delete(pool: PoolArg, name: ImageArg) -> None:
    """Delete an image (refused while a domain's definition uses it, or another
    image is backed by it)."""
    call(lambda c: c.delete_disk(pool, name))
    typer.echo(f"deleted {pool}:{name}")


# -- certificates ----------------------------------------------------------------------
pki_app = typer.Typer(help="The cluster's certificate authority and certificates.",
                      no_args_is_help=True)
app.add_typer(pki_app, name="pki")
PkiDir = Annotated[Path, typer.Option("--dir", help="Where the CA and certificates live.")]


def _pki(fn: Callable[[], Path]) -> Path:
    try:
        return fn()
    except FerryError as err:
        fail(err.message)
        raise AssertionError("unreachable") from err


@pki_app.command("init")
def pki_init(directory: PkiDir = Path("/etc/ferry/pki")) -> None:
    """Create the cluster CA (ca.pem, ca.key): once, on a trusted machine."""
    from ferry import pki
    path = _pki(lambda: pki.init_ca(directory))
    typer.echo(f"created CA {path}")


@pki_app.command("issue")
def pki_issue(
    name: Annotated[str, typer.Argument(help="Host or operator name.")],
    host: Annotated[bool, typer.Option("--host", help="A host certificate.")] = False,
    operator: Annotated[bool, typer.Option("--operator", help="An operator certificate.")
                        ] = False,
    address: Annotated[list[str] | None, typer.Option(
        help="An address of the host (repeat for several); hosts need one.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.", min=1, max=3650)] = 825,
    directory: PkiDir = Path("/etc/ferry/pki"),
) -> None:
    """Issue a certificate signed by the cluster CA (NAME.pem, NAME.key)."""
    if host == operator:
        fail("give exactly one of --host or --operator")
    from ferry import pki
    role = "host" if host else "operator"
    path = _pki(lambda: pki.issue(directory, name, role, address or [], days))
    typer.echo(f"issued {role} certificate {path}")


@pki_app.command("show")
def pki_show(
    cert: Annotated[str, typer.Argument(help="A certificate file, or a NAME in --dir.")],
    directory: PkiDir = Path("/etc/ferry/pki"),
    as_json: JsonOpt = False,
) -> None:
    """Show what a certificate says: name, role, addresses, validity, and whether the
    CA in --dir signed it (what ferryd checks when it lets a peer in)."""
    from ferry import pki
    path = Path(cert)
    if not path.exists() and "/" not in cert:
        path = directory / f"{cert}.pem"
    try:
        info = pki.describe(path, directory / "ca.pem")
    except FerryError as err:
        fail(err.message)
        raise AssertionError("unreachable") from err
    if as_json:
        return print_json(info)
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        typer.echo(f"{key:<13} {shown if shown not in ('', None) else '-'}")


def run() -> None:
    app()
