"""Input from the wire and from files, checked before it is used.

``describe`` turns pydantic's validation errors into one readable line;
``parse_body`` reads an API request body strictly, after ``nesting_depth``
has made sure it is not nested deep enough to exhaust the parser.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ferry.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have; ours need 5."""

# A JSON string (escapes honoured; an unterminated one runs to the end, as a JSON
# lexer sees it) or a bracket. Possessive quantifiers: no backtracking, linear time.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


def where(loc: Sequence[int | str]) -> str:
    """A location as the user wrote it: ``nics[0].speed``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def describe(exc: ValidationError) -> str:
    """``key.sub: reason; other[0]: reason`` — short enough for one CLI line.
    Keys are named as in the TOML or JSON the input came from."""
    parts = []
    for err in exc.errors():
        loc = where(err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing (required)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def nesting_depth(raw: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep JSON text ``raw`` nests arrays and objects (``[]`` is 1); brackets
    inside strings don't count. Stops at ``limit + 1``: past the limit, how deep
    does not matter. Checks no other syntax: unbalanced text gets a number too."""
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match[0]
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_body(raw: bytes, model: type[M]) -> M:
    """A request body as ``model``, strictly: each JSON value must have its field's
    type (no ``"yes"`` for a bool, no ``"128"`` or ``true`` for an int); strings
    stand for enums, paths and UUIDs, which JSON has no type for. An empty body
    is ``{}``.

    Raises InvalidInput when the body nests deeper than MAX_DEPTH, is not JSON,
    or does not fit ``model``."""
    raw = raw or b"{}"
    if nesting_depth(raw) > MAX_DEPTH:
        raise InvalidInput(f"request body nests deeper than {MAX_DEPTH} levels")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first["msg"].removeprefix("Invalid JSON: ")
            raise InvalidInput(f"request body is not JSON: {reason}") from exc
        raise InvalidInput(describe(exc)) from exc
