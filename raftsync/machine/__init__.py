"""The deterministic replicated state machine.

Pure Python with no PySyncObj import: no clock, no randomness, no I/O, and ``apply``
never raises. Every replica applies the same command bytes in the same order and so
ends in the same state and returns the same result bytes. Time enters only through
commands (the Raft leader proposes expiries from its own monotonic clock).

``index`` counts applied commands; it is the revision of KV changes and the fencing
token of lock grants, so both strictly increase across the cluster.

``apply`` may append *effects* to a list the caller passes in: what changed that a
node may want to tell its application (a lock granted, a session ended, a keepalive
seen). Effects are not state; they are recomputed by every replica as it applies.
"""

from __future__ import annotations

from typing import Any, Callable

import msgpack

from ..codec import (MAX_KEY_BYTES, MAX_NAME_BYTES, MAX_VALUE_BYTES, NOT_APPLIED, Op, Query, Status,
                     decode_command, decode_query, encode_result)
from .history import History
from .kv import KeyValue
from .locks import Locks
from .semaphores import MAX_CAPACITY, RW_CAPACITY, Semaphores
from .sessions import MAX_TTL_MS, MIN_TTL_MS, Sessions

SNAPSHOT_VERSION = 1
# Leadership changes kept for observers that resume (after a snapshot install).
LEADER_HISTORY_MAX_ENTRIES = 10000
LEADER_HISTORY_MAX_BYTES = 4 * 1024 * 1024
_LEADER_EFFECTS = ("leader_granted", "leader_released", "leader_changed")


class _Invalid(Exception):
    """Raised by argument checks inside handlers; turned into BAD_COMMAND by apply."""


