"""The replicated key/value map, its change history and per-record TTLs.

Every key carries a ``version`` (writes since it was created, starting at 1) and a
``revision`` (the machine index of its last change, strictly increasing across the
whole map, like etcd's mod_revision). ``if_version`` makes a write or delete a
compare-and-set: ``0`` means "must not exist".

A record may carry a TTL; the machine only stores it. The Raft leader measures it on
its monotonic clock from when it applied the write and proposes ``KV_EXPIRE`` naming
the revision it saw, so a newer write always wins over a stale expiry.

The history (every change, oldest first, bounded by count and bytes) lets a watch
resume from a revision in commit order, including across a snapshot install; a
revision older than what is kept raises Compacted.
"""

from __future__ import annotations

from collections import deque
from typing import Any

HISTORY_MAX_ENTRIES = 10000
HISTORY_MAX_BYTES = 16 * 1024 * 1024


class KeyValue:
    def __init__(self) -> None:
        # key -> [value, version, revision, ttl_ms or 0]
        self.records: dict[str, list[Any]] = {}
        # [revision, key, value or None (deleted), version]
        self.history: deque[list[Any]] = deque()
        self.history_bytes = 0
        # every change at or below this revision has been trimmed from the history
        self.compacted_revision = 0

    def put(self, key: str, value: bytes, if_version: int | None, ttl_ms: int,
            index: int) -> tuple[bool, list[Any]]:
        """Returns (ok, [revision, version]) or (False, [current_version])."""
        record = self.records.get(key)
        current = record[1] if record is not None else 0
        if if_version is not None and if_version != current:
            return False, [current]
        version = current + 1
        self.records[key] = [value, version, index, ttl_ms]
        self._remember(index, key, value, version)
        return True, [index, version]

    def delete(self, key: str, if_version: int | None, index: int) -> tuple[str, list[Any]]:
        record = self.records.get(key)
        if record is None:
            return "not_found", []
        if if_version is not None and if_version != record[1]:
            return "conflict", [record[1]]
        del self.records[key]
        self._remember(index, key, None, 0)
        return "ok", [index]

    def expire(self, key: str, revision: int, index: int) -> bool:
        record = self.records.get(key)
        if record is None or record[2] != revision or not record[3]:
            return False
        del self.records[key]
        self._remember(index, key, None, 0)
        return True

    def _remember(self, revision: int, key: str, value: bytes | None, version: int) -> None:
        self.history.append([revision, key, value, version])
        self.history_bytes += len(key) + (len(value) if value else 0)
        while len(self.history) > HISTORY_MAX_ENTRIES or self.history_bytes > HISTORY_MAX_BYTES:
            old = self.history.popleft()
            self.history_bytes -= len(old[1]) + (len(old[2]) if old[2] else 0)
            self.compacted_revision = old[0]

    def changes_since(self, revision: int, prefix: str) -> list[list[Any]] | None:
        """Changes after ``revision`` under ``prefix``, or None if some were trimmed."""
        if revision < self.compacted_revision:
            return None
        return [entry for entry in self.history if entry[0] > revision and entry[1].startswith(prefix)]

    def get(self, key: str) -> list[Any] | None:
        record = self.records.get(key)
        if record is None:
            return None
        return [key, record[0], record[1], record[2], record[3]]

    def range(self, prefix: str) -> list[list[Any]]:
        return [[key, r[0], r[1], r[2], r[3]] for key, r in sorted(self.records.items()) if key.startswith(prefix)]

    def to_state(self) -> dict[str, Any]:
        return {"records": [[key, *r] for key, r in sorted(self.records.items())],
                "history": list(self.history), "compacted": self.compacted_revision}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "KeyValue":
        kv = cls()
        for key, value, version, revision, ttl_ms in state["records"]:
            kv.records[key] = [value, version, revision, ttl_ms]
        kv.history = deque(state["history"])
        kv.history_bytes = sum(len(e[1]) + (len(e[2]) if e[2] else 0) for e in kv.history)
        kv.compacted_revision = state["compacted"]
        return kv
