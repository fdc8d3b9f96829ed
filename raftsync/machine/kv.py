"""The replicated key/value map.

Every key carries a ``version`` (writes since it was created, starting at 1) and a
``revision`` (the machine index of its last change, strictly increasing across the
whole map, like etcd's mod_revision). ``if_version`` makes a write or delete a
compare-and-set: ``0`` means "must not exist".
"""

from __future__ import annotations

from typing import Any


class KeyValue:
    def __init__(self) -> None:
        # key -> [value, version, revision]
        self.records: dict[str, list[Any]] = {}

    def put(self, key: str, value: bytes, if_version: int | None, index: int) -> tuple[bool, list[Any]]:
        """Returns (ok, [revision, version]) or (False, [current_version])."""
        record = self.records.get(key)
        current = record[1] if record is not None else 0
        if if_version is not None and if_version != current:
            return False, [current]
        version = current + 1
        self.records[key] = [value, version, index]
        return True, [index, version]

    def delete(self, key: str, if_version: int | None, index: int) -> tuple[str, list[Any]]:
        record = self.records.get(key)
        if record is None:
            return "not_found", []
        if if_version is not None and if_version != record[1]:
            return "conflict", [record[1]]
        del self.records[key]
        return "ok", [index]

    def get(self, key: str) -> list[Any] | None:
        record = self.records.get(key)
        if record is None:
            return None
        return [key, record[0], record[1], record[2]]

    def range(self, prefix: str) -> list[list[Any]]:
        return [[key, r[0], r[1], r[2]] for key, r in sorted(self.records.items()) if key.startswith(prefix)]

    def to_state(self) -> list[Any]:
        return [[key, r[0], r[1], r[2]] for key, r in sorted(self.records.items())]

    @classmethod
    def from_state(cls, state: list[Any]) -> "KeyValue":
        kv = cls()
        for key, value, version, revision in state:
            kv.records[key] = [value, version, revision]
        return kv
