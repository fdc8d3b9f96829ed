"""Lock: a distributed mutex with FIFO waiters and fencing tokens.

Guarantees
- Mutual exclusion: at most one handle holds a lock in the cluster at a time.
- The handle is the owner: two handles (in one process or in many) exclude each
  other; a second ``acquire`` through the handle that already holds it is a reentrant
  hold, released by as many ``release`` calls. Give each thread its own handle when
  the threads must exclude each other.
- ``Lease.token`` is a fencing token, strictly increasing per lock across the
  cluster: pass it to the resource you protect and have it refuse older tokens.
- Waiters are served first come, first served. A release hands the lock to the next
  waiter in the same log entry and only that waiter's node is notified: no polling,
  no thundering herd.
- The lease lives as long as its session: while this process runs (the engine keeps
  the session alive) and at most ``ttl`` after it goes silent (killed or paused).
  ``Lease.lost`` is set before the cluster can give the lock to anyone else.

Failure modes
- ``acquire(timeout)`` raises LockTimeout; the wait is withdrawn through the log (in the
  background) and a grant that raced the timeout is released, so no lock is left held by
  nobody.
- An acquire whose answer is lost (leader change, dropped reply) returns the lease if its
  grant was seen being applied by the deadline; otherwise it raises OutcomeUnknown and
  whatever it took is released in the background.
- ``release()`` returns once the release applied, or raises OutcomeUnknown by its
  deadline (also on ``with`` exit) and keeps proposing it in the background until it
  applies or the session ends; releasing that same lease again is a no-op.
- Without a quorum for ``quorum_timeout``, ``acquire`` raises NoQuorum.
- A process paused past its TTL may hold a lost lease without having noticed yet:
  that is what the fencing token is for.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from .errors import BadRequest, LockTimeout, NotHeld, OutcomeUnknown
from .ownership import Claimant, Grant, check_name, check_timeout
from .replica import Replica
from .session import Session


class Lease(Grant):
    """One grant of a lock to a handle. ``token`` is its fencing token."""

    @property
    def lost(self) -> threading.Event:
        """Set when the session is lost or the lock's TTL ran out."""
        return self._ended

    def on_lost(self, callback: Callable[["Lease"], None]) -> None:
        """Call ``callback(lease)`` once, on a raftsync thread, when the lease is lost."""
        self._on_end(callback)

    def __repr__(self) -> str:
        return f"<Lease {self.name!r} token={self.token}{' LOST' if self.lost.is_set() else ''}>"


class _Handle(Claimant):
    """One owner of a lock-like name: acquire/release, reentrant holds, leases."""

    def __init__(self, replica: Replica, name: str, ttl: float | None, session: Session | None) -> None:
        super().__init__(replica, name, ttl, session)
        self._lease: Lease | None = None
        self._holds = 0
        # the lease whose release went unanswered (still proposed in the background)
        self._releasing: Lease | None = None

    def _acquire_args(self, wait: bool) -> list[Any]:
        return [self.name, self._handle_id, wait]

    @property
    def lease(self) -> Lease | None:
        """The current lease, if this handle holds it (and has not lost it)."""
        lease = self._lease
        return lease if lease is not None and not lease.lost.is_set() else None

    def acquire(self, timeout: float | None = None) -> Lease:
        """Block until this handle holds it; ``timeout=0`` tries once.

        A handle that already holds it counts one more (reentrant) hold.
        Raises LockTimeout, NoQuorum, SessionExpired (the session was lost while waiting)
        or OutcomeUnknown (see the module's failure modes).
        """
        check_timeout(timeout)
        self._replica.check_owner()  # a forked child must not count a hold of its parent's
        with self._mutex:
            if self.lease is not None:
                self._holds += 1
                return self._lease
            lease = self._claim(self._acquire_args(timeout != 0), timeout, LockTimeout,
                                lambda token, session: Lease(self.name, token, session))
            self._lease, self._holds, self._releasing = lease, 1, None
            return lease

    def release(self, timeout: float | None = None) -> None:
        """Release one hold; the last release gives it back through the log.

        Raises NotHeld, or OutcomeUnknown when the release was not applied by the deadline
        (it keeps being proposed in the background; releasing again is then a no-op).
        ``timeout=None`` waits for it, but at most ``quorum_timeout`` without a quorum."""
        check_timeout(timeout)
        self._replica.check_owner()
        with self._mutex:
            lease = self._lease
            if lease is None or self._holds == 0:
                if self._releasing is not None:
                    return  # that lease's release is already under way
                raise NotHeld(f"{self.name!r} is not held by this handle")
            if lease.lost.is_set():
                self._lease, self._holds = None, 0
                self._table.forget(self._handle_id, lease)
                raise NotHeld(f"the lease on {self.name!r} was lost")
            if self._holds > 1:
                self._holds -= 1
                return
            self._lease, self._holds, self._releasing = None, 0, lease
            try:
                self._give_back(lease, timeout)
            except OutcomeUnknown:
                raise  # still being released: releasing again is a no-op
            except BaseException:
                self._releasing = None
                raise
            self._releasing = None

    @property
    def held(self) -> bool:
        return self.lease is not None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {'held' if self.held else 'free'}>"


class Lock(_Handle):
    """A handle on the distributed lock ``name``. Create with ``node.lock(name, ttl)``."""

    _kind = "lock"

    def __init__(self, replica: Replica, name: str, ttl: float | None = None,
                 session: Session | None = None) -> None:
        super().__init__(replica, name, ttl, session)


class Semaphore(_Handle):
    """A handle on a counting semaphore of ``permits``: up to that many handles hold it at
    once, each with its own lease and fencing token; waiters are served FIFO.
    Every handle on one name must agree on ``permits`` (else BadRequest)."""

    _kind = "sem"

    def __init__(self, replica: Replica, name: str, permits: int, ttl: float | None = None,
                 session: Session | None = None) -> None:
        if isinstance(permits, bool) or not isinstance(permits, int) or permits < 1:
            raise BadRequest("permits must be an int >= 1")
        super().__init__(replica, name, ttl, session)
        self.permits = permits

    def _acquire_args(self, wait: bool) -> list[Any]:
        return [self.name, self._handle_id, self.permits, wait]


class RWLock:
    """A read/write lock: many readers or one writer, served in arrival order (a waiting
    writer is not overtaken by later readers). ``read_lock()`` and ``write_lock()``
    each return a new handle (an owner) with the Lock API."""

    def __init__(self, replica: Replica, name: str, ttl: float | None = None,
                 session: Session | None = None) -> None:
        check_name(name, "name")
        self.name = name
        self._args = (replica, name, ttl, session)

    def read_lock(self) -> "_RWHandle":
        return _RWHandle(*self._args, mode="r")

    def write_lock(self) -> "_RWHandle":
        return _RWHandle(*self._args, mode="w")


class _RWHandle(_Handle):
    _kind = "rw"

    def __init__(self, replica: Replica, name: str, ttl: float | None, session: Session | None,
                 mode: str) -> None:
        super().__init__(replica, name, ttl, session)
        self.mode = mode

    def _acquire_args(self, wait: bool) -> list[Any]:
        return [self.name, self._handle_id, self.mode, wait]
