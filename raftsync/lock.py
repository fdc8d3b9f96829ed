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
- ``acquire(timeout)`` raises LockTimeout; the wait is withdrawn through the log and a
  grant that raced the timeout is released, so no lock is left held by nobody.
- Without a quorum for ``quorum_timeout``, ``acquire`` raises NoQuorum.
- A process paused past its TTL may hold a lost lease without having noticed yet:
  that is what the fencing token is for.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Callable

from .codec import MAX_NAME_BYTES, Op, Status, check_key
from .errors import BadRequest, LockTimeout, NoQuorum, NotHeld, SessionExpired, TooLarge
from .replica import Replica, raise_for_status
from .session import Session


class Lease:
    """One grant of a lock to a handle."""

    def __init__(self, name: str, token: int, session: Session) -> None:
        self.name = name
        self.token = token
        self.session = session
        self.lost = threading.Event()
        self._callbacks: list[Callable[["Lease"], None]] = []
        self._guard = threading.Lock()

    def on_lost(self, callback: Callable[["Lease"], None]) -> None:
        """Call ``callback(lease)`` once, on a raftsync thread, when the lease is lost."""
        with self._guard:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        self.session._replica.call_soon(callback, self)

    def _mark_lost(self) -> list[Callable[["Lease"], None]]:
        with self._guard:
            if self.lost.is_set():
                return []
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
            return callbacks

    def __repr__(self) -> str:
        return f"<Lease {self.name!r} token={self.token}{' LOST' if self.lost.is_set() else ''}>"


class _Waiter:
    __slots__ = ("event", "token")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.token = 0


