"""The fleet under the fault tier's fake QEMU: migrations beyond a host's
outgoing or incoming limit wait, queued, and go on when one ends; an abort of a
queued job changes nothing; the bandwidth budget is shared; machine types are
pinned; a registry that refuses the commit leaves the guest on the source; and
reconcile at start fences what the registry gives to another host."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fault.fakes import FakeHost, World
from fault.test_protocol_faults import assert_runs_only_on, boot, migrate, restart, settle
from ferry.models import DomainState
from ferry.ownership import LocalOnly


async def with_limits(world: World, host: str, **limits: int) -> FakeHost:
    world.limits[host] = limits
    await restart(world.hosts[host])
    return world.hosts[host]


async def until(predicate: Any, what: str, timeout: float = 5.0) -> Any:
    for _ in range(int(timeout / 0.01)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_a_migration_beyond_the_outgoing_limit_waits_until_one_ends(
        world: World) -> None:
    a = await with_limits(world, "a", outgoing=1)
    await boot(world, "a", "web")
    await boot(world, "a", "app")
    world.converges = False      # the first job streams until the test lets it end
    first = await migrate(world, "web")
    await until(lambda: any(q.name == "web" and q.mig_status == "active"
                            for q in a.qemus()), "the first stream runs")
    second = await migrate(world, "app")
    rec = await until(lambda: a.mig.jobs[second].record.queued and a.mig.jobs[second].record,
                      "the second job queued")
    assert "at most 1 outgoing" in str(rec.queued) and rec.phase.value == "begin"
    assert world.hosts["b"].record(second) is None        # b has heard nothing of it
    assert a.mig.jobs[first].record.queued is None
    world.converges = True
    assert (await settle(world, first))["state"] == "completed"
    done = await settle(world, second)
    assert done["state"] == "completed" and done["queued"] is None, done
    assert [e["action"] for e in done["escalations"]][:1] == ["queued"]
    assert_runs_only_on(world, "b", "web")
    assert_runs_only_on(world, "b", "app")


async def test_a_destination_at_its_incoming_limit_is_asked_again(world: World) -> None:
    b = await with_limits(world, "b", incoming=1)
    a = world.hosts["a"]
    await boot(world, "a", "web")
    await boot(world, "a", "app")
    world.converges = False
    first = await migrate(world, "web")
    await until(lambda: any(q.name == "web" and q.mig_status == "active"
                            for q in a.qemus()), "the first stream runs")
    second = await migrate(world, "app")
    rec = await until(lambda: a.mig.jobs[second].record.queued and a.mig.jobs[second].record,
                      "the second job waits for b")
    assert "at most 1 incoming" in str(rec.queued) and rec.phase.value == "prepare", rec
    assert b.record(second) is None and "app" not in b.svc.domains
    world.converges = True
    assert (await settle(world, first))["state"] == "completed"
    assert (await settle(world, second))["state"] == "completed"
    assert_runs_only_on(world, "b", "app")


async def test_aborting_a_queued_job_changes_nothing(world: World) -> None:
    a = await with_limits(world, "a", outgoing=1)
    await boot(world, "a", "web")
    await boot(world, "a", "app")
    world.converges = False
    first = await migrate(world, "web")
    second = await migrate(world, "app")
    await until(lambda: a.mig.jobs[second].record.queued, "the second job queued")
    a.mig.abort(second)
    rec = await settle(world, second)
    assert rec["state"] == "aborted" and rec["error"]["phase"] == "begin", rec
    assert a.svc.domains["app"].state == DomainState.running
    assert world.hosts["b"].record(second) is None and "app" not in world.hosts["b"].svc.domains
    a.mig.abort(first)
    assert (await settle(world, first))["state"] == "aborted"
    assert_runs_only_on(world, "a", "web")


async def test_the_bandwidth_budget_is_shared_by_the_jobs_copying(world: World) -> None:
    a = await with_limits(world, "a", bandwidth_mibps=100)
    await boot(world, "a", "web")
    await boot(world, "a", "app")
    world.converges = False
    first = await migrate(world, "web", bandwidth_mibps=80)

    def cap(name: str) -> int | None:
        q = [q for q in a.qemus() if q.name == name and not q.incoming]
        return q[0].params.get("max-bandwidth") if q else None

    await until(lambda: cap("web") == 80 << 20, "web at its own cap (within the budget)")
    second = await migrate(world, "app")
    await until(lambda: cap("app") == 50 << 20 and cap("web") == 50 << 20,
                "both at half the budget")
    a.mig.abort(first)
    assert (await settle(world, first))["state"] == "aborted"
    await until(lambda: cap("app") == 100 << 20, "app takes the whole budget")
    shares = [e for e in a.mig.jobs[second].record.escalations if e["action"] == "bandwidth"]
    assert shares and "budget of 100 MiB/s" in shares[-1]["reason"], shares
    a.mig.abort(second)
    assert (await settle(world, second))["state"] == "aborted"


async def test_the_machine_type_is_pinned_at_first_start_and_travels(world: World) -> None:
    """`q35` becomes the versioned type this host's QEMU stands it for, in the
    stored definition too, and the destination keeps it."""
    a = world.hosts["a"]
    await boot(world, "a", "web")
    assert a.svc.domains["web"].config.machine == "pc-q35-9.9"
    assert a.store.get("web").config.machine == "pc-q35-9.9"
    assert "pc-q35-9.9" in a.qemus()[0].argv[a.qemus()[0].argv.index("-machine") + 1]
    job = await migrate(world, "web")
    assert (await settle(world, job))["state"] == "completed"
    assert world.hosts["b"].svc.domains["web"].config.machine == "pc-q35-9.9"


class RefusingRegistry(LocalOnly):
    """A registry whose commit fails (refused, or with no answer: it may have been
    applied), recording what it was asked."""

    backend = "test"

    def __init__(self, outcome: str) -> None:
        super().__init__("test")
        self.outcome = outcome
        self.calls: list[tuple[str, ...]] = []

    async def lock(self, name: str, uuid: str, job_id: str) -> None:
        self.calls.append(("lock", name, job_id))

    async def unlock(self, name: str, job_id: str) -> None:
        self.calls.append(("unlock", name, job_id))

    async def commit(self, name: str, uuid: str, source: str, dest: str,
                     job_id: str) -> None:
        from ferry.errors import Failed
        self.calls.append(("commit", name, source, dest))
        raise Failed(f"the registry says no ({self.outcome})", outcome=self.outcome)

    async def give_back(self, name: str, uuid: str, source: str, dest: str) -> None:
        self.calls.append(("give_back", name, source, dest))


@pytest.mark.parametrize("outcome", ["refused", "unknown"])
async def test_a_commit_the_registry_refuses_leaves_the_guest_on_the_source(
        world: World, outcome: str) -> None:
    """The destination commits just before the guest would run there: refused (or
    unanswered), it drops its side, never resumes the guest, and the source
    resumes its copy; an unanswered commit is given back, as it may have been
    applied."""
    a, b = world.hosts["a"], world.hosts["b"]
    reg = RefusingRegistry(outcome)
    a.svc.owners = b.svc.owners = reg
    await boot(world, "a", "web")
    job = await migrate(world, "web")
    rec = await settle(world, job)
    assert rec["state"] == "failed" and "the registry says no" in rec["error"]["message"], rec
    assert_runs_only_on(world, "a", "web")
    assert ("commit", "web", "a", "b") in reg.calls
    assert (("give_back", "web", "a", "b") in reg.calls) is (outcome == "unknown")
    assert ("lock", "web", job) in reg.calls
    await until(lambda: ("unlock", "web", job) in reg.calls, "the lock released")


class OwnedElsewhere(RefusingRegistry):
    """A registry that names host b the owner of everything."""

    async def owner(self, name: str) -> str | None:
        return self.owner_is

    owner_is: str | None = "b"


async def test_a_domain_the_registry_gives_to_another_host_is_fenced_at_start(
        world: World) -> None:
    """ferryd reconciles at start: a guest running here that the registry says runs
    elsewhere is paused and never resumed or started here; once the registry names
    this host again, the fence is lifted."""
    from ferry.errors import Conflict
    a = world.hosts["a"]
    await boot(world, "a", "web")
    reg = OwnedElsewhere("refused")
    await a.stop()
    await a.start()
    a.svc.owners = reg
    await a.svc.reconcile()
    dom = a.svc.domains["web"]
    assert dom.state == DomainState.paused and dom.fenced and "host b owns it" in dom.fenced
    assert [q.runstate for q in a.qemus() if q.name == "web"] == ["paused"]
    assert "host b owns it" in a.store.get("web").state_reason
    with pytest.raises(Conflict, match="not run here"):
        await a.svc.unpause("web")
    assert dom.state == DomainState.paused
    reg.owner_is = "a"   # the registry names this host again
    await a.svc.unpause("web")
    assert dom.state == DomainState.running and dom.fenced is None


async def test_a_domain_the_registry_does_not_know_is_claimed_at_start(world: World) -> None:
    a = world.hosts["a"]
    await boot(world, "a", "web")

    class Unknown(RefusingRegistry):
        async def owner(self, name: str) -> str | None:
            return None

        async def claim(self, name: str, uuid: str) -> bool:
            self.calls.append(("claim", name))
            return True

    reg = Unknown("refused")
    a.svc.owners = reg
    await a.svc.reconcile()
    assert ("claim", "web") in reg.calls
    assert a.svc.domains["web"].state == DomainState.running


async def test_the_source_never_resumes_a_guest_the_registry_names_elsewhere(
        world: World) -> None:
    """The destination's commit fails and its give-back has not reached the
    registry yet (it still names b): the source keeps its copy paused and fenced —
    one copy, never run on a host the registry does not name — until the registry
    names it again."""
    from ferry.errors import Conflict
    a, b = world.hosts["a"], world.hosts["b"]
    reg = OwnedElsewhere("refused")
    reg.owner_is = None          # (during the migration: not consulted)
    a.svc.owners = b.svc.owners = reg
    await boot(world, "a", "web")

    async def commit_then_owned_by_b(name: str, uuid: str, source: str, dest: str,
                                     job_id: str) -> None:
        reg.owner_is = "b"        # applied, as far as the registry is concerned
        from ferry.errors import Failed
        raise Failed("the guest could not start", outcome="refused")

    reg.commit = commit_then_owned_by_b  # type: ignore[method-assign]
    job = await migrate(world, "web")
    rec = await settle(world, job)
    assert rec["state"] == "failed", rec
    assert any("registry names host b" in e for e in rec["error"].get("undo_errors", [])), rec
    dom = a.svc.domains["web"]
    assert dom.state == DomainState.paused and dom.fenced
    assert not [q for q in b.qemus() if q.name == "web"]
    with pytest.raises(Conflict, match="not run here"):
        await a.svc.unpause("web")
    reg.owner_is = "a"           # the give-back arrived
    await a.svc.unpause("web")
    assert_runs_only_on(world, "a", "web")
