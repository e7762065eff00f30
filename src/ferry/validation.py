"""Turn pydantic's validation errors into one readable line."""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError


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
