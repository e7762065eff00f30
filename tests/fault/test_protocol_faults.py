"""The migration protocol under faults: the real MigrationService and
RelocationService of two hosts, over the real relocation API, with a fake QEMU
that fails, dies or hangs at a chosen QMP step. Each test checks the
invariants from outside: the guest runs on exactly one host (or, only where
Ferry cannot know, stays paused in doubt), nothing is left on the other, and
both records of the job tell the same outcome.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ferry.migration.destination as destination
import ferry.migration.source as source
from fault.fakes import FakeHost, World, domain
from ferry.errors import Busy, Conflict, NotFound, Refused
from ferry.migration.job import PhaseStep
from ferry.migration.models import MigrateRequest, Phase
from ferry.models import DomainConfig, DomainState


async def boot(world: World, host: str = "a", name: str = "web") -> None:
    await world.hosts[host].svc.define(DomainConfig.model_validate(domain(world, name)),
                                       start=True)


async def migrate(world: World, name: str = "web", mode: str = "live", src: str = "a",
                  dst: str = "b", **opts: Any) -> str:
    req = MigrateRequest.model_validate({"dest": dst, "mode": mode, **opts})
    record = await world.hosts[src].mig.start(name, req)
    return record.id


async def settle(world: World, job_id: str, src: str = "a", timeout: float = 10
                 ) -> dict[str, Any]:
    """Wait for the source's job to end (or go in doubt); its record."""
    host = world.hosts[src]
    for _ in range(int(timeout / 0.01)):
        rec = host.record(job_id)
        if job_id not in host.mig.jobs and rec is not None and rec["state"] != "running":
            return rec
        if rec is not None and rec["state"] == "in_doubt":
            return rec
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not end: {host.record(job_id)}")


def state(host: FakeHost, name: str = "web") -> DomainState | None:
    dom = host.svc.domains.get(name)
    return dom.state if dom is not None else None


def assert_runs_only_on(world: World, where: str, name: str = "web") -> None:
    """The guest's CPU runs on ``where`` and nowhere else; the other host has no
    QEMU, reservation, arrival or domain of it."""
    for host in world.hosts.values():
        running = [q for q in host.qemus() if q.name == name and q.runstate == "running"]
        if host.name == where:
            assert len(running) == 1, (host.name, [q.runstate for q in host.qemus()])
            assert state(host, name) == DomainState.running
            assert not host.svc.domains[name].lock.locked(), "the domain is free again"
        else:
            assert running == [], host.name
            assert name not in host.svc.domains
            assert [q for q in host.qemus() if q.name == name] == []
            assert host.svc.reservations == {} and host.svc.arrivals == {}
            assert host.reloc.incoming == {}


