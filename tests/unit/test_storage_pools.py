"""Storage pools: where a disk lives on each host, and what a copy needs there."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ferry.hostconfig import HostConfig
from ferry.migration.models import DiskCopy
from ferry.migration.storagecopy import blockers
from ferry.models import DomainConfig
from ferry.storage import localize, parse_size


def host(tmp: Path, name: str) -> HostConfig:
    (tmp / f"{name}-local").mkdir(exist_ok=True)
    return HostConfig.model_validate({
        "name": name, "storage_dirs": [str(tmp / "shared")],
        "pools": [{"name": "local", "path": str(tmp / f"{name}-local")}]})


def domain(**disk: str) -> DomainConfig:
    return DomainConfig.model_validate({"name": "web", "memory": 64, "disks": [disk]})


def test_storage_dirs_are_shared_pools_after_the_configured_ones(tmp_path: Path) -> None:
    h = host(tmp_path, "a")
    assert [(p.name, p.shared) for p in h.storage_pools] == [("local", False),
                                                             ("storage", True)]
    with pytest.raises(ValidationError, match="two storage pools"):
        HostConfig.model_validate({"storage_dirs": [str(tmp_path)],
                                   "pools": [{"name": "storage", "path": str(tmp_path)}]})
    with pytest.raises(ValidationError, match=r"only one is allowed.*storage-2"):
        HostConfig.model_validate({"storage_dirs": [str(tmp_path), "/srv/b"]})
    with pytest.raises(ValidationError, match="invalid pool name"):
        HostConfig.model_validate({"pools": [{"name": "Bad Name", "path": "/x"}]})


def test_a_disk_is_located_in_each_hosts_own_pool(tmp_path: Path) -> None:
    a, b = host(tmp_path, "a"), host(tmp_path, "b")
    cfg = localize(domain(pool="local", image="web.qcow2"), a)
    assert cfg.disks[0].path == tmp_path / "a-local" / "web.qcow2"
    there = localize(cfg, b)  # the same definition, on another host
    assert there.disks[0].path == tmp_path / "b-local" / "web.qcow2"
    by_path = localize(domain(path=str(tmp_path / "a-local" / "sub" / "x.raw")), a)
    assert (by_path.disks[0].pool, by_path.disks[0].image) == ("local", "sub/x.raw")
    missing = localize(domain(pool="fast", image="x.qcow2"), a)
    assert missing.disks[0].path is None  # (the disk blocker names the pool)


@pytest.mark.parametrize("disk,why", [
    ({"pool": "local"}, "both 'pool' and 'image'"),
    ({"image": "x.qcow2"}, "both 'pool' and 'image'"),
    ({"pool": "local", "image": "../etc/shadow"}, "invalid image name"),
    ({"pool": "local", "image": "/abs"}, "invalid image name"),
    ({"format": "raw"}, "needs 'pool' and 'image'"),
])
def test_bad_disks_are_refused(disk: dict[str, str], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        domain(**disk)


def test_a_copy_is_refused_where_it_cannot_land(tmp_path: Path) -> None:
    b = host(tmp_path, "b")
    copy = [DiskCopy(index=0, format="qcow2", virtual_size=1 << 30, allocated=1 << 20)]
    cfg = localize(domain(pool="local", image="web.qcow2"), b)
    assert blockers(cfg, b, copy) == []
    (tmp_path / "b-local" / "web.qcow2").write_text("x")
    assert "already exists" in blockers(cfg, b, copy)[0].message
    nopool = localize(domain(pool="fast", image="web.qcow2"), b)
    assert "no storage pool 'fast'" in blockers(nopool, b, copy)[0].message
    huge = [DiskCopy(index=0, format="raw", virtual_size=60 << 40, allocated=0)]
    other = localize(domain(pool="local", image="huge.raw"), b)
    found = blockers(other, b, huge)
    assert found and found[0].code == "space" and "raw: the virtual size" in \
        found[0].message


def test_sizes() -> None:
    assert parse_size("10G") == 10 << 30 and parse_size("512M") == 512 << 20
    assert parse_size("1GiB") == 1 << 30 and parse_size("4096") == 4096
    for bad in ("lots", "0", "-1G", "100T"):
        with pytest.raises(Exception, match="invalid size"):
            parse_size(bad)


def test_an_image_name_cannot_lead_out_of_its_pool(tmp_path: Path) -> None:
    from ferry.errors import InvalidInput
    from ferry.storage import Storage
    h = host(tmp_path, "a")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "a-local" / "sub").symlink_to(outside)
    storage = Storage(h)
    pool = storage.pool("local")
    assert storage.image_path(pool, "web.qcow2") == tmp_path / "a-local" / "web.qcow2"
    with pytest.raises(InvalidInput, match="leads out of pool local"):
        storage.image_path(pool, "sub/x.qcow2")
    with pytest.raises(Exception, match="invalid size"):
        parse_size("inf")


async def test_delete_sees_an_overlay_in_another_directory(tmp_path: Path) -> None:
    """An overlay names its base relative to its own directory."""
    from ferry.errors import Conflict
    from ferry.storage import Storage
    storage = Storage(host(tmp_path, "a"))
    await storage.create("local", "base/deb.qcow2", 1 << 20)
    await storage.create("local", "web.qcow2", 1 << 20, backing="base/deb.qcow2")
    with pytest.raises(Conflict, match=r"backs web\.qcow2"):
        await storage.delete("local", "base/deb.qcow2", [])
    await storage.delete("local", "web.qcow2", [])
    await storage.delete("local", "base/deb.qcow2", [])


def test_a_cached_disk_on_a_shared_pool_refuses_a_live_migration(tmp_path: Path) -> None:
    from ferry.migration.models import CopyStorage
    from ferry.migration.storagecopy import cache_blockers
    a = host(tmp_path, "a")
    (tmp_path / "shared").mkdir()

    def found(copy: CopyStorage = CopyStorage.auto, running: bool = True, **disk: object
              ) -> list[str]:
        cfg = localize(DomainConfig.model_validate(
            {"name": "web", "memory": 64, "disks": [disk]}), a)
        return [b.code for b in cache_blockers(cfg, a, copy, running)]

    assert found(pool="storage", image="w.qcow2") == ["cache"]          # writeback
    for mode in ("writethrough", "unsafe"):
        assert found(pool="storage", image="w.qcow2", cache=mode) == ["cache"]
    for mode in ("none", "directsync"):
        assert found(pool="storage", image="w.qcow2", cache=mode) == []
    assert found(pool="storage", image="w.qcow2", readonly=True) == []
    assert found(pool="storage", image="w.qcow2", running=False) == []  # shut off
    assert found(pool="local", image="w.qcow2") == []                   # copied
    assert found(CopyStorage.none, pool="local", image="w.qcow2") == []  # its own file
    assert found(CopyStorage.all, pool="storage", image="w.qcow2") == []


def test_free_space_counts_the_top_only_and_what_other_arrivals_may_still_take(
        tmp_path: Path) -> None:
    import os

    from ferry.migration.storagecopy import need, still_to_land
    b = host(tmp_path, "b")
    st = os.statvfs(tmp_path / "b-local")
    free = st.f_bavail * st.f_frsize
    # an overlay whose base is as big as the free space: in full it can't land,
    # its top alone can
    top = DiskCopy(index=0, format="qcow2", virtual_size=1 << 40, allocated=8 << 20,
                   base="base.qcow2", base_id="0" * 64, base_allocated=free)
    cfg = localize(domain(pool="local", image="web.qcow2"), b)
    assert [x.code for x in blockers(cfg, b, [top])] == ["space"]
    assert blockers(cfg, b, [top], tops=[0]) == []
    assert need(top, True) < need(top, False)
    # another copy arriving now has promised nearly all of it
    promised = {"local": free - (4 << 20)}
    (found,) = blockers(cfg, b, [top], tops=[0], promised=promised)
    assert found.code == "space" and "promised to copies arriving now" in found.message
    # what an arriving image already holds is no longer promised
    other = localize(domain(pool="local", image="other.raw", format="raw"), b)
    raw = DiskCopy(index=0, format="raw", virtual_size=64 << 20, allocated=0)
    path = str(other.disks[0].path)
    assert still_to_land(other, [raw], [], []) == {"local": 64 << 20}
    with open(path, "wb") as f:
        f.write(os.urandom(16 << 20))
        os.fsync(f.fileno())
    left = still_to_land(other, [raw], [], [path])["local"]
    assert (64 << 20) - left >= 16 << 20


def test_a_base_image_is_hashed_once_and_a_caller_need_not_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import hashlib

    from ferry.storage import ImageIds

    base = tmp_path / "base.raw"
    base.write_bytes(b"x" * (3 << 20))

    import ferry.storage
    hashed: list[Path] = []
    real = ferry.storage._sha256

    def counting(path: Path, stop: Any) -> str:
        hashed.append(path)
        return real(path, stop)

    async def run() -> None:
        ids = ImageIds(tmp_path / "ids.json")
        assert ids.known(base) is None
        assert await ids.get(base, wait=0) is None      # not waited for: goes on
        digests = await asyncio.gather(ids.get(base), ids.get(base))
        assert hashed == [base]                         # one hash for all three asks
        digest = digests[0]
        assert digest == hashlib.sha256(base.read_bytes()).hexdigest()
        assert ImageIds(tmp_path / "ids.json").known(base) == digest  # cached on disk
        base.write_bytes(b"y" * (1 << 20))               # changed: no longer known
        assert ids.known(base) is None
        assert await ids.get(base) == hashlib.sha256(b"y" * (1 << 20)).hexdigest()
        assert hashed == [base, base]
        await ids.close()

    monkeypatch.setattr(ferry.storage, "_sha256", counting)
    asyncio.run(run())


def test_the_copies_arriving_now_hold_their_room(tmp_path: Path) -> None:
    """Two arrivals promise what their copies may still take, by pool; a third
    copy is measured against the free space less those promises."""
    from types import SimpleNamespace

    from ferry.migration.destination import RelocationService
    from ferry.migration.models import DestinationFacts
    b = host(tmp_path, "b")
    raw = DiskCopy(index=0, format="raw", virtual_size=64 << 20, allocated=0)

    def arriving(image: str) -> SimpleNamespace:
        cfg = localize(domain(pool="local", image=image, format="raw"), b)
        return SimpleNamespace(facts=DestinationFacts(config=cfg, copies=[raw]))

    svc = SimpleNamespace(incoming={"j1": arriving("one.raw"), "j2": arriving("two.raw"),
                                    "j3": SimpleNamespace(facts=DestinationFacts())})
    promised = RelocationService._promised(svc)  # type: ignore[arg-type]
    assert promised == {"local": 128 << 20}


def test_the_wait_for_base_identities_bounds_the_whole_call(tmp_path: Path) -> None:
    """Two copies whose bases are not hashed yet: the second is given only what is
    left of the one wait, not a wait of its own; neither is top-only this time."""
    import asyncio

    from ferry.migration.storagecopy import top_only
    b = host(tmp_path, "b")
    waits: list[float | None] = []

    class Slow:
        async def get(self, path: Path, wait: float | None = None) -> str | None:
            waits.append(wait)
            await asyncio.sleep(wait or 0)
            return None

        def warm(self, path: Path) -> None:
            raise AssertionError("the source sent identities")

    cfg = localize(DomainConfig.model_validate({"name": "web", "memory": 64, "disks": [
        {"pool": "local", "image": "a.qcow2"}, {"pool": "local", "image": "b.qcow2"}]}), b)
    (tmp_path / "b-local" / "base.qcow2").write_bytes(b"base")
    copies = [DiskCopy(index=i, format="qcow2", virtual_size=1 << 20, allocated=0,
                       base="base.qcow2", base_id="0" * 64) for i in (0, 1)]
    tops, pending = asyncio.run(top_only(cfg, b, copies, Slow(), 0.2))  # type: ignore[arg-type]
    assert tops == [] and pending == [0, 1]
    assert waits[0] is not None and waits[0] > 0.15
    assert waits[1] is not None and waits[1] < 0.05
