"""ferryd's management API (aiohttp): REST/JSON, plus a websocket for consoles.

Errors leave as ``{"error": {code, kind, message, details}}`` with a fitting
HTTP status (the router's own 404 and 405 too); anything that is not a
FerryError is logged and reported as an internal error, never as a traceback.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from ferry.api.consoles import Consoles
from ferry.api.events import EVENT_SOCKETS, close_event_sockets, serve_events
from ferry.api.metrics import Metrics
from ferry.domains import DomainService
from ferry.errors import FerryError, Forbidden, InvalidInput, NotFound
from ferry.fleet.cluster import ClusterView
from ferry.fleet.evacuate import EvacuateRequest, Evacuator
from ferry.migration.models import MigrateRequest, ResolveRequest, SteerRequest
from ferry.migration.savefile import RestoreRequest, SaveRequest, SaveService
from ferry.migration.source import MigrationService
from ferry.models import (
    DefineRequest,
    HostInfo,
    MaintenanceRequest,
    ShutdownRequest,
    check_name,
)
from ferry.storage import DiskCreate, Storage
from ferry.validation import parse_body

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SVC: web.AppKey[DomainService] = web.AppKey("svc", DomainService)
HOSTINFO: web.AppKey[Callable[[], HostInfo]] = web.AppKey("hostinfo")
MIG: web.AppKey[MigrationService] = web.AppKey("mig", MigrationService)
SAVES: web.AppKey[SaveService] = web.AppKey("saves", SaveService)
JOB_RE = re.compile(r"^[0-9a-f]{12}$")
CONSOLES: web.AppKey[Consoles] = web.AppKey("consoles", Consoles)
CLUSTER: web.AppKey[ClusterView] = web.AppKey("cluster", ClusterView)
EVACUATOR: web.AppKey[Evacuator] = web.AppKey("evacuator", Evacuator)
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")


def ok(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        body = data.model_dump_json()
    else:
        body = json.dumps(data, default=_jsonable)
    return web.Response(text=body, status=status, content_type="application/json")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def error_response(err: FerryError, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps({"error": err.to_json()}, default=str),
                        status=status or err.http_status, headers=headers,
                        content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FerryError as err:
        log.info("%s %s refused/failed: %s", request.method, request.path, err.message)
        return error_response(err)
    # the router's own answers, in the same shape as every other error
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such API route: {request.method} {request.path}",
                                       method=request.method, path=request.path))
    except web.HTTPMethodNotAllowed as exc:
        allowed = sorted(exc.allowed_methods)
        refusal = InvalidInput(f"method {request.method} not allowed on {request.path} "
                               f"(allowed: {', '.join(allowed)})", method=request.method,
                               path=request.path, allowed=allowed)
        return error_response(refusal, status=405, headers={"Allow": ", ".join(allowed)})
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(FerryError(f"internal error in ferryd: {exc!r}"))


def browser_guard(scheme: str, hosts: frozenset[str] | None = None) -> Any:
    """For a listener a browser can reach (the TCP port, where a browser may hold
    an operator certificate; the dashboard's plain-HTTP loopback listener), so
    that another web page the browser visits cannot drive ferryd:

    - a change (not GET) needs the ``X-Ferry: 1`` header, which a page of another
      origin can only send after a CORS preflight ferryd never grants (Ferry's
      own client and the dashboard send it);
    - a request the browser marks cross-site, or whose ``Origin`` is not this
      listener (``scheme://Host``), is refused — websockets included;
    - ``hosts``: the only ``Host`` values accepted (the plain-HTTP listener:
      its own address), so a name rebound to 127.0.0.1 (DNS rebinding) gets
      nothing."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if hosts is not None and request.host not in hosts:
            raise Forbidden(f"this listener answers to {', '.join(sorted(hosts))} only, "
                            f"not to Host {request.host!r}")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{scheme}://{request.host}":
            raise Forbidden(f"a request from {origin} is not this dashboard's")
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            raise Forbidden("a cross-site request is not this dashboard's")
        if request.method not in ("GET", "HEAD") and request.headers.get("X-Ferry") != "1":
            raise Forbidden("a change needs the header X-Ferry: 1 (Ferry's client and "
                            "dashboard send it)")
        return await handler(request)

    return guard


async def body_as(request: web.Request, model: type[M]) -> M:
    """The request's body as ``model``, strictly (``validation.parse_body``)."""
    return parse_body(await request.read(), model)


def domain_name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


# -- handlers --------------------------------------------------------------------------
async def get_host(request: web.Request) -> web.Response:
    return ok(request.app[HOSTINFO]())


async def set_maintenance(request: web.Request) -> web.Response:
    req = await body_as(request, MaintenanceRequest)
    request.app[SVC].set_maintenance(req.on)
    return ok(request.app[HOSTINFO]())


async def evacuate_host(request: web.Request) -> web.Response:
    req = await body_as(request, EvacuateRequest)
    evac = await request.app[EVACUATOR].start(req)
    return ok(evac, status=200 if req.dry_run else 202)


async def get_evacuation(request: web.Request) -> web.Response:
    return ok(request.app[EVACUATOR].status())


WEB = Path(__file__).resolve().parent / "web"
UI_FILES = {"ferry.js": "text/javascript", "ferry.css": "text/css",
            "index.html": "text/html"}
# what the dashboard takes from the xterm.js package (npm's @xterm/xterm)
VENDOR_FILES = {"xterm.js": ("@xterm/xterm/lib/xterm.js", "text/javascript"),
                "xterm.css": ("@xterm/xterm/css/xterm.css", "text/css")}


async def ui(request: web.Request) -> web.StreamResponse:
    """The dashboard (``ferry.api.web``): its own files, and xterm.js from the
    host's ``web_vendor`` directory (installed by setup, never from the internet)."""
    name = request.match_info.get("file") or "index.html"
    if name not in UI_FILES:
        raise NotFound(f"no such dashboard file: {name}")
    return web.FileResponse(WEB / name, headers={"Content-Type": UI_FILES[name],
                                                 "Cache-Control": "no-cache"})


async def ui_vendor(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if name not in VENDOR_FILES:
        raise NotFound(f"no such dashboard file: vendor/{name}")
    rel, ctype = VENDOR_FILES[name]
    path = request.app[SVC].host.web_vendor / rel
    if not path.is_file():
        raise NotFound(f"{path} is missing: scripts/setup.sh installs xterm.js")
    return web.FileResponse(path, headers={"Content-Type": ctype})


async def ui_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def openapi(request: web.Request) -> web.Response:
    from ferry.api.openapi import document
    return ok(document())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format (``ferry.api.metrics``)."""
    m = request.app[METRICS]
    if m is None:
        raise NotFound("this ferryd serves no metrics")
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


async def list_domains(request: web.Request) -> web.Response:
    return ok([d.model_dump(mode="json", exclude={"config"})
               for d in request.app[SVC].infos()])


async def define_domain(request: web.Request) -> web.Response:
    req = await body_as(request, DefineRequest)
    info = await request.app[SVC].define(req.config, start=req.start)
    return ok(info, status=201)


async def get_domain(request: web.Request) -> web.Response:
    return ok(request.app[SVC].get(domain_name(request)).info(with_config=True))


async def undefine_domain(request: web.Request) -> web.Response:
    await request.app[SVC].undefine(domain_name(request))
    return ok({"undefined": request.match_info["name"]})


async def domain_action(request: web.Request) -> web.Response:
    svc, name = request.app[SVC], domain_name(request)
    action = request.match_info["action"]
    if action == "shutdown":
        req = await body_as(request, ShutdownRequest)
        return ok(await svc.shutdown(name, req.timeout))
    actions = {"start": svc.start, "pause": svc.pause, "unpause": svc.unpause,
               "destroy": svc.destroy, "reboot": svc.reboot}
    if action not in actions:
        raise InvalidInput(f"unknown action {action!r}; one of: shutdown, "
                           + ", ".join(actions))
    return ok(await actions[action](name))


def tail_param(request: web.Request) -> int | None:
    tail = request.query.get("tail")
    if tail is not None and not tail.isdigit():
        raise InvalidInput(f"tail must be a number of bytes, not {tail!r}")
    return int(tail) if tail else None


async def console_log(request: web.Request, relay: bool = True) -> web.Response:
    """The console log of a domain here, or (``relay``) wherever it runs now."""
    data = await request.app[CONSOLES].log(domain_name(request), tail_param(request), relay)
    return web.Response(body=data, content_type="application/octet-stream")


async def events_ws(request: web.Request) -> web.StreamResponse:
    """This host's events as they happen (``ferry.api.events``)."""
    svc = request.app[SVC]
    return await serve_events(request, svc.events, svc.host.name)


async def console_ws(request: web.Request) -> web.StreamResponse:
    """Attach to a domain's console, on this host or wherever it runs now."""
    return await request.app[CONSOLES].serve(request, domain_name(request), relay=True)


# -- the cluster view ---------------------------------------------------------------------
async def cluster_hosts(request: web.Request) -> web.Response:
    return ok([h.model_dump(mode="json") for h in await request.app[CLUSTER].hosts()])


async def cluster_domains(request: web.Request) -> web.Response:
    found, missing = await request.app[CLUSTER].domains()
    return ok({"domains": [d.model_dump(mode="json") for d in found],
               "unreachable": [h.model_dump(mode="json") for h in missing]})


# -- storage pools and disks ------------------------------------------------------------
def _storage(request: web.Request) -> Storage:
    svc = request.app[SVC]
    return Storage(svc.host, svc.image_ids)


def _users(svc: DomainService, pool: str, path: Path) -> list[str]:
    """Domains whose definition has this image as a disk, and those arriving
    with it (their migration is making it)."""
    def same(p: Path | None) -> bool:
        return p is not None and (p == path or p.resolve() == path.resolve())
    users = [d.name for d in svc.domains.values()
             if any((disk.pool == pool and same(disk.path)) or disk.path == path
                    for disk in d.config.disks)]
    users += [f"{a.name} (arriving from host {a.source}, job {a.job_id})"
              for a in svc.arrivals.values() if any(same(p) for p in a.disks)]
    return users


async def list_pools(request: web.Request) -> web.Response:
    return ok([p.model_dump() for p in _storage(request).pools()])


async def list_disks(request: web.Request) -> web.Response:
    pool = request.match_info.get("pool")
    images = await _storage(request).images(pool)
    return ok([{"pool": p, **i.model_dump()} for p, i in images])


async def create_disk(request: web.Request) -> web.Response:
    req = await body_as(request, DiskCreate)
    info = await _storage(request).create(request.match_info["pool"], req.name, req.size,
                                          req.format, req.backing)
    return ok({"pool": request.match_info["pool"], **info.model_dump()}, status=201)


async def delete_disk(request: web.Request) -> web.Response:
    storage, pool = _storage(request), request.match_info["pool"]
    image = request.match_info["image"]
    path = storage.image_path(storage.pool(pool), image)
    await storage.delete(pool, image, _users(request.app[SVC], pool, path))
    return ok({"deleted": f"{pool}:{image}"})


# -- save and restore -----------------------------------------------------------------
async def save_domain(request: web.Request) -> web.Response:
    req = await body_as(request, SaveRequest)
    return ok(await request.app[SAVES].save(domain_name(request), req.path))


async def restore_domain(request: web.Request) -> web.Response:
    req = await body_as(request, RestoreRequest)
    return ok(await request.app[SAVES].restore(req.path), status=201)


# -- migration (management side) --------------------------------------------------------
async def migrate_domain(request: web.Request) -> web.Response:
    name = domain_name(request)
    req = await body_as(request, MigrateRequest)
    mig = request.app[MIG]
    if req.auto:
        from ferry.fleet.auto import choose_destination
        dest = await choose_destination(request.app[CLUSTER], mig, name, req)
        req = req.model_copy(update={"dest": dest, "auto": False})
    if req.check:
        blockers, notes = await mig.check(name, req)
        return ok({"domain": name, "dest": req.dest, "blockers": blockers, "notes": notes})
    return ok(await mig.start(name, req), status=202)


async def recover_migration(request: web.Request) -> web.Response:
    return ok(request.app[MIG].recover_postcopy(domain_name(request)))


async def list_jobs(request: web.Request) -> web.Response:
    return ok([r.model_dump(mode="json") for r in request.app[MIG].running()])


async def get_job(request: web.Request) -> web.Response:
    return ok(request.app[MIG].get(job_id(request)))


async def job_log(request: web.Request) -> web.Response:
    """The job's timeline on both hosts: this one's, and the other's, asked over
    the relocation API (within 5 s; if it does not answer, it says so)."""
    return ok(await request.app[MIG].job_log(job_id(request)))


async def abort_job(request: web.Request) -> web.Response:
    return ok(request.app[MIG].abort(job_id(request)))


async def steer_job(request: web.Request) -> web.Response:
    req = await body_as(request, SteerRequest)
    return ok(request.app[MIG].steer(job_id(request), req))


async def complete_job(request: web.Request) -> web.Response:
    return ok(request.app[MIG].complete(job_id(request)))


async def resolve_job(request: web.Request) -> web.Response:
    req = await body_as(request, ResolveRequest)
    return ok(await request.app[MIG].resolve(job_id(request), req.runs_on))


async def list_migrations(request: web.Request) -> web.Response:
    return ok(request.app[MIG].records_json())


def job_id(request: web.Request) -> str:
    value = request.match_info["job"]
    if not JOB_RE.fullmatch(value):
        raise InvalidInput(f"invalid job id {value!r}")
    return value


async def not_for_operators(request: web.Request) -> web.Response:
    raise Forbidden("the relocation API is for peer hosts (host certificates), not for "
                    "operators")


def make_app(svc: DomainService, hostinfo: Callable[[], HostInfo],
             migrations: MigrationService, consoles: Consoles,
             remote: bool = False, cluster: ClusterView | None = None,
             evacuator: Evacuator | None = None,
             metrics_: Metrics | None = None, plain_http: str | None = None
             ) -> web.Application:
    """The management API; ``remote``: a copy for another listener: the TCP port
    (TLS, operators), or ``plain_http``: the dashboard's loopback listener at
    that ADDRESS:PORT. Both are guarded against other web pages
    (``browser_guard``); the Unix socket is not (no browser reaches it)."""
    middlewares: list[Any] = [errors_middleware]
    if plain_http is not None:
        port = plain_http.rpartition(":")[2]
        middlewares.append(browser_guard("http", frozenset({plain_http,
                                                            f"localhost:{port}"})))
    elif remote:
        middlewares.append(browser_guard("https"))
    app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
    app[SVC] = svc
    app[HOSTINFO] = hostinfo
    app[CONSOLES] = consoles
    app[MIG] = migrations
    app[SAVES] = SaveService(svc)
    app[CLUSTER] = cluster or ClusterView(svc.host, svc, hostinfo,
                                          lambda: len(migrations.running()))
    app[EVACUATOR] = evacuator or Evacuator(app[CLUSTER], migrations)
    app[METRICS] = metrics_
    app[EVENT_SOCKETS] = set()
    app.on_shutdown.append(close_event_sockets)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/events", events_ws)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/ui", ui_root)
    app.router.add_get("/ui/", ui)
    app.router.add_get("/ui/vendor/{file}", ui_vendor)
    app.router.add_get("/ui/{file}", ui)
    app.router.add_get("/v1/host", get_host)
    app.router.add_post("/v1/host/maintenance", set_maintenance)
    app.router.add_post("/v1/host/evacuate", evacuate_host)
    app.router.add_get("/v1/host/evacuation", get_evacuation)
    app.router.add_get("/v1/cluster/hosts", cluster_hosts)
    app.router.add_get("/v1/cluster/domains", cluster_domains)
    app.router.add_get("/v1/pools", list_pools)
    app.router.add_get("/v1/disks", list_disks)
    app.router.add_get("/v1/pools/{pool}/disks", list_disks)
    app.router.add_post("/v1/pools/{pool}/disks", create_disk)
    app.router.add_delete("/v1/pools/{pool}/disks/{image:.+}", delete_disk)
    app.router.add_post("/v1/domains/{name}/save", save_domain)
    app.router.add_post("/v1/restore", restore_domain)
    app.router.add_post("/v1/domains/{name}/migrate", migrate_domain)
    app.router.add_post("/v1/domains/{name}/recover", recover_migration)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job}", get_job)
    app.router.add_get("/v1/jobs/{job}/log", job_log)
    app.router.add_post("/v1/jobs/{job}/abort", abort_job)
    app.router.add_post("/v1/jobs/{job}/resolve", resolve_job)
    app.router.add_post("/v1/jobs/{job}/set", steer_job)
    app.router.add_post("/v1/jobs/{job}/complete", complete_job)
    app.router.add_get("/v1/migrations", list_migrations)
    app.router.add_get("/v1/domains", list_domains)
    app.router.add_post("/v1/domains", define_domain)
    app.router.add_get("/v1/domains/{name}", get_domain)
    app.router.add_delete("/v1/domains/{name}", undefine_domain)
    app.router.add_post("/v1/domains/{name}/{action}", domain_action)
    app.router.add_get("/v1/domains/{name}/console/log", console_log)
    app.router.add_get("/v1/domains/{name}/console", console_ws)
    app.router.add_route("*", "/v1/relocation/{tail:.*}", not_for_operators)
    if not remote:  # the Unix socket's app owns the console sessions

        async def close_consoles(app: web.Application) -> None:
            await app[CONSOLES].close()

        app.on_shutdown.append(close_consoles)
    return app