def assert_agree(world: World, job_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both records of the job tell the same outcome (and the same failing phase)."""
    a, b = world.hosts["a"].record(job_id), world.hosts["b"].record(job_id)
    assert a is not None
    if b is not None:
        assert a["state"] == b["state"], (a, b)
        if a["error"] is not None and a["state"] != "completed":
            assert b["error"] is not None and a["error"]["phase"] == b["error"]["phase"], (a, b)
    return a, b


def assert_source_clean_stream(world: World, name: str = "web") -> None:
    """The source QEMU holds no migration: no TLS object, no stream in flight."""
    for q in world.hosts["a"].qemus():
        if q.name == name:
            assert q.objects == set(), q.objects
            assert q.mig_status not in ("active", "setup"), q.mig_status


async def test_live_migration_completes_with_one_record_outcome(world: World) -> None:
    await boot(world)
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    assert_runs_only_on(world, "b")
    a, b = assert_agree(world, job)
    assert a["stats"]["stream_tls"] and a["stats"]["passes"] >= 1
    assert b is not None and b["dest_facts"]["resumed"] and b["decided_by"] == "a"
    assert world.hosts["a"].qemus() == []
    # source's STOP to the destination's RESUME, from the two QEMUs' events
    assert 0 <= a["stats"]["paused_ms"] < 10_000


@pytest.mark.parametrize("opts,shape", [
    ({"parallel": 3, "compress": "zstd"}, (True, 3, "zstd")),
    ({"parallel": 1}, (False, None, None)),  # multifd off, said explicitly
    ({"parallel": 1, "compress": "zstd"}, (True, 1, "zstd")),
])
async def test_the_stream_shape_is_the_same_on_both_qemus(
        world: World, opts: dict[str, Any], shape: tuple[Any, ...]) -> None:
    await boot(world)
    src_qemu = world.hosts["a"].qemus()[0]
    job_id = await migrate(world, **opts)
    rec = await settle(world, job_id)
    assert rec["state"] == "completed", rec
    dst_qemu = world.hosts["b"].qemus()[0]
    for q in (src_qemu, dst_qemu):
        assert (q.caps.get("multifd"), q.params.get("multifd-channels"),
                q.params.get("multifd-compression")) == shape
    assert rec["stats"]["channels"] == (shape[1] or 0)
    assert rec["stats"]["compression"] == (shape[2] or "none")
    assert rec["options"]["parallel"] == opts["parallel"]


async def test_options_come_from_the_request_then_the_domain_then_the_host(
        world: World) -> None:
    from ferry.models import MigrationSettings
    a = world.hosts["a"]
    cfg = {**domain(world, "web"), "migration": {"parallel": 2, "max_downtime_ms": 50}}
    await a.svc.define(DomainConfig.model_validate(cfg), start=True)
    a.mig.host = a.mig.host.model_copy(update={"migration": MigrationSettings(
        parallel=4, compress="zstd", max_downtime_ms=70, timeout_s=30)})
    job_id = await migrate(world, max_downtime_ms=90)
    rec = await settle(world, job_id)
    assert rec["state"] == "completed", rec
    opts = rec["options"]
    assert (opts["max_downtime_ms"], opts["parallel"], opts["compress"],
            opts["timeout_s"], opts["on_timeout"]) == (90, 2, "zstd", 30, "pause")
    assert world.hosts["b"].qemus()[0].params["multifd-channels"] == 2


async def test_offline_migration_completes(world: World) -> None:
    await boot(world)
    job = await migrate(world, mode="offline")
    assert (await settle(world, job))["state"] == "completed"
    assert_runs_only_on(world, "b")


# (host, QMP command, kind, the phase it fails in)
STEPS = [
    ("a", "migrate-set-capabilities", "error", "perform"),
    ("a", "migrate-set-parameters", "error", "perform"),
    ("a", "object-add", "error", "perform"),
    ("a", "query-migrate-parameters", "error", "perform"),
    ("a", "migrate", "error", "perform"),
    ("b", "migrate-set-capabilities", "error", "prepare"),
    ("b", "object-add", "error", "prepare"),
    ("b", "migrate-set-parameters", "error", "prepare"),
    ("b", "migrate-incoming", "error", "prepare"),
    ("b", "migrate-incoming", "die", "prepare"),
    ("b", "cont", "error", "finish"),
    ("b", "cont", "die", "finish"),
]


@pytest.mark.parametrize("mode", ["live", "offline"])
@pytest.mark.parametrize("host,command,kind,phase", STEPS)
async def test_a_failed_qmp_step_is_undone_on_both_hosts(
        world: World, host: str, command: str, kind: str, phase: str, mode: str) -> None:
    await boot(world)
    world.fail(host, command, kind)
    job = await migrate(world, mode=mode)
    rec = await settle(world, job)
    assert rec["state"] == "failed", rec
    assert rec["error"]["phase"] == phase and rec["error"]["host"] == host, rec
    assert "undo_errors" not in rec["error"], rec
    assert_runs_only_on(world, "a")
    assert_agree(world, job)
    assert_source_clean_stream(world)


async def test_destination_qemu_that_fails_to_start_fails_prepare(world: World) -> None:
    await boot(world)
    world.launch_faults.append("b")
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["phase"] == "prepare", rec
    assert "failed to start" in rec["error"]["message"]
    assert_runs_only_on(world, "a")
    assert_agree(world, job)


async def test_finish_query_failure_resumes_the_source(world: World) -> None:
    await boot(world)
    f = world.fail("b", "query-migrate")
    f.when = lambda q: q.mig_status == "completed"  # in Finish, not in Prepare
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["phase"] == "finish", rec
    assert rec["source_facts"]["finish_sent"] and rec["source_facts"]["dest_gone"]
    assert_runs_only_on(world, "a")
    assert_agree(world, job)


async def test_incoming_qemu_killed_mid_stream(world: World) -> None:
    world.converges = False
    await boot(world)
    job = await migrate(world)
    b = world.hosts["b"]
    for _ in range(500):
        if any(q.mig_status == "active" for q in b.qemus()):
            break
        await asyncio.sleep(0.01)
    for q in b.qemus():
        q.exit()  # kill -9 of the destination QEMU
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["phase"] == "perform", rec
    assert_runs_only_on(world, "a")
    assert_agree(world, job)


async def test_source_qemu_dying_mid_stream_leaves_the_destination_clean(world: World) -> None:
    await boot(world)
    f = world.fail("a", "query-migrate", "die")
    f.when = lambda q: q.mig_status == "active"
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["phase"] == "perform", rec
    b = world.hosts["b"]
    assert b.qemus() == [] and b.svc.reservations == {} and b.reloc.incoming == {}
    assert state(world.hosts["a"]) == DomainState.crashed  # it died: said so, not hidden
    assert_agree(world, job)


async def test_a_failing_confirm_is_a_completed_migration_with_a_cleanup_error(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    await boot(world)
    a = world.hosts["a"]

    async def broken_release(dom: Any) -> None:
        raise OSError("disk full while removing the domain's directory")

    monkeypatch.setattr(a.svc, "release", broken_release)
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    assert "disk full" in rec["cleanup_error"]
    assert state(world.hosts["b"]) == DomainState.running
    assert_agree(world, job)


async def test_an_undo_that_fails_is_reported_and_the_others_still_run(world: World) -> None:
    await boot(world)
    world.fail("a", "migrate")   # Perform fails after the offline pause...
    world.fail("a", "cont")      # ...and resuming the source fails in the undo
    job = await migrate(world, mode="offline")
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["phase"] == "perform", rec
    assert any(e.startswith("perform:") for e in rec["error"]["undo_errors"]), rec
    b = world.hosts["b"]  # the prepare undo still ran
    assert b.qemus() == [] and b.reloc.incoming == {} and b.svc.arrivals == {}
    assert_agree(world, job)


@pytest.mark.parametrize("on_timeout", ["abort", "pause"])
async def test_on_timeout_actions(world: World, on_timeout: str) -> None:
    world.converges = False
    await boot(world)
    job = await migrate(world, timeout_s=0.3, on_timeout=on_timeout)
    rec = await settle(world, job)
    if on_timeout == "abort":
        assert rec["state"] == "aborted" and rec["error"]["phase"] == "perform", rec
        assert "on_timeout=abort" in rec["error"]["message"]
        assert_runs_only_on(world, "a")
    else:
        assert rec["state"] == "completed", rec
        assert rec["stats"]["forced_pause"] is True
        assert [e["action"] for e in rec["escalations"]][-1] == "pause"
        assert_runs_only_on(world, "b")
    assert_agree(world, job)


async def test_throttling_is_recorded_as_an_escalation(world: World) -> None:
    world.converges, world.queries_to_converge = False, 12
    await boot(world)
    job = await migrate(world, timeout_s=0.5)
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    notes = [e for e in rec["escalations"] if e["action"] == "throttle"]
    assert notes and "auto-converge" in notes[0]["reason"], rec["escalations"]


async def test_the_allowed_pause_steps_up_and_each_step_is_recorded(world: World) -> None:
    world.queries_to_converge, world.expected_downtime_ms = 15, 900
    await boot(world)
    src_qemu = world.hosts["a"].qemus()[0]
    job = await migrate(world, max_downtime_ms=250)
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    steps = [e["reason"] for e in rec["escalations"] if e["action"] == "downtime"]
    assert len(steps) == 3 and "50 → 100 ms" in steps[0] and "→ 250 ms" in steps[-1], steps
    assert rec["stats"]["downtime_limit_ms"] == 250
    assert src_qemu.params["downtime-limit"] == 250


async def test_a_qemu_dying_after_cont_is_a_completed_migration(world: World) -> None:
    """The destination drops the stream's credentials after cont: if its QEMU
    dies then, the guest had already moved (and crashed there), nothing is
    undone and the source's copy is gone."""
    await boot(world)
    world.fail("b", "object-del", "die")
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    assert world.hosts["a"].qemus() == [] and state(world.hosts["a"]) is None
    for _ in range(200):
        if state(world.hosts["b"]) == DomainState.crashed:
            break
        await asyncio.sleep(0.01)
    assert state(world.hosts["b"]) == DomainState.crashed


async def test_operator_abort_during_perform(world: World) -> None:
    world.converges = False
    await boot(world)
    a = world.hosts["a"]
    job = await migrate(world)
    for _ in range(500):
        if a.mig.jobs[job].record.stats.transferred:
            break
        await asyncio.sleep(0.01)
    a.mig.abort(job)
    rec = await settle(world, job)
    assert rec["state"] == "aborted" and rec["error"]["phase"] == "perform", rec
    assert_runs_only_on(world, "a")
    _, b_rec = assert_agree(world, job)
    assert b_rec is not None and b_rec["state"] == "aborted" and b_rec["decided_by"] == "a"


async def test_abort_while_prepare_waits_on_a_silent_destination(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.3)
    await boot(world)
    world.hosts["b"].silent = True  # packets dropped: Prepare never answers
    a = world.hosts["a"]
    job = await migrate(world)
    for _ in range(200):
        if a.mig.jobs[job].record.phase.value == "prepare":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    a.mig.abort(job)
    rec = await settle(world, job, timeout=3)
    assert rec["state"] == "aborted" and rec["error"]["phase"] == "prepare", rec
    assert state(a) == DomainState.running and not a.svc.domains["web"].lock.locked()
    # and the domain can migrate again at once, once the destination answers
    world.hosts["b"].silent = False
    assert (await settle(world, await migrate(world)))["state"] == "completed"


async def test_heartbeat_misses_fail_the_job_and_the_destination_drops_its_side(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.2)
    monkeypatch.setattr(destination, "INCOMING_LEASE_S", 0.5)
    world.converges = False
    await boot(world)
    b = world.hosts["b"]
    job = await migrate(world)
    for _ in range(500):
        if any(q.mig_status == "active" for q in b.qemus()):
            break
        await asyncio.sleep(0.01)
    b.silent = True
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["host"] == "b", rec
    assert "stopped answering" in rec["error"]["message"]
    assert any("did not answer the abort" in e for e in rec["error"]["undo_errors"])
    assert state(world.hosts["a"]) == DomainState.running
    b.silent = False
    for _ in range(300):  # b's lease on the silent source runs out
        if b.reloc.incoming == {}:
            break
        await asyncio.sleep(0.01)
    assert_runs_only_on(world, "a")
    assert b.record(job)["state"] == "failed"


async def test_an_arriving_name_is_reserved_on_the_destination(world: World) -> None:
    world.converges = False
    await boot(world)
    b = world.hosts["b"]
    job = await migrate(world)
    for _ in range(500):
        if b.reloc.incoming:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(Busy, match="arriving from host a"):
        await b.svc.define(DomainConfig.model_validate(domain(world)))
    other_name = DomainConfig.model_validate(
        {**domain(world, "other"), "uuid": str(b.reloc.incoming[job].config.uuid)})
    with pytest.raises(Busy, match="arriving"):
        await b.svc.define(other_name)
    world.hosts["a"].mig.abort(job)
    assert (await settle(world, job))["state"] == "aborted"
    assert_runs_only_on(world, "a")


# -- after a restart of the source ferryd --------------------------------------------
async def restart(host: FakeHost) -> None:
    """kill -9 and start again: the record stays as the job left it; QEMUs go on."""
    await host.stop()
    await host.start()


def stall(host: FakeHost, phase: Phase) -> None:
    """The host's next job stops in ``phase`` (as if its ferryd died there)."""
    stuck = asyncio.Event()

    async def never(job: Any) -> None:
        await stuck.wait()

    index = [step.phase for step in host.mig.steps].index(phase)
    host.mig.steps[index] = PhaseStep(phase, never)


async def in_doubt_after_restart(world: World) -> str:
    """A job whose Finish the destination answered, the source restarted with the
    destination silent: in doubt. Its id."""
    await boot(world)
    a, b = world.hosts["a"], world.hosts["b"]
    stall(a, Phase.confirm)
    job = await migrate(world)
    await until_phase(a, job, "confirm")
    b.silent = True
    await restart(a)
    assert a.record(job)["state"] == "in_doubt", a.record(job)
    return job


async def until_phase(host: FakeHost, job: str, phase: str) -> None:
    for _ in range(1000):
        j = host.mig.jobs.get(job)
        if j is not None and j.record.phase.value == phase:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"job {job} never reached {phase}")


