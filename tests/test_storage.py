"""Storage pools and live storage migration between real ferryd hosts: a guest
that keeps writing checksummed blocks to its disk moves with the disk, and
checks every block it wrote, on each host and from outside at the end."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Host,
    LoopbackCapture,
    Probe,
    disk_check,
    free_port,
    guest_config,
    image_holds_writes,
    wait_for,
)

pytestmark = pytest.mark.qemu
ADDRS = {"ma": "127.0.0.1", "mb": "127.0.0.2"}
REGION_MIB = 16   # the part of the disk the guest writes, cyclically


class Pair:
    """Two hosts, each with its own local pool (different paths) and the work
    dir as the shared pool "storage"; ma also has a local pool "scratch" that mb
    lacks."""

    def __init__(self, root: Path) -> None:
        ports = {n: free_port(socket.SOCK_STREAM, a) for n, a in ADDRS.items()}
        self.local = {n: root / f"{n}-local" for n in ADDRS}
        self.scratch = root / "ma-scratch"
        for d in (*self.local.values(), self.scratch):
            d.mkdir(exist_ok=True)
        self.hosts = {
            n: Host(root, n, a, control_port=ports[n], storage_dirs=[str(root)],
                    pools=[{"name": "local", "path": str(self.local[n])},
                           *([{"name": "scratch", "path": str(self.scratch)}]
                             if n == "ma" else [])],
                    peers={p: f"{ADDRS[p]}:{ports[p]}" for p in ADDRS if p != n})
            for n, a in ADDRS.items()}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


@pytest.fixture(scope="module")
def pair(guest: Any, workdir: Path) -> Iterator[Pair]:
    p = Pair(workdir)
    try:
        for h in p.hosts.values():
            h.start()
        yield p
    finally:
        for h in p.hosts.values():
            h.cleanup()
        for d in p.local.values():
            for f in d.glob("*"):
                f.unlink()


def disk_guest(pair: Pair, name: str, image: str, rate: float = 2.0, extra: str = "",
               pool: str = "local", backing: str | None = None,
               more: tuple[dict[str, Any], ...] = ()) -> tuple[dict[str, Any], Probe]:
    """``image`` made in ma's ``pool`` (over ``backing``, an image there), and a
    guest on ma writing to it (``more``: its other disks)."""
    pair["ma"].ferry("disk", "create", pool, image, "--size", "64M",
                     *(("--backing", backing) if backing else ()))
    port = free_port()
    cfg = guest_config(name, port, bind="", cmdline_extra=f"ferry.mem=8 ferry.diskwrite="
                       f"{REGION_MIB}:{rate} {extra}".strip(),
                       disks=[{"pool": pool, "image": image}, *more])
    pair["ma"].create(cfg)
    probe = Probe(port, *ADDRS.values())
    probe.wait_up()
    return cfg, probe


def migrate(h: Host, name: str, dest: str, *flags: str) -> dict[str, Any]:
    res = h.ferry("migrate", name, dest, "--live", *flags, "--json", check=False)
    job: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    job["_rc"], job["_stderr"] = res.returncode, res.stderr
    return job


def cleanup(pair: Pair, name: str, image: str) -> None:
    for h in pair.hosts.values():
        if name in h.domains():
            h.ferry("destroy", name, check=False)
            h.ferry("undefine", name, check=False)
    for d in pair.local.values():
        (d / image).unlink(missing_ok=True)


def test_pools_and_disks_from_the_cli(pair: Pair) -> None:
    ma = pair["ma"]
    pools = {p["name"]: p for p in ma.json("pool", "list")}
    assert pools["local"]["shared"] is False and pools["storage"]["shared"] is True
    assert pools["local"]["free"] > 0 and pools["local"]["path"] == str(pair.local["ma"])
    ma.ferry("disk", "create", "local", "base.qcow2", "--size", "32M")
    ma.ferry("disk", "create", "local", "top.qcow2", "--size", "32M", "--backing",
             "base.qcow2")
    disks = {d["name"]: d for d in ma.json("disk", "list", "local")}
    assert disks["base.qcow2"]["virtual_size"] == 32 << 20
    assert disks["top.qcow2"]["backing"] == "base.qcow2"
    for args, why in [(("local", "top.qcow2", "--size", "1M"), "already exists"),
                      (("nowhere", "x.qcow2", "--size", "1M"), "no storage pool"),
                      (("local", "../x.qcow2", "--size", "1M"), "invalid image name"),
                      (("local", "y.qcow2", "--size", "lots"), "invalid size")]:
        res = ma.ferry("disk", "create", *args, check=False)
        assert res.returncode != 0 and why in res.stderr, (args, res.stderr)
    res = ma.ferry("disk", "delete", "local", "base.qcow2", check=False)
    assert res.returncode == 1 and "backs top.qcow2" in res.stderr, res.stderr
    ma.ferry("disk", "delete", "local", "top.qcow2")
    ma.ferry("disk", "delete", "local", "base.qcow2")
    assert ma.json("disk", "list", "local") == []


def test_a_writing_guest_moves_with_its_disk_both_ways(pair: Pair) -> None:
    """ma → mb → ma, each time with the disk copied while the guest writes: the
    guest's check of every block passes on each host, the source's copy is
    deleted, and after the writer stops the image read from the host holds
    exactly the newest write of every block. A capture of loopback during the
    first move holds no plaintext copy of a marker in every block written."""
    ma, mb = pair["ma"], pair["mb"]
    marker = f"FERRY-DISK-MARKER-{os.getpid()}"
    _, probe = disk_guest(pair, "st", "st.qcow2", extra=f"ferry.diskmark={marker}")
    try:
        res = ma.ferry("disk", "delete", "local", "st.qcow2", check=False)
        assert res.returncode == 1 and "disk of domain st" in res.stderr, res.stderr
        check = ma.ferry("migrate", "st", "mb", "--live", "--check").stdout
        assert "no blockers" in check, check
        before = disk_check(probe)
        assert before["disk_bad"] == "0" and int(before["disk_seq"]) > 0, before
        for src, dst in (("ma", "mb"), ("mb", "ma")):
            with LoopbackCapture(marker.encode(), tuple(ADDRS.values())) as cap:
                job = migrate(pair[src], "st", dst)
            assert job["state"] == "completed", job
            if src == "ma":
                assert cap.tcp_bytes > job["stats"]["disk_total"] // 2, cap.tcp_bytes
                assert cap.hits == 0 and cap.drops == 0
            assert job["stats"]["disk_total"] > 0, job["stats"]
            assert any(e["action"] == "disks" for e in job["escalations"])
            assert not (pair.local[src] / "st.qcow2").exists(), "source copy left"
            assert (pair.local[dst] / "st.qcow2").is_file()
            info = pair[dst].json("info", "st")
            assert info["config"]["disks"][0]["path"] == str(pair.local[dst] / "st.qcow2")
            reply = disk_check(probe)
            assert reply["disk_bad"] == "0" and reply["disk_errors"] == "0", reply
            assert int(reply["disk_seq"]) > int(before["disk_seq"])
            assert probe.ask(1)["corrupt"] == "0"
            before = reply
        final = disk_check(probe, "DISKSTOP")
        ma.ferry("destroy", "st")
        writes, blocks = int(final["disk_seq"]), int(final["disk_blocks"])
        assert image_holds_writes(pair.local["ma"] / "st.qcow2", "qcow2", writes,
                                  blocks, marker) == []
        assert mb.domains() == {} and list(pair.local["mb"].glob("*")) == []
    finally:
        probe.close()
        cleanup(pair, "st", "st.qcow2")


def test_refusals_and_failures_during_the_mirror_leave_the_source_whole(pair: Pair) -> None:
    """An image already at the destination is refused before anything starts.
    Then abort, and kill -9 of the destination QEMU, while the disk is being
    copied (slowly: --bandwidth 1): each time the source guest runs on and its
    disk check passes, the destination keeps no image, export or QEMU; then a
    retry succeeds."""
    ma, mb = pair["ma"], pair["mb"]
    _, probe = disk_guest(pair, "mir", "mir.qcow2", rate=4)
    image = pair.local["mb"] / "mir.qcow2"
    try:
        image.write_bytes(b"someone else's")
        job = migrate(ma, "mir", "mb")
        assert job["_rc"] == 1 and "already exists" in job["_stderr"] + str(job), job
        assert image.read_bytes() == b"someone else's"
        image.unlink()
        assert ma.domains()["mir"]["state"] == "running" and mb.domains() == {}
        for fault in ("abort", "kill-dest-qemu"):
            job_id = ma.ferry("migrate", "mir", "mb", "--live", "--bandwidth", "1",
                              "--detach").stdout.strip()
            wait_for(lambda i=job_id: ma.json("job", "show", i)["stats"]["disk_bytes"] > 0,
                     30, "the mirror to copy something", interval=0.2)
            assert image.is_file()
            res = mb.ferry("disk", "delete", "local", "mir.qcow2", check=False)
            assert res.returncode == 1 and "arriving from host ma" in res.stderr, res.stderr
            if fault == "abort":
                ma.ferry("job", "abort", job_id)
            else:
                os.kill(mb.qemu_pids()[0], signal.SIGKILL)
            job = wait_for(lambda i=job_id: (j := ma.json("job", "show", i))["state"] !=
                           "running" and j, 60, "the job to end")
            assert job["state"] == ("aborted" if fault == "abort" else "failed"), job
            assert ma.domains()["mir"]["state"] == "running"
            assert disk_check(probe)["disk_bad"] == "0"
            wait_for(lambda: mb.json("jobs") == [], 30, "the destination to drop its side")
            assert not image.exists(), fault
            assert mb.qemu_pids() == [] and mb.domains() == {}
        job = migrate(ma, "mir", "mb")
        assert job["state"] == "completed", job
        assert disk_check(probe)["disk_bad"] == "0"
    finally:
        probe.close()
        cleanup(pair, "mir", "mir.qcow2")


def test_a_copy_that_cannot_land_is_refused_with_nothing_changed(pair: Pair) -> None:
    """Besides its disk, the guest has a raw, sparse one whose virtual size is more
    than the destination pool has free, and one in a pool the destination lacks:
    the migration is refused naming both (the space rule too); the guest runs on
    at the source, intact, and the destination holds no image, job or QEMU."""
    ma, mb = pair["ma"], pair["mb"]
    ma.ferry("disk", "create", "local", "huge.raw", "--size", "1T", "--format", "raw")
    ma.ferry("disk", "create", "scratch", "tmp.raw", "--size", "1M", "--format", "raw")
    _, probe = disk_guest(pair, "ref", "ref.qcow2", more=(
        {"pool": "local", "image": "huge.raw", "format": "raw"},
        {"pool": "scratch", "image": "tmp.raw", "format": "raw"}))
    try:
        job = migrate(ma, "ref", "mb")
        assert job["_rc"] == 1, job
        assert "raw: the virtual size" in job["_stderr"], job
        assert "no storage pool 'scratch'" in job["_stderr"], job
        assert ma.domains()["ref"]["state"] == "running" and mb.domains() == {}
        assert ma.json("jobs") == [] and mb.json("jobs") == [] and mb.qemu_pids() == []
        assert list(pair.local["mb"].glob("*")) == []
        assert disk_check(probe)["disk_bad"] == "0"
    finally:
        probe.close()
        cleanup(pair, "ref", "ref.qcow2")
        (pair.local["ma"] / "huge.raw").unlink(missing_ok=True)
        (pair.scratch / "tmp.raw").unlink(missing_ok=True)


def test_a_disk_cached_by_the_host_on_a_shared_pool_needs_unsafe(pair: Pair,
                                                                  workdir: Path) -> None:
    """A running guest writing to a disk in the shared pool with the default cache
    (writeback): --check names the cache mode, the migration is refused with
    nothing changed on either host; with --unsafe it moves, the disk stays where
    both hosts see it (nothing copied) and the guest's check of every block passes."""
    ma, mb = pair["ma"], pair["mb"]
    _, probe = disk_guest(pair, "shr", "shr.qcow2", pool="storage")
    try:
        check = ma.ferry("migrate", "shr", "mb", "--live", "--check", check=False).stdout
        assert "cache writeback" in check and "--unsafe" in check, check
        job = migrate(ma, "shr", "mb")
        assert job["_rc"] == 1 and "shared pool storage" in job["_stderr"], job
        assert ma.domains()["shr"]["state"] == "running" and mb.domains() == {}
        assert ma.json("jobs") == [] and mb.json("jobs") == [] and mb.qemu_pids() == []
        job = migrate(ma, "shr", "mb", "--unsafe")
        assert job["state"] == "completed", job
        assert job["stats"]["disk_total"] == 0 and job.get("disks") == [], job
        assert (workdir / "shr.qcow2").is_file()
        assert mb.domains()["shr"]["state"] == "running"
        assert disk_check(probe)["disk_bad"] == "0"
    finally:
        probe.close()
        cleanup(pair, "shr", "shr.qcow2")
        (workdir / "shr.qcow2").unlink(missing_ok=True)


