"""A bounded, ordered history of changes: what lets a watch resume from a revision.

Entries are lists whose first two items are the change's revision (the machine index
that made it, strictly increasing) and its key; what follows is up to the table. The
history keeps the newest changes within a count and a byte budget; every change at or
below ``compacted_revision`` has been trimmed, and asking for one answers None (the
watch then reports Compacted instead of silently skipping it).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

DEFAULT_MAX_ENTRIES = 10000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


def _entry_bytes(entry: list[Any]) -> int:
    return sum(len(item) for item in entry[1:] if isinstance(item, (str, bytes)))


class History:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES,
                 size: Callable[[list[Any]], int] = _entry_bytes) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self.entries: deque[list[Any]] = deque()
        self.bytes = 0
        self.compacted_revision = 0

    def append(self, entry: list[Any]) -> None:
        self.entries.append(entry)
        self.bytes += self._size(entry)
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            old = self.entries.popleft()
            self.bytes -= self._size(old)
            self.compacted_revision = old[0]

    @property
    def last_revision(self) -> int:
        """The revision of the newest change kept (or trimmed)."""
        return self.entries[-1][0] if self.entries else self.compacted_revision

    def since(self, revision: int, match: Callable[[str], bool]) -> list[list[Any]] | None:
        """Entries after ``revision`` whose key matches, oldest first; None if some of them
        may have been trimmed. Costs O(entries after ``revision``)."""
        if revision < self.compacted_revision:
            return None
        newer = []
        for entry in reversed(self.entries):
            if entry[0] <= revision:
                break
            if match(entry[1]):
                newer.append(entry)
        newer.reverse()
        return newer

    def to_state(self) -> dict[str, Any]:
        return {"entries": list(self.entries), "compacted": self.compacted_revision}

    def load_state(self, state: dict[str, Any]) -> None:
        self.entries = deque(state["entries"])
        self.bytes = sum(self._size(entry) for entry in self.entries)
        self.compacted_revision = state["compacted"]