class _LockTable:
    """Per-replica routing of grant notifications to waiting handles and of session
    loss to leases. Runs on the replica's reader thread: quick, never blocks."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.guard = threading.Lock()
        self.waiters: dict[tuple[int, int, str], _Waiter] = {}
        self.leases: dict[tuple[int, int, str], Lease] = {}
        replica.add_listener("lock_granted", self._on_granted)
        replica.add_listener("session_lost", self._on_session_lost)

    def _on_granted(self, effect: list[Any]) -> None:
        _, name, session_id, handle_id, token = effect
        key = (session_id, handle_id, name)
        with self.guard:
            waiter = self.waiters.get(key)
            if waiter is not None:
                waiter.token = token
                waiter.event.set()
                return
            lease = self.leases.get(key)
            if lease is not None and lease.token == token:
                return  # a re-announcement (after a snapshot install) of what we hold
        # Nobody waits for this grant any more (the wait timed out and its withdrawal
        # lost the race): give the lock back so it is not held by nobody.
        threading.Thread(target=self._release_orphan, args=(name, session_id, handle_id, token),
                         daemon=True).start()

    def _release_orphan(self, name: str, session_id: int, handle_id: int, token: int) -> None:
        session = self.replica.session_by_id(session_id)
        if session is None:
            return  # the session is gone, and the cluster released its locks with it
        try:
            self.replica.submit(session, Op.LOCK_RELEASE, [name, handle_id, token], session.ttl,
                                "release orphaned grant")
        except Exception:
            pass

    def _on_session_lost(self, effect: list[Any]) -> None:
        session_id = effect[1]
        with self.guard:
            lost = [lease for key, lease in self.leases.items() if key[0] == session_id]
            for waiter_key, waiter in self.waiters.items():
                if waiter_key[0] == session_id:
                    waiter.event.set()
        for lease in lost:
            for callback in lease._mark_lost():
                self.replica.call_soon(callback, lease)


class Lock:
    """A handle on the distributed lock ``name``. Create with ``node.lock(name, ttl)``."""

    def __init__(self, replica: Replica, name: str, ttl: float | None = None,
                 session: Session | None = None) -> None:
        check_key(name, "lock name")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise TooLarge(f"lock name is over {MAX_NAME_BYTES} bytes")
        if ttl is not None and session is not None:
            raise BadRequest("give either ttl or session, not both")
        self.name = name
        self.ttl = ttl
        self._replica = replica
        self._fixed_session = session
        self._table: _LockTable = replica.attachment("locks", _LockTable)
        self._handle_id = secrets.randbits(62)
        self._mutex = threading.RLock()
        self._lease: Lease | None = None
        self._holds = 0

    @property
    def lease(self) -> Lease | None:
        """The current lease, if this handle holds the lock (and has not lost it)."""
        lease = self._lease
        return lease if lease is not None and not lease.lost.is_set() else None

    def _session(self, timeout: float | None) -> Session:
        if self._fixed_session is not None:
            if self._fixed_session.lost.is_set():
                raise SessionExpired(f"session {self._fixed_session.id:#x} is lost")
            return self._fixed_session
        if self.ttl is None:
            return self._replica.default_session(timeout)
        return self._replica.session_for_ttl(self.ttl, timeout)

    def acquire(self, timeout: float | None = None) -> Lease:
        """Block until this handle holds the lock; ``timeout=0`` tries once.

        Raises LockTimeout, NoQuorum, or SessionExpired (the session was lost while waiting).
        """
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise BadRequest("timeout must be None or a number >= 0")
        with self._mutex:
            if self.lease is not None:
                self._holds += 1
                return self._lease
            started = time.monotonic()
            deadline = None if timeout is None else started + timeout
            session = self._session(timeout)
            key = (session.id, self._handle_id, self.name)
            waiter = _Waiter()
            with self._table.guard:
                self._table.waiters[key] = waiter
            try:
                # The request itself may use one attempt's time even for a try-lock.
                request_timeout = None if deadline is None else max(
                    self._remaining(deadline), self._replica.config.attempt_timeout)
                status, token = self._replica.submit(
                    session, Op.LOCK_ACQUIRE, [self.name, self._handle_id, timeout != 0],
                    request_timeout, f"acquire {self.name!r}")
                raise_for_status(status, token, f"acquire {self.name!r}")
                if not token:
                    if timeout == 0:
                        raise LockTimeout(f"{self.name!r} is held by another owner")
                    token = self._wait_grant(waiter, session, deadline)
            finally:
                with self._table.guard:
                    self._table.waiters.pop(key, None)
            lease = Lease(self.name, token, session)
            with self._table.guard:
                self._table.leases[key] = lease
            if session.lost.is_set():
                self._forget(lease)
                raise SessionExpired(f"session lost while acquiring {self.name!r}")
            self._lease, self._holds = lease, 1
            return lease

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _wait_grant(self, waiter: _Waiter, session: Session, deadline: float | None) -> int:
        """Wait for the grant notification; withdraw the wait on timeout or quorum loss."""
        while True:
            remaining = self._remaining(deadline)
            # Wake at least every quorum_timeout to notice a lost cluster.
            slice_ = self._replica.config.quorum_timeout if remaining is None else min(
                remaining, self._replica.config.quorum_timeout)
            if waiter.event.wait(slice_):
                if waiter.token:
                    return waiter.token
                raise SessionExpired(f"session lost while waiting for {self.name!r}")
            if self._replica.unavailable_for() >= self._replica.config.quorum_timeout:
                self._withdraw(session)
                raise NoQuorum(f"no quorum while waiting for {self.name!r}")
            if deadline is not None and time.monotonic() >= deadline:
                # A grant that raced the timeout is released by the withdrawal itself.
                self._withdraw(session)
                raise LockTimeout(f"{self.name!r} not acquired within the timeout")

    def _withdraw(self, session: Session) -> None:
        try:
            self._replica.submit(session, Op.LOCK_WITHDRAW, [self.name, self._handle_id],
                                 max(1.0, session.ttl), f"withdraw {self.name!r}")
        except Exception:
            # Unknown outcome: if a grant still arrives, the lock table releases it.
            pass

    def release(self) -> None:
        """Release one hold; the last release frees the lock. Raises NotHeld."""
        with self._mutex:
            lease = self._lease
            if lease is None or self._holds == 0:
                raise NotHeld(f"{self.name!r} is not held by this handle")
            if lease.lost.is_set():
                self._lease, self._holds = None, 0
                self._forget(lease)
                raise NotHeld(f"the lease on {self.name!r} was lost")
            if self._holds > 1:
                self._holds -= 1
                return
            self._lease, self._holds = None, 0
            self._forget(lease)
            status, payload = self._replica.submit(lease.session, Op.LOCK_RELEASE,
                                                   [self.name, self._handle_id, lease.token], None,
                                                   f"release {self.name!r}")
            if status == Status.SESSION_EXPIRED:
                raise NotHeld(f"the session of the lease on {self.name!r} has ended")
            raise_for_status(status, payload, f"release {self.name!r}")

    def _forget(self, lease: Lease) -> None:
        with self._table.guard:
            key = (lease.session.id, self._handle_id, self.name)
            if self._table.leases.get(key) is lease:
                del self._table.leases[key]

    @property
    def held(self) -> bool:
        return self.lease is not None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Lock {self.name!r} {'held' if self.held else 'free'}>"
