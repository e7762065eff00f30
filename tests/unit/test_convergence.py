"""The convergence policy as a pure function of recorded pass histories."""
from __future__ import annotations

from ferry.migration.convergence import HEARTBEAT_MISSES, Action, decide, throttle_note
from ferry.migration.models import MigrateOptions
from ferry.stats import MigrationStats

LIVE = MigrateOptions(mode="live", timeout_s=60)


def sample(passes: int, throttle: int = 0, remaining: int = 1 << 28,
           transferred: int = 0) -> MigrationStats:
    return MigrationStats(status="active", passes=passes, throttle_pct=throttle,
                          remaining=remaining, transferred=transferred or passes << 28,
                          total=1 << 30, dirty_rate=200 << 20)


# a guest dirtying faster than the link: QEMU throttles 20 %, then 30 %, ...
HEAVY = [sample(1), sample(2), sample(3), sample(4, 20), sample(5, 20), sample(6, 30)]


def test_a_converging_migration_just_continues() -> None:
    history = [sample(1), sample(2, remaining=1 << 20)]
    assert decide(history, 5.0, LIVE).action == Action.proceed
    assert decide([], 0.0, LIVE).action == Action.proceed


def test_each_new_throttle_level_is_noted_once() -> None:
    notes = [decide(HEAVY[:i], 10.0, LIVE).note for i in range(1, len(HEAVY) + 1)]
    assert [n is not None for n in notes] == [False, False, False, True, False, True]
    assert "80% of its CPU" in str(notes[3]) and "pass 4" in str(notes[3])
    assert throttle_note([]) is None


def test_offline_migrations_are_never_noted_as_throttled() -> None:
    offline = MigrateOptions(mode="offline", timeout_s=60)
    assert decide(HEAVY[:4], 10.0, offline).note is None


def test_timeout_pauses_by_default_and_only_once() -> None:
    d = decide(HEAVY, 61.0, LIVE)
    assert d.action == Action.pause and "within 60s" in d.reason
    assert decide(HEAVY, 61.0, LIVE, paused=True).action == Action.proceed


def test_timeout_aborts_in_every_mode_when_asked() -> None:
    for mode in ("live", "offline"):
        opts = MigrateOptions(mode=mode, timeout_s=60, on_timeout="abort")
        assert decide(HEAVY, 59.0, opts).action == Action.proceed
        d = decide(HEAVY, 61.0, opts, paused=(mode == "offline"))
        assert d.action == Action.abort and "on_timeout=abort" in d.reason


def test_a_paused_migration_still_ends() -> None:
    """After the forced pause (or for offline) the stream has a hard bound too."""
    opts = MigrateOptions(mode="live", timeout_s=60)
    assert decide(HEAVY, 100.0, opts, paused=True).action == Action.proceed
    d = decide(HEAVY, 60 + 60 + 121.0, opts, paused=True)
    assert d.action == Action.abort and "paused" in d.reason


def test_operator_abort_and_silent_destination_win() -> None:
    assert decide(HEAVY, 1.0, LIVE, abort_requested="by the operator").action == Action.abort
    d = decide(HEAVY, 1.0, LIVE, peer_misses=HEARTBEAT_MISSES)
    assert d.action == Action.fail and "heartbeats" in d.reason
    assert decide(HEAVY, 1.0, LIVE, peer_misses=HEARTBEAT_MISSES - 1).action == \
        Action.proceed
