"""The lock table: one holder per name, a FIFO of waiters, fencing tokens.

The same table serves leader elections (``Locks("leader")``): a group's leader is
the holder, candidates are the waiters, and each owner carries a payload
(candidate id and proclaimed value) that grant effects report.

An owner is ``(session_id, handle_id)``: the handle, not the process, owns a lock, so
two handles in one process exclude each other. The fencing token of a grant is the
machine index of the command that granted it, so tokens strictly increase per lock
(and across the cluster). A release or a session's end hands the lock to the first
waiter in the same command: a hand-off costs one log entry however many wait.
"""

from __future__ import annotations

from collections import deque
from typing import Any

Owner = tuple[int, int]


class LockRecord:
    __slots__ = ("holder", "token", "waiters", "payloads")

    def __init__(self) -> None:
        self.holder: Owner | None = None
        self.token = 0
        self.waiters: deque[Owner] = deque()
        # owner -> payload (elections: [candidate_id, value]); absent for plain locks
        self.payloads: dict[Owner, Any] = {}


class Locks:
    def __init__(self, kind: str = "lock") -> None:
        self.kind = kind
        self.by_name: dict[str, LockRecord] = {}
        # session id -> names of locks it holds or waits on (for release on expiry)
        self.by_session: dict[int, set[str]] = {}

    def _track(self, session_id: int, name: str) -> None:
        self.by_session.setdefault(session_id, set()).add(name)

    def _untrack_if_idle(self, session_id: int, name: str) -> None:
        record = self.by_name.get(name)
        if record is not None:
            if record.holder is not None and record.holder[0] == session_id:
                return
            if any(w[0] == session_id for w in record.waiters):
                return
        names = self.by_session.get(session_id)
        if names is not None:
            names.discard(name)
            if not names:
                del self.by_session[session_id]

    def acquire(self, name: str, owner: Owner, wait: bool, index: int, effects: list,
                payload: Any = None) -> int:
        """Returns the token if ``owner`` holds the lock after this command, else 0."""
        record = self.by_name.get(name)
        if record is None:
            record = self.by_name[name] = LockRecord()
        if record.holder == owner:
            return record.token
        if record.holder is None:
            if payload is not None:
                record.payloads[owner] = payload
            self._grant(name, record, owner, index, effects)
            return record.token
        if wait and owner not in record.waiters:
            record.waiters.append(owner)
            if payload is not None:
                record.payloads[owner] = payload
            self._track(owner[0], name)
        return 0

    def set_payload(self, name: str, owner: Owner, token: int, payload: Any, effects: list) -> bool:
        """Replace the holder's payload (an election's proclaimed value)."""
        record = self.by_name.get(name)
        if record is None or record.holder != owner or record.token != token:
            return False
        record.payloads[owner] = payload
        effects.append((f"{self.kind}_changed", name, owner[0], owner[1], token))
        return True

    def holdings(self):
        """(name, session_id, handle_id, token) of every current grant."""
        for name, record in self.by_name.items():
            if record.holder is not None:
                yield name, record.holder[0], record.holder[1], record.token

    def holder_info(self, name: str) -> list[Any] | None:
        """[session_id, handle_id, token, payload] of the holder, or None."""
        record = self.by_name.get(name)
        if record is None or record.holder is None:
            return None
        return [record.holder[0], record.holder[1], record.token, record.payloads.get(record.holder)]

    def release(self, name: str, owner: Owner, token: int, index: int, effects: list) -> bool:
        record = self.by_name.get(name)
        if record is None or record.holder != owner or record.token != token:
            return False
        self._release(name, record, index, effects)
        return True

    def withdraw(self, name: str, owner: Owner, index: int, effects: list) -> int:
        """Withdraw a wait; if a grant raced it, release that grant. Returns the released token or 0."""
        record = self.by_name.get(name)
        if record is None:
            return 0
        if record.holder == owner:
            token = record.token
            self._release(name, record, index, effects)
            return token
        try:
            record.waiters.remove(owner)
        except ValueError:
            return 0
        record.payloads.pop(owner, None)
        self._untrack_if_idle(owner[0], name)
        if record.holder is None and not record.waiters:
            del self.by_name[name]
        return 0

    def end_session(self, session_id: int, index: int, effects: list) -> None:
        for name in sorted(self.by_session.pop(session_id, ())):
            record = self.by_name.get(name)
            if record is None:
                continue
            record.waiters = deque(w for w in record.waiters if w[0] != session_id)
            for owner in [o for o in record.payloads if o[0] == session_id and o != record.holder]:
                del record.payloads[owner]
            if record.holder is not None and record.holder[0] == session_id:
                self._release(name, record, index, effects)
            elif record.holder is None and not record.waiters:
                del self.by_name[name]

    def info(self, name: str) -> list[Any] | None:
        record = self.by_name.get(name)
        if record is None:
            return None
        holder = list(record.holder) if record.holder else None
        return [holder, record.token, [list(w) for w in record.waiters]]

    def _grant(self, name: str, record: LockRecord, owner: Owner, index: int, effects: list) -> None:
        record.holder = owner
        record.token = index
        self._track(owner[0], name)
        effects.append((f"{self.kind}_granted", name, owner[0], owner[1], index))

    def _release(self, name: str, record: LockRecord, index: int, effects: list) -> None:
        previous = record.holder
        if previous is None:
            return
        record.holder = None
        record.payloads.pop(previous, None)
        effects.append((f"{self.kind}_released", name, previous[0], previous[1], record.token))
        self._untrack_if_idle(previous[0], name)
        if record.waiters:
            self._grant(name, record, record.waiters.popleft(), index, effects)
        else:
            del self.by_name[name]

    def to_state(self) -> list[Any]:
        return [[name, list(r.holder) if r.holder else None, r.token, [list(w) for w in r.waiters],
                 [[list(o), p] for o, p in sorted(r.payloads.items())]]
                for name, r in sorted(self.by_name.items())]

    @classmethod
    def from_state(cls, state: list[Any], kind: str = "lock") -> "Locks":
        locks = cls(kind)
        for name, holder, token, waiters, payloads in state:
            record = LockRecord()
            record.holder = tuple(holder) if holder else None
            record.token = token
            record.waiters = deque(tuple(w) for w in waiters)
            record.payloads = {tuple(o): p for o, p in payloads}
            locks.by_name[name] = record
            if record.holder:
                locks._track(record.holder[0], name)
            for waiter in record.waiters:
                locks._track(waiter[0], name)
        return locks