async def test_restart_of_the_source_during_precopy(world: World) -> None:
    world.converges = False
    await boot(world)
    a = world.hosts["a"]
    job = await migrate(world)
    await until_phase(a, job, "perform")
    await asyncio.sleep(0.05)
    await restart(a)
    rec = a.record(job)
    assert rec is not None and rec["state"] == "failed" and "restarted" in rec["error"]["message"]
    assert_runs_only_on(world, "a")
    assert_source_clean_stream(world)
    assert_agree(world, job)


@pytest.mark.parametrize("phase,outcome,where", [
    # the stream completed while the source ferryd was down: the guest is paused in
    # postmigrate there and was never resumed on the destination (no Finish); the
    # restarted source has the destination drop its copy and resumes its own
    (Phase.finish, "failed", "a"),
    # the destination had taken over: the restarted source confirms
    (Phase.confirm, "completed", "b"),
])
async def test_restart_of_the_source_after_the_stream(
        world: World, phase: Phase, outcome: str, where: str) -> None:
    """Either way the guest runs on exactly one host, with no operator action."""
    await boot(world)
    a = world.hosts["a"]
    stall(a, phase)
    job = await migrate(world)
    await until_phase(a, job, phase.value)
    if phase == Phase.finish:
        assert [q.runstate for q in a.qemus()] == ["postmigrate"]
    await restart(a)
    assert a.record(job)["state"] == outcome
    assert_runs_only_on(world, where)
    assert_agree(world, job)


