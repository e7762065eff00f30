"""An in-process event bus: state changes go to every subscriber's queue."""
from __future__ import annotations

import asyncio
import time
from typing import Any


class EventBus:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._seq = 0

    def publish(self, kind: str, **data: Any) -> None:
        self._seq += 1   # (numbered: a subscriber that lost some sees the gap)
        event = {"seq": self._seq, "kind": kind, "time": time.time(), **data}
        for q in self._queues:
            if q.qsize() < 1000:  # a stuck subscriber loses events, never blocks us
                q.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(q)
