"""API request bodies: nesting bounded, types strict, every real body accepted."""
from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from ferry.errors import InvalidInput
from ferry.migration.models import (
    AbortRequest,
    FinishRequest,
    MigrateRequest,
    RelocationRequest,
    StreamCreds,
)
from ferry.models import DefineRequest, DomainConfig, ShutdownRequest
from ferry.validation import MAX_DEPTH, nesting_depth, parse_body

FULL_CONFIG: dict[str, Any] = {
    "name": "web01", "uuid": "6f1c2e0a-8a5e-4a89-9d7e-0b2a8c9f9f01", "memory": 1024,
    "vcpus": 2, "machine": "q35", "cpu": "qemu64", "accel": "tcg",
    "kernel": "/var/cache/ferry/guest/vmlinuz", "initrd": "/var/cache/ferry/guest/initrd.img",
    "cmdline": "console=ttyS0 ferry.port=7777", "serial": True,
    "disks": [{"path": "/var/lib/ferry/images/web01.qcow2", "format": "qcow2",
               "bus": "virtio", "readonly": False},
              {"path": "/var/lib/ferry/images/data.raw", "format": "raw", "bus": "scsi",
               "readonly": True}],
    "nics": [{"model": "virtio-net-pci", "mac": "52:54:00:12:34:56", "mode": "user",
              "forwards": ["udp::7777-:7777", "tcp:127.0.0.1:2222-:22"]},
             {"model": "e1000", "mac": "52:54:00:12:34:57", "mode": "bridge",
              "bridge": "br0"},
             {"model": "rtl8139", "mac": "52:54:00:12:34:58", "mode": "none"}],
}


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- nesting depth ---------------------------------------------------------------------
@pytest.mark.parametrize("raw,depth", [
    (b"", 0), (b"1", 0), (b'"x"', 0), (b"{}", 1), (b"[]", 1), (b'{"a": [1, {"b": []}]}', 4),
    (b"[[], [[]], []]", 3),
    (b'["[[[[", "{{{{"]', 1),                  # brackets in strings don't count
    (rb'["\"[[[[", "]]"]', 1),                # an escaped quote does not end the string
    (rb'["\\", [[]]]', 3),                    # an escaped backslash does not escape the quote
    (rb'["\u005b[", "\\\"[["]', 1),
    (b'["[[[[', 1),                            # an unterminated string runs to the end
    (b'{"a": "\\', 1),
    ("[\"ünï[[\", [[]]]".encode(), 3),         # UTF-8 never hides a quote or a bracket
])
def test_nesting_depth(raw: bytes, depth: int) -> None:
    assert nesting_depth(raw) == depth


def test_nesting_depth_stops_past_the_limit() -> None:
    assert nesting_depth(nested(100_000), limit=MAX_DEPTH) == MAX_DEPTH + 1
    assert nesting_depth(nested(5), limit=3) == 4


def test_deep_body_is_refused_before_parsing() -> None:
    raw = nested(100_000)  # ~200 KB: once HTTP 500 and a RecursionError
    assert len(raw) == 200_000
    with pytest.raises(InvalidInput, match=f"nests deeper than {MAX_DEPTH} levels"):
        parse_body(raw, DefineRequest)


def test_depth_limit_is_exact() -> None:
    def finish(depth: int) -> bytes:  # the body is 1, stats 2, the rest arrays
        inner = "[" * (depth - 2) + "]" * (depth - 2)
        return f'{{"job_id": "0123456789ab", "resume": true, "stats": {{"x": {inner}}}}}'\
            .encode()
    assert nesting_depth(finish(MAX_DEPTH)) == MAX_DEPTH
    assert parse_body(finish(MAX_DEPTH), FinishRequest).resume is True
    with pytest.raises(InvalidInput, match="nests deeper"):
        parse_body(finish(MAX_DEPTH + 1), FinishRequest)


# -- strict types ----------------------------------------------------------------------
def config(**change: Any) -> dict[str, Any]:
    return {"config": {**FULL_CONFIG, **change}}


