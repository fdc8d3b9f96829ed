"""Deadlines kept by the Raft leader on its own monotonic clock.

Used for every TTL a machine table declares (sessions, records, ...). Each tracked
item has a *token* (a session's last keepalive index, a record's revision): the expiry
command names it,
so anything that renewed the item in the meantime makes the expiry a no-op in the
machine. Every replica tracks when it applied each renewal, but only the leader
proposes expiries, and a new leader first restarts every clock (``reset``): it cannot
know when the old leader last saw a renewal.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable, Iterable


class Deadlines:
    """Items by key; ``due`` costs O(items that fall due), not O(all items), so the leader's
    tick stays cheap with many TTLs (a heap of expiry times, stale entries skipped)."""

    def __init__(self) -> None:
        # key -> [token, seen_at, ttl_seconds]
        self._items: dict[Hashable, list] = {}
        # key -> token whose expiry is proposed and not yet answered
        self._proposed: dict[Hashable, int] = {}
        # (expires_at, tie, key, token); an entry whose item changed since is skipped
        self._heap: list[tuple[float, int, Hashable, int]] = []
        self._tie = itertools.count()

    def _push(self, key: Hashable, token: int, expires_at: float) -> None:
        heapq.heappush(self._heap, (expires_at, next(self._tie), key, token))
        if len(self._heap) > 4 * len(self._items) + 64:  # many stale entries: rebuild
            self._heap = [(item[1] + item[2], next(self._tie), k, item[0]) for k, item in self._items.items()
                          if self._proposed.get(k) != item[0]]
            heapq.heapify(self._heap)

    def observe(self, key: Hashable, token: int, ttl: float | None, now: float) -> None:
        """A renewal (new token) seen at ``now``; ``ttl`` None keeps the TTL known for
        ``key`` (a keepalive renews a session's own TTL), and is ignored if none is."""
        if ttl is None:
            item = self._items.get(key)
            if item is None:
                return
            ttl = item[2]
        self._items[key] = [token, now, ttl]
        self._proposed.pop(key, None)
        self._push(key, token, now + ttl)

    def forget(self, key: Hashable) -> None:
        self._items.pop(key, None)
        self._proposed.pop(key, None)

    def reset(self, items: Iterable[tuple[Hashable, int, float]], now: float) -> None:
        self._items = {key: [token, now, ttl] for key, token, ttl in items}
        self._proposed.clear()
        self._heap = [(now + item[2], next(self._tie), key, item[0]) for key, item in self._items.items()]
        heapq.heapify(self._heap)

    def remaining(self, key: Hashable, token: int, now: float) -> float | None:
        item = self._items.get(key)
        if item is None or item[0] != token:
            return None
        return item[2] - (now - item[1])

    def due(self, now: float) -> list[tuple[Hashable, int]]:
        """Items past their TTL whose expiry is not already proposed; marks them proposed."""
        due = []
        heap = self._heap
        while heap and heap[0][0] < now:
            expires_at, _, key, token = heapq.heappop(heap)
            item = self._items.get(key)
            if item is None or item[0] != token or item[1] + item[2] != expires_at:
                continue  # renewed, forgotten or reset since
            if self._proposed.get(key) != token:
                self._proposed[key] = token
                due.append((key, token))
        return due

    def proposal_failed(self, key: Hashable, token: int) -> None:
        if self._proposed.get(key) == token:
            del self._proposed[key]
            item = self._items.get(key)
            if item is not None and item[0] == token:
                self._push(key, token, item[1] + item[2])  # due again at once
