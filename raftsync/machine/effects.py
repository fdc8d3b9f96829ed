"""Effects: what an applied command changed that someone outside the machine acts on.

Every replica computes the same effects as it applies an entry; they are not state.
Each is a typed tuple (equal to the plain tuple of its fields) that says, without the
engine knowing any primitive:
- ``owner``: the session whose application must hear of it (0: nobody in particular);
  the engine forwards it to the app that owns that session;
- ``deadline``: a TTL the Raft leader must now measure, ``(kind, key, token, seconds)``,
  ``seconds`` None to keep the TTL it knows for that key, or ``(kind, key, None, None)``
  to stop measuring it. The leader proposes the kind's expiry command, naming the token,
  once the TTL has passed on its own monotonic clock.
"""

from __future__ import annotations

from typing import Any, NamedTuple

Deadline = tuple[str, Any, Any, Any]


class SessionOpened(NamedTuple):
    kind: str
    session_id: int
    ttl_ms: int
    index: int

    owner = property(lambda self: 0)
    deadline = property(lambda self: ("session", self.session_id, self.index, self.ttl_ms / 1000.0))


class Keepalive(NamedTuple):
    kind: str
    session_id: int
    index: int

    owner = property(lambda self: 0)
    deadline = property(lambda self: ("session", self.session_id, self.index, None))


class SessionEnded(NamedTuple):
    kind: str
    session_id: int
    reason: str

    owner = property(lambda self: self.session_id)
    deadline = property(lambda self: ("session", self.session_id, None, None))


class Granted(NamedTuple):
    """A name granted to an owner (session, handle); ``kind`` names the table, e.g. "lock_granted"."""

    kind: str
    name: str
    session_id: int
    handle_id: int
    token: int

    owner = property(lambda self: self.session_id)
    deadline = property(lambda self: None)


class Released(NamedTuple):
    kind: str
    name: str
    session_id: int
    handle_id: int
    token: int

    owner = property(lambda self: self.session_id)
    deadline = property(lambda self: None)


class Changed(NamedTuple):
    """The holder's payload changed (an election's proclaimed value)."""

    kind: str
    name: str
    session_id: int
    handle_id: int
    token: int

    owner = property(lambda self: 0)
    deadline = property(lambda self: None)


class RecordWritten(NamedTuple):
    kind: str
    key: str
    revision: int
    ttl_ms: int

    owner = property(lambda self: 0)

    @property
    def deadline(self) -> Deadline:
        if self.ttl_ms:
            return ("kv", self.key, self.revision, self.ttl_ms / 1000.0)
        return ("kv", self.key, None, None)


class RecordDeleted(NamedTuple):
    kind: str
    key: str
    revision: int

    owner = property(lambda self: 0)
    deadline = property(lambda self: ("kv", self.key, None, None))
