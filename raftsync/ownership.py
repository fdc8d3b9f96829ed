"""What Lock and Leader share: claiming a name for a handle through the log.

A claim registers a waiter, proposes the acquire command and, if queued, sleeps until
the engine's grant notification (no polling). Nothing is left held by a handle nobody
has:
- an acquire whose answer is lost is retried in the background (same seq, so it applies
  once) until answered, then withdrawn, unless its grant was seen and handed to the
  caller;
- a wait that times out (or loses the quorum) is withdrawn in the background, which also
  releases a grant that raced it; a grant arriving when nobody waits any more is
  released here ("orphan");
- a release is proposed until it applies or the session ends, past the caller's deadline
  if need be.
While any of that is pending for a (session, handle, name), a new claim by the same
handle waits for it, so a late withdrawal cannot take a fresh grant away. A lost session
marks every grant it held lost.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Callable

from .codec import MAX_NAME_BYTES, Op, Status, check_key, raise_for_status
from .errors import BadRequest, NoQuorum, NotHeld, OutcomeUnknown, RaftsyncError, SessionExpired, TooLarge
from .latch import Latch
from .replica import Replica, deadline_after
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
        self._given_back = False  # released or resigned by its holder

    @property
    def valid(self) -> bool:
        """False once the grant ended (lost, or given back) or its session's "safe until"
        has passed, read from the monotonic clock right now: it holds even when
        raftsync's threads are starved and have not yet set ``lost``/``revoked``."""
        return (not self._given_back and not self._ended.is_set()
                and time.monotonic() < self.session.safe_until)

    def _on_end(self, callback: Callable[[Any], None]) -> None:
        if not self._latch.add(callback):
            self.session._replica.call_soon(callback, self)

    def _end(self) -> list[Callable[[Any], None]]:
        return self._latch.fire()


class _Waiter:
    __slots__ = ("event", "token", "outcome")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.token = 0
        # for an acquire that went unanswered: "kept" (the caller took the grant it saw)
        # or "abandoned" (settling withdraws it), decided once by whoever comes first
        self.outcome: str | None = None


