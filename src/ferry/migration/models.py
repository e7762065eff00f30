"""What the two daemons and the CLI exchange about a migration."""
from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ferry.models import DomainConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Mode(enum.StrEnum):
    live = "live"
    offline = "offline"


class OnTimeout(enum.StrEnum):
    pause = "pause"   # stop the guest and finish as an offline migration
    abort = "abort"   # cancel; the guest keeps running on the source


class Phase(enum.StrEnum):
    begin = "begin"
    prepare = "prepare"
    perform = "perform"
    finish = "finish"
    confirm = "confirm"


class JobState(enum.StrEnum):
    running = "running"
    completed = "completed"
    failed = "failed"
    aborted = "aborted"


class MigrateOptions(Strict):
    mode: Mode = Mode.offline
    max_downtime_ms: int = Field(default=300, ge=1, le=600_000)
    bandwidth_mibps: int = Field(default=0, ge=0, le=1_000_000,
                                 description="0: unlimited")
    timeout_s: float = Field(default=600.0, gt=0, le=86_400)
    on_timeout: OnTimeout = OnTimeout.pause
    auto_converge_after: int = Field(default=4, ge=1, le=1000,
                                     description="passes before throttling the guest")


class MigrateRequest(MigrateOptions):
    dest: str = Field(min_length=1, max_length=255)
    check: bool = False


class StreamCreds(Strict):
    """One QEMU's half of a migration's TLS credentials (PEM); see streamtls."""

    ca: str = Field(max_length=16384)
    cert: str = Field(max_length=16384)
    key: str = Field(max_length=16384, repr=False)


class RelocationRequest(Strict):
    """Source → destination: the domain and what it needs there."""

    job_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    source: str
    config: DomainConfig
    mode: Mode
    running: bool        # False: a shut-off domain, move the definition only
    accel: str | None
    arch: str
    # the destination QEMU's TLS credentials for this job's stream (Prepare only;
    # never stored): without them a running domain is refused
    stream: StreamCreds | None = Field(default=None, repr=False)


class FinishRequest(Strict):
    job_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    resume: bool
    stats: dict[str, Any] = Field(default_factory=dict)
    # the console log so far (base64) and the offset of its first byte, so the
    # console's output continues on the destination with the same offsets
    console_base: int = Field(default=0, ge=0)
    console_b64: str = Field(default="", max_length=8 << 20)


class AbortRequest(Strict):
    job_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    reason: str = ""


class JobRecord(BaseModel):
    """A migration as either host keeps it (``ferry jobs``, ``ferry migrations``)."""

    id: str
    domain: str
    mode: Mode
    role: str                      # "source" or "destination"
    source: str
    dest: str
    state: JobState = JobState.running
    phase: Phase = Phase.begin
    error: dict[str, Any] | None = None
    started: float
    ended: float | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    phase_times: dict[str, float] = Field(default_factory=dict)
