"""The management API as an OpenAPI 3.1 document (``GET /v1/openapi.json``),
made from the same pydantic models the API validates and answers with, so it
cannot drift from them. ``ROUTES`` names every route's request and answer; a
unit test checks that it lists every route the app has."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ferry import __version__
from ferry.fleet.cluster import DomainView, HostView
from ferry.fleet.evacuate import EvacuateRequest, Evacuation
from ferry.migration.models import (
    JobRecord,
    MigrateRequest,
    MigrationCheck,
    ResolveRequest,
    SteerRequest,
)
from ferry.migration.savefile import SaveRequest
from ferry.models import (
    DefineRequest,
    DomainInfo,
    HostInfo,
    MaintenanceRequest,
    ShutdownRequest,
)
from ferry.storage import DiskCreate, ImageInfo, PoolInfo

Json = dict[str, Any]
# answers that are not JSON: (media type, schema)
BYTES = ("application/octet-stream", {"type": "string", "format": "binary"})
TEXT = ("text/plain", {"type": "string"})
# answers other than 200
STATUS = {("POST", "/v1/domains"): "201", ("POST", "/v1/restore"): "201",
          ("POST", "/v1/pools/{pool}/disks"): "201",
          ("POST", "/v1/domains/{name}/migrate"): "202",
          ("POST", "/v1/host/evacuate"): "202 (200 for a dry run)"}
# (method, path): (summary, request model, answer model or schema, list of it?)
ROUTES: dict[tuple[str, str], tuple[str, type[BaseModel] | None, Any, bool]] = {
    ("GET", "/v1/host"): ("This host", None, HostInfo, False),
    ("POST", "/v1/host/maintenance"): ("Maintenance mode on or off", MaintenanceRequest,
                                       HostInfo, False),
    ("POST", "/v1/host/evacuate"): ("Evacuate this host (or plan it: dry_run)",
                                    EvacuateRequest, Evacuation, False),
    ("GET", "/v1/host/evacuation"): ("The evacuation under way, or the last one", None,
                                     Evacuation, False),
    ("GET", "/v1/cluster/hosts"): ("Every host of the cluster", None, HostView, True),
    ("GET", "/v1/cluster/domains"): ("Every domain on every host that answers", None,
                                     {"type": "object", "properties": {
                                         "domains": {"type": "array", "items": {
                                             "$ref": "#/components/schemas/DomainView"}},
                                         "unreachable": {"type": "array", "items": {
                                             "$ref": "#/components/schemas/HostView"}}}},
                                     False),
    ("GET", "/v1/pools"): ("Storage pools", None, PoolInfo, True),
    ("GET", "/v1/disks"): ("Images in every pool", None, ImageInfo, True),
    ("GET", "/v1/pools/{pool}/disks"): ("Images in one pool", None, ImageInfo, True),
    ("POST", "/v1/pools/{pool}/disks"): ("Create an image", DiskCreate, ImageInfo, False),
    ("DELETE", "/v1/pools/{pool}/disks/{image}"): ("Delete an image (refused while used)",
                                                   None, {"type": "object"}, False),
    ("POST", "/v1/domains/{name}/save"): ("Save a running domain to a file", SaveRequest,
                                          {"type": "object"}, False),
    ("POST", "/v1/restore"): ("Restore a domain from a file", SaveRequest, DomainInfo,
                              False),
    ("POST", "/v1/domains/{name}/migrate"): (
        "Migrate (202, the job's record), or with check=true only check (200, the "
        "blockers)", MigrateRequest, {"oneOf": [
            {"$ref": "#/components/schemas/JobRecord"},
            {"$ref": "#/components/schemas/MigrationCheck"}]}, False),
    ("POST", "/v1/domains/{name}/recover"): ("Reconnect a paused post-copy", None,
                                             JobRecord, False),
    ("GET", "/v1/jobs"): ("Migrations not ended here", None, JobRecord, True),
    ("GET", "/v1/jobs/{job}"): ("One migration job", None, JobRecord, False),
    ("GET", "/v1/jobs/{job}/log"): ("A job's timeline on both hosts", None,
                                    {"type": "object"}, False),
    ("POST", "/v1/jobs/{job}/abort"): ("Abort a job", None, JobRecord, False),
    ("POST", "/v1/jobs/{job}/resolve"): ("Settle a job in doubt", ResolveRequest,
                                         JobRecord, False),
    ("POST", "/v1/jobs/{job}/set"): ("Change a running job's limits", SteerRequest,
                                     JobRecord, False),
    ("POST", "/v1/jobs/{job}/complete"): ("Finish a live job now", None, JobRecord, False),
    ("GET", "/v1/migrations"): ("Every migration this host took part in", None, JobRecord,
                                True),
    ("GET", "/v1/domains"): ("Domains on this host", None, DomainInfo, True),
    ("POST", "/v1/domains"): ("Define (and start: start=true) a domain", DefineRequest,
                              DomainInfo, False),
    ("GET", "/v1/domains/{name}"): ("One domain, with its definition", None, DomainInfo,
                                    False),
    ("DELETE", "/v1/domains/{name}"): ("Undefine a domain", None, {"type": "object"},
                                       False),
    ("POST", "/v1/domains/{name}/{action}"): (
        "start | pause | unpause | reboot | destroy | shutdown (body: timeout)",
        ShutdownRequest, DomainInfo, False),
    ("GET", "/v1/domains/{name}/console/log"): ("The console's output so far (bytes)",
                                                None, BYTES, False),
    ("GET", "/v1/domains/{name}/console"): ("The serial console (websocket)", None,
                                            None, False),
    ("GET", "/v1/events"): ("This host's events (websocket; docs/events.md)", None, None,
                            False),
    ("GET", "/v1/openapi.json"): ("This document", None, {"type": "object"}, False),
    ("GET", "/metrics"): ("Prometheus metrics (text format; docs/metrics.md)", None,
                          TEXT, False),
}
MODELS: list[type[BaseModel]] = [
    HostInfo, MaintenanceRequest, EvacuateRequest, Evacuation, HostView, DomainView,
    PoolInfo, ImageInfo, DiskCreate, SaveRequest, MigrateRequest, MigrationCheck, JobRecord,
    ResolveRequest, SteerRequest, DomainInfo, DefineRequest, ShutdownRequest]
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "kind", "message"], "properties": {
        "code": {"type": "string"}, "kind": {"type": "string",
                                             "enum": ["refused", "failed", "unreachable"]},
        "message": {"type": "string"}, "details": {"type": "object"}}}}}


def _ref(model: Any) -> Json:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {"$ref": f"#/components/schemas/{model.__name__}"}
    return dict(model)


def document() -> Json:
    _, defs = models_json_schema([(m, "validation") for m in MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas: Json = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR
    paths: Json = {}
    for (method, path), (summary, body, answer, many) in ROUTES.items():
        op: Json = {"summary": summary, "responses": {
            "default": {"description": "an error (nothing changed if its kind is refused)",
                        "content": {"application/json": {"schema": {
                            "$ref": "#/components/schemas/Error"}}}}}}
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "string"}} for p in params]
        if body is not None:
            op["requestBody"] = {"content": {"application/json": {"schema": _ref(body)}}}
        if answer is None:
            op["responses"]["101"] = {"description": "switching to a websocket"}
        elif isinstance(answer, tuple):
            op["responses"]["200"] = {"description": "ok", "content": {
                answer[0]: {"schema": answer[1]}}}
        else:
            schema = {"type": "array", "items": _ref(answer)} if many else _ref(answer)
            code, _, also = STATUS.get((method, path), "200").partition(" ")
            op["responses"][code] = {"description": also.strip("()") or "ok", "content": {
                "application/json": {"schema": schema}}}
            if code == "202" and path.endswith("/migrate"):
                op["responses"]["200"] = {"description": "check=true: the blockers",
                                          "content": {"application/json": {"schema": {
                                              "$ref": "#/components/schemas/MigrationCheck"}}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "ferryd management API", "version": __version__,
                     "description": "Ferry's host daemon: on its Unix socket (root) and "
                     "over mutual TLS with an operator certificate. Errors are "
                     "{\"error\": {code, kind, message, details}}."},
            "paths": paths, "components": {"schemas": schemas}}

