"""Turn pydantic's validation errors into one readable line."""
from __future__ import annotations

from pydantic import ValidationError


def describe(exc: ValidationError) -> str:
    """``field.sub: reason; other: reason`` — short enough for one CLI line."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
