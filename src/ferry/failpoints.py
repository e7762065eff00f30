"""Crash points for tests: ``FERRY_CRASH_AT=NAME`` makes ferryd die at that point
as abruptly as ``kill -9`` (``os._exit``), so the recovery paths that follow a
crash at an exact protocol step can be tested for real. Unset: a no-op."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    if os.environ.get("FERRY_CRASH_AT") == name:
        log.critical("FERRY_CRASH_AT=%s: dying here", name)
        logging.shutdown()
        os._exit(137)
