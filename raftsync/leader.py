"""Leader: election of one leader per group among candidates, with fencing terms.

Guarantees
- At most one leader per group at a time in the cluster; ``Term.term`` (the fencing
  number) strictly increases per group with every new leadership.
- Candidates are served first come, first served: when a leader resigns or its
  session ends, the next candidate becomes leader in the same log entry.
- ``Term.revoked`` is set (and ``on_revoked`` callbacks run) when this process can no
  longer be sure it leads: its session was lost (before the cluster can elect someone
  else) or it resigned.
- ``observe()`` yields every leadership change of the group in commit order, on any
  node; ``current()`` is a linearizable read by default.

Failure modes
- ``campaign(timeout)`` raises Timeout (``timeout=0``: someone else leads), NoQuorum.
- A process paused past its TTL may still believe it leads until it resumes: fence
  side effects with ``Term.term``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from .codec import Op, Query, Status, check_value, encode_query, raise_for_status
from .errors import NotHeld, Timeout
from .ownership import Claimant, Grant, check_name, check_timeout
from .replica import Replica, deadline_after
from .session import Session
from .watch import WatchStream


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads a group: candidate ``id``, its proclaimed ``value``, and the ``term``."""

    group: str
    id: str
    value: bytes
    term: int


class Term(Grant):
    """This process's leadership of a group."""

    def __init__(self, election: "Election", candidate_id: str, value: bytes, token: int,
                 session: Session) -> None:
        super().__init__(election.group, token, session)
        self._election = election
        self._resigned = False
        self.id = candidate_id
        self.value = value

    @property
    def term(self) -> int:
        """The fencing number of this leadership."""
        return self.token

    @property
    def revoked(self) -> threading.Event:
        return self._ended

    def on_revoked(self, callback: Callable[["Term"], None]) -> None:
        """Call ``callback(term)`` once, on a raftsync thread, when leadership is revoked."""
        self._on_end(callback)

    def resign(self, timeout: float | None = None) -> None:
        """Step down; the next candidate (if any) becomes leader. ``revoked`` is set at once.

        Raises NotHeld if the leadership was already over, OutcomeUnknown if the
        resignation was not applied by the deadline (it keeps being proposed in the
        background until it applies or the session ends; resigning again is a no-op)."""
        check_timeout(timeout)
        self._election._replica.check_owner()
        self._election._resign(self, timeout)

    def proclaim(self, value: bytes, timeout: float | None = None) -> None:
        """Publish a new value for this leadership (observers see it). Raises NotHeld."""
        self._election._proclaim(self, check_value(value), timeout)

    def __repr__(self) -> str:
        return f"<Term {self.name!r} id={self.id!r} term={self.term}{' REVOKED' if self.revoked.is_set() else ''}>"


class Election(Claimant):
    """A handle on the election of ``group``. Create with ``node.leader(group)``."""

    _kind = "leader"

    def __init__(self, replica: Replica, group: str, ttl: float | None = None,
                 session: Session | None = None) -> None:
        super().__init__(replica, check_name(group, "group"), ttl, session)
        self.group = group
        self._term: Term | None = None

    def campaign(self, candidate_id: str, value: bytes = b"", timeout: float | None = None) -> Term:
        """Block until this handle leads the group; ``timeout=0`` tries once (Timeout if not)."""
        check_name(candidate_id, "candidate_id")
        value = check_value(value)
        check_timeout(timeout)
        self._replica.check_owner()  # a forked child must not reuse its parent's term
        with self._mutex:
            if self._term is not None and not self._term.revoked.is_set():
                return self._term
            self._term = self._claim([self.group, self._handle_id, candidate_id, value, timeout != 0], timeout,
                                     Timeout, lambda token, session: Term(self, candidate_id, value, token, session))
            return self._term

    def _resign(self, term: Term, timeout: float | None) -> None:
        with self._mutex:
            if term._resigned:
                return  # already resigned (perhaps still being proposed in the background)
            if term.revoked.is_set():
                raise NotHeld(f"leadership of {self.group!r} is already over")
            term._resigned = True
            self._table._end(term)
            if self._term is term:
                self._term = None
            self._give_back(term, timeout)

    def _proclaim(self, term: Term, value: bytes, timeout: float | None) -> None:
        self._replica.check_owner()
        if term.revoked.is_set():
            raise NotHeld(f"leadership of {self.group!r} is over")
        status, payload = self._replica.submit(term.session, Op.LEADER_PROCLAIM,
                                               [self.group, self._handle_id, term.term, value],
                                               deadline_after(timeout), f"proclaim {self.group!r}")
        if status in (Status.NOT_HELD, Status.SESSION_EXPIRED):
            raise NotHeld(f"leadership of {self.group!r} is over")
        raise_for_status(status, payload, f"proclaim {self.group!r}")
        term.value = value

    def current(self, consistency: str = "linearizable", timeout: float | None = None) -> LeaderInfo | None:
        """The group's leader now, or None."""
        status, payload = self._replica.query(encode_query(Query.LEADER_INFO, [self.group]), consistency,
                                              deadline_after(timeout))
        raise_for_status(status, payload, f"leader of {self.group!r}")
        return self._info(payload)

    def _info(self, payload: list[Any] | None) -> LeaderInfo | None:
        if payload is None:
            return None
        candidate_id, value, term = payload
        return LeaderInfo(self.group, candidate_id, value, term)

    def observe(self) -> WatchStream[LeaderInfo | None]:
        """The current leader (or None), then every change, in commit order."""
        return WatchStream(self._replica, "leader", self.group, None, lambda kind, payload: self._info(payload))

    @property
    def term(self) -> Term | None:
        """This handle's current leadership, if any."""
        term = self._term
        return term if term is not None and not term.revoked.is_set() else None
