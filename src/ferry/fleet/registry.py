"""The cluster's record of which host owns each domain (``ferry.ownership``'s
interface), with two backends:

- **embedded** (the default, nothing to install): each host's SQLite is the
  record of its own domains; a new name or UUID is checked against every peer
  that answers (the cluster view). A peer that does not answer cannot be
  asked: the define goes ahead and the log says which peer was not asked.
  The migration lock is the domain's own hold on its source host, and the
  commit point is the protocol's Finish.
- **etcd** (``[cluster] backend = "etcd"``): a key per domain naming its owner
  (``PREFIX/domains/NAME``: host and UUID) and one per UUID; the migration lock
  is a key on a lease of the source's ferryd, so it expires when that ferryd
  dies; the commit point is one transaction, run by the destination just
  before the guest runs there, that makes it the owner only if the source
  still owns the domain and still holds the job's lock. With etcd away,
  defines and migrations are refused (RegistryUnavailable); running domains
  are not touched.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ferry.domains import DomainService
from ferry.errors import Busy, Conflict, Failed
from ferry.fleet.cluster import ClusterView
from ferry.hostconfig import ClusterSettings, HostConfig
from ferry.ownership import Owners, RegistryUnavailable

log = logging.getLogger(__name__)

# (host, name, uuid) of every domain on the peers that answered; the peers that did not
PeerDomains = Callable[[], Awaitable[tuple[list[tuple[str, str, str]], list[str]]]]


class EmbeddedRegistry:
    backend = "embedded"

    def __init__(self, host: str, local: Callable[[], list[tuple[str, str]]],
                 peers: PeerDomains) -> None:
        self.host = host
        self.local = local
        self.peers = peers

    async def claim(self, name: str, uuid: str) -> bool:
        others, missing = await self.peers()
        taken = [f"domain {name} is defined on host {h}" for h, n, _ in others if n == name]
        taken += [f"UUID {uuid} is domain {n} on host {h}" for h, n, u in others
                  if u == uuid and n != name]
        if taken:
            raise Conflict("; ".join(taken) + " (names and UUIDs are unique across the "
                           "cluster)", domain=name)
        if missing:
            log.warning("domain %s: peers %s did not answer, so they were not asked "
                        "whether they have its name or UUID", name, ", ".join(missing))
        return False   # (this host's database is the record: nothing taken here)

    async def release(self, name: str, uuid: str) -> None:
        return None

    async def owner(self, name: str) -> str | None:
        if any(n == name for n, _ in self.local()):
            return self.host
        others, _ = await self.peers()
        return next((h for h, n, _ in others if n == name), None)

    async def lock(self, name: str, uuid: str, job_id: str) -> None:
        return None   # (the source's hold on the domain is the lock)

    async def unlock(self, name: str, job_id: str) -> None:
        return None

    async def commit(self, name: str, uuid: str, source: str, dest: str,
                     job_id: str) -> None:
        return None   # (Finish is the commit point)

    async def give_back(self, name: str, uuid: str, source: str, dest: str) -> None:
        return None

    async def close(self) -> None:
        return None


def _value(**fields: str) -> bytes:
    """A key's value, the same bytes every time (transactions compare bytes)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _read(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class EtcdRegistry:
    backend = "etcd"

    def __init__(self, host: str, settings: ClusterSettings) -> None:
        self.host = host
        self.settings = settings
        self.prefix = settings.prefix.rstrip("/")
        self._clients: dict[str, Any] = {}           # endpoint -> its client
        self._current = 0                            # the endpoint asked first
        self._closed = False
        self._leases: dict[str, Any] = {}            # job id -> its lease
        self._keepers: dict[str, asyncio.Task[None]] = {}

    # -- keys -------------------------------------------------------------------------
    def _dkey(self, name: str) -> bytes:
        return f"{self.prefix}/domains/{name}".encode()

    def _ukey(self, uuid: str) -> bytes:
        return f"{self.prefix}/uuids/{uuid}".encode()

    def _lkey(self, name: str) -> bytes:
        return f"{self.prefix}/locks/{name}".encode()

    # -- the connection ---------------------------------------------------------------
    def _client(self, endpoint: str) -> Any:
        if self._closed:
            raise RegistryUnavailable("ferryd is stopping: the registry is closed",
                                      host=self.host)
        if endpoint not in self._clients:
            self._clients[endpoint] = etcd_client(self.settings, endpoint)
        return self._clients[endpoint]

    def client(self) -> Any:
        return self._client(self.settings.endpoints[self._current])

    async def close(self) -> None:
        self._closed = True
        for task in self._keepers.values():
            task.cancel()
        await asyncio.gather(*self._keepers.values(), return_exceptions=True)
        self._keepers.clear()
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        self._clients.clear()

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """One etcd call, on the endpoint that answered last, else on the next ones
        in turn, each within ``timeout_s``; RegistryUnavailable if none answers."""
        endpoints = self.settings.endpoints
        errors: list[tuple[str, BaseException]] = []
        for i in range(len(endpoints)):
            at = (self._current + i) % len(endpoints)
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    out = await fn(self._client(endpoints[at]))
                self._current = at
                return out
            except RegistryUnavailable:
                raise
            except (TimeoutError, OSError) as exc:
                errors.append((endpoints[at], exc))
            except Exception as exc:  # aetcd's and gRPC's own errors
                if not type(exc).__module__.startswith(("aetcd", "grpc")):
                    raise
                errors.append((endpoints[at], exc))
        why = "; ".join(f"{e}: {type(x).__name__}{' ' + str(x) if str(x) else ''}"
                        for e, x in errors)
        raise RegistryUnavailable(
            f"the cluster registry (etcd at {', '.join(endpoints)}) does not answer "
            f"({why}), so {what} is refused; running domains are not touched",
            host=self.host)

    async def _get(self, key: bytes) -> bytes | None:
        got = await self._call("reading the registry", lambda c: c.get(key))
        return None if got is None else bytes(got.value)

    # -- the interface ----------------------------------------------------------------
    async def claim(self, name: str, uuid: str) -> bool:
        dkey, ukey = self._dkey(name), self._ukey(uuid)
        mine = _value(host=self.host, uuid=uuid)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.version(dkey) == 0, t.version(ukey) == 0],
                success=[t.put(dkey, mine), t.put(ukey, name.encode())],
                failure=[t.get(dkey), t.get(ukey)])

        ok, _ = await self._call(f"defining domain {name}", txn)
        if ok:
            return True
        owner, by_uuid = _read(await self._get(dkey)), await self._get(ukey)
        if owner.get("host") == self.host and owner.get("uuid") == uuid and \
                by_uuid in (None, name.encode()):
            if by_uuid is None:  # (half of an older claim: complete it)
                await self._call(f"defining domain {name}",
                                 lambda c: c.put(ukey, name.encode()))
            return False
        taken = []
        if owner:
            taken.append(f"domain {name} is owned by host {owner.get('host')}")
        if by_uuid is not None and by_uuid != name.encode():
            taken.append(f"UUID {uuid} is domain {by_uuid.decode(errors='replace')}")
        raise Conflict("; ".join(taken or [f"domain {name} changed meanwhile"])
                       + " (the cluster registry, etcd)", domain=name)

    async def release(self, name: str, uuid: str) -> None:
        """Remove the domain's keys if they name this host and ``uuid``."""
        dkey, ukey = self._dkey(name), self._ukey(uuid)
        mine = _value(host=self.host, uuid=uuid)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(compare=[t.value(dkey) == mine],
                                       success=[t.delete(dkey), t.delete(ukey)], failure=[])

        await self._call(f"removing domain {name}", txn)

    async def owner(self, name: str) -> str | None:
        owner = _read(await self._get(self._dkey(name)))
        host = owner.get("host")
        return str(host) if host else None

    async def lock(self, name: str, uuid: str, job_id: str) -> None:
        """The job's lock on the domain, on a lease this ferryd keeps alive. A lock
        of this host's that no job of this ferryd holds (it is being released, or
        an earlier ferryd held it) is taken over."""
        dkey, lkey = self._dkey(name), self._lkey(name)
        what = f"migrating domain {name}"
        if await self.owner(name) is None:   # (defined before the registry was)
            await self.claim(name, uuid)
        lease = await self._call(what, lambda c: c.lease(self.settings.lock_ttl_s))
        mine = _value(host=self.host, uuid=uuid)
        held = _value(host=self.host, job=job_id)

        async def txn(c: Any, free: Any) -> Any:
            t = c.transactions
            return await c.transaction(compare=[t.value(dkey) == mine, free(t)],
                                       success=[t.put(lkey, held, lease)], failure=[])

        try:
            ok, _ = await self._call(what, lambda c: txn(c, lambda t: t.version(lkey) == 0))
            if not ok:
                old = await self._get(lkey)
                locked = _read(old)
                if old is not None and locked.get("host") == self.host and \
                        locked.get("job") not in self._leases:
                    ok, _ = await self._call(what, lambda c: txn(
                        c, lambda t: t.value(lkey) == old))
        except BaseException:
            await self._revoke(lease)
            raise
        if not ok:
            await self._revoke(lease)
            owner, locked = _read(await self._get(dkey)), _read(await self._get(lkey))
            if owner.get("host") != self.host:
                raise Conflict(f"the cluster registry says domain {name} is owned by host "
                               f"{owner.get('host') or 'nobody'}, not {self.host}",
                               domain=name)
            raise Busy(f"domain {name} is locked in the cluster registry by migration "
                       f"{locked.get('job')} of host {locked.get('host')}", domain=name)
        self._leases[job_id] = lease
        self._keepers[job_id] = asyncio.create_task(self._keep(job_id, lease))

    async def _keep(self, job_id: str, lease: Any) -> None:
        """Refresh the lease a few times per TTL while the job runs; if etcd stays
        away longer than the TTL, the lock expires (and the commit then fails)."""
        every = max(0.5, self.settings.lock_ttl_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self._call("keeping a migration's lock",
                                 lambda c: c.refresh_lease(lease.id))
            except RegistryUnavailable as exc:  # keep trying: the TTL decides
                log.warning("job %s: refreshing the lock's lease: %s", job_id, exc.message)

    async def _revoke(self, lease: Any) -> None:
        try:
            await self._call("releasing a lock", lambda c: c.revoke_lease(lease.id))
        except RegistryUnavailable as exc:  # it expires by itself
            log.warning("revoking lease %s: %s", getattr(lease, "id", "?"), exc.message)

    async def unlock(self, name: str, job_id: str) -> None:
        keeper = self._keepers.pop(job_id, None)
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        lease = self._leases.pop(job_id, None)   # (a new job may take the lock over now)
        if lease is not None:
            await self._revoke(lease)

    async def commit(self, name: str, uuid: str, source: str, dest: str,
                     job_id: str) -> None:
        """``dest`` owns the domain from here on, if ``source`` still owns it and
        still holds this job's lock (or ``dest`` already does, by this job)."""
        dkey, lkey = self._dkey(name), self._lkey(name)
        theirs = _value(host=source, uuid=uuid)
        held = _value(host=source, job=job_id)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.value(dkey) == theirs, t.value(lkey) == held],
                success=[t.put(dkey, _value(host=dest, uuid=uuid))], failure=[])

        what = f"committing the migration of {name}"
        try:
            ok, _ = await self._call(what, txn)
            if ok:
                log.info("job %s: the registry names host %s the owner of %s", job_id, dest,
                         name)
                return
            owner, locked = _read(await self._get(dkey)), _read(await self._get(lkey))
        except RegistryUnavailable as exc:
            raise Failed(exc.message, host=self.host, outcome="unknown") from exc
        if owner.get("host") == dest and owner.get("uuid") == uuid and \
                locked.get("job") == job_id:
            return   # (committed by this job already)
        why = (f"the registry says host {owner.get('host')} owns it"
               if owner.get("host") != source else
               f"source {source} no longer holds the job's lock (its lease expired: its "
               "ferryd stopped or lost etcd)" if locked.get("job") != job_id else
               "the registry changed meanwhile")
        raise Failed(f"commit of the migration of {name} refused by the cluster registry: "
                     f"{why}", host=self.host, outcome="refused")

    async def give_back(self, name: str, uuid: str, source: str, dest: str) -> None:
        """The guest does not run on ``dest``: ``source`` owns it again, if the
        registry still names ``dest`` (RegistryUnavailable: try again later)."""
        dkey = self._dkey(name)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.value(dkey) == _value(host=dest, uuid=uuid)],
                success=[t.put(dkey, _value(host=source, uuid=uuid))], failure=[])

        ok, _ = await self._call(f"giving {name} back to {source}", txn)
        if ok:
            log.info("the registry names host %s the owner of %s again", source, name)


