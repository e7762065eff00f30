"""The CLI's migration display reads the typed record (MigrationStats), not keys."""
from __future__ import annotations

from ferry.cli.progress import jobs_table, progress_line, records_table, summary
from ferry.migration.models import JobRecord

RECORD = {
    "id": "0123456789ab", "domain": "web", "mode": "live", "role": "source",
    "source": "a", "dest": "b", "state": "completed", "phase": "confirm",
    "started": 100.0, "ended": 101.5, "cleanup_error": None,
    "stats": {"status": "completed", "transferred": 96 << 20, "total": 256 << 20,
              "remaining": 0, "mbps": 900.0, "passes": 3, "downtime_ms": 42,
              "stream_tls": True, "was_running": True},  # an 0.1 record's extra key
    "escalations": [{"time": 100.5, "action": "throttle", "reason": "auto-converge ..."}],
    "phase_times": {"prepare": 0.1},
}


def test_summary_of_a_completed_job() -> None:
    text = summary(RECORD)
    assert "web a -> b (live): completed" in text
    assert "downtime:   42 ms" in text and "in 3 passes" in text
    assert "escalation: throttle" in text and "TLS" in text


def test_progress_line_and_tables_take_records_and_dicts() -> None:
    running = {**RECORD, "state": "running", "phase": "perform",
               "stats": {**RECORD["stats"], "remaining": 10 << 20, "throttle_pct": 20,
                         "expected_downtime_ms": None}}
    line = progress_line(JobRecord.model_validate(running))
    assert "phase perform" in line and "throttle 20%" in line
    assert "expected downtime" not in line
    assert jobs_table([running]).row_count == 1
    assert records_table([RECORD, {**RECORD, "stats": {}}]).row_count == 2


def test_a_failed_job_says_where_and_what_was_left() -> None:
    failed = {**RECORD, "state": "failed", "stats": {},
              "error": {"phase": "perform", "host": "b", "message": "boom",
                        "undo_errors": ["prepare: host b did not answer the abort"]}}
    text = summary(failed)
    assert "in perform on host b: boom" in text and "left over:  prepare:" in text
    assert "downtime" not in text


def test_each_disk_shows_apart_from_memory_and_the_last_escalation() -> None:
    rec = JobRecord.model_validate({
        "id": "0123456789ab", "domain": "web", "mode": "live", "role": "source",
        "source": "a", "dest": "b", "started": 0.0, "phase": "perform",
        "disks": [{"index": 0, "disk": "local:web.qcow2", "mode": "full",
                   "bytes": 100 << 20, "total": 400 << 20, "rate_mibps": 80.0,
                   "first_pass_s": 0, "saved_bytes": 0}],
        "escalations": [{"time": 1.0, "action": "downtime", "reason": "x"}]})
    line = progress_line(rec)
    assert "local:web.qcow2 100.0 MiB/400.0 MiB 80 MiB/s" in line, line
    assert "last escalation: downtime" in line
    done = JobRecord.model_validate({**rec.model_dump(), "state": "completed",
                                     "phase": "confirm"})
    assert "local:web.qcow2" not in progress_line(done)
    assert "disk:       local:web.qcow2: 100.0 MiB copied (full)" in summary(done)
