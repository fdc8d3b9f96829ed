"""The deterministic replicated state machine.

Pure Python with no PySyncObj import: no clock, no randomness, no I/O, and ``apply``
never raises. Every replica applies the same command bytes in the same order and so
ends in the same state and returns the same result bytes. Time enters only through
commands (the Raft leader proposes expiries from its own monotonic clock).

The machine is a list of tables (``machine/table.py`` says what a table declares):
sessions, KV, locks, elections, semaphores, read/write locks, events, tasks. It dispatches commands
and queries to them, ends sessions across all of them, and snapshots them; a new
primitive is one more table. The machine itself keeps what is common: the command
index, sessions and their exactly-once results.

``index`` counts applied commands; it is the revision of KV changes and the fencing
token of grants, so both strictly increase across the cluster.

``apply`` may append *effects* (``machine/effects.py``) to a list the caller passes in:
what changed that a node may want to act on (a grant to tell its owner about, a TTL to
measure). Effects are not state; every replica recomputes them as it applies.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import msgpack

from ..codec import NOT_APPLIED, Op, Status, decode_command, decode_query, encode_result
from .effects import Keepalive, SessionEnded, SessionOpened
from .events import EventsTable
from .kv import KeyValue
from .ownership import ElectionTable, LockTable, RWLockTable, SemaphoreTable
from .sessions import MAX_TTL_MS, MIN_TTL_MS, Sessions
from .table import Context, Invalid, Reader, Table, WatchKind, int_arg
from .tasks import TaskTable

SNAPSHOT_VERSION = 2
OK = encode_result(Status.OK)


class StateMachine:
    def __init__(self) -> None:
        self.index = 0
        self.sessions = Sessions()
        self.kv = KeyValue()
        self.locks = LockTable()
        self.leaders = ElectionTable()
        self.semaphores = SemaphoreTable()
        self.rwlocks = RWLockTable()
        self.events = EventsTable()
        self.tasks = TaskTable()
        self.tables: list[Table] = [self.sessions, self.kv, self.locks, self.leaders, self.semaphores,
                                    self.rwlocks, self.events, self.tasks]
        self._commands: dict[int, Callable[[Context, int, list[Any]], bytes]] = {}
        self._engine_commands: dict[int, Callable[[Context, list[Any]], bytes]] = {
            Op.KEEPALIVE: self._keepalive,
            Op.EXPIRE_SESSION: self._expire_session,
            Op.BARRIER: lambda ctx, args: encode_result(Status.OK, ctx.index),
        }
        self._queries: dict[int, Callable[[list[Any], Reader], bytes]] = {}
        self.expiry_ops: dict[str, int] = {}
        self.watch_kinds: dict[str, WatchKind] = {}
        names = [table.name for table in self.tables]
        if len(set(names)) != len(names) or {"v", "index"} & set(names):
            raise ValueError(f"table names must be unique and not 'v' or 'index': {names}")
        for table in self.tables:
            for registry, entries in ((self._commands, table.commands()),
                                      (self._engine_commands, table.engine_commands()),
                                      (self._queries, table.queries()), (self.expiry_ops, table.expiry_ops),
                                      (self.watch_kinds, table.watch_kinds())):
                clash = set(registry) & set(entries)
                if clash:
                    raise ValueError(f"table {table.name!r} redefines {sorted(clash)}")
                registry.update(entries)

    # -- commands ---------------------------------------------------------------------

    def apply(self, command: bytes, effects: list | None = None) -> bytes:
        """Apply one committed command and return its result bytes. Never raises."""
        self.index += 1
        ctx = Context(self.index, [] if effects is None else effects)
        try:
            op, session_id, seq, acked_below, args = decode_command(command)
        except Exception as exc:  # malformed input is a result, never an exception
            return encode_result(Status.BAD_COMMAND, f"malformed command: {exc}")
        try:
            if op == Op.OPEN_SESSION:
                return self._open_session(ctx, session_id, args)
            engine_command = self._engine_commands.get(op)
            if engine_command is not None:
                return engine_command(ctx, args)
            handler = self._commands.get(op)
            if handler is None and op != Op.CLOSE_SESSION:
                return encode_result(Status.BAD_COMMAND, f"unknown op {op}")
            session = self.sessions.get(session_id)
            if session is None:
                return self._answer_ended(session_id, seq)
            session.ack(acked_below)
            if seq < session.acked_below:
                return encode_result(Status.STALE)
            cached = session.results.get(seq)
            if cached is not None:
                return cached
            if op == Op.CLOSE_SESSION:  # its answer outlives the session, in the ended window
                self._end_session(ctx, session_id, "closed", (seq, OK))
                return OK
            result = handler(ctx, session_id, args)
            session.remember(seq, result)
            return result
        except Invalid as exc:
            return encode_result(Status.BAD_COMMAND, str(exc))
        except Exception as exc:  # a bug must not stop the log: same answer on every replica
            return encode_result(Status.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _answer_ended(self, session_id: int, seq: int) -> bytes:
        """A command of a session that is gone: its original answer if the window of ended
        sessions still has it, "not applied" if it certainly never applied, else plain
        SESSION_EXPIRED (the client cannot tell whether an earlier attempt applied)."""
        ended = self.sessions.ended.get(session_id)
        if ended is None:
            return encode_result(Status.SESSION_EXPIRED)
        cached = ended.results.get(seq)
        if cached is not None:
            return cached
        if seq < ended.acked_below:
            return encode_result(Status.STALE)
        return encode_result(Status.SESSION_EXPIRED, NOT_APPLIED)

    def _open_session(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        if session_id == 0 or len(args) != 1:
            raise Invalid("OPEN_SESSION takes [ttl_ms] and a non-zero session id")
        ttl_ms = int_arg(args[0], "ttl_ms", MIN_TTL_MS)
        if ttl_ms > MAX_TTL_MS:
            raise Invalid(f"ttl_ms must be at most {MAX_TTL_MS}")
        existing = self.sessions.get(session_id)
        record = self.sessions.create(session_id, ttl_ms, ctx.index)
        if record is None:
            return encode_result(Status.SESSION_EXPIRED)
        if existing is None:
            ctx.effects.append(SessionOpened("session_opened", session_id, ttl_ms, ctx.index))
        return encode_result(Status.OK, [record.ttl_ms])

    def _keepalive(self, ctx: Context, args: list[Any]) -> bytes:
        if len(args) != 1 or not isinstance(args[0], list):
            raise Invalid("KEEPALIVE takes [[session_id, ...]]")
        if any(type(session_id) is not int for session_id in args[0]):
            raise Invalid("session ids are ints")
        missing = []
        for session_id in args[0]:
            if self.sessions.keepalive(session_id, ctx.index):
                ctx.effects.append(Keepalive("keepalive", session_id, ctx.index))
            else:
                missing.append(session_id)
        return encode_result(Status.OK, missing)

    def _expire_session(self, ctx: Context, args: list[Any]) -> bytes:
        if len(args) != 2:
            raise Invalid("EXPIRE_SESSION takes [session_id, keepalive_index]")
        session_id = int_arg(args[0], "session_id")
        expected = int_arg(args[1], "keepalive_index")
        record = self.sessions.get(session_id)
        if record is None or record.keepalive_index != expected:
            return encode_result(Status.STALE)
        self._end_session(ctx, session_id, "expired")
        return OK

    def _end_session(self, ctx: Context, session_id: int, reason: str,
                     final: tuple[int, bytes] | None = None) -> None:
        for table in self.tables:
            table.end_session(ctx, session_id)
        self.sessions.remove(session_id, final)
        ctx.effects.append(SessionEnded("session_ended", session_id, reason))

    # -- queries ----------------------------------------------------------------------

    def query(self, query: bytes, reader: Reader | None = None) -> bytes:
        """Answer a read-only query against the current state. Never raises."""
        try:
            kind, args = decode_query(query)
            handler = self._queries.get(kind)
            if handler is None:
                return encode_result(Status.BAD_COMMAND, f"unknown query {kind}")
            reader = reader or Reader()
            reader.index = self.index
            return handler(args, reader)
        except (Invalid, IndexError, ValueError, TypeError) as exc:
            return encode_result(Status.BAD_COMMAND, str(exc))
        except Exception as exc:
            return encode_result(Status.INTERNAL, f"{type(exc).__name__}: {exc}")

    # -- what the engine needs across tables --------------------------------------------

    def holdings(self) -> Iterable[tuple]:
        """Every grant that exists now, as Granted effects."""
        for table in self.tables:
            yield from table.holdings()

    def deadlines(self) -> Iterable[tuple[str, Any, int, float]]:
        """(kind, key, token, seconds) of every TTL a new Raft leader must measure."""
        for table in self.tables:
            yield from table.deadlines()

    def leader_duties(self) -> list[Any]:
        """Every table's LeaderDuty objects (engine-side; see table.LeaderDuty)."""
        return [duty for table in self.tables for duty in table.leader_duties()]

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as msgpack bytes: restore(snapshot()) continues identically."""
        state: dict[str, Any] = {"v": SNAPSHOT_VERSION, "index": self.index}
        for table in self.tables:
            state[table.name] = table.to_state()
        return msgpack.packb(state, use_bin_type=True)

    @classmethod
    def restore(cls, data: bytes) -> "StateMachine":
        """The machine a snapshot holds. A table the snapshot does not know (it predates
        the table) starts empty. Raises ValueError for a snapshot it cannot read."""
        state = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if state.get("v") == 1:
            state = _upgrade_from_v1(state)
        if state.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {state.get('v')}")
        machine = cls()
        machine.index = state["index"]
        for table in machine.tables:
            if table.name in state:  # a table newer than the snapshot starts empty
                table.load_state(state[table.name])
        if "leader" not in state:
            machine.leaders.history.compacted_revision = machine.index  # nothing known before
        return machine


def _upgrade_from_v1(state: dict[str, Any]) -> dict[str, Any]:
    """A version 1 snapshot (separate lock and semaphore tables) in today's layout."""
    def lock_names(entries: list[Any]) -> list[Any]:
        return [[name, 1, [[holder, token, 1]] if holder else [], [[w, 1] for w in waiters], payloads]
                for name, holder, token, waiters, payloads in entries]

    def semaphore_names(entries: list[Any]) -> list[Any]:
        return [[name, capacity, holders, waiters, []] for name, capacity, holders, waiters in entries]

    index = state["index"]
    return {
        "v": SNAPSHOT_VERSION, "index": index,
        "sessions": {"ended": [], **state["sessions"]},
        "kv": state["kv"],
        "lock": lock_names(state["locks"]),
        "leader": {"names": lock_names(state["leaders"]),
                   "history": state.get("leader_history", {"entries": [], "compacted": index})},
        "sem": semaphore_names(state["semaphores"]),
        "rw": semaphore_names(state["rwlocks"]),
    }
