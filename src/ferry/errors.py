"""Ferry's exceptions.

Two kinds of failure, so that an error says whether anything changed::

    FerryError                      root: every error Ferry raises on purpose
     ├── Refused                    nothing changed; safe to fix and retry
     │    ├── InvalidInput          a name, path, size or enum is wrong
     │    ├── NotFound              no such domain (or other object)
     │    ├── Forbidden             the caller's certificate does not allow it
     │    ├── Conflict              duplicate name/UUID, wrong state for the action
     │    ├── Busy                  another operation holds the object
     │    ├── InsufficientResources not enough memory (or other resource) free
     │    └── RegistryUnavailable   the cluster registry (etcd) does not answer
     ├── Failed                     execution went wrong; undo ran (or is needed)
     │    ├── QemuError             QEMU failed to start or to answer
     │    └── Aborted               stopped on purpose (operator, policy); undo ran
     └── Unreachable                no answer from a ferryd (connect, TLS, timeout,
                                    connection lost): whether it acted is unknown

Every error carries a machine-readable ``code``, a one-line ``message`` and
``details``; daemons and the CLI exchange them as structured JSON
(``to_json``/``from_json``), never as strings to parse.
"""
from __future__ import annotations

from typing import Any, ClassVar


class FerryError(Exception):
    """Root of Ferry's errors."""

    code: ClassVar[str] = "error"
    kind: ClassVar[str] = "failed"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "kind": self.kind, "message": self.message,
                "details": self.details}

    @staticmethod
    def from_json(data: dict[str, Any]) -> FerryError:
        cls = _BY_CODE.get(str(data.get("code")), FerryError)
        err = cls(str(data.get("message", "unknown error")), **(data.get("details") or {}))
        return err


class Refused(FerryError):
    """The request was refused before anything changed."""

    code = "refused"
    kind = "refused"
    http_status = 400


class InvalidInput(Refused):
    code = "invalid"
    http_status = 400


class NotFound(Refused):
    code = "not_found"
    http_status = 404


class Forbidden(Refused):
    """The caller's certificate does not allow this (a host certificate on the
    management API, an operator certificate on the relocation API, ...)."""

    code = "forbidden"
    http_status = 403


class Conflict(Refused):
    code = "conflict"
    http_status = 409


class Busy(Refused):
    code = "busy"
    http_status = 409


class InsufficientResources(Refused):
    code = "insufficient_resources"
    http_status = 409


class Failed(FerryError):
    """Something went wrong while changing the host; the undo has run."""

    code = "failed"
    http_status = 500


class QemuError(Failed):
    """QEMU failed: carries argv, exit code and QEMU's own stderr in details."""

    code = "qemu_failed"
    http_status = 500


class Aborted(Failed):
    """A job stopped on purpose (the operator, the timeout policy, the peer) and
    undone."""

    code = "aborted"
    http_status = 409


class Unreachable(FerryError):
    """A ferryd could not be reached or did not answer in time. Unlike a peer's
    own error, this says nothing about what the peer did: callers that must know
    ask again."""

    code = "unreachable"
    http_status = 502


class RegistryUnavailable(Refused):
    """The cluster registry (etcd) does not answer: defines and migrations are
    refused (nothing changed); running domains are not touched."""

    code = "registry_unavailable"
    http_status = 503


_BY_CODE: dict[str, type[FerryError]] = {
    c.code: c for c in (FerryError, Refused, InvalidInput, NotFound, Forbidden, Conflict, Busy,
                        InsufficientResources, Failed, QemuError, Aborted, Unreachable,
                        RegistryUnavailable)
}
