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

from typing import Any

from .history import History

HISTORY_MAX_ENTRIES = 10000
HISTORY_MAX_BYTES = 16 * 1024 * 1024


class KeyValue:
    def __init__(self) -> None:
        # key -> [value, version, revision, ttl_ms or 0]
        self.records: dict[str, list[Any]] = {}
        # [revision, key, value or None (deleted), version]
        self.history = History(HISTORY_MAX_ENTRIES, HISTORY_MAX_BYTES)

    @property
    def compacted_revision(self) -> int:
        """Every change at or below this revision has been trimmed from the history."""
        return self.history.compacted_revision

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

    def changes_since(self, revision: int, prefix: str) -> list[list[Any]] | None:
        """Changes after ``revision`` under ``prefix``, or None if some were trimmed."""
        return self.history.since(revision, lambda key: key.startswith(prefix))

    def get(self, key: str) -> list[Any] | None:
        record = self.records.get(key)
        if record is None:
            return None
        return [key, record[0], record[1], record[2], record[3]]

    def range(self, prefix: str) -> list[list[Any]]:
        return [[key, r[0], r[1], r[2], r[3]] for key, r in sorted(self.records.items()) if key.startswith(prefix)]

    def to_state(self) -> dict[str, Any]:
        history = self.history.to_state()
        return {"records": [[key, *r] for key, r in sorted(self.records.items())],
                "history": history["entries"], "compacted": history["compacted"]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "KeyValue":
        kv = cls()
        for key, value, version, revision, ttl_ms in state["records"]:
            kv.records[key] = [value, version, revision, ttl_ms]
        kv.history.load_state({"entries": state["history"], "compacted": state["compacted"]})
        return kv
