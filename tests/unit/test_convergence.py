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


def busy(passes: int, expected_ms: int) -> MigrationStats:
    return sample(passes).model_copy(update={"expected_downtime_ms": expected_ms})


def test_the_allowed_pause_starts_low_and_doubles_per_pass_up_to_the_bound() -> None:
    from ferry.migration.convergence import DOWNTIME_START_MS, initial_downtime
    assert initial_downtime(LIVE) == DOWNTIME_START_MS == 50
    history, limit, steps = [], initial_downtime(LIVE), []
    for passes in range(1, 9):
        history.append(busy(passes, 900))  # QEMU keeps expecting a long pause
        d = decide(history, 5.0, LIVE, downtime_ms=limit)
        if d.downtime_ms is not None:
            assert d.downtime_note is not None and f"→ {d.downtime_ms} ms" in d.downtime_note
            limit = d.downtime_ms
            steps.append((passes, limit))
    assert steps == [(3, 100), (4, 200), (5, 300)]  # 300: the default --max-downtime


def test_no_step_while_qemu_expects_to_fit_the_limit_or_the_guest_is_paused() -> None:
    from ferry.migration.convergence import downtime_step
    assert downtime_step([busy(5, 40)], 50, LIVE) is None
    assert decide([busy(5, 900)], 5.0, LIVE, paused=True, downtime_ms=50).downtime_ms is None
    assert downtime_step([busy(2, 900)], 50, LIVE) is None  # too early


def test_offline_and_a_tight_bound_start_at_the_bound_and_never_step() -> None:
    from ferry.migration.convergence import downtime_step, initial_downtime
    offline = MigrateOptions(mode="offline", max_downtime_ms=300)
    tight = MigrateOptions(mode="live", max_downtime_ms=30)
    assert initial_downtime(offline) == 300 and initial_downtime(tight) == 30
    assert downtime_step([busy(6, 900)], 300, offline) is None
    assert downtime_step([busy(6, 900)], 30, tight) is None


def test_progress_counts_the_whole_job_and_never_goes_back() -> None:
    from ferry.migration.convergence import progress
    mib = 1 << 20
    # pass 1 sends 512 MiB at 100 MB/s (800 Mbit/s); then pass 2 finds 200 MiB dirty
    seq = [MigrationStats(status="active", total=512 * mib, transferred=t * mib,
                          remaining=r * mib, mbps=800.0, dirty_rate=d * mib, passes=p)
           for t, r, d, p in ((0, 512, 0, 1), (256, 256, 0, 1), (500, 12, 0, 1),
                              (512, 200, 20, 2), (700, 30, 20, 3), (730, 4, 20, 4))]
    shown: float | None = None
    pcts, etas = [], []
    for s in seq:
        shown, eta = progress(s, shown)
        pcts.append(shown)
        etas.append(eta)
    assert pcts == sorted(pcts) and pcts[0] == 0.0 and pcts[-1] > 99
    assert pcts[3] == pcts[2]  # the new dirty pages don't take the bar back
    assert etas[1] is not None and 2 < etas[1] < 3   # 256 MiB at 100 MB/s
    # a first-pass estimate of the dirty rate makes the first pass's ETA honest
    _, sampled_eta = progress(seq[1].model_copy(update={"dirty_rate": 50 * mib}), None)
    assert sampled_eta is not None and sampled_eta > etas[1]


def test_no_eta_while_the_guest_dirties_faster_than_the_stream() -> None:
    from ferry.migration.convergence import progress
    s = MigrationStats(status="active", total=1 << 30, transferred=1 << 30,
                       remaining=1 << 28, mbps=800.0, dirty_rate=200 << 20, passes=5)
    assert progress(s, 61.0) == (61.0, None)


def test_postcopy_is_the_rung_after_the_stepped_pause_when_allowed() -> None:
    """--postcopy auto: a guest dirtying faster than the link goes through the
    pause steps first; once the pause is at its bound and QEMU still expects
    longer, from POSTCOPY_AFTER_PASSES on, it switches to post-copy. Without
    --postcopy it never does."""
    from ferry.migration.convergence import POSTCOPY_AFTER_PASSES
    auto = MigrateOptions(mode="live", timeout_s=60, postcopy="auto")
    history, limit, actions = [], 50, []
    for passes in range(1, POSTCOPY_AFTER_PASSES + 2):
        history.append(busy(passes, 900))
        d = decide(history, 5.0, auto, downtime_ms=limit)
        limit = d.downtime_ms or limit
        actions.append(d.action)
    assert actions.index(Action.postcopy) == POSTCOPY_AFTER_PASSES - 1
    assert limit == auto.max_downtime_ms
    d = decide(history, 5.0, auto, downtime_ms=limit)
    assert "not converging" in d.reason and "900 ms" in d.reason
    assert decide(history, 5.0, LIVE, downtime_ms=limit).action == Action.proceed
    # converging (QEMU expects to fit the bound) or paused: no post-copy
    assert decide([busy(9, 200)], 5.0, auto, downtime_ms=300).action == Action.proceed
    assert decide(history, 5.0, auto, downtime_ms=limit, paused=True).action == \
        Action.proceed


def test_postcopy_now_on_timeout_and_complete() -> None:
    now = MigrateOptions(mode="live", timeout_s=60, postcopy="now")
    assert decide([sample(1)], 0.1, now).action == Action.postcopy
    setup = MigrationStats(status="setup")
    assert decide([setup], 0.1, now).action == Action.proceed  # not under way yet
    on_timeout = MigrateOptions(mode="live", timeout_s=60, on_timeout="postcopy")
    assert on_timeout.postcopy_allowed and not LIVE.postcopy_allowed
    assert decide(HEAVY, 59.0, on_timeout).action == Action.proceed
    d = decide(HEAVY, 61.0, on_timeout)
    assert d.action == Action.postcopy and "on_timeout=postcopy" in d.reason
    # QEMU refused post-copy: the timeout pauses instead
    d = decide(HEAVY, 61.0, on_timeout, postcopy_possible=False)
    assert d.action == Action.pause
    d = decide(HEAVY, 1.0, on_timeout, complete_requested="asked")
    assert d.action == Action.postcopy and "asked" in d.reason
    assert decide(HEAVY, 1.0, LIVE, complete_requested="asked").action == Action.pause
    offline = MigrateOptions(mode="offline", postcopy="now")
    assert not offline.postcopy_allowed
    assert decide([sample(1)], 0.1, offline, paused=True).action == Action.proceed