def _str_arg(value: Any, limit: int, what: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > limit:
        raise _Invalid(f"{what} must be a non-empty str of at most {limit} bytes")
    return value


def _int_arg(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _Invalid(f"{what} must be an int >= {minimum}")
    return value


def _optional_version(value: Any) -> int | None:
    if value is None:
        return None
    return _int_arg(value, "if_version")


OK = encode_result(Status.OK)


def _leader_entry_bytes(entry: list[Any]) -> int:
    info = entry[2]
    return len(entry[1]) + (len(info[0]) + len(info[1]) if info else 0)


class StateMachine:
    def __init__(self) -> None:
        self.index = 0
        self.sessions = Sessions()
        self.kv = KeyValue()
        self.locks = Locks("lock")
        self.leaders = Locks("leader")
        # [revision, group, [candidate_id, value, term] or None] per leadership change
        self.leader_history = History(LEADER_HISTORY_MAX_ENTRIES, LEADER_HISTORY_MAX_BYTES, _leader_entry_bytes)
        self.semaphores = Semaphores("sem")
        self.rwlocks = Semaphores("rw")
        self._session_free: dict[int, Callable[[list[Any], list], bytes]] = {
            Op.KEEPALIVE: self._keepalive,
            Op.EXPIRE_SESSION: self._expire_session,
            Op.BARRIER: self._barrier,
            Op.KV_EXPIRE: self._kv_expire,
        }
        self._session_bound: dict[int, Callable[[int, list[Any], list], bytes]] = {
            Op.KV_PUT: self._kv_put,
            Op.KV_DELETE: self._kv_delete,
            Op.LOCK_ACQUIRE: self._lock_acquire,
            Op.LOCK_RELEASE: self._lock_release,
            Op.LOCK_WITHDRAW: self._lock_withdraw,
            Op.LEADER_CAMPAIGN: self._leader_campaign,
            Op.LEADER_RESIGN: self._leader_resign,
            Op.LEADER_WITHDRAW: self._leader_withdraw,
            Op.LEADER_PROCLAIM: self._leader_proclaim,
            Op.SEM_ACQUIRE: self._sem_acquire,
            Op.SEM_RELEASE: lambda sid, args, eff: self._shared_release(self.semaphores, sid, args, eff),
            Op.SEM_WITHDRAW: lambda sid, args, eff: self._shared_withdraw(self.semaphores, sid, args, eff),
            Op.RW_ACQUIRE: self._rw_acquire,
            Op.RW_RELEASE: lambda sid, args, eff: self._shared_release(self.rwlocks, sid, args, eff),
            Op.RW_WITHDRAW: lambda sid, args, eff: self._shared_withdraw(self.rwlocks, sid, args, eff),
        }

    # -- commands ---------------------------------------------------------------------

    def apply(self, command: bytes, effects: list | None = None) -> bytes:
        """Apply one committed command and return its result bytes. Never raises."""
        self.index += 1
        if effects is None:
            effects = []
        try:
            op, session_id, seq, acked_below, args = decode_command(command)
        except Exception as exc:  # malformed input is a result, never an exception
            return encode_result(Status.BAD_COMMAND, f"malformed command: {exc}")
        try:
            if op == Op.OPEN_SESSION:
                return self._open_session(session_id, args, effects)
            free = self._session_free.get(op)
            if free is not None:
                return self._recording_leaders(free, effects, args, effects)
            bound = self._session_bound.get(op)
            if bound is None and op != Op.CLOSE_SESSION:
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
                self._recording_leaders(self._end_session, effects, session_id, "closed", effects, (seq, OK))
                return OK
            result = self._recording_leaders(bound, effects, session_id, args, effects)
            session.remember(seq, result)
            return result
        except _Invalid as exc:
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

    def _recording_leaders(self, handler: Callable[..., Any], effects: list, *args: Any) -> Any:
        """Run ``handler`` and record each leadership it changed in the leader history."""
        start = len(effects)
        result = handler(*args)
        groups = {effect[1]: None for effect in effects[start:] if effect[0] in _LEADER_EFFECTS}
        for group in groups:
            self.leader_history.append([self.index, group, self.leader_info(group)])
        return result

    def _open_session(self, session_id: int, args: list[Any], effects: list) -> bytes:
        if session_id == 0 or len(args) != 1:
            raise _Invalid("OPEN_SESSION takes [ttl_ms] and a non-zero session id")
        ttl_ms = _int_arg(args[0], "ttl_ms", MIN_TTL_MS)
        if ttl_ms > MAX_TTL_MS:
            raise _Invalid(f"ttl_ms must be at most {MAX_TTL_MS}")
        existing = self.sessions.get(session_id)
        record = self.sessions.create(session_id, ttl_ms, self.index)
        if record is None:
            return encode_result(Status.SESSION_EXPIRED)
        if existing is None:
            effects.append(("session_opened", session_id, ttl_ms, self.index))
        return encode_result(Status.OK, [record.ttl_ms])

    def _keepalive(self, args: list[Any], effects: list) -> bytes:
        if len(args) != 1 or not isinstance(args[0], list):
            raise _Invalid("KEEPALIVE takes [[session_id, ...]]")
        missing = []
        for session_id in args[0]:
            if type(session_id) is not int:
                raise _Invalid("session ids are ints")
        for session_id in args[0]:
            if self.sessions.keepalive(session_id, self.index):
                effects.append(("keepalive", session_id, self.index))
            else:
                missing.append(session_id)
        return encode_result(Status.OK, missing)

    def _expire_session(self, args: list[Any], effects: list) -> bytes:
        if len(args) != 2:
            raise _Invalid("EXPIRE_SESSION takes [session_id, keepalive_index]")
        session_id = _int_arg(args[0], "session_id")
        expected = _int_arg(args[1], "keepalive_index")
        record = self.sessions.get(session_id)
        if record is None or record.keepalive_index != expected:
            return encode_result(Status.STALE)
        self._end_session(session_id, "expired", effects)
        return OK

    def _end_session(self, session_id: int, reason: str, effects: list,
                     final: tuple[int, bytes] | None = None) -> None:
        self.locks.end_session(session_id, self.index, effects)
        self.leaders.end_session(session_id, self.index, effects)
        self.semaphores.end_session(session_id, self.index, effects)
        self.rwlocks.end_session(session_id, self.index, effects)
        self.sessions.remove(session_id, final)
        effects.append(("session_ended", session_id, reason))

    def _barrier(self, args: list[Any], effects: list) -> bytes:
        return encode_result(Status.OK, self.index)

    def _kv_put(self, session_id: int, args: list[Any], effects: list) -> bytes:
        if len(args) not in (3, 4):
            raise _Invalid("KV_PUT takes [key, value, if_version, ttl_ms?]")
        key = _str_arg(args[0], MAX_KEY_BYTES, "key")
        value = args[1]
        if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
            raise _Invalid(f"value must be bytes of at most {MAX_VALUE_BYTES}")
        ttl_ms = 0
        if len(args) == 4 and args[3] is not None:
            ttl_ms = _int_arg(args[3], "ttl_ms", 1)
            if ttl_ms > MAX_TTL_MS:
                raise _Invalid(f"ttl_ms must be at most {MAX_TTL_MS}")
        ok, payload = self.kv.put(key, value, _optional_version(args[2]), ttl_ms, self.index)
        if not ok:
            return encode_result(Status.CONFLICT, payload)
        effects.append(("kv_put", key, self.index, ttl_ms))
        return encode_result(Status.OK, payload)

    def _kv_expire(self, args: list[Any], effects: list) -> bytes:
        if len(args) != 2:
            raise _Invalid("KV_EXPIRE takes [key, revision]")
        key = _str_arg(args[0], MAX_KEY_BYTES, "key")
        if not self.kv.expire(key, _int_arg(args[1], "revision"), self.index):
            return encode_result(Status.STALE)
        effects.append(("kv_delete", key, self.index))
        return OK

    def _kv_delete(self, session_id: int, args: list[Any], effects: list) -> bytes:
        if len(args) != 2:
            raise _Invalid("KV_DELETE takes [key, if_version]")
        key = _str_arg(args[0], MAX_KEY_BYTES, "key")
        outcome, payload = self.kv.delete(key, _optional_version(args[1]), self.index)
        if outcome == "not_found":
            return encode_result(Status.NOT_FOUND)
        if outcome == "conflict":
            return encode_result(Status.CONFLICT, payload)
        effects.append(("kv_delete", key, self.index))
        return encode_result(Status.OK, payload)

    def _lock_args(self, args: list[Any], count: int, what: str) -> tuple[str, int]:
        if len(args) != count:
            raise _Invalid(what)
        return _str_arg(args[0], MAX_NAME_BYTES, "lock name"), _int_arg(args[1], "handle id")

    def _lock_acquire(self, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 3, "LOCK_ACQUIRE takes [name, handle, wait]")
        if not isinstance(args[2], bool):
            raise _Invalid("wait must be a bool")
        token = self.locks.acquire(name, (session_id, handle), args[2], self.index, effects)
        return encode_result(Status.OK, token)

    def _lock_release(self, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 3, "LOCK_RELEASE takes [name, handle, token]")
        token = _int_arg(args[2], "token")
        if not self.locks.release(name, (session_id, handle), token, self.index, effects):
            return encode_result(Status.NOT_HELD)
        return OK

    def _lock_withdraw(self, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 2, "LOCK_WITHDRAW takes [name, handle]")
        return encode_result(Status.OK, self.locks.withdraw(name, (session_id, handle), self.index, effects))

    def _leader_campaign(self, session_id: int, args: list[Any], effects: list) -> bytes:
        if len(args) != 5:
            raise _Invalid("LEADER_CAMPAIGN takes [group, handle, candidate_id, value, wait]")
        group, handle = self._lock_args(args[:2], 2, "")
        candidate = _str_arg(args[2], MAX_NAME_BYTES, "candidate id")
        if not isinstance(args[3], bytes) or len(args[3]) > MAX_VALUE_BYTES:
            raise _Invalid("value must be bytes")
        if not isinstance(args[4], bool):
            raise _Invalid("wait must be a bool")
        term = self.leaders.acquire(group, (session_id, handle), args[4], self.index, effects,
                                    payload=[candidate, args[3]])
        return encode_result(Status.OK, term)

    def _leader_resign(self, session_id: int, args: list[Any], effects: list) -> bytes:
        group, handle = self._lock_args(args, 3, "LEADER_RESIGN takes [group, handle, term]")
        if not self.leaders.release(group, (session_id, handle), _int_arg(args[2], "term"), self.index, effects):
            return encode_result(Status.NOT_HELD)
        return OK

    def _leader_withdraw(self, session_id: int, args: list[Any], effects: list) -> bytes:
        group, handle = self._lock_args(args, 2, "LEADER_WITHDRAW takes [group, handle]")
        return encode_result(Status.OK, self.leaders.withdraw(group, (session_id, handle), self.index, effects))

    def _leader_proclaim(self, session_id: int, args: list[Any], effects: list) -> bytes:
        group, handle = self._lock_args(args, 4, "LEADER_PROCLAIM takes [group, handle, term, value]")
        term = _int_arg(args[2], "term")
        if not isinstance(args[3], bytes) or len(args[3]) > MAX_VALUE_BYTES:
            raise _Invalid("value must be bytes")
        info = self.leaders.holder_info(group)
        if info is None or info[:3] != [session_id, handle, term]:
            return encode_result(Status.NOT_HELD)
        self.leaders.set_payload(group, (session_id, handle), term, [info[3][0], args[3]], effects)
        return OK

    def _sem_acquire(self, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 4, "SEM_ACQUIRE takes [name, handle, permits, wait]")
        permits = _int_arg(args[2], "permits", 1)
        if permits > MAX_CAPACITY or not isinstance(args[3], bool):
            raise _Invalid(f"permits must be at most {MAX_CAPACITY}; wait a bool")
        token = self.semaphores.acquire(name, (session_id, handle), permits, 1, args[3], self.index, effects)
        if token is None:
            raise _Invalid(f"semaphore {name!r} exists with a different number of permits")
        return encode_result(Status.OK, token)

    def _rw_acquire(self, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 4, "RW_ACQUIRE takes [name, handle, mode, wait]")
        if args[2] not in ("r", "w") or not isinstance(args[3], bool):
            raise _Invalid("mode must be 'r' or 'w'; wait a bool")
        weight = 1 if args[2] == "r" else RW_CAPACITY
        token = self.rwlocks.acquire(name, (session_id, handle), RW_CAPACITY, weight, args[3], self.index, effects)
        return encode_result(Status.OK, token)

    def _shared_release(self, table: Semaphores, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 3, "RELEASE takes [name, handle, token]")
        if not table.release(name, (session_id, handle), _int_arg(args[2], "token"), self.index, effects):
            return encode_result(Status.NOT_HELD)
        return OK

    def _shared_withdraw(self, table: Semaphores, session_id: int, args: list[Any], effects: list) -> bytes:
        name, handle = self._lock_args(args, 2, "WITHDRAW takes [name, handle]")
        return encode_result(Status.OK, table.withdraw(name, (session_id, handle), self.index, effects))

    # -- queries ----------------------------------------------------------------------

    def query(self, query: bytes) -> bytes:
        """Answer a read-only query against the current state. Never raises."""
        try:
            kind, args = decode_query(query)
            if kind == Query.KV_GET:
                key = _str_arg(args[0], MAX_KEY_BYTES, "key")
                record = self.kv.get(key)
                if record is None:
                    return encode_result(Status.NOT_FOUND, self.index)
                return encode_result(Status.OK, record)
            if kind == Query.KV_RANGE:
                prefix = args[0]
                if not isinstance(prefix, str):
                    raise _Invalid("prefix must be str")
                return encode_result(Status.OK, self.kv.range(prefix))
            if kind == Query.SESSION_INFO:
                record = self.sessions.get(_int_arg(args[0], "session_id"))
                if record is None:
                    return encode_result(Status.NOT_FOUND)
                return encode_result(Status.OK, [record.ttl_ms, record.keepalive_index])
            if kind == Query.LEADER_INFO:
                return encode_result(Status.OK, self.leader_info(_str_arg(args[0], MAX_NAME_BYTES, "group")))
            if kind in (Query.SEM_INFO, Query.RW_INFO):
                table = self.semaphores if kind == Query.SEM_INFO else self.rwlocks
                return encode_result(Status.OK, table.info(_str_arg(args[0], MAX_NAME_BYTES, "name")))
            if kind in (Query.LOCK_INFO, Query.LEADER_QUEUE):
                table = self.locks if kind == Query.LOCK_INFO else self.leaders
                return encode_result(Status.OK, table.info(_str_arg(args[0], MAX_NAME_BYTES, "name")))
            return encode_result(Status.BAD_COMMAND, f"unknown query {kind}")
        except (_Invalid, IndexError, ValueError, TypeError) as exc:
            return encode_result(Status.BAD_COMMAND, str(exc))
        except Exception as exc:
            return encode_result(Status.INTERNAL, f"{type(exc).__name__}: {exc}")

    def leader_info(self, group: str) -> list[Any] | None:
        """[candidate_id, value, term] of the group's leader, or None."""
        info = self.leaders.holder_info(group)
        if info is None:
            return None
        candidate, value = info[3]
        return [candidate, value, info[2]]

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as msgpack bytes: restore(snapshot()) continues identically."""
        return msgpack.packb({
            "v": SNAPSHOT_VERSION,
            "index": self.index,
            "sessions": self.sessions.to_state(),
            "kv": self.kv.to_state(),
            "locks": self.locks.to_state(),
            "leaders": self.leaders.to_state(),
            "leader_history": self.leader_history.to_state(),
            "semaphores": self.semaphores.to_state(),
            "rwlocks": self.rwlocks.to_state(),
        }, use_bin_type=True)

    @classmethod
    def restore(cls, data: bytes) -> "StateMachine":
        state = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if state.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {state.get('v')}")
        machine = cls()
        machine.index = state["index"]
        machine.sessions = Sessions.from_state(state["sessions"])
        machine.kv = KeyValue.from_state(state["kv"])
        machine.locks = Locks.from_state(state["locks"], "lock")
        machine.leaders = Locks.from_state(state["leaders"], "leader")
        # A snapshot from before leader history was kept: everything up to it is unknown.
        machine.leader_history.load_state(state.get("leader_history",
                                                    {"entries": [], "compacted": machine.index}))
        machine.semaphores = Semaphores.from_state(state["semaphores"], "sem")
        machine.rwlocks = Semaphores.from_state(state["rwlocks"], "rw")
        return machine