def test_only_the_top_layer_moves_when_the_base_is_there(pair: Pair) -> None:
    """The same base image in both hosts' local pools and an overlay the guest
    writes to: `--check` says only the top layer goes, the record shows the base's
    bytes not sent, and the destination's overlay reads the base's data."""
    import shutil
    import subprocess
    ma, mb = pair["ma"], pair["mb"]
    ma.ferry("disk", "create", "local", "base.qcow2", "--size", "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 32M 32M",
                    str(pair.local["ma"] / "base.qcow2")], check=True, capture_output=True)
    shutil.copy2(pair.local["ma"] / "base.qcow2", pair.local["mb"] / "base.qcow2")
    _, probe = disk_guest(pair, "inc", "inc.qcow2", backing="base.qcow2")
    try:
        check = ma.ferry("migrate", "inc", "mb", "--live", "--check").stdout
        assert "only its top layer" in check and "base base.qcow2" in check, check
        job = migrate(ma, "inc", "mb")
        assert job["state"] == "completed", job
        (disk,) = job["disks"]
        assert disk["mode"] == "top" and disk["saved_bytes"] >= 32 << 20, disk
        assert disk["bytes"] < 24 << 20, disk  # the top layer only, not the 32 MiB base
        assert disk_check(probe)["disk_bad"] == "0"
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(pair.local["mb"] / "inc.qcow2")],
            check=True, capture_output=True, text=True).stdout)
        assert info["backing-filename"] == "base.qcow2", info
        mb.ferry("destroy", "inc")
        res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 32M 32M",
                              str(pair.local["mb"] / "inc.qcow2")], capture_output=True,
                             text=True)
        assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, \
            res.stdout
    finally:
        probe.close()
        cleanup(pair, "inc", "inc.qcow2")
        for d in pair.local.values():
            (d / "base.qcow2").unlink(missing_ok=True)


