"""Weighted FIFO semaphores: counting semaphores and read/write locks in one table.

A name has a ``capacity``; each owner holds ``weight`` units of it. Waiters are
served strictly in arrival order: the head is granted as soon as its weight fits,
then the next, and so on, so nobody is starved (a queued writer stops later readers
from jumping ahead). A counting semaphore of N permits is capacity N, weight 1; a
read/write lock is capacity ``RW_CAPACITY``, weight 1 for readers and the whole
capacity for the writer. Every grant gets the machine index as its fencing token.
"""

from __future__ import annotations

from collections import deque
from typing import Any

Owner = tuple[int, int]
RW_CAPACITY = 1 << 30
MAX_CAPACITY = 1 << 30


class SemaphoreRecord:
    __slots__ = ("capacity", "used", "holders", "waiters")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.holders: dict[Owner, list[int]] = {}  # owner -> [token, weight]
        self.waiters: deque[tuple[Owner, int]] = deque()


class Semaphores:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.by_name: dict[str, SemaphoreRecord] = {}
        self.by_session: dict[int, set[str]] = {}

    def acquire(self, name: str, owner: Owner, capacity: int, weight: int, wait: bool, index: int,
                effects: list) -> int | None:
        """Token if held after this command, 0 if queued/busy, None on a capacity mismatch."""
        record = self.by_name.get(name)
        if record is None:
            record = self.by_name[name] = SemaphoreRecord(capacity)
        if record.capacity != capacity:
            self._drop_if_idle(name, record)
            return None
        held = record.holders.get(owner)
        if held is not None:
            return held[0]
        if not record.waiters and record.used + weight <= record.capacity:
            self._grant(name, record, owner, weight, index, effects)
            return index
        if wait and all(w[0] != owner for w in record.waiters):
            record.waiters.append((owner, weight))
            self.by_session.setdefault(owner[0], set()).add(name)
        self._drop_if_idle(name, record)
        return 0

    def release(self, name: str, owner: Owner, token: int, index: int, effects: list) -> bool:
        record = self.by_name.get(name)
        held = record.holders.get(owner) if record else None
        if held is None or held[0] != token:
            return False
        self._release(name, record, owner, index, effects)
        return True

    def withdraw(self, name: str, owner: Owner, index: int, effects: list) -> int:
        record = self.by_name.get(name)
        if record is None:
            return 0
        held = record.holders.get(owner)
        if held is not None:
            self._release(name, record, owner, index, effects)
            return held[0]
        before = len(record.waiters)
        record.waiters = deque(w for w in record.waiters if w[0] != owner)
        if len(record.waiters) != before:
            # the head may have left: whoever fits now is served
            self._serve(name, record, index, effects)
            self._untrack(owner[0], name)
        self._drop_if_idle(name, record)
        return 0

    def end_session(self, session_id: int, index: int, effects: list) -> None:
        for name in sorted(self.by_session.pop(session_id, ())):
            record = self.by_name.get(name)
            if record is None:
                continue
            record.waiters = deque(w for w in record.waiters if w[0][0] != session_id)
            for owner in sorted(o for o in record.holders if o[0] == session_id):
                token, weight = record.holders.pop(owner)
                record.used -= weight
                effects.append((f"{self.kind}_released", name, owner[0], owner[1], token))
            self._serve(name, record, index, effects)
            self._drop_if_idle(name, record)

    def holdings(self):
        """(name, session_id, handle_id, token) of every current grant."""
        for name, record in self.by_name.items():
            for owner, (token, _) in record.holders.items():
                yield name, owner[0], owner[1], token

    def info(self, name: str) -> list[Any] | None:
        record = self.by_name.get(name)
        if record is None:
            return None
        return [record.capacity, record.used, [[list(o), t, w] for o, (t, w) in sorted(record.holders.items())],
                [[list(o), w] for o, w in record.waiters]]

    def _grant(self, name: str, record: SemaphoreRecord, owner: Owner, weight: int, index: int,
               effects: list) -> None:
        record.holders[owner] = [index, weight]
        record.used += weight
        self.by_session.setdefault(owner[0], set()).add(name)
        effects.append((f"{self.kind}_granted", name, owner[0], owner[1], index))

    def _release(self, name: str, record: SemaphoreRecord, owner: Owner, index: int, effects: list) -> None:
        token, weight = record.holders.pop(owner)
        record.used -= weight
        effects.append((f"{self.kind}_released", name, owner[0], owner[1], token))
        self._untrack(owner[0], name)
        self._serve(name, record, index, effects)
        self._drop_if_idle(name, record)

    def _serve(self, name: str, record: SemaphoreRecord, index: int, effects: list) -> None:
        while record.waiters and record.used + record.waiters[0][1] <= record.capacity:
            owner, weight = record.waiters.popleft()
            self._grant(name, record, owner, weight, index, effects)

    def _untrack(self, session_id: int, name: str) -> None:
        record = self.by_name.get(name)
        if record is not None and (any(o[0] == session_id for o in record.holders)
                                   or any(w[0][0] == session_id for w in record.waiters)):
            return
        names = self.by_session.get(session_id)
        if names is not None:
            names.discard(name)
            if not names:
                del self.by_session[session_id]

    def _drop_if_idle(self, name: str, record: SemaphoreRecord) -> None:
        if not record.holders and not record.waiters:
            self.by_name.pop(name, None)

    def to_state(self) -> list[Any]:
        return [[name, r.capacity, [[list(o), t, w] for o, (t, w) in sorted(r.holders.items())],
                 [[list(o), w] for o, w in r.waiters]] for name, r in sorted(self.by_name.items())]

    @classmethod
    def from_state(cls, state: list[Any], kind: str) -> "Semaphores":
        table = cls(kind)
        for name, capacity, holders, waiters in state:
            record = SemaphoreRecord(capacity)
            for owner, token, weight in holders:
                record.holders[tuple(owner)] = [token, weight]
                record.used += weight
                table.by_session.setdefault(owner[0], set()).add(name)
            for owner, weight in waiters:
                record.waiters.append((tuple(owner), weight))
                table.by_session.setdefault(owner[0], set()).add(name)
            table.by_name[name] = record
        return table
