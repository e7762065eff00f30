"""Storage pools: where a disk lives on each host, and what a copy needs there."""
from __future__ import annotations

from pathlib import Path

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