async def test_restart_of_the_source_after_finish_with_the_destination_away(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finish was sent and the destination can't be asked: in doubt, the source copy
    paused and held; once the destination answers, the job settles by itself."""
    monkeypatch.setattr(source, "RESOLVE_EVERY_S", 0.05)
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.2)
    a, b = world.hosts["a"], world.hosts["b"]
    job = await in_doubt_after_restart(world)
    assert state(a) == DomainState.paused and a.svc.domains["web"].lock.locked()
    assert "in doubt" in a.svc.domains["web"].reason
    b.silent = False
    for _ in range(300):
        if job not in a.mig.jobs:
            break
        await asyncio.sleep(0.01)
    assert a.record(job)["state"] == "completed"
    assert_runs_only_on(world, "b")
    assert_agree(world, job)


async def test_restart_of_the_source_with_the_destination_gone_before_finish(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Finish was sent, so the destination never ran the guest: even unreachable,
    the source may resume its copy (the destination drops its side by its lease)."""
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.2)
    monkeypatch.setattr(destination, "INCOMING_LEASE_S", 0.5)
    world.converges = False
    await boot(world)
    a, b = world.hosts["a"], world.hosts["b"]
    job = await migrate(world)
    await until_phase(a, job, "perform")
    b.silent = True
    await restart(a)
    rec = a.record(job)
    assert rec["state"] == "failed" and "never got Finish" in rec["error"]["message"], rec
    assert state(a) == DomainState.running
    b.silent = False
    for _ in range(300):
        if b.reloc.incoming == {}:
            break
        await asyncio.sleep(0.01)
    assert_runs_only_on(world, "a")


