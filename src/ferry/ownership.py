"""Who owns each domain across the cluster: the small interface the services
use (the backends, embedded and etcd, are in ``ferry.fleet.registry``).

- ``claim``: a new domain (define, create, restore) takes its name and UUID;
  Conflict if another host owns either, RegistryUnavailable if the registry
  cannot say.
- ``release``: the domain leaves the cluster (undefine, save to a file).
- ``owner``: the host the registry names for a domain (None: nobody).
- ``lock`` / ``unlock``: held by the source for a whole migration job (etcd: a
  key on a lease that expires if the source's ferryd dies).
- ``commit``: the migration's commit point, run by the destination just
  before the guest runs there: the owner becomes the destination only if the
  source still owns it and still holds the job's lock. If that fails the
  destination never resumes the guest, and the source keeps it;
  ``uncommit`` gives it back if the guest then fails to run there.
"""
from __future__ import annotations

from typing import Protocol

from ferry.errors import Refused


class RegistryUnavailable(Refused):
    """The registry does not answer: defines and migrations are refused (nothing
    changed); running domains are not touched."""

    code = "registry_unavailable"
    http_status = 503


class Owners(Protocol):
    backend: str

    async def claim(self, name: str, uuid: str) -> None: ...

    async def release(self, name: str) -> None: ...

    async def owner(self, name: str) -> str | None: ...

    async def lock(self, name: str, uuid: str, job_id: str) -> None: ...

    async def unlock(self, name: str, job_id: str) -> None: ...

    async def commit(self, name: str, uuid: str, source: str, job_id: str) -> None: ...

    async def uncommit(self, name: str, uuid: str, source: str, job_id: str) -> None: ...


class LocalOnly:
    """No registry: each host answers for itself (a host with no peers, and the
    fault tier)."""

    backend = "local"

    def __init__(self, host: str) -> None:
        self.host = host

    async def claim(self, name: str, uuid: str) -> None:
        return None

    async def release(self, name: str) -> None:
        return None

    async def owner(self, name: str) -> str | None:
        return None

    async def lock(self, name: str, uuid: str, job_id: str) -> None:
        return None

    async def unlock(self, name: str, job_id: str) -> None:
        return None

    async def commit(self, name: str, uuid: str, source: str, job_id: str) -> None:
        return None

    async def uncommit(self, name: str, uuid: str, source: str, job_id: str) -> None:
        return None
