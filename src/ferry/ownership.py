"""Who owns each domain across the cluster: the small interface the services
use (the backends, embedded and etcd, are in ``ferry.fleet.registry``).

- ``claim``: a new domain (define, create, restore) takes its name and UUID;
  Conflict if another host owns either, RegistryUnavailable if the registry
  cannot say. True if this call took them (False: this host had them already).
- ``release``: the domain (that name with that UUID) leaves the cluster
  (undefine, save to a file).
- ``owner``: the host the registry names for a domain (None: nobody).
- ``lock`` / ``unlock``: held by the source for a whole migration job (etcd: a
  key on a lease that expires if the source's ferryd dies).
- ``commit``: the migration's commit point: the owner becomes ``dest`` only if
  ``source`` still owns the domain and still holds the job's lock. Run by the
  destination just before the guest runs there (and by the source just before
  a switch to post-copy). Failed if refused; Failed with ``outcome="unknown"``
  if the registry did not answer (it may have been applied).
- ``give_back``: the guest does not run on ``dest`` after all: the owner is
  ``source`` again, if the registry still names ``dest``.
"""
from __future__ import annotations

from typing import Protocol

from ferry.errors import RegistryUnavailable

__all__ = ["LocalOnly", "Owners", "RegistryUnavailable"]


class Owners(Protocol):
    backend: str

    async def claim(self, name: str, uuid: str) -> bool: ...

    async def release(self, name: str, uuid: str) -> None: ...

    async def owner(self, name: str) -> str | None: ...

    async def lock(self, name: str, uuid: str, job_id: str) -> None: ...

    async def unlock(self, name: str, job_id: str) -> None: ...

    async def commit(self, name: str, uuid: str, source: str, dest: str,
                     job_id: str) -> None: ...

    async def give_back(self, name: str, uuid: str, source: str, dest: str) -> None: ...


class LocalOnly:
    """No registry: each host answers for itself (until the daemon sets the
    configured one, and in the fault tier)."""

    backend = "local"

    def __init__(self, host: str) -> None:
        self.host = host

    async def claim(self, name: str, uuid: str) -> bool:
        return False

    async def release(self, name: str, uuid: str) -> None:
        return None

    async def owner(self, name: str) -> str | None:
        return None

    async def lock(self, name: str, uuid: str, job_id: str) -> None:
        return None

    async def unlock(self, name: str, job_id: str) -> None:
        return None

    async def commit(self, name: str, uuid: str, source: str, dest: str,
                     job_id: str) -> None:
        return None

    async def give_back(self, name: str, uuid: str, source: str, dest: str) -> None:
        return None
