"""Sessions in the state machine: liveness leases and exactly-once command results.

A session is opened by a client-chosen id, kept alive by ``KEEPALIVE`` commands and
ended by ``CLOSE_SESSION`` or by an ``EXPIRE_SESSION`` that the Raft leader proposes
from its own monotonic clock. An expiry names the keepalive it expects
(``keepalive_index``): if a keepalive was applied after the leader decided, the expiry
is stale and ignored, so a racing keepalive always wins.

Each session also keeps the results of its commands with ``seq >= acked_below`` so a
retried command returns its original result instead of applying twice. When a session
ends, those results stay in a bounded window of recently ended sessions: a command
that applied, lost its reply, and is retried after its session ended still gets its
original answer, and one that never applied is told so for certain.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Callable

from ..codec import Op, Query, Status, encode_result
from .table import Reader, Table, int_arg

# Closed session ids are remembered (bounded) so a delayed duplicate OPEN cannot
# resurrect a session the client was already told it lost.
TOMBSTONE_CAPACITY = 65536
# A client that never advances acked_below cannot grow a session without bound.
MAX_RESULTS_PER_SESSION = 4096
# Ended sessions whose results are kept for late retries: at most this many sessions and
# this many results in all (the oldest ended session goes first).
ENDED_SESSIONS_CAPACITY = 4096
ENDED_RESULTS_CAPACITY = 16384
MIN_TTL_MS = 100
MAX_TTL_MS = 24 * 3600 * 1000


class SessionRecord:
    __slots__ = ("session_id", "ttl_ms", "keepalive_index", "acked_below", "results")

    def __init__(self, session_id: int, ttl_ms: int, keepalive_index: int) -> None:
        self.session_id = session_id
        self.ttl_ms = ttl_ms
        self.keepalive_index = keepalive_index
        self.acked_below = 0
        self.results: dict[int, bytes] = {}

    def ack(self, acked_below: int) -> None:
        """Forget results the client no longer waits for."""
        if acked_below > self.acked_below:
            self.acked_below = acked_below
            for seq in [s for s in self.results if s < acked_below]:
                del self.results[seq]

    def remember(self, seq: int, result: bytes) -> None:
        self.results[seq] = result
        if len(self.results) > MAX_RESULTS_PER_SESSION:
            oldest = min(self.results)
            del self.results[oldest]
            self.acked_below = max(self.acked_below, oldest + 1)

    def to_state(self) -> list[Any]:
        return [self.session_id, self.ttl_ms, self.keepalive_index, self.acked_below,
                sorted(self.results.items())]

    @classmethod
    def from_state(cls, state: list[Any]) -> "SessionRecord":
        record = cls(state[0], state[1], state[2])
        record.acked_below = state[3]
        record.results = {seq: result for seq, result in state[4]}
        return record


class EndedSession:
    """What is kept of an ended session: its un-acked results and where acks stood."""

    __slots__ = ("acked_below", "results")

    def __init__(self, acked_below: int, results: dict[int, bytes]) -> None:
        self.acked_below = acked_below
        self.results = results

    def to_state(self) -> list[Any]:
        return [self.acked_below, sorted(self.results.items())]


class Sessions(Table):
    name = "sessions"
    expiry_ops = {"session": Op.EXPIRE_SESSION}

    def __init__(self) -> None:
        self.by_id: dict[int, SessionRecord] = {}
        self.tombstones: deque[int] = deque()
        self._tombstone_set: set[int] = set()
        self.ended: OrderedDict[int, EndedSession] = OrderedDict()
        self._ended_results = 0

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        return {Query.SESSION_INFO: self._info_query}

    def deadlines(self):
        for session_id, record in self.by_id.items():
            yield "session", session_id, record.keepalive_index, record.ttl_ms / 1000.0

    def _info_query(self, args: list[Any], reader: Reader) -> bytes:
        record = self.get(int_arg(args[0], "session_id"))
        if record is None:
            return encode_result(Status.NOT_FOUND)
        return encode_result(Status.OK, [record.ttl_ms, record.keepalive_index])

    def get(self, session_id: int) -> SessionRecord | None:
        return self.by_id.get(session_id)

    def create(self, session_id: int, ttl_ms: int, index: int) -> SessionRecord | None:
        """Open (idempotently). Returns None if the id was used by a session that ended."""
        if session_id in self._tombstone_set:
            return None
        record = self.by_id.get(session_id)
        if record is None:
            record = SessionRecord(session_id, ttl_ms, index)
            self.by_id[session_id] = record
        return record

    def keepalive(self, session_id: int, index: int) -> bool:
        record = self.by_id.get(session_id)
        if record is None:
            return False
        record.keepalive_index = index
        return True

    def remove(self, session_id: int, final: tuple[int, bytes] | None = None) -> None:
        """End a session; ``final`` = (seq, result) of the command that ended it (a close)."""
        record = self.by_id.pop(session_id, None)
        if record is None:
            return
        self.tombstones.append(session_id)
        self._tombstone_set.add(session_id)
        if len(self.tombstones) > TOMBSTONE_CAPACITY:
            self._tombstone_set.discard(self.tombstones.popleft())
        results = dict(record.results)
        if final is not None and final[0] >= record.acked_below:
            results[final[0]] = final[1]
        self.ended[session_id] = EndedSession(record.acked_below, results)
        self._ended_results += len(results)
        while self.ended and (len(self.ended) > ENDED_SESSIONS_CAPACITY
                              or self._ended_results > ENDED_RESULTS_CAPACITY):
            _, oldest = self.ended.popitem(last=False)
            self._ended_results -= len(oldest.results)

    def to_state(self) -> dict[str, Any]:
        return {"live": [r.to_state() for _, r in sorted(self.by_id.items())],
                "tombstones": list(self.tombstones),
                "ended": [[sid, *ended.to_state()] for sid, ended in self.ended.items()]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.__init__()
        for item in state["live"]:
            record = SessionRecord.from_state(item)
            self.by_id[record.session_id] = record
        self.tombstones = deque(state["tombstones"])
        self._tombstone_set = set(self.tombstones)
        for session_id, acked_below, results in state["ended"]:
            self.ended[session_id] = EndedSession(acked_below, {seq: result for seq, result in results})
            self._ended_results += len(results)
