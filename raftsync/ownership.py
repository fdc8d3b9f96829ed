"""What Lock and Leader share: claiming a name for a handle through the log.

A claim registers a waiter, proposes the acquire command and, if queued, sleeps until
the engine's grant notification (no polling). On timeout or quorum loss the wait is
withdrawn through the log; a grant that raced the withdrawal is released by it, and
a grant that arrives when nobody waits any more is released here ("orphan"), so a
name is never left held by nobody. A lost session marks every grant it held lost.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .codec import MAX_NAME_BYTES, Op, check_key, raise_for_status
from .errors import BadRequest, NoQuorum, SessionExpired, TooLarge
from .latch import Latch
from .replica import Replica
from .session import Session

Key = tuple[int, int, str]  # (session_id, handle_id, name)


class Grant:
    """One grant of a name to a handle: a lock's Lease, a leader's Term."""

    def __init__(self, name: str, token: int, session: Session) -> None:
        self.name = name
        self.token = token
        self.session = session
        self._latch = Latch()
        self._ended = self._latch.event

    def _on_end(self, callback: Callable[[Any], None]) -> None:
        if not self._latch.add(callback):
            self.session._replica.call_soon(callback, self)

    def _end(self) -> list[Callable[[Any], None]]:
        return self._latch.fire()


class _Waiter:
    __slots__ = ("event", "token")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.token = 0


class OwnershipTable:
    """Per replica and kind ("lock", "leader"): routes grant notifications to waiting
    handles and session loss to grants. Listeners run on the reader thread."""

    def __init__(self, replica: Replica, kind: str, release_op: int, withdraw_op: int) -> None:
        self.replica = replica
        self.kind = kind
        self.release_op = release_op
        self.withdraw_op = withdraw_op
        self.guard = threading.Lock()
        self.waiters: dict[Key, _Waiter] = {}
        self.grants: dict[Key, Grant] = {}
        replica.add_listener(f"{kind}_granted", self._on_granted)
        replica.add_listener(f"{kind}_released", self._on_released)
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
            grant = self.grants.get(key)
            if grant is not None and grant.token == token:
                return  # re-announced after a snapshot install
        threading.Thread(target=self._release_orphan, args=(name, session_id, handle_id, token),
                         daemon=True).start()

    def _on_released(self, effect: list[Any]) -> None:
        # The cluster released a grant we did not give back ourselves (e.g. the wait's
        # withdrawal took a grant that raced it): it is over for its holder.
        _, name, session_id, handle_id, token = effect
        with self.guard:
            grant = self.grants.get((session_id, handle_id, name))
        if grant is not None and grant.token == token:
            self._end(grant)

    def _release_orphan(self, name: str, session_id: int, handle_id: int, token: int) -> None:
        session = self.replica.sessions.by_id(session_id)
        if session is None:
            return  # the session is gone, and the cluster released its grants with it
        try:
            self.replica.submit(session, self.release_op, [name, handle_id, token], session.ttl,
                                f"release orphaned {self.kind} grant")
        except Exception:
            pass

    def _on_session_lost(self, effect: list[Any]) -> None:
        session_id = effect[1]
        with self.guard:
            ended = [grant for key, grant in self.grants.items() if key[0] == session_id]
            for key, waiter in self.waiters.items():
                if key[0] == session_id:
                    waiter.event.set()
        for grant in ended:
            self._end(grant)

    def _end(self, grant: Grant) -> None:
        for callback in grant._end():
            self.replica.call_soon(callback, grant)

    def claim(self, session: Session, name: str, handle_id: int, acquire_op: int, args: list[Any],
              timeout: float | None, timeout_error: Callable[[str], Exception]) -> int:
        """Propose ``acquire_op`` with ``args`` and wait for the grant; returns its token.

        ``args`` must end with the ``wait`` flag; ``timeout=0`` asks once.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        key = (session.id, handle_id, name)
        waiter = _Waiter()
        with self.guard:
            self.waiters[key] = waiter
        try:
            # The request itself may use one attempt's time even when asking once.
            request_timeout = None if deadline is None else max(
                deadline - time.monotonic(), self.replica.config.attempt_timeout)
            status, token = self.replica.submit(session, acquire_op, args, request_timeout,
                                                f"{self.kind} {name!r}")
            raise_for_status(status, token, f"{self.kind} {name!r}")
            if token:
                return token
            if timeout == 0:
                raise timeout_error(f"{name!r} is held by another owner")
            return self._wait(waiter, session, name, handle_id, deadline, timeout_error)
        finally:
            with self.guard:
                self.waiters.pop(key, None)

    def _wait(self, waiter: _Waiter, session: Session, name: str, handle_id: int, deadline: float | None,
              timeout_error: Callable[[str], Exception]) -> int:
        quorum_timeout = self.replica.config.quorum_timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Wake at least every quorum_timeout to notice a lost cluster.
            if waiter.event.wait(quorum_timeout if remaining is None else min(remaining, quorum_timeout)):
                if waiter.token:
                    return waiter.token
                raise SessionExpired(f"session lost while waiting for {name!r}")
            if self.replica.unavailable_for() >= quorum_timeout:
                self._withdraw(session, name, handle_id)
                raise NoQuorum(f"no quorum while waiting for {name!r}")
            if deadline is not None and time.monotonic() >= deadline:
                # A grant that raced the timeout is released by the withdrawal itself.
                self._withdraw(session, name, handle_id)
                raise timeout_error(f"{name!r} not acquired within the timeout")

    def _withdraw(self, session: Session, name: str, handle_id: int) -> None:
        try:
            self.replica.submit(session, self.withdraw_op, [name, handle_id], max(1.0, session.ttl),
                                f"withdraw {self.kind} {name!r}")
        except Exception:
            pass  # unknown outcome: a grant that still arrives is released as an orphan

    def hold(self, session: Session, handle_id: int, grant: Grant) -> None:
        key = (session.id, handle_id, grant.name)
        with self.guard:
            self.grants[key] = grant
        if session.lost.is_set():
            self._end(grant)

    def forget(self, handle_id: int, grant: Grant) -> None:
        key = (grant.session.id, handle_id, grant.name)
        with self.guard:
            if self.grants.get(key) is grant:
                del self.grants[key]

    def release(self, handle_id: int, grant: Grant, not_held: Callable[[str], Exception],
                timeout: float | None = None) -> None:
        """Give a grant back through the log."""
        from .codec import Status

        self.forget(handle_id, grant)
        status, payload = self.replica.submit(grant.session, self.release_op,
                                              [grant.name, handle_id, grant.token], timeout,
                                              f"release {self.kind} {grant.name!r}")
        if status in (Status.SESSION_EXPIRED, Status.NOT_HELD):
            raise not_held(f"{grant.name!r} was no longer held (lost lease or session)")
        raise_for_status(status, payload, f"release {self.kind} {grant.name!r}")