class Registry(Owners, Protocol):
    """An ``Owners`` the daemon closes when it stops."""

    async def close(self) -> None: ...


def make_registry(cfg: HostConfig, svc: DomainService, cluster: ClusterView) -> Registry:
    """The backend ``[cluster]`` names."""
    if cfg.cluster.backend == "etcd":
        return EtcdRegistry(cfg.name, cfg.cluster)

    async def peers() -> tuple[list[tuple[str, str, str]], list[str]]:
        views, missing = await cluster.domains()
        return ([(v.host, v.domain.name, v.domain.uuid) for v in views
                 if v.host != cfg.name], [m.name for m in missing])

    return EmbeddedRegistry(cfg.name, lambda: [(d.name, str(d.config.uuid))
                                               for d in svc.domains.values()], peers)


def etcd_client(settings: ClusterSettings, endpoint: str) -> Any:
    """An aetcd client for one endpoint, over TLS when ``ca`` is set (each member's
    certificate must name its own address). aetcd 1.0 opens plaintext channels
    only, so the TLS channel is made here with gRPC's own credentials; the stubs
    are aetcd's."""
    import aetcd
    from aetcd import rpc, watcher

    host, port = endpoint.rsplit(":", 1)

    class Client(aetcd.Client):  # type: ignore[misc]
        async def connect(self) -> None:
            if self._connected.is_set() or settings.ca is None:
                await super().connect()
                return
            import grpc
            creds = grpc.ssl_channel_credentials(
                root_certificates=settings.ca.read_bytes(),
                private_key=settings.key.read_bytes() if settings.key else None,
                certificate_chain=settings.cert.read_bytes() if settings.cert else None)
            self.channel = rpc.secure_channel(endpoint, creds, options=self._options.items())
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel),
                                            timeout=self._timeout, metadata=self.metadata)
            self._connected.set()

    return Client(host=host, port=int(port), timeout=max(1, int(settings.timeout_s)))
