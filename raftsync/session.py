"""Sessions: a client's liveness lease (etcd lease / ZooKeeper session / Hazelcast CP session).

Guarantees
- Locks and other ownership taken under a session are released by the cluster when
  the session closes or expires. Expiry is decided by the Raft leader's monotonic
  clock: no sooner than the TTL after the last keepalive it applied.
- The engine keeps a session alive through the log every TTL/3, but only while the
  application process keeps talking to it: a SIGKILLed or SIGSTOPped app loses it.
- ``lost`` is set (and ``on_lost`` callbacks run) when this process can no longer be
  sure the session is alive: at ``safe_until`` = send time of the last acknowledged
  keepalive + TTL − margin, which is *before* the cluster can expire it, or when the
  cluster reports it ended. A lost session is over for good: raftsync closes it and,
  for the node's default session, opens a fresh one for new work.

Failure modes
- A process paused longer than its TTL cannot observe ``lost`` until it resumes;
  protect external resources with the fencing token of each lease.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

MIN_TTL = 0.3
MAX_TTL = 86400.0


# The app reports a lease lost this long before the cluster could expire it, to
# absorb scheduling delay of the watchdog thread.
def safety_margin(ttl: float) -> float:
    return max(0.1, 0.1 * ttl)


class Session:
    """A liveness lease. Create with ``node.session(ttl)``; the node has a default one."""

    def __init__(self, session_id: int, ttl: float, replica: "object") -> None:
        self.id = session_id
        self.ttl = ttl
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self._replica = replica
        self._lock = threading.Lock()
        self._next_seq = 1
        self._in_flight: set[int] = set()
        self._callbacks: list[Callable[["Session"], None]] = []
        # set by the replica from the OPEN_SESSION send time, then by each acknowledged keepalive
        self.safe_until = 0.0

    # -- command sequencing (used by the replica) --------------------------------------

    def _begin(self) -> tuple[int, int]:
        """Reserve a seq; returns (seq, acked_below)."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._in_flight.add(seq)
            return seq, min(self._in_flight)

    def _end(self, seq: int) -> None:
        with self._lock:
            self._in_flight.discard(seq)

    def _extend(self, sent_at: float) -> None:
        with self._lock:
            self.safe_until = max(self.safe_until, sent_at + self.ttl - safety_margin(self.ttl))

    # -- public ----------------------------------------------------------------------

    def on_lost(self, callback: Callable[["Session"], None]) -> None:
        """Call ``callback(session)`` once, on a raftsync thread, when the session is lost."""
        with self._lock:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        self._replica.call_soon(callback, self)

    def close(self, timeout: float | None = 5.0) -> None:
        """Close the session in the cluster, releasing everything it holds at once."""
        self._replica.close_session(self, timeout)

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.safe_until

    def _mark_lost(self, reason: str) -> list[Callable[["Session"], None]]:
        with self._lock:
            if self.lost.is_set():
                return []
            self.lost_reason = reason
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
            return callbacks

    def __repr__(self) -> str:
        state = f"lost: {self.lost_reason}" if self.lost.is_set() else "alive"
        return f"<Session {self.id:#x} ttl={self.ttl}s {state}>"
