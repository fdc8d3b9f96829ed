"""Data: the replicated key/value map.

Guarantees
- Writes and deletes are committed through the Raft log before they return; each is
  applied exactly once even when retried after a lost reply.
- ``read(consistency="linearizable")`` (the default) sees every write acknowledged
  before the read began, on any node: it waits for a barrier entry proposed after the
  read started. Concurrent reads on one node share a barrier.
- ``consistency="local"`` answers from this node's replica at once and may be stale.
- ``version`` counts writes to a key since it was created; ``revision`` is the
  cluster-wide index of the key's last change. ``if_version`` makes a write or delete
  a compare-and-set (``0``: the key must not exist); a failed check raises Conflict.

Failure modes
- ``write(..., ttl=s)``: the record is deleted about ``s`` seconds after the write, as
  measured by the Raft leader's monotonic clock (a leader change restarts the clock,
  so a record may live up to one TTL longer, never shorter). ``Record.expires_at`` is
  the reading node's wall-clock estimate, for display.
- ``watch(prefix, from_revision)`` yields every change under the prefix in commit
  order, from any node, across leader changes and snapshot installs; a revision that
  was already trimmed from the bounded history raises Compacted.
- A write that raises OutcomeUnknown (a Timeout) was sent and got no answer by its
  deadline: it may or may not have applied, and may still apply. A plain Timeout or
  NoQuorum means it was never sent.
- Without a quorum for ``quorum_timeout`` calls raise NoQuorum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .codec import Op, Query, Status, check_key, check_value, encode_query, raise_for_status
from .errors import BadRequest, NotFound
from .replica import Replica, deadline_after
from .session import MAX_TTL, MIN_TTL
from .watch import WatchStream


@dataclass(frozen=True)
class Record:
    """One key's value as of a read or write."""

    key: str
    value: bytes
    version: int
    revision: int
    expires_at: float | None = None


@dataclass(frozen=True)
class Change:
    """One committed change seen by a watch: a write, or a delete/expiry (``deleted``)."""

    key: str
    value: bytes | None
    version: int
    revision: int

    @property
    def deleted(self) -> bool:
        return self.value is None


def _check_version(if_version: Any) -> int | None:
    if if_version is None:
        return None
    if isinstance(if_version, bool) or not isinstance(if_version, int) or if_version < 0:
        raise BadRequest("if_version must be a non-negative int (0: the key must not exist)")
    return if_version


class Data:
    """A view of the KV map; keys are prefixed with ``prefix`` in the cluster."""

    def __init__(self, replica: Replica, prefix: str = "") -> None:
        if not isinstance(prefix, str):
            raise BadRequest("prefix must be str")
        self._replica = replica
        self.prefix = prefix

    def _full(self, key: Any) -> str:
        check_key(key)
        return check_key(self.prefix + key)

    def _record(self, item: list[Any]) -> Record:
        key, value, version, revision, seconds_left = item
        expires_at = None if seconds_left is None else time.time() + seconds_left
        return Record(key[len(self.prefix):], value, version, revision, expires_at)

    def write(self, key: str, value: bytes, ttl: float | None = None, if_version: int | None = None,
              timeout: float | None = None) -> Record:
        """Set ``key`` to ``value``; returns the new Record. Raises Conflict if ``if_version`` fails.

        ``ttl``: seconds after which the record is deleted (unless written again).
        """
        full, value, if_version = self._full(key), check_value(value), _check_version(if_version)
        ttl_ms = None
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not MIN_TTL <= ttl <= MAX_TTL:
                raise BadRequest(f"ttl must be a number of seconds in [{MIN_TTL}, {MAX_TTL}]")
            ttl_ms = int(ttl * 1000)
        deadline = deadline_after(timeout)
        session = self._replica.sessions.default(deadline)
        status, payload = self._replica.submit(session, Op.KV_PUT, [full, value, if_version, ttl_ms], deadline,
                                               f"write {key!r}")
        raise_for_status(status, payload, f"write {key!r}")
        revision, version = payload
        return Record(key, value, version, revision, None if ttl is None else time.time() + ttl)

    def read(self, key: str, consistency: str = "linearizable", timeout: float | None = None) -> Record:
        """Return the key's Record; raises NotFound."""
        full = self._full(key)
        status, payload = self._replica.query(encode_query(Query.KV_GET, [full]), consistency,
                                              deadline_after(timeout))
        if status == Status.NOT_FOUND:
            raise NotFound(key)
        raise_for_status(status, payload, f"read {key!r}")
        return self._record(payload)

    def delete(self, key: str, if_version: int | None = None, timeout: float | None = None) -> int:
        """Delete ``key``; returns the revision of the delete. Raises NotFound or Conflict."""
        full, if_version = self._full(key), _check_version(if_version)
        deadline = deadline_after(timeout)
        session = self._replica.sessions.default(deadline)
        status, payload = self._replica.submit(session, Op.KV_DELETE, [full, if_version], deadline,
                                               f"delete {key!r}")
        if status == Status.NOT_FOUND:
            raise NotFound(key)
        raise_for_status(status, payload, f"delete {key!r}")
        return payload[0]

    def dump(self, prefix: str = "", consistency: str = "linearizable",
             timeout: float | None = None) -> list[Record]:
        """All records whose key starts with ``prefix``, in key order."""
        if not isinstance(prefix, str):
            raise BadRequest("prefix must be str")
        status, payload = self._replica.query(encode_query(Query.KV_RANGE, [self.prefix + prefix]),
                                              consistency, deadline_after(timeout))
        raise_for_status(status, payload, "dump")
        return [self._record(item) for item in payload]

    def watch(self, prefix: str = "", from_revision: int | None = None) -> WatchStream[Change]:
        """Every change to keys under ``prefix`` in commit order.

        ``from_revision=None`` starts with the next change; ``from_revision=r`` replays
        every change after revision ``r`` first (Compacted if that history is gone).
        """
        if not isinstance(prefix, str):
            raise BadRequest("prefix must be str")
        if from_revision is not None and (isinstance(from_revision, bool) or not isinstance(from_revision, int)
                                          or from_revision < 0):
            raise BadRequest("from_revision must be a non-negative int")
        strip = len(self.prefix)

        def convert(kind: str, change: list[Any]) -> Change:
            revision, key, value, version = change
            return Change(key[strip:], value, version, revision)

        return WatchStream(self._replica, "kv", self.prefix + prefix, from_revision, convert)
