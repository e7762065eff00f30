"""The relocation API: what a peer ferryd may ask of this host over TCP.

Only the destination's half of the migration protocol is here; the management
API (define, start, migrate, ...) is never served on this listener.
"""
from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from ferry.api.consoles import Consoles
from ferry.api.server import (
    CONSOLES,
    HOSTINFO,
    body_as,
    console_log,
    domain_name,
    errors_middleware,
    job_id,
    ok,
)
from ferry.errors import Forbidden, NotFound, Refused
from ferry.migration.destination import RelocationService
from ferry.migration.job import timeline_entries
from ferry.migration.models import (
    PROTOCOL_VERSION,
    AbortRequest,
    Blocker,
    CheckAnswer,
    FinishRequest,
    JobRecord,
    RecoverRequest,
    RelocationRequest,
    check_protocol,
)
from ferry.models import HostInfo
from ferry.tls import identity
from ferry.validation import parse_body

RELOC: web.AppKey[RelocationService] = web.AppKey("reloc", RelocationService)


JOBS: web.AppKey[Callable[[], int]] = web.AppKey("jobs")


def peer_host(request: web.Request) -> str | None:
    """The host named by the caller's certificate (the gate let only host
    certificates through to this app); None on a plain connection (tests)."""
    who = identity(request.transport.get_extra_info("peercert")
                   if request.transport is not None else None)
    return who.name if who is not None else None


def _as_source(request: web.Request, source: str | None) -> None:
    """A host may only speak for itself, and only about its own jobs."""
    peer = peer_host(request)
    if peer is not None and source is not None and peer != source:
        raise Forbidden(f"host {peer} may not act for host {source}")


async def relocation_request(request: web.Request) -> RelocationRequest:
    """The check/Prepare body. Its protocol is checked first, so a source on
    another version hears which versions differ (Refused, blocker "protocol")
    rather than which of its fields this version doesn't know."""
    body = await request.read()
    try:
        raw = json.loads(body)
    except ValueError:
        raw = None  # parse_body says what is wrong with it
    if isinstance(raw, dict) and isinstance(raw.get("protocol", 1), int):
        source = raw.get("source")
        source = source if isinstance(source, str) else None
        _as_source(request, source)  # an impostor learns nothing, not even versions
        check_protocol(raw.get("protocol", 1), source or "(unnamed)",
                       request.app[RELOC].host.name)
    return parse_body(body, RelocationRequest)


async def check(request: web.Request) -> web.Response:
    try:
        req = await relocation_request(request)
    except Refused as exc:
        if exc.details.get("blocker") != "protocol":
            raise
        return ok(CheckAnswer(protocol=PROTOCOL_VERSION, blockers=[
            Blocker(code="protocol", message=exc.message)]))
    _as_source(request, req.source)
    blockers, notes = await request.app[RELOC].check(req)
    return ok(CheckAnswer(protocol=PROTOCOL_VERSION, blockers=blockers, notes=notes))


async def prepare(request: web.Request) -> web.Response:
    req = await relocation_request(request)
    _as_source(request, req.source)
    return ok(await request.app[RELOC].prepare(req))


async def finish(request: web.Request) -> web.Response:
    req = await body_as(request, FinishRequest)
    _as_source(request, request.app[RELOC].source_of(req.job_id))
    return ok(await request.app[RELOC].finish(req))


async def abort(request: web.Request) -> web.Response:
    req = await body_as(request, AbortRequest)
    _as_source(request, request.app[RELOC].source_of(req.job_id))
    return ok(await request.app[RELOC].abort(req))


async def recover(request: web.Request) -> web.Response:
    req = await body_as(request, RecoverRequest)
    _as_source(request, request.app[RELOC].source_of(req.job_id))
    return ok(await request.app[RELOC].recover_stream(req))


async def not_for_hosts(request: web.Request) -> web.Response:
    raise Forbidden(f"host certificates may only use the relocation API, not "
                    f"{request.method} {request.path}")


async def status(request: web.Request) -> web.Response:
    job = job_id(request)
    _as_source(request, request.app[RELOC].source_of(job))  # and renews its lease
    return ok(request.app[RELOC].status(job))


async def job_log(request: web.Request) -> web.Response:
    """This host's part of a job's log, for the job's other host only."""
    job = job_id(request)
    records = [JobRecord.model_validate(r) for r in request.app[RELOC].store.migrations()
               if r["id"] == job]
    peer = peer_host(request)
    mine = [r for r in records if peer is None or peer in (r.source, r.dest)]
    if not mine:
        raise NotFound(f"no job {job} of host {peer} on host {request.app[RELOC].host.name}")
    name = request.app[RELOC].host.name
    return ok([e for r in mine for e in timeline_entries(r, name)])


async def console(request: web.Request) -> web.StreamResponse:
    return await request.app[CONSOLES].serve(request, domain_name(request), relay=False)


async def local_console_log(request: web.Request) -> web.Response:
    return await console_log(request, relay=False)


async def whereabouts(request: web.Request) -> web.Response:
    return ok(request.app[CONSOLES].locator.whereabouts(domain_name(request)))


def _a_peer(request: web.Request) -> None:
    """The cluster view is for this host's configured peers only."""
    who = peer_host(request)
    if who is not None and who not in {p.name for p in request.app[RELOC].host.peers}:
        raise Forbidden(f"host {who} is not a peer of this host ([[peers]]): the cluster "
                        "view is for peers")


async def host_view(request: web.Request) -> web.Response:
    """What this host says of itself to a peer's cluster view (not its paths,
    QEMU binary or TCP settings)."""
    _a_peer(request)
    info = request.app[HOSTINFO]().model_dump(mode="json")
    info.update(state_dir="", qemu="", tcp_api="")
    return ok({"info": info, "jobs": request.app[JOBS]()})


async def domains_view(request: web.Request) -> web.Response:
    _a_peer(request)
    return ok([d.model_dump(mode="json", exclude={"config", "pid"})
               for d in request.app[RELOC].domains.infos()])


def make_relocation_app(reloc: RelocationService, consoles: Consoles,
                        hostinfo: Callable[[], HostInfo] | None = None,
                        jobs: Callable[[], int] | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024 * 1024)
    app[RELOC] = reloc
    app[CONSOLES] = consoles
    if hostinfo is not None:
        app[HOSTINFO] = hostinfo
        app[JOBS] = jobs or (lambda: 0)
        app.router.add_get("/v1/relocation/host", host_view)
        app.router.add_get("/v1/relocation/domains", domains_view)
    app.router.add_get("/v1/relocation/consoles/{name}", console)
    app.router.add_get("/v1/relocation/consoles/{name}/log", local_console_log)
    app.router.add_get("/v1/relocation/whereabouts/{name}", whereabouts)
    app.router.add_post("/v1/relocation/check", check)
    app.router.add_post("/v1/relocation/prepare", prepare)
    app.router.add_post("/v1/relocation/finish", finish)
    app.router.add_post("/v1/relocation/abort", abort)
    app.router.add_post("/v1/relocation/recover", recover)
    app.router.add_get("/v1/relocation/jobs/{job}", status)
    app.router.add_get("/v1/relocation/jobs/{job}/log", job_log)
    app.router.add_route("*", "/{tail:.*}", not_for_hosts)
    return app