def session_for(replica: Replica, session: Session | None, ttl: float | None, timeout: float | None) -> Session:
    """The session a handle acts under: explicit, per-TTL shared, or the node's default."""
    if session is not None:
        if session.lost.is_set():
            raise SessionExpired(f"session {session.id:#x} is lost")
        return session
    if ttl is None:
        return replica.sessions.default(timeout)
    return replica.sessions.for_ttl(ttl, timeout)


# kind -> (acquire, release, withdraw) ops
_OPS = {
    "lock": (Op.LOCK_ACQUIRE, Op.LOCK_RELEASE, Op.LOCK_WITHDRAW),
    "sem": (Op.SEM_ACQUIRE, Op.SEM_RELEASE, Op.SEM_WITHDRAW),
    "rw": (Op.RW_ACQUIRE, Op.RW_RELEASE, Op.RW_WITHDRAW),
    "leader": (Op.LEADER_CAMPAIGN, Op.LEADER_RESIGN, Op.LEADER_WITHDRAW),
}


def acquire_op(kind: str) -> int:
    return _OPS[kind][0]


def ownership_table(replica: Replica, kind: str) -> OwnershipTable:
    """The replica's one OwnershipTable for ``kind`` ("lock", "sem", "rw", "leader")."""
    _, release_op, withdraw_op = _OPS[kind]
    return replica.attachment(f"ownership:{kind}", lambda r: OwnershipTable(r, kind, release_op, withdraw_op))


def check_name(name: Any, what: str) -> str:
    check_key(name, what)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise TooLarge(f"{what} is over {MAX_NAME_BYTES} bytes")
    return name


def check_timeout(timeout: Any) -> float | None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout < 0):
        raise BadRequest("timeout must be None or a number >= 0")
    return timeout