def test_a_ferryd_killed_during_the_mirror_is_settled_at_its_restart(pair: Pair) -> None:
    """kill -9 of the destination's ferryd mid-mirror: the source gives up (its
    guest runs on, on its own disk), and the restarted destination removes its
    QEMU and the image it made. kill -9 of the source's ferryd mid-mirror: its
    restart stops the mirror and has the destination drop its side. Nothing is
    orphaned; a retry succeeds."""
    ma, mb = pair["ma"], pair["mb"]
    _, probe = disk_guest(pair, "crash", "crash.qcow2", rate=4)
    image = pair.local["mb"] / "crash.qcow2"

    def mirroring() -> str:
        job_id = ma.ferry("migrate", "crash", "mb", "--live", "--bandwidth", "1",
                          "--detach").stdout.strip()
        wait_for(lambda: ma.json("job", "show", job_id)["stats"]["disk_bytes"] > 0, 30,
                 "the mirror to copy something", interval=0.2)
        assert image.is_file()
        return job_id

    def settled(job_id: str) -> None:
        job = wait_for(lambda: (j := ma.json("job", "show", job_id))["state"] != "running"
                       and j, 60, "the job to end")
        assert job["state"] == "failed", job
        assert ma.domains()["crash"]["state"] == "running"
        assert disk_check(probe)["disk_bad"] == "0"
        wait_for(lambda: mb.json("jobs") == [] and not image.exists()
                 and mb.qemu_pids() == [], 30, "the destination to drop its side")
        assert mb.domains() == {}

    try:
        job_id = mirroring()
        mb.kill9()
        wait_for(lambda: ma.json("job", "show", job_id)["state"] != "running", 60,
                 "the source to give up")
        mb.start()
        settled(job_id)
        job_id = mirroring()
        ma.kill9()
        ma.start()
        settled(job_id)
        assert ma.json("jobs") == []
        job = migrate(ma, "crash", "mb")
        assert job["state"] == "completed", job
        assert disk_check(probe)["disk_bad"] == "0"
    finally:
        probe.close()
        for h in (ma, mb):
            if h.proc is None or h.proc.poll() is not None:
                h.start()
        cleanup(pair, "crash", "crash.qcow2")


