"""Ownership tables: locks, elections, counting semaphores and read/write locks, one logic.

A name has a ``capacity``; each owner ``(session_id, handle_id)`` holds ``weight`` units
of it. Waiters are served strictly in arrival order: the head is granted as soon as its
weight fits, then the next, so nobody is starved (a queued writer stops later readers
from jumping ahead). A release or a session's end hands the name on in the same
command: a hand-off costs one log entry however many wait.

- a lock is capacity 1, weight 1 (``LockTable``);
- an election is a lock whose owners carry a payload (candidate id, proclaimed value):
  the group's leader is the holder, candidates are the waiters (``ElectionTable``); its
  changes are kept in a bounded history so observers resume without skipping a term;
- a counting semaphore of N permits is capacity N, weight 1 (``SemaphoreTable``);
- a read/write lock is capacity RW_CAPACITY, weight 1 for readers and all of it for
  the writer (``RWLockTable``).

The handle, not the process, owns a name, so two handles in one process exclude each
other. The fencing token of a grant is the machine index of the command that granted
it, so tokens strictly increase per name (and across the cluster).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable

from ..codec import MAX_NAME_BYTES, MAX_VALUE_BYTES, Op, Query, Status, encode_result
from .effects import Changed, Granted, Released
from .history import History
from .table import (Context, Invalid, Reader, Table, WatchKind, arity, bool_arg, bytes_arg, int_arg,
                    str_arg)

Owner = tuple[int, int]
RW_CAPACITY = 1 << 30
MAX_CAPACITY = 1 << 30
HISTORY_MAX_ENTRIES = 10000
HISTORY_MAX_BYTES = 4 * 1024 * 1024
OK = encode_result(Status.OK)


class Record:
    __slots__ = ("capacity", "used", "holders", "waiters", "payloads")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.holders: dict[Owner, list[int]] = {}  # owner -> [token, weight]
        self.waiters: deque[tuple[Owner, int]] = deque()
        self.payloads: dict[Owner, Any] = {}  # owner -> payload (elections), holders and waiters


class OwnershipTable(Table):
    """One kind of owned name. Subclasses parse their acquire command and answer their
    info query; everything else (grant, queue, hand-off, withdraw, session end, tokens,
    snapshots) is here, once."""

    acquire_op = release_op = withdraw_op = 0
    info_query = 0

    def __init__(self) -> None:
        self.by_name: dict[str, Record] = {}
        # session id -> names it holds or waits on (for release when it ends)
        self.by_session: dict[int, set[str]] = {}
        self._granted_kind = f"{self.name}_granted"
        self._released_kind = f"{self.name}_released"

    # -- the table interface ------------------------------------------------------------

    def commands(self) -> dict[int, Callable[[Context, int, list[Any]], bytes]]:
        return {self.acquire_op: self._acquire_command, self.release_op: self._release_command,
                self.withdraw_op: self._withdraw_command}

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        return {self.info_query: lambda args, reader: encode_result(
            Status.OK, self.info(str_arg(args[0], MAX_NAME_BYTES, "name")))}

    def parse_acquire(self, args: list[Any]) -> tuple[str, int, int, int, bool, Any]:
        """(name, handle, capacity, weight, wait, payload) of an acquire command."""
        raise NotImplementedError

    def info(self, name: str) -> Any:
        raise NotImplementedError

    def end_session(self, ctx: Context, session_id: int) -> None:
        for name in sorted(self.by_session.pop(session_id, ())):
            record = self.by_name.get(name)
            if record is None:
                continue
            record.waiters = deque(w for w in record.waiters if w[0][0] != session_id)
            for owner in [o for o in record.payloads if o[0] == session_id and o not in record.holders]:
                del record.payloads[owner]
            for owner in sorted(o for o in record.holders if o[0] == session_id):
                self._take_back(ctx, name, record, owner)
            self._serve(ctx, name, record)
            self._drop_if_idle(name, record)

    def holdings(self) -> Iterable[tuple]:
        for name, record in self.by_name.items():
            for owner, (token, _) in record.holders.items():
                yield Granted(self._granted_kind, name, owner[0], owner[1], token)

    # -- commands -------------------------------------------------------------------------

    def _name_and_handle(self, args: list[Any]) -> tuple[str, int]:
        return str_arg(args[0], MAX_NAME_BYTES, "name"), int_arg(args[1], "handle id")

    def _acquire_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        name, handle, capacity, weight, wait, payload = self.parse_acquire(args)
        token = self.acquire(ctx, name, (session_id, handle), capacity, weight, wait, payload)
        if token is None:
            raise Invalid(f"{name!r} exists with a different capacity (permits)")
        return encode_result(Status.OK, token)

    def _release_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (3,), "RELEASE takes [name, handle, token]")
        name, handle = self._name_and_handle(args)
        if not self.release(ctx, name, (session_id, handle), int_arg(args[2], "token")):
            return encode_result(Status.NOT_HELD)
        return OK

    def _withdraw_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (2,), "WITHDRAW takes [name, handle]")
        name, handle = self._name_and_handle(args)
        return encode_result(Status.OK, self.withdraw(ctx, name, (session_id, handle)))

    # -- the logic ----------------------------------------------------------------------

    def acquire(self, ctx: Context, name: str, owner: Owner, capacity: int, weight: int, wait: bool,
                payload: Any = None) -> int | None:
        """The token if ``owner`` holds it after this command, 0 if queued or busy, None on
        a capacity mismatch."""
        record = self.by_name.get(name)
        if record is None:
            record = self.by_name[name] = Record(capacity)
        if record.capacity != capacity:
            self._drop_if_idle(name, record)
            return None
        held = record.holders.get(owner)
        if held is not None:
            return held[0]
        if not record.waiters and record.used + weight <= record.capacity:
            if payload is not None:
                record.payloads[owner] = payload
            self._grant(ctx, name, record, owner, weight)
            return ctx.index
        if wait and all(w[0] != owner for w in record.waiters):
            record.waiters.append((owner, weight))
            if payload is not None:
                record.payloads[owner] = payload
            self.by_session.setdefault(owner[0], set()).add(name)
        self._drop_if_idle(name, record)
        return 0

    def release(self, ctx: Context, name: str, owner: Owner, token: int) -> bool:
        record = self.by_name.get(name)
        held = record.holders.get(owner) if record else None
        if held is None or held[0] != token:
            return False
        self._take_back(ctx, name, record, owner)
        self._serve(ctx, name, record)
        self._drop_if_idle(name, record)
        return True

    def withdraw(self, ctx: Context, name: str, owner: Owner) -> int:
        """Withdraw a wait; if a grant raced it, release that grant. Returns the released
        token or 0."""
        record = self.by_name.get(name)
        if record is None:
            return 0
        held = record.holders.get(owner)
        if held is not None:
            self.release(ctx, name, owner, held[0])
            return held[0]
        before = len(record.waiters)
        record.waiters = deque(w for w in record.waiters if w[0] != owner)
        if len(record.waiters) != before:
            record.payloads.pop(owner, None)
            self._untrack(owner[0], name)
            self._serve(ctx, name, record)  # the head may have left: whoever fits now is served
        self._drop_if_idle(name, record)
        return 0

    def _grant(self, ctx: Context, name: str, record: Record, owner: Owner, weight: int) -> None:
        record.holders[owner] = [ctx.index, weight]
        record.used += weight
        self.by_session.setdefault(owner[0], set()).add(name)
        ctx.effects.append(Granted(self._granted_kind, name, owner[0], owner[1], ctx.index))

    def _take_back(self, ctx: Context, name: str, record: Record, owner: Owner) -> None:
        token, weight = record.holders.pop(owner)
        record.used -= weight
        record.payloads.pop(owner, None)
        ctx.effects.append(Released(self._released_kind, name, owner[0], owner[1], token))
        self._untrack(owner[0], name)

    def _serve(self, ctx: Context, name: str, record: Record) -> None:
        while record.waiters and record.used + record.waiters[0][1] <= record.capacity:
            owner, weight = record.waiters.popleft()
            self._grant(ctx, name, record, owner, weight)

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

    def _drop_if_idle(self, name: str, record: Record) -> None:
        if not record.holders and not record.waiters:
            self.by_name.pop(name, None)

    # -- snapshots ------------------------------------------------------------------------

    def to_state(self) -> list[Any]:
        return [[name, r.capacity, [[list(o), t, w] for o, (t, w) in sorted(r.holders.items())],
                 [[list(o), w] for o, w in r.waiters], [[list(o), p] for o, p in sorted(r.payloads.items())]]
                for name, r in sorted(self.by_name.items())]

    def load_state(self, state: list[Any]) -> None:
        self.by_name.clear()
        self.by_session.clear()
        for name, capacity, holders, waiters, payloads in state:
            record = Record(capacity)
            for owner, token, weight in holders:
                record.holders[tuple(owner)] = [token, weight]
                record.used += weight
                self.by_session.setdefault(owner[0], set()).add(name)
            for owner, weight in waiters:
                record.waiters.append((tuple(owner), weight))
                self.by_session.setdefault(owner[0], set()).add(name)
            record.payloads = {tuple(owner): payload for owner, payload in payloads}
            self.by_name[name] = record


class LockTable(OwnershipTable):
    """Mutexes: one holder per name, a FIFO of waiters, fencing tokens."""

    name = "lock"
    acquire_op, release_op, withdraw_op = Op.LOCK_ACQUIRE, Op.LOCK_RELEASE, Op.LOCK_WITHDRAW
    info_query = Query.LOCK_INFO

    def parse_acquire(self, args: list[Any]) -> tuple[str, int, int, int, bool, Any]:
        arity(args, (3,), "LOCK_ACQUIRE takes [name, handle, wait]")
        name, handle = self._name_and_handle(args)
        return name, handle, 1, 1, bool_arg(args[2], "wait"), None

    def info(self, name: str) -> list[Any] | None:
        """[holder [session_id, handle_id] or None, token, waiters]."""
        record = self.by_name.get(name)
        if record is None:
            return None
        holder = next(iter(record.holders.items()), None)
        return [list(holder[0]) if holder else None, holder[1][0] if holder else 0,
                [list(owner) for owner, _ in record.waiters]]


class ElectionTable(LockTable):
    """Leader elections: a group's leader is the holder, candidates the waiters; each owner
    carries [candidate_id, value]. Every leadership change is kept in ``history``."""

    name = "leader"
    acquire_op, release_op, withdraw_op = Op.LEADER_CAMPAIGN, Op.LEADER_RESIGN, Op.LEADER_WITHDRAW
    info_query = Query.LEADER_QUEUE

    def __init__(self) -> None:
        super().__init__()
        # [revision, group, [candidate_id, value, term] or None] per leadership change
        self.history = History(HISTORY_MAX_ENTRIES, HISTORY_MAX_BYTES, _history_entry_bytes)
        self._changed_kind = f"{self.name}_changed"

    def commands(self) -> dict[int, Callable[[Context, int, list[Any]], bytes]]:
        commands = {op: self._recording(handler) for op, handler in super().commands().items()}
        commands[Op.LEADER_PROCLAIM] = self._recording(self._proclaim_command)
        return commands

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        queries = super().queries()
        queries[Query.LEADER_INFO] = lambda args, reader: encode_result(
            Status.OK, self.leader_info(str_arg(args[0], MAX_NAME_BYTES, "group")))
        return queries

    def watch_kinds(self) -> dict[str, WatchKind]:
        return {"leader": WatchKind(history=lambda: self.history, match=lambda group, name: name == group,
                                    payload=lambda entry: entry[2], initial=self.leader_info)}

    def end_session(self, ctx: Context, session_id: int) -> None:
        start = len(ctx.effects)
        super().end_session(ctx, session_id)
        self._record(ctx, start)

    def parse_acquire(self, args: list[Any]) -> tuple[str, int, int, int, bool, Any]:
        arity(args, (5,), "LEADER_CAMPAIGN takes [group, handle, candidate_id, value, wait]")
        group, handle = self._name_and_handle(args)
        candidate = str_arg(args[2], MAX_NAME_BYTES, "candidate id")
        value = bytes_arg(args[3], MAX_VALUE_BYTES, "value")
        return group, handle, 1, 1, bool_arg(args[4], "wait"), [candidate, value]

    def _proclaim_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (4,), "LEADER_PROCLAIM takes [group, handle, term, value]")
        group, handle = self._name_and_handle(args)
        term = int_arg(args[2], "term")
        value = bytes_arg(args[3], MAX_VALUE_BYTES, "value")
        owner = (session_id, handle)
        record = self.by_name.get(group)
        held = record.holders.get(owner) if record else None
        if held is None or held[0] != term:
            return encode_result(Status.NOT_HELD)
        record.payloads[owner] = [record.payloads[owner][0], value]
        ctx.effects.append(Changed(self._changed_kind, group, session_id, handle, term))
        return OK

    def leader_info(self, group: str) -> list[Any] | None:
        """[candidate_id, value, term] of the group's leader, or None."""
        record = self.by_name.get(group)
        holder = next(iter(record.holders.items()), None) if record else None
        if holder is None:
            return None
        candidate, value = record.payloads[holder[0]]
        return [candidate, value, holder[1][0]]

    def _recording(self, handler: Callable[[Context, int, list[Any]], bytes]) -> Callable[..., bytes]:
        def run(ctx: Context, session_id: int, args: list[Any]) -> bytes:
            start = len(ctx.effects)
            result = handler(ctx, session_id, args)
            self._record(ctx, start)
            return result
        return run

    def _record(self, ctx: Context, start: int) -> None:
        """One history entry per group whose leadership this command changed."""
        mine = (self._granted_kind, self._released_kind, self._changed_kind)
        for group in {effect[1]: None for effect in ctx.effects[start:] if effect[0] in mine}:
            self.history.append([ctx.index, group, self.leader_info(group)])

    def to_state(self) -> dict[str, Any]:
        return {"names": super().to_state(), "history": self.history.to_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state["names"])
        self.history.load_state(state["history"])


