"""ferryd's own configuration: one TOML file (``ferryd --config``).

Example (every key optional)::

    name = "host-a"                     # default: the machine's host name
    state_dir = "/var/lib/ferry"        # all of this host's state lives here
    socket = "/run/ferry/ferryd.sock"   # default: <state_dir>/ferryd.sock
    accel = "auto"                      # auto | kvm | tcg
    qemu = "qemu-system-x86_64"
    memory_reserve = 512                # MiB kept back for the host itself
    shutdown_timeout = 60               # s before an ACPI shutdown becomes destroy
"""
from __future__ import annotations

import socket
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ferry.errors import InvalidInput
from ferry.models import AbsPath, Accel, check_name
from ferry.validation import describe


class HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    state_dir: AbsPath = Path("/var/lib/ferry")
    socket: AbsPath | None = None
    accel: Accel = Accel.auto
    qemu: str = "qemu-system-x86_64"
    memory_reserve: int = Field(default=512, ge=0)
    shutdown_timeout: float = Field(default=60.0, ge=0, le=3600)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / "ferryd.sock"


def load_host_config(path: Path | None, **overrides: object) -> HostConfig:
    """Read ferryd's TOML config; ``overrides`` (from the command line) win.

    Raises InvalidInput with a readable reason for malformed TOML or bad keys."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise InvalidInput(f"cannot read config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"malformed TOML in {path}: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return HostConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"bad config {path}: {describe(exc)}") from exc