def test_a_source_killed_between_release_and_disk_delete_deletes_at_restart(
        pair: Pair) -> None:
    """The source ferryd dies right after it let go of its copy in Confirm, before it
    deleted the copied image: restarted, it hears the job completed and deletes
    the image; the guest runs on mb on its copy, every block intact."""
    ma, mb = pair["ma"], pair["mb"]
    _, probe = disk_guest(pair, "rel", "rel.qcow2")
    crashing = True
    try:
        ma.stop()
        ma.start(env={"FERRY_CRASH_AT": "source-after-release"})
        job_id = ma.ferry("migrate", "rel", "mb", "--live", "--detach").stdout.strip()
        assert ma.proc is not None
        ma.proc.wait(120)  # it died at the crash point
        ma.proc = None
        assert (pair.local["ma"] / "rel.qcow2").is_file()  # (left by the crash)
        ma.start()
        crashing = False
        rec = next(r for r in ma.json("migrations") if r["id"] == job_id)
        assert rec["state"] == "completed", rec
        assert not (pair.local["ma"] / "rel.qcow2").exists()
        assert "rel" not in ma.domains() and mb.domains()["rel"]["state"] == "running"
        assert disk_check(probe)["disk_bad"] == "0"
    finally:
        probe.close()
        if crashing:  # (ferryd goes on without the crash point)
            ma.stop()
            ma.start()
        cleanup(pair, "rel", "rel.qcow2")