async def test_restart_of_the_destination_before_finish_drops_its_side(world: World) -> None:
    world.converges = False
    await boot(world)
    a, b = world.hosts["a"], world.hosts["b"]
    job = await migrate(world)
    await until_phase(a, job, "perform")
    await asyncio.sleep(0.05)
    await restart(b)  # its recovery kills the incoming QEMU; the stream breaks
    rec = await settle(world, job)
    assert rec["state"] == "failed" and rec["error"]["phase"] == "perform", rec
    assert_runs_only_on(world, "a")
    assert_agree(world, job)


# -- found by review: each of these broke an invariant before it was fixed ---------------
async def test_a_destination_error_after_it_resumed_never_resumes_the_source(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error on the destination after `cont` (its store fails) must not
    read as "my side is gone": the guest runs on b only."""
    import sqlite3

    from ferry.migration.models import JobState
    await boot(world)
    b = world.hosts["b"]
    real = b.reloc.records.set_state

    def flaky(rec: Any, new: JobState, **kw: Any) -> None:
        if new == JobState.completed:
            raise sqlite3.OperationalError("database or disk is full")
        real(rec, new, **kw)

    monkeypatch.setattr(b.reloc.records, "set_state", flaky)
    job = await migrate(world)
    assert (await settle(world, job))["state"] == "completed"
    assert_runs_only_on(world, "b")


async def test_a_source_error_after_finish_asks_the_destination(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any failure on the source once Finish was sent goes by the destination's
    word: here it runs the guest, so the job is completed, not failed."""

    class Unreadable:
        @staticmethod
        def model_validate(data: Any) -> Any:
            raise ValueError("unexpected answer shape")

    monkeypatch.setattr(source, "FinishAnswer", Unreadable)
    await boot(world)
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "completed" and rec["cleanup_error"] is None, rec
    assert_runs_only_on(world, "b")
    assert_agree(world, job)


async def completed_with_a_failed_confirm(world: World,
                                          monkeypatch: pytest.MonkeyPatch) -> Any:
    """A migration of `web` a → b whose Confirm can't remove the source copy;
    returns the real release, to put back."""
    a = world.hosts["a"]
    await boot(world)
    real = a.svc.release

    async def broken_release(dom: Any) -> None:
        raise OSError("disk full while removing the domain's directory")

    monkeypatch.setattr(a.svc, "release", broken_release)
    job = await migrate(world)
    rec = await settle(world, job)
    assert rec["state"] == "completed" and "disk full" in rec["cleanup_error"], rec
    return real


async def test_a_failed_confirm_fences_the_stale_copy_until_a_restart_removes_it(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    a = world.hosts["a"]
    real = await completed_with_a_failed_confirm(world, monkeypatch)
    job = next(iter(a.store.migrations()))["id"]
    with pytest.raises(Busy):
        await a.svc.unpause("web")
    with pytest.raises(Busy):
        await a.svc.start("web")
    assert [q for q in a.qemus() if q.name == "web"] == []  # killed, not just paused
    monkeypatch.setattr(a.svc, "release", real)
    await restart(a)
    assert "web" not in a.svc.domains
    assert "cleaned up" in a.record(job)["cleanup_error"]
    assert_runs_only_on(world, "b")


async def test_an_abort_while_the_destination_still_prepares_leaves_no_qemu(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from fault.fakes import FakeLauncher
    await boot(world)
    b = world.hosts["b"]
    launch = FakeLauncher.launch

    async def slow_launch(self: FakeLauncher, *args: Any, **kw: Any) -> Any:
        if self.host == "b":
            await asyncio.sleep(0.5)
        return await launch(self, *args, **kw)

    monkeypatch.setattr(FakeLauncher, "launch", slow_launch)
    job = await migrate(world)
    for _ in range(200):
        if b.reloc.incoming:
            break
        await asyncio.sleep(0.01)
    world.hosts["a"].mig.abort(job)
    assert (await settle(world, job))["state"] == "aborted"
    for _ in range(200):  # the abort waits for Prepare to finish, then undoes it
        if b.record(job) and b.record(job)["state"] == "aborted" and not b.qemus():
            break
        await asyncio.sleep(0.01)
    assert_runs_only_on(world, "a")
    assert_agree(world, job)


async def test_offline_on_timeout_abort_aborts(world: World) -> None:
    world.queries_to_converge = 10**9  # the stream makes no progress
    await boot(world)
    job = await migrate(world, mode="offline", timeout_s=0.3, on_timeout="abort")
    rec = await settle(world, job)
    assert rec["state"] == "aborted" and "on_timeout=abort" in rec["error"]["message"]
    assert_runs_only_on(world, "a")


async def restart_with_a_01_incoming_record(b: FakeHost) -> None:
    """Ferry 0.1's record of an incoming job left in Finish; restart b; the guest
    it resumed must be b's, running, and the job completed."""
    import time
    b.store.save_migration({"id": "0123456789ab", "domain": "web", "mode": "live",
                            "role": "destination", "source": "a", "dest": "b",
                            "state": "running", "phase": "finish", "error": None,
                            "started": time.time(), "ended": None, "stats": {},
                            "phase_times": {}})
    await restart(b)
    assert b.record("0123456789ab")["state"] == "completed"
    assert state(b) == DomainState.running


OLD_SOURCE_RECORD = {  # as Ferry 0.1 stored it: stats a free dict, no facts
    "id": "0123456789ab", "domain": "web", "mode": "live", "role": "source",
    "source": "a", "dest": "b", "state": "running", "error": None, "ended": None,
    "stats": {"status": "completed", "was_running": True, "stream_tls": True,
              "transferred": 1, "total": 2, "remaining": 0, "mbps": 1.0, "dirty_rate": 0,
              "passes": 2, "expected_downtime_ms": 30, "throttle_pct": 0},
    "phase_times": {}}


async def test_a_01_source_record_in_finish_with_the_destination_away_is_in_doubt(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.2)
    await boot(world)
    a, b = world.hosts["a"], world.hosts["b"]
    dom = a.svc.domains["web"]
    await dom.proc.qmp.execute("stop")  # paused in postmigrate, as 0.1 left it
    a.store.save_migration({**OLD_SOURCE_RECORD, "phase": "finish", "started": time.time()})
    b.silent = True
    await restart(a)
    rec = a.record("0123456789ab")
    assert rec["state"] == "in_doubt", rec
    assert state(a) == DomainState.paused and a.svc.domains["web"].lock.locked()


async def test_a_01_destination_record_of_a_resumed_guest_is_adopted(world: World) -> None:

    from ferry.migration.models import RelocationRequest
    b = world.hosts["b"]
    cfg = DomainConfig.model_validate(domain(world))
    proc = await b.svc.launch_incoming(cfg)
    proc.runstate = "running"  # 0.1's Finish resumed it, then ferryd died
    req = RelocationRequest(job_id="0123456789ab", source="a", config=cfg, mode="live",
                            running=True, accel="tcg", arch="x86_64")
    (b.svc.paths("web").root / "incoming.json").write_text(req.model_dump_json())
    await restart_with_a_01_incoming_record(b)


async def test_a_peer_answering_in_another_shape_does_not_stop_ferryd(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    await boot(world)
    a, b = world.hosts["a"], world.hosts["b"]
    a.store.save_migration({**OLD_SOURCE_RECORD, "phase": "perform", "started": time.time(),
                            "stats": {"status": "active", "was_running": True}})
    monkeypatch.setattr(b.reloc, "status",  # 0.1's answer for an open incoming job
                        lambda job_id: {"job_id": job_id, "state": "incoming"})
    await restart(a)  # does not raise
    rec = a.record("0123456789ab")
    assert rec["state"] == "failed", rec
    assert state(a) == DomainState.running


@pytest.mark.parametrize("runs_on", ["source", "destination"])
async def test_the_operator_settles_a_job_in_doubt_when_the_destination_is_gone(
        world: World, monkeypatch: pytest.MonkeyPatch, runs_on: str) -> None:
    from ferry.migration.models import Role
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.2)
    a, b = world.hosts["a"], world.hosts["b"]
    job = await in_doubt_after_restart(world)
    with pytest.raises(Refused, match="ferry job resolve"):
        a.mig.abort(job)
    if runs_on == "source":  # as the operator vouches: b is gone, its guest too
        for q in b.qemus():
            q.exit()
    rec = await a.mig.resolve(job, Role(runs_on))
    assert rec.decided_by == "the operator on a" and job not in a.mig.jobs
    if runs_on == "source":
        assert rec.state.value == "failed" and state(a) == DomainState.running
    else:
        assert rec.state.value == "completed" and "web" not in a.svc.domains
        assert state(b) == DomainState.running
    with pytest.raises(Conflict, match="not in doubt"):
        await a.mig.resolve(job, Role(runs_on))


async def test_a_cleaned_up_stale_copy_is_not_confused_with_the_domain_come_back(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Confirm failed once (fenced copy, removed at a restart); the domain later
    migrates back: a further restart leaves it alone."""
    a = world.hosts["a"]
    real = await completed_with_a_failed_confirm(world, monkeypatch)
    job = next(iter(a.store.migrations()))["id"]
    assert a.record(job)["source_facts"]["stale_copy"] is True
    monkeypatch.setattr(a.svc, "release", real)
    await restart(a)
    assert "web" not in a.svc.domains and not a.record(job)["source_facts"]["stale_copy"]
    back = await migrate(world, src="b", dst="a")
    assert (await settle(world, back, src="b"))["state"] == "completed"
    await restart(a)
    assert_runs_only_on(world, "a")


async def test_the_destinations_answer_beats_the_operators_guess(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ferry job resolve --here` while the destination has come back and runs the
    guest: its answer decides (completed), not the operator's guess."""
    from ferry.migration.models import Role
    monkeypatch.setattr(source, "CALL_TIMEOUT", 0.2)
    job = await in_doubt_after_restart(world)
    a, b = world.hosts["a"], world.hosts["b"]
    b.silent = False
    rec = await a.mig.resolve(job, Role.source)
    assert rec.state.value == "completed" and rec.decided_by == "a"
    assert_runs_only_on(world, "b")


async def test_an_abort_that_overtakes_its_prepare_refuses_the_prepare(world: World) -> None:
    from ferry.errors import FerryError
    from ferry.migration.models import AbortRequest
    await boot(world)
    a, b = world.hosts["a"], world.hosts["b"]
    job_id = "00000000abcd"
    answer = await b.reloc.abort(AbortRequest(job_id=job_id, outcome="aborted"))
    assert answer.aborted is False
    from ferry.migration.models import MigrateOptions
    rel = a.mig._relocation(job_id, a.svc.domains["web"], MigrateOptions(mode="live"))
    with pytest.raises(FerryError, match="aborted before its Prepare"):
        await b.reloc.prepare(rel)
    assert b.qemus() == [] and b.svc.arrivals == {}


async def test_a_guest_01_had_adopted_before_its_restart_stays(world: World) -> None:
    b = world.hosts["b"]
    await boot(world, "b")  # adopted (stored, running) by 0.1's Finish, then it died
    await restart_with_a_01_incoming_record(b)


# -- steering a running job ------------------------------------------------------------
async def in_perform(world: World, **opts: Any) -> str:
    """A live job copying a guest that never converges by itself; its id, once the
    stream runs."""
    world.converges, world.queries_to_converge = False, 40  # (paused: after 40 samples)
    await boot(world)
    job_id = await migrate(world, timeout_s=3600, **opts)
    for _ in range(500):
        if world.hosts["a"].qemus()[0].mig_status == "active":
            return job_id
        await asyncio.sleep(0.01)
    raise AssertionError("the stream did not start")


async def test_job_set_changes_the_limits_in_qemu_and_the_record(world: World) -> None:
    from ferry.migration.models import SteerRequest
    job_id = await in_perform(world, max_downtime_ms=300)
    a = world.hosts["a"]
    rec = a.mig.steer(job_id, SteerRequest(bandwidth_mibps=50, max_downtime_ms=40))
    assert (rec.options.bandwidth_mibps, rec.options.max_downtime_ms) == (50, 40)
    src = a.qemus()[0]
    for _ in range(300):
        if src.params.get("max-bandwidth") == 50 << 20:
            break
        await asyncio.sleep(0.01)
    assert src.params["max-bandwidth"] == 50 << 20
    assert src.params["downtime-limit"] <= 40
    sets = [e for e in a.mig.jobs[job_id].record.escalations if e["action"] == "set"]
    assert "bandwidth_mibps 0 → 50" in sets[0]["reason"], sets
    a.mig.abort(job_id)
    assert (await settle(world, job_id))["state"] == "aborted"


async def test_job_complete_pauses_and_finishes_offline(world: World) -> None:
    job_id = await in_perform(world)
    a = world.hosts["a"]
    a.mig.complete(job_id)
    rec = await settle(world, job_id)
    assert rec["state"] == "completed", rec
    assert rec["stats"]["forced_pause"] is True
    pauses = [e for e in rec["escalations"] if e["action"] == "pause"]
    assert "ferry job complete" in pauses[0]["reason"], rec["escalations"]
    assert_runs_only_on(world, "b")


async def test_steering_what_cannot_be_steered_is_refused(world: World) -> None:
    from ferry.errors import InvalidInput, NotFound, Refused
    from ferry.migration.models import SteerRequest
    a = world.hosts["a"]
    with pytest.raises(NotFound):
        a.mig.steer("0123456789ab", SteerRequest(bandwidth_mibps=1))
    with pytest.raises(NotFound):
        a.mig.complete("0123456789ab")
    job_id = await in_perform(world)
    with pytest.raises(InvalidInput, match="say what to change"):
        a.mig.steer(job_id, SteerRequest())
    before = a.mig.jobs[job_id].record.options
    a.mig.abort(job_id)
    with pytest.raises(Refused, match="being aborted"):
        a.mig.steer(job_id, SteerRequest(bandwidth_mibps=1))
    assert a.mig.jobs.get(job_id) is None or a.mig.jobs[job_id].record.options == before
    await settle(world, job_id)
    stall(a, Phase.perform)
    await boot(world, name="off")
    off = await migrate(world, name="off", mode="offline")
    with pytest.raises(Refused, match="offline"):
        a.mig.complete(off)


async def test_a_job_set_while_perform_sets_up_reaches_qemu(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steered between Perform reading the options and the stream's first sample:
    QEMU still gets the new cap (the record must not claim what QEMU lacks)."""
    import ferry.migration.source as source
    from ferry.migration.models import SteerRequest
    world.converges, world.queries_to_converge = False, 40
    a = world.hosts["a"]
    real = source.streamtls.install

    async def install(qmp: Any, *args: Any) -> None:
        await real(qmp, *args)
        if not args[2]:  # the source's half: Perform has read its options
            (job_id,) = a.mig.jobs
            a.mig.steer(job_id, SteerRequest(bandwidth_mibps=50))

    monkeypatch.setattr(source.streamtls, "install", install)
    await boot(world)
    src = a.qemus()[0]
    job_id = await migrate(world, timeout_s=3600, bandwidth_mibps=6)
    for _ in range(300):
        if src.mig_status == "active" and src.params.get("max-bandwidth") == 50 << 20:
            break
        await asyncio.sleep(0.01)
    assert src.params.get("max-bandwidth") == 50 << 20
    a.mig.abort(job_id)
    await settle(world, job_id)


async def test_complete_is_not_undone_by_an_on_timeout_abort(world: World) -> None:
    from ferry.migration.convergence import Action, decide
    from ferry.migration.models import MigrateOptions
    opts = MigrateOptions(mode="live", timeout_s=60, on_timeout="abort")
    asked = "the operator asked to complete now"
    assert decide([], 61.0, opts, paused=True, complete_requested=asked).action \
        == Action.proceed
    assert decide([], 61.0, opts, paused=True).action == Action.abort


async def test_steering_a_failing_job_or_an_incoming_one_is_refused(world: World) -> None:
    from ferry.errors import Refused
    from ferry.migration.models import SteerRequest
    job_id = await in_perform(world)
    a, b = world.hosts["a"], world.hosts["b"]
    with pytest.raises(Refused, match="arrives here from host a"):
        b.mig.steer(job_id, SteerRequest(bandwidth_mibps=1))
    a.mig.jobs[job_id].failing = True
    with pytest.raises(Refused, match="failing"):
        a.mig.complete(job_id)
    a.mig.jobs[job_id].failing = False
    a.mig.abort(job_id)
    await settle(world, job_id)


# -- post-copy --------------------------------------------------------------------------
async def test_postcopy_now_completes_and_the_source_never_runs_again(world: World) -> None:
    await boot(world)
    src_qemu = world.hosts["a"].qemus()[0]
    booted = src_qemu.conts  # (the boot's cont)
    job = await migrate(world, postcopy="now", parallel=2)
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    assert rec["source_facts"]["postcopy_started"] and rec["stats"]["postcopy"]
    actions = [e["action"] for e in rec["escalations"]]
    assert actions[:2] == ["stream", "postcopy"], rec["escalations"]  # one stream
    assert rec["stats"]["channels"] == 0
    assert src_qemu.conts == booted  # stopped at the switch, never resumed
    assert_runs_only_on(world, "b")
    assert_agree(world, job)
    assert world.hosts["b"].reloc.tails == {}


async def test_a_failed_finish_in_postcopy_loses_the_guest_loudly(world: World) -> None:
    """The destination cannot run the guest after the switch (cont fails): the
    source copy is stale, so it is stopped, never resumed; its definition stays
    here, crashed; both records say lost."""
    await boot(world)
    world.fail("b", "cont", "error")
    job = await migrate(world, postcopy="now")
    rec = await settle(world, job)
    assert rec["state"] == "lost", rec
    assert "THE GUEST IS LOST" in rec["error"]["message"]
    assert state(world.hosts["a"]) == DomainState.crashed
    assert world.hosts["a"].qemus() == [] and world.hosts["b"].qemus() == []
    assert "web" not in world.hosts["b"].svc.domains
    assert_agree(world, job)


async def test_destination_qemu_dying_in_the_postcopy_tail_is_lost(world: World) -> None:
    world.queries_to_converge = 10_000  # the tail never ends by itself
    await boot(world)
    src_qemu = world.hosts["a"].qemus()[0]
    booted = src_qemu.conts
    job = await migrate(world, postcopy="now")
    b = world.hosts["b"]
    for _ in range(500):
        if b.reloc.tails:
            break
        await asyncio.sleep(0.01)
    assert b.reloc.tails, "the guest should run on b in post-copy"
    for q in b.qemus():
        q.exit()
    rec = await settle(world, job)
    assert rec["state"] == "lost" and "destination QEMU died" in rec["error"]["message"]
    assert "web" not in world.hosts["a"].svc.domains and world.hosts["a"].qemus() == []
    assert src_qemu.conts == booted
    for _ in range(200):
        if state(b) == DomainState.crashed:
            break
        await asyncio.sleep(0.01)
    assert state(b) == DomainState.crashed  # its definition stays there
    assert b.record(job)["state"] == "lost"


async def test_recover_is_refused_for_a_job_not_in_postcopy(world: World) -> None:
    world.converges = False
    await boot(world)
    job = await migrate(world)
    a = world.hosts["a"]
    with pytest.raises(Conflict, match="not in post-copy"):
        a.mig.recover_postcopy("web")
    with pytest.raises(NotFound, match="no migration running"):
        a.mig.recover_postcopy("other")
    a.mig.abort(job)
    assert (await settle(world, job))["state"] == "aborted"


async def test_abort_is_refused_once_postcopy_was_asked_for(world: World) -> None:
    """Between migrate-start-postcopy and QEMU's switch nothing may cancel the
    stream: the guest would be lost for nothing."""
    world.queries_to_converge = 10_000
    await boot(world)
    job = await migrate(world, postcopy="now")
    a = world.hosts["a"]
    for _ in range(500):
        if a.mig.jobs[job].facts.postcopy_started:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(Refused, match=r"post-copy|too late"):
        a.mig.abort(job)
    world.queries_to_converge = 1  # let the tail end
    rec = await settle(world, job)
    assert rec["state"] == "completed", rec
    assert_runs_only_on(world, "b")