class OwnershipTable:
    """Per replica and kind ("lock", "leader", ...): routes grant notifications to waiting
    handles and session loss to grants. Listeners run on the reader thread."""

    def __init__(self, replica: Replica, kind: str, release_op: int, withdraw_op: int) -> None:
        self.replica = replica
        self.kind = kind
        self.release_op = release_op
        self.withdraw_op = withdraw_op
        self.guard = threading.Lock()
        self.waiters: dict[Key, _Waiter] = {}
        self.grants: dict[Key, Grant] = {}
        # claims, withdrawals and releases still being settled in the background
        self.settling: dict[Key, list[threading.Event]] = {}
        # the machine's Granted/Released effects of this kind's table, as notices
        replica.on_notice(f"{kind}_granted", self._on_granted)
        replica.on_notice(f"{kind}_released", self._on_released)
        replica.on_notice("holdings", self._on_holdings)
        replica.sessions.on_loss(self._on_session_lost)

    # -- notifications (reader thread) --------------------------------------------------

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
        session = self.replica.sessions.by_id(session_id)
        if session is not None:
            self._propose_in_background(session, key, self.release_op, [name, handle_id, token],
                                        f"release orphaned {self.kind} grant {name!r}")

    def _on_released(self, effect: list[Any]) -> None:
        # The cluster released a grant we did not give back ourselves (e.g. the wait's
        # withdrawal took a grant that raced it): it is over for its holder.
        _, name, session_id, handle_id, token = effect
        key = (session_id, handle_id, name)
        with self.guard:
            grant = self.grants.get(key)
            if grant is None or grant.token != token:
                return
            del self.grants[key]
        self._end(grant)

    def _on_holdings(self, effect: list[Any]) -> None:
        # After a snapshot install: every grant our sessions hold now. One of ours that
        # is not listed ended in the entries the snapshot skipped.
        _, session_ids, holdings = effect
        current = {(name, session_id, handle_id, token) for kind, name, session_id, handle_id, token in holdings
                   if kind == f"{self.kind}_granted"}
        sessions = set(session_ids)
        with self.guard:
            ended = [(key, grant) for key, grant in self.grants.items()
                     if key[0] in sessions and (key[2], key[0], key[1], grant.token) not in current]
            for key, _ in ended:
                del self.grants[key]
        for _, grant in ended:
            self._end(grant)

    def _on_session_lost(self, session_id: int) -> None:
        with self.guard:
            keys = [key for key in self.grants if key[0] == session_id]
            ended = [self.grants.pop(key) for key in keys]
            for key, waiter in self.waiters.items():
                if key[0] == session_id:
                    waiter.event.set()
        for grant in ended:
            self._end(grant)

    def _end(self, grant: Grant) -> None:
        for callback in grant._end():
            self.replica.call_soon(callback, grant)

    # -- settling -----------------------------------------------------------------------

    def _begin_settling(self, key: Key) -> threading.Event:
        settled = threading.Event()
        with self.guard:
            self.settling.setdefault(key, []).append(settled)
        return settled

    def _end_settling(self, key: Key, settled: threading.Event) -> None:
        with self.guard:
            pending = self.settling.get(key)
            if pending is not None and settled in pending:
                pending.remove(settled)
                if not pending:
                    del self.settling[key]
        settled.set()

    def _wait_settled(self, key: Key, deadline: float, started: float) -> bool:
        """Wait until nothing of this key is being settled any more (every pending claim,
        withdrawal and release); NoQuorum rules as for any wait."""
        while True:
            with self.guard:
                pending = list(self.settling.get(key, ()))
            if not pending:
                return True
            for settled in pending:
                if not self.replica.wait_for(settled, deadline, started):
                    return False

    def _propose_in_background(self, session: Session, key: Key, op: int, args: list[Any], what: str) -> None:
        """Propose a release or withdrawal off the caller's thread, until it applies or the
        session is lost; the handle's next claim waits for it."""
        settled = self._begin_settling(key)

        def run() -> None:
            try:
                self.replica.finish(session, op, args, time.monotonic() + self.replica.config.quorum_timeout,
                                    what, on_done=lambda status, payload: self._end_settling(key, settled))
            except RaftsyncError:
                pass  # finish goes on in the background, or gave up (session lost, node closed)

        threading.Thread(target=run, name="raftsync-settle", daemon=True).start()

    # -- claim --------------------------------------------------------------------------

    def claim(self, session: Session, name: str, handle_id: int, acquire_op: int, args: list[Any],
              deadline: float, try_once: bool, timeout_error: Callable[[str], Exception],
              make_grant: Callable[[int, Session], Grant]) -> Grant:
        """Propose ``acquire_op`` with ``args``, wait for the grant and hold it as
        ``make_grant(token, session)``.

        ``args`` must end with the ``wait`` flag. ``try_once`` asks once (the request may
        still use one attempt's time). Raises ``timeout_error``, NoQuorum, SessionExpired or
        OutcomeUnknown (the acquire went unanswered: whatever it took is given back in the
        background).
        """
        key = (session.id, handle_id, name)
        what = f"{self.kind} {name!r}"
        started = time.monotonic()
        if not self._wait_settled(key, deadline, started):
            raise timeout_error(f"{name!r}: this handle's previous claim or release is still being settled")
        waiter = _Waiter()
        settled = self._begin_settling(key)
        with self.guard:
            self.waiters[key] = waiter

        def after_unknown(status: int | None, token: Any) -> None:
            # The unanswered acquire is answered now (or its session is gone). Whoever of
            # this and the caller decides first decides: unless the caller took the grant
            # it saw, withdraw whatever the acquire did (queued or granted).
            with self.guard:
                if waiter.outcome is None:
                    waiter.outcome = "abandoned"
                kept = waiter.outcome == "kept"
            if status is not None and not kept:
                self._propose_in_background(session, key, self.withdraw_op, [name, handle_id], f"withdraw {what}")
            self._end_settling(key, settled)

        unanswered = False
        try:
            request_deadline = max(deadline, time.monotonic() + self.replica.config.attempt_timeout) \
                if try_once else deadline
            try:
                status, token = self.replica.submit(session, acquire_op, args, request_deadline, what,
                                                    settle=after_unknown)
            except OutcomeUnknown:
                unanswered = True
                with self.guard:
                    if waiter.outcome is None:  # its grant was applied and seen: it is ours
                        waiter.outcome = "kept" if waiter.token else "abandoned"
                    if waiter.outcome != "kept":
                        raise
                    token = waiter.token
            else:
                raise_for_status(status, token, what)
                if not token:
                    if try_once:
                        raise timeout_error(f"{name!r} is held by another owner")
                    token = self._wait(waiter, session, key, deadline, started, timeout_error)
            with self.guard:  # held from the moment nobody waits: no notice falls in between
                self.waiters.pop(key, None)
                grant = self.grants[key] = make_grant(token, session)
            if session.lost.is_set():
                self._end(grant)
            return grant
        finally:
            with self.guard:
                self.waiters.pop(key, None)
            if not unanswered:
                self._end_settling(key, settled)

    def _wait(self, waiter: _Waiter, session: Session, key: Key, deadline: float, started: float,
              timeout_error: Callable[[str], Exception]) -> int:
        _, handle_id, name = key
        try:
            granted = self.replica.wait_for(waiter.event, deadline, started)
        except NoQuorum as exc:
            error: Exception = NoQuorum(f"while waiting for {name!r}: {exc}")
        else:
            if granted:
                if waiter.token:
                    return waiter.token
                raise SessionExpired(f"session lost while waiting for {name!r}")
            error = timeout_error(f"{name!r} not acquired within the timeout")
        # A grant that raced the deadline is released by the withdrawal itself.
        self._propose_in_background(session, key, self.withdraw_op, [name, handle_id],
                                    f"withdraw {self.kind} {name!r}")
        raise error

    # -- holding and releasing ------------------------------------------------------------

    def forget(self, handle_id: int, grant: Grant) -> None:
        key = (grant.session.id, handle_id, grant.name)
        with self.guard:
            if self.grants.get(key) is grant:
                del self.grants[key]

    def release(self, handle_id: int, grant: Grant, not_held: Callable[[str], Exception],
                deadline: float) -> None:
        """Give a grant back through the log. Returns once applied; raises OutcomeUnknown
        at the deadline, and the release is then still proposed in the background until
        it applies or the session ends."""
        key = (grant.session.id, handle_id, grant.name)
        what = f"release {self.kind} {grant.name!r}"
        grant._given_back = True
        self.forget(handle_id, grant)
        settled = self._begin_settling(key)
        args = [grant.name, handle_id, grant.token]

        def done(status: int | None, payload: Any) -> None:
            if status == Status.STALE:
                # Its answer was trimmed: whether it applied is unknown. Releasing by
                # token again is harmless (NOT_HELD if it did) and settles it.
                self._propose_in_background(grant.session, key, self.release_op, args, what)
            self._end_settling(key, settled)

        status, payload = self.replica.finish(grant.session, self.release_op, args, deadline, what, on_done=done)
        if status in (Status.SESSION_EXPIRED, Status.NOT_HELD):
            raise not_held(f"{grant.name!r} was no longer held (lost lease or session)")
        raise_for_status(status, payload, what)