class SemaphoreTable(OwnershipTable):
    """Counting semaphores: up to ``permits`` holders at once."""

    name = "sem"
    acquire_op, release_op, withdraw_op = Op.SEM_ACQUIRE, Op.SEM_RELEASE, Op.SEM_WITHDRAW
    info_query = Query.SEM_INFO

    def parse_acquire(self, args: list[Any]) -> tuple[str, int, int, int, bool, Any]:
        arity(args, (4,), "SEM_ACQUIRE takes [name, handle, permits, wait]")
        name, handle = self._name_and_handle(args)
        permits = int_arg(args[2], "permits", 1)
        if permits > MAX_CAPACITY:
            raise Invalid(f"permits must be at most {MAX_CAPACITY}")
        return name, handle, permits, 1, bool_arg(args[3], "wait"), None

    def info(self, name: str) -> list[Any] | None:
        """[capacity, used, holders [[owner, token, weight]], waiters [[owner, weight]]]."""
        record = self.by_name.get(name)
        if record is None:
            return None
        return [record.capacity, record.used,
                [[list(o), t, w] for o, (t, w) in sorted(record.holders.items())],
                [[list(o), w] for o, w in record.waiters]]


class RWLockTable(SemaphoreTable):
    """Read/write locks: many readers (weight 1) or one writer (all of the capacity)."""

    name = "rw"
    acquire_op, release_op, withdraw_op = Op.RW_ACQUIRE, Op.RW_RELEASE, Op.RW_WITHDRAW
    info_query = Query.RW_INFO

    def parse_acquire(self, args: list[Any]) -> tuple[str, int, int, int, bool, Any]:
        arity(args, (4,), "RW_ACQUIRE takes [name, handle, mode, wait]")
        name, handle = self._name_and_handle(args)
        if args[2] not in ("r", "w"):
            raise Invalid("mode must be 'r' or 'w'")
        weight = 1 if args[2] == "r" else RW_CAPACITY
        return name, handle, RW_CAPACITY, weight, bool_arg(args[3], "wait"), None


def _history_entry_bytes(entry: list[Any]) -> int:
    info = entry[2]
    return len(entry[1]) + (len(info[0]) + len(info[1]) if info else 0)
