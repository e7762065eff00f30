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
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ferry.domains import DomainService
from ferry.errors import Busy, Conflict, Failed
from ferry.fleet.cluster import ClusterView
from ferry.hostconfig import ClusterSettings, HostConfig
from ferry.ownership import RegistryUnavailable

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

    async def claim(self, name: str, uuid: str) -> None:
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

    async def release(self, name: str) -> None:
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

    async def commit(self, name: str, uuid: str, source: str, job_id: str) -> None:
        return None   # (Finish is the commit point)

    async def uncommit(self, name: str, uuid: str, source: str, job_id: str) -> None:
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
        self._client: Any = None
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
    def client(self) -> Any:
        if self._client is None:
            self._client = etcd_client(self.settings)
        return self._client

    async def close(self) -> None:
        for task in self._keepers.values():
            task.cancel()
        await asyncio.gather(*self._keepers.values(), return_exceptions=True)
        self._keepers.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """One etcd call within the configured time; RegistryUnavailable if etcd
        does not answer."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await fn(self.client())
        except (TimeoutError, OSError) as exc:
            raise self._unavailable(what, exc) from exc
        except Exception as exc:  # aetcd's and gRPC's own errors
            if type(exc).__module__.startswith(("aetcd", "grpc")):
                raise self._unavailable(what, exc) from exc
            raise

    def _unavailable(self, what: str, exc: BaseException) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"the cluster registry (etcd at {', '.join(self.settings.endpoints)}) does not "
            f"answer ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''}), so "
            f"{what} is refused; running domains are not touched", host=self.host)

    async def _get(self, key: bytes) -> bytes | None:
        got = await self._call("reading the registry", lambda c: c.get(key))
        return None if got is None else bytes(got.value)

    # -- the interface ----------------------------------------------------------------
    async def claim(self, name: str, uuid: str) -> None:
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
            return
        owner, by_uuid = _read(await self._get(dkey)), await self._get(ukey)
        if owner.get("host") == self.host and owner.get("uuid") == uuid and \
                by_uuid in (None, name.encode()):
            if by_uuid is None:  # (half of an older claim: complete it)
                await self._call(f"defining domain {name}",
                                 lambda c: c.put(ukey, name.encode()))
            return
        taken = []
        if owner:
            taken.append(f"domain {name} is owned by host {owner.get('host')}")
        if by_uuid is not None and by_uuid != name.encode():
            taken.append(f"UUID {uuid} is domain {by_uuid.decode(errors='replace')}")
        raise Conflict("; ".join(taken or [f"domain {name} changed meanwhile"])
                       + " (the cluster registry, etcd)", domain=name)

    async def release(self, name: str) -> None:
        dkey = self._dkey(name)
        owner = _read(await self._get(dkey))
        if owner.get("host") != self.host:
            return   # (not ours: nothing of ours to remove)
        ukey = self._ukey(str(owner.get("uuid")))
        mine = _value(host=self.host, uuid=str(owner.get("uuid")))

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
        """The job's lock on the domain, on a lease this ferryd keeps alive."""
        dkey, lkey = self._dkey(name), self._lkey(name)
        what = f"migrating domain {name}"
        if await self.owner(name) is None:   # (defined before the registry was)
            await self.claim(name, uuid)
        lease = await self._call(what, lambda c: c.lease(self.settings.lock_ttl_s))
        mine = _value(host=self.host, uuid=uuid)
        held = _value(host=self.host, job=job_id)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.value(dkey) == mine, t.version(lkey) == 0],
                success=[t.put(lkey, held, lease)], failure=[t.get(dkey), t.get(lkey)])

        try:
            ok, _ = await self._call(what, txn)
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
                async with asyncio.timeout(every):
                    await self.client().refresh_lease(lease.id)
            except Exception as exc:  # keep trying: the TTL decides
                log.warning("job %s: refreshing the lock's lease: %r", job_id, exc)

    async def _revoke(self, lease: Any) -> None:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await self.client().revoke_lease(lease.id)
        except Exception as exc:  # it expires by itself
            log.warning("revoking lease %s: %r", getattr(lease, "id", "?"), exc)

    async def unlock(self, name: str, job_id: str) -> None:
        keeper = self._keepers.pop(job_id, None)
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        lease = self._leases.pop(job_id, None)
        if lease is not None:
            await self._revoke(lease)

    async def commit(self, name: str, uuid: str, source: str, job_id: str) -> None:
        """Run by the destination: it owns the domain from here on, if the source
        still owns it and still holds this job's lock; Failed (nothing changed)
        otherwise."""
        dkey, lkey = self._dkey(name), self._lkey(name)
        theirs = _value(host=source, uuid=uuid)
        held = _value(host=source, job=job_id)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.value(dkey) == theirs, t.value(lkey) == held],
                success=[t.put(dkey, _value(host=self.host, uuid=uuid))],
                failure=[])

        try:
            ok, _ = await self._call(f"committing the migration of {name}", txn)
        except RegistryUnavailable as exc:
            raise Failed(exc.message, host=self.host, phase="finish") from exc
        if ok:
            log.info("job %s: the registry names host %s the owner of %s", job_id, self.host,
                     name)
            return
        owner, locked = _read(await self._get(dkey)), _read(await self._get(lkey))
        why = (f"the registry says host {owner.get('host')} owns it"
               if owner.get("host") != source else
               f"source {source} no longer holds the job's lock (its lease expired: its "
               "ferryd stopped or lost etcd)" if locked.get("job") != job_id else
               "the registry changed meanwhile")
        raise Failed(f"commit of the migration of {name} refused by the cluster registry: "
                     f"{why}; the guest does not run here", host=self.host, phase="finish")


    async def uncommit(self, name: str, uuid: str, source: str, job_id: str) -> None:
        """The destination committed but the guest could not run here: the source
        owns it again (only if this host still does and the lock is unchanged)."""
        dkey, lkey = self._dkey(name), self._lkey(name)

        async def txn(c: Any) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.value(dkey) == _value(host=self.host, uuid=uuid),
                         t.value(lkey) == _value(host=source, job=job_id)],
                success=[t.put(dkey, _value(host=source, uuid=uuid))], failure=[])

        ok, _ = await self._call(f"giving {name} back to {source}", txn)
        if not ok:
            log.error("job %s: could not give %s back to %s in the registry", job_id, name,
                      source)