@pytest.mark.parametrize("change,message", [
    ({"start": "yes"}, "start: Input should be a valid boolean"),
    ({"start": 1}, "start: Input should be a valid boolean"),
    (config(memory="128"), "config.memory: Input should be a valid integer"),
    (config(memory=128.0), "config.memory: Input should be a valid integer"),
    (config(vcpus=True), "config.vcpus: Input should be a valid integer"),
    (config(serial="false"), "config.serial: Input should be a valid boolean"),
    (config(name=7), "config.name: Input should be a valid string"),
    (config(accel="warp"), "config.accel: Input should be"),
    (config(uuid="not-a-uuid"), "config.uuid: Input should be a valid UUID"),
    (config(colour="blue"), "config.colour: unknown key"),
])
def test_define_is_strict(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_body(body({"config": FULL_CONFIG, **change}), DefineRequest)
    assert exc.value.message.startswith(message), exc.value.message


@pytest.mark.parametrize("model,data,message", [
    (ShutdownRequest, {"timeout": "5"}, "timeout: Input should be a valid number"),
    (MigrateRequest, {"dest": "b", "check": "true"}, "check: Input should be a valid boolean"),
    (MigrateRequest, {"dest": "b", "max_downtime_ms": "300"}, "max_downtime_ms: Input should"),
    (MigrateRequest, {"dest": "b", "mode": "fast"}, "mode: Input should be 'live' or 'offline'"),
    (MigrateRequest, {"dest": "b", "parallel": 0}, "parallel: Input should be greater than"),
    (MigrateRequest, {"dest": "b", "parallel": 17}, "parallel: Input should be less than"),
    (MigrateRequest, {"dest": "b", "compress": "lz4"}, "compress: Input should be 'none' or"),
    (AbortRequest, {"job_id": 123}, "job_id: Input should be a valid string"),
    (FinishRequest, {"job_id": "0123456789ab", "resume": "no"}, "resume: Input should be"),
    (FinishRequest, {"job_id": "0123456789ab", "resume": True, "console_base": "0"},
     "console_base: Input should be a valid integer"),
])
def test_other_requests_are_strict(model: type[BaseModel], data: dict[str, Any],
                                   message: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_body(body(data), model)
    assert exc.value.message.startswith(message), exc.value.message


@pytest.mark.parametrize("raw,message", [
    (b"{", "request body is not JSON: EOF while parsing an object"),
    (b"  ", "request body is not JSON: EOF while parsing a value"),
    (b"\xff\xfe{}", "request body is not JSON: "),
    (b'{"timeout": 5,}', "request body is not JSON: "),
    (b"[]", "Input should be an object"),
    (b"null", "Input should be an object"),
])
def test_not_a_body(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_body(raw, ShutdownRequest)
    assert exc.value.message.startswith(message), exc.value.message


# -- what ferry and ferryd really send is accepted ---------------------------------------
def test_empty_body_is_an_empty_object() -> None:
    assert parse_body(b"", ShutdownRequest) == ShutdownRequest()
    with pytest.raises(InvalidInput, match=r"config: missing \(required\)"):
        parse_body(b"", DefineRequest)


def test_define_with_a_full_config() -> None:
    req = parse_body(body({"config": FULL_CONFIG, "start": True}), DefineRequest)
    assert req.start is True
    assert req.config == DomainConfig.model_validate(FULL_CONFIG)
    # a minimal one, as `ferry define` sends a short TOML file
    req = parse_body(body({"config": {"name": "a", "memory": 64, "kernel": "/k"},
                           "start": False}), DefineRequest)
    assert req.config.vcpus == 1 and req.config.nics == []


@pytest.mark.parametrize("data", [{}, {"timeout": 5}, {"timeout": 5.5}, {"timeout": 0}])
def test_shutdown(data: dict[str, Any]) -> None:
    assert parse_body(body(data), ShutdownRequest).timeout == data.get("timeout", 60.0)


def test_migrate_as_the_cli_sends_it() -> None:
    data = {"dest": "host-b", "mode": "live", "check": False, "max_downtime_ms": 300,
            "bandwidth_mibps": 0, "timeout_s": 600.0, "on_timeout": "pause"}
    req = parse_body(body(data), MigrateRequest)
    assert req.mode == "live" and req.timeout_s == 600.0
    assert parse_body(body({**data, "timeout_s": 30}), MigrateRequest).timeout_s == 30.0


def relocation() -> RelocationRequest:
    return RelocationRequest(job_id="0123456789ab", source="host-a",
                             config=DomainConfig.model_validate(FULL_CONFIG), mode="live",
                             running=True, accel="tcg", arch="x86_64",
                             stream=StreamCreds(ca="CA PEM", cert="CERT PEM", key="KEY PEM"))


@pytest.mark.parametrize("make", [
    relocation,
    lambda: relocation().model_copy(update={"stream": None, "accel": None, "running": False}),
    lambda: FinishRequest(job_id="0123456789ab", resume=True,
                          stats={"total_ms": 1234.5, "downtime_ms": 12, "passes": 3,
                                 "was_running": True, "stream_tls": True},
                          console_base=4096, console_b64="aGVsbG8K"),
    lambda: AbortRequest(job_id="0123456789ab", reason="operator"),
], ids=["prepare", "prepare-shutoff", "finish", "abort"])
def test_relocation_requests_as_the_source_sends_them(make: Any) -> None:
    """The source sends model_dump(mode="json") (or the same dict by hand)."""
    sent = make()
    assert parse_body(body(sent.model_dump(mode="json")), type(sent)) == sent