def test_a_shut_off_domain_moves_with_its_disk_and_boots_there(pair: Pair) -> None:
    """A domain that wrote its disk and was shut off: the offline migration
    copies the disk over the same TLS NBD path (a QEMU with only the disks, on
    each side), the destination's image holds every block it wrote, and the
    domain boots there."""
    ma, mb = pair["ma"], pair["mb"]
    _, probe = disk_guest(pair, "cold", "cold.qcow2", rate=4)
    try:
        time.sleep(1)
        final = disk_check(probe, "DISKSTOP")
        ma.ferry("destroy", "cold")
        assert ma.domains()["cold"]["state"] == "shutoff"
        res = ma.ferry("migrate", "cold", "mb", "--json")
        job = json.loads(res.stdout)
        assert job["state"] == "completed", job
        assert job["disks"] and job["disks"][0]["bytes"] > 0, job["disks"]
        assert "cold" not in ma.domains() and not (pair.local["ma"] / "cold.qcow2").exists()
        assert mb.domains()["cold"]["state"] == "shutoff"
        assert list((ma.state_dir / "disk-servers").glob("*")) == []
        assert list((mb.state_dir / "disk-servers").glob("*")) == []
        assert image_holds_writes(pair.local["mb"] / "cold.qcow2", "qcow2",
                                  int(final["disk_seq"]), int(final["disk_blocks"])) == []
        mb.ferry("start", "cold")
        probe.wait_up()
        assert disk_check(probe)["disk_bad"] == "0"
    finally:
        probe.close()
        cleanup(pair, "cold", "cold.qcow2")
