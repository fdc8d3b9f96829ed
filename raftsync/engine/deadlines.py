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

from typing import Hashable, Iterable


class Deadlines:
    def __init__(self) -> None:
        # key -> [token, seen_at, ttl_seconds]
        self._items: dict[Hashable, list] = {}
        # key -> token whose expiry is proposed and not yet answered
        self._proposed: dict[Hashable, int] = {}

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

    def forget(self, key: Hashable) -> None:
        self._items.pop(key, None)
        self._proposed.pop(key, None)

    def reset(self, items: Iterable[tuple[Hashable, int, float]], now: float) -> None:
        self._items = {key: [token, now, ttl] for key, token, ttl in items}
        self._proposed.clear()

    def remaining(self, key: Hashable, token: int, now: float) -> float | None:
        item = self._items.get(key)
        if item is None or item[0] != token:
            return None
        return item[2] - (now - item[1])

    def due(self, now: float) -> list[tuple[Hashable, int]]:
        """Items past their TTL whose expiry is not already proposed; marks them proposed."""
        due = []
        for key, (token, seen_at, ttl) in self._items.items():
            if now - seen_at > ttl and self._proposed.get(key) != token:
                self._proposed[key] = token
                due.append((key, token))
        return due

    def proposal_failed(self, key: Hashable, token: int) -> None:
        if self._proposed.get(key) == token:
            del self._proposed[key]
