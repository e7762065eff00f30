"""Ferry: run QEMU domains on a set of hosts and move them between hosts.

The public API is what this package root exports: ``__version__``, the errors
(``ferry.errors``), the models (``ferry.models``) and ``FerryClient``, the async
client of a ferryd. Everything else is internal and may change.

``FerryClient`` is imported on first use, so that ``import ferry.models`` (what
a config checker or another daemon's validation needs) does not load aiohttp.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ferry.errors import (
    Aborted,
    Busy,
    Conflict,
    Failed,
    FerryError,
    Forbidden,
    InsufficientResources,
    InvalidInput,
    NotFound,
    QemuError,
    Refused,
    Unreachable,
)
from ferry.models import (
    Accel,
    DefineRequest,
    Disk,
    DiskBus,
    DiskFormat,
    DomainConfig,
    DomainInfo,
    DomainState,
    HostInfo,
    Nic,
    NicMode,
    NicModel,
    ShutdownRequest,
)

if TYPE_CHECKING:
    from ferry.client import FerryClient

# pyproject.toml's version, for a source tree that is not installed (PYTHONPATH=src);
# tests/unit/test_version.py keeps the two equal
PYPROJECT_VERSION = "0.1.0"

try:
    __version__ = version("ferry")
except PackageNotFoundError:
    __version__ = PYPROJECT_VERSION

__all__ = [
    "Aborted", "Accel", "Busy", "Conflict", "DefineRequest", "Disk", "DiskBus", "DiskFormat",
    "DomainConfig", "DomainInfo", "DomainState", "Failed", "FerryClient", "FerryError",
    "Forbidden", "HostInfo", "InsufficientResources", "InvalidInput", "Nic", "NicMode",
    "NicModel", "NotFound", "QemuError", "Refused", "ShutdownRequest", "Unreachable",
    "__version__",
]

if not TYPE_CHECKING:  # mypy sees the import above; a visible __getattr__ would hide typos
    def __getattr__(name: str) -> Any:
        if name == "FerryClient":
            from ferry.client import FerryClient
            return FerryClient
        raise AttributeError(f"module 'ferry' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(globals()) | {"FerryClient"})
