"""The relocation API: what a peer ferryd may ask of this host over TCP.

Only the destination's half of the migration protocol is here; the management
API (define, start, migrate, ...) is never served on this listener.
"""
from __future__ import annotations

from aiohttp import web

from ferry.api.consoles import Consoles
from ferry.api.server import (
    CONSOLES,
    body_as,
    console_log,
    domain_name,
    errors_middleware,
    job_id,
    ok,
)
from ferry.migration.destination import RelocationService
from ferry.migration.models import AbortRequest, FinishRequest, RelocationRequest

RELOC: web.AppKey[RelocationService] = web.AppKey("reloc", RelocationService)


async def check(request: web.Request) -> web.Response:
    req = await body_as(request, RelocationRequest)
    return ok({"blockers": request.app[RELOC].blockers(req)})


async def prepare(request: web.Request) -> web.Response:
    req = await body_as(request, RelocationRequest)
    return ok(await request.app[RELOC].prepare(req))


async def finish(request: web.Request) -> web.Response:
    req = await body_as(request, FinishRequest)
    return ok(await request.app[RELOC].finish(req))


async def abort(request: web.Request) -> web.Response:
    req = await body_as(request, AbortRequest)
    return ok(await request.app[RELOC].abort(req))


async def status(request: web.Request) -> web.Response:
    return ok(request.app[RELOC].status(job_id(request)))


async def console(request: web.Request) -> web.StreamResponse:
    return await request.app[CONSOLES].serve(request, domain_name(request), relay=False)


async def local_console_log(request: web.Request) -> web.Response:
    return await console_log(request, relay=False)


async def whereabouts(request: web.Request) -> web.Response:
    return ok(request.app[CONSOLES].whereabouts(domain_name(request)))


def make_relocation_app(reloc: RelocationService, consoles: Consoles) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024 * 1024)
    app[RELOC] = reloc
    app[CONSOLES] = consoles
    app.router.add_get("/v1/relocation/consoles/{name}", console)
    app.router.add_get("/v1/relocation/consoles/{name}/log", local_console_log)
    app.router.add_get("/v1/relocation/whereabouts/{name}", whereabouts)
    app.router.add_post("/v1/relocation/check", check)
    app.router.add_post("/v1/relocation/prepare", prepare)
    app.router.add_post("/v1/relocation/finish", finish)
    app.router.add_post("/v1/relocation/abort", abort)
    app.router.add_get("/v1/relocation/jobs/{job}", status)
    return app
