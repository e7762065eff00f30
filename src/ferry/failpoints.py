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


def stream_uri(uri: str) -> str:
    """The URI the source QEMU sends its stream to. For the test of a broken
    link, ``FERRY_STREAM_RELAY=HOST:PORT:FILE`` sends it through the test's relay
    on HOST:PORT, writing the real ``host:port`` into FILE for the relay to
    forward to (tests/relay.py). Unset: ``uri`` itself."""
    relay = os.environ.get("FERRY_STREAM_RELAY")
    if not relay or not uri.startswith("tcp:"):
        return uri
    host, port, path = relay.split(":", 2)
    with open(path, "w") as f:
        f.write(uri.removeprefix("tcp:"))
    log.warning("FERRY_STREAM_RELAY: the stream to %s goes through %s:%s", uri, host, port)
    return f"tcp:{host}:{port}"