class Claimant:
    """One owner (a handle) of a name of some kind: what a lock handle and an election
    share — its session, its handle id, and claiming and giving back grants through the
    kind's OwnershipTable."""

    _kind = "lock"

    def __init__(self, replica: Replica, name: str, ttl: float | None, session: Session | None) -> None:
        check_name(name, "name")
        if ttl is not None and session is not None:
            raise BadRequest("give either ttl or session, not both")
        self.name = name
        self.ttl = ttl
        self._replica = replica
        self._fixed_session = session
        self._table = ownership_table(replica, self._kind)
        self._handle_id = secrets.randbits(62)
        self._mutex = threading.RLock()

    def _claim(self, args: list[Any], timeout: float | None, timeout_error: Callable[[str], Exception],
               make_grant: Callable[[int, Session], Grant]) -> Grant:
        """Claim the name with acquire ``args`` (ending with the wait flag) and hold the
        grant ``make_grant(token, session)``. Call with ``_mutex`` held."""
        deadline = deadline_after(timeout)
        session = session_for(self._replica, self._fixed_session, self.ttl, deadline)
        grant = self._table.claim(session, self.name, self._handle_id, _OPS[self._kind][0], args, deadline,
                                  timeout == 0, timeout_error, make_grant)
        if grant._ended.is_set():
            self._table.forget(self._handle_id, grant)
            raise SessionExpired(f"session lost while acquiring {self.name!r}")
        return grant

    def _give_back(self, grant: Grant, timeout: float | None) -> None:
        """Release ``grant`` through the log (see OwnershipTable.release)."""
        self._table.release(self._handle_id, grant, NotHeld, deadline_after(timeout))


def session_for(replica: Replica, session: Session | None, ttl: float | None, deadline: float) -> Session:
    """The session a handle acts under: explicit, per-TTL shared, or the node's default."""
    if session is not None:
        if session.lost.is_set():
            raise SessionExpired(f"session {session.id:#x} is lost")
        return session
    if ttl is None:
        return replica.sessions.default(deadline)
    return replica.sessions.for_ttl(ttl, deadline)


# kind -> (acquire, release, withdraw) ops
_OPS = {
    "lock": (Op.LOCK_ACQUIRE, Op.LOCK_RELEASE, Op.LOCK_WITHDRAW),
    "sem": (Op.SEM_ACQUIRE, Op.SEM_RELEASE, Op.SEM_WITHDRAW),
    "rw": (Op.RW_ACQUIRE, Op.RW_RELEASE, Op.RW_WITHDRAW),
    "leader": (Op.LEADER_CAMPAIGN, Op.LEADER_RESIGN, Op.LEADER_WITHDRAW),
}


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
    deadline_after(timeout)  # raises BadRequest
    return timeout