class Registry(Protocol):
    """An ``Owners`` the daemon closes when it stops."""

    backend: str

    async def claim(self, name: str, uuid: str) -> None: ...

    async def release(self, name: str) -> None: ...

    async def owner(self, name: str) -> str | None: ...

    async def lock(self, name: str, uuid: str, job_id: str) -> None: ...

    async def unlock(self, name: str, job_id: str) -> None: ...

    async def commit(self, name: str, uuid: str, source: str, job_id: str) -> None: ...

    async def uncommit(self, name: str, uuid: str, source: str, job_id: str) -> None: ...

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


def etcd_client(settings: ClusterSettings) -> Any:
    """An aetcd client for ``settings.endpoints``, over TLS when ``ca`` is set.

    aetcd 1.0 opens plaintext channels only, so the TLS channel is made here
    with gRPC's own credentials; the stubs are aetcd's. Several endpoints: gRPC
    tries them in order (its ``ipv4:`` target lists them)."""
    import aetcd
    from aetcd import rpc, watcher

    hosts = [e.rsplit(":", 1) for e in settings.endpoints]
    first = hosts[0]

    class Client(aetcd.Client):  # type: ignore[misc]
        async def connect(self) -> None:
            if self._connected.is_set():
                return
            if settings.ca is None and len(hosts) == 1:
                await super().connect()
                return
            import grpc
            target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
            if settings.ca is None:
                self.channel = rpc.insecure_channel(target, options=self._options.items())
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=settings.ca.read_bytes(),
                    private_key=settings.key.read_bytes() if settings.key else None,
                    certificate_chain=settings.cert.read_bytes() if settings.cert else None)
                self.channel = rpc.secure_channel(target, creds,
                                                  options=self._options.items())
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel),
                                            timeout=self._timeout, metadata=self.metadata)
            self._connected.set()

    return Client(host=first[0], port=int(first[1]),
                  timeout=max(1, int(settings.timeout_s)))
