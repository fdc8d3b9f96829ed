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

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .codec import Op, Status, encode_command, raise_for_status
from .errors import BadRequest, NoQuorum, RaftsyncError, Timeout
from .latch import Latch

if TYPE_CHECKING:
    from .replica import Replica

log = logging.getLogger("raftsync.session")

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
        self._lost = Latch()
        self.lost = self._lost.event
        self.lost_reason: str | None = None
        self._replica = replica
        self._lock = threading.Lock()
        self._next_seq = 1
        self._in_flight: set[int] = set()
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
        if not self._lost.add(callback):
            self._replica.call_soon(callback, self)

    def close(self, timeout: float | None = 5.0) -> None:
        """Close the session in the cluster, releasing everything it holds at once.

        The session (and every grant it holds) is over for this process at once. Raises
        OutcomeUnknown if the close got no answer in time; it is then still proposed in
        the background."""
        from .replica import deadline_after

        self._replica.sessions.close(self, deadline_after(timeout))

    @property
    def alive(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.safe_until

    def _mark_lost(self, reason: str) -> list[Callable[["Session"], None]]:
        """Set ``lost`` (once, keeping the first reason); returns the callbacks to run."""
        return self._lost.fire(lambda: setattr(self, "lost_reason", reason))

    def __repr__(self) -> str:
        state = f"lost: {self.lost_reason}" if self.lost.is_set() else "alive"
        return f"<Session {self.id:#x} ttl={self.ttl}s {state}>"


class SessionKeeper:
    """A replica's sessions: opening and closing them, the "safe until" watchdog that
    reports a session lost before the cluster can expire it, and the node's default
    session, replaced whenever it is lost."""

    def __init__(self, replica: "Replica") -> None:
        self._replica = replica
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._watchdog_wake = threading.Condition(self._lock)
        self._default: Session | None = None
        self._default_ready = threading.Condition()
        self._by_ttl: dict[float, Session] = {}
        self._by_ttl_lock = threading.Lock()
        # told, on the losing thread, of every lost session (ownership tables end its grants)
        self._loss_listeners: list[Callable[[int], None]] = []

    def start(self) -> None:
        threading.Thread(target=self._watchdog_loop, name="raftsync-watchdog", daemon=True).start()
        threading.Thread(target=self._keep_default, name="raftsync-session", daemon=True).start()

    # -- opening and closing -------------------------------------------------------

    def open(self, ttl: float, deadline: float) -> Session:
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not MIN_TTL <= ttl <= MAX_TTL:
            raise BadRequest(f"ttl must be a number of seconds between {MIN_TTL} and {MAX_TTL}")
        session = Session(secrets.randbits(62) | 1, float(ttl), self._replica)
        command = encode_command(Op.OPEN_SESSION, session.id, 0, 0, [int(ttl * 1000)])
        sent_at = time.monotonic()
        status, payload = self._replica.submit_engine_command(command, deadline, "open session")
        if status != Status.OK:
            raise_for_status(status, payload, "open session")
        with self._lock:
            self._sessions[session.id] = session
            session._extend(sent_at)
            self._watchdog_wake.notify_all()
        self._replica.own(session.id, ttl)
        return session

    def close(self, session: Session, deadline: float) -> None:
        self._replica.check_owner()
        if session.lost.is_set():
            return
        # Over for this process first (every grant marked lost before the close is even
        # written); then one CLOSE, kept proposed in the background if unanswered.
        self.lose(session, "closed", ended_in_cluster=True)
        status, payload = self._replica.finish(session, Op.CLOSE_SESSION, [], deadline, "close session",
                                               allow_lost=True)
        if status not in (Status.OK, Status.SESSION_EXPIRED):
            raise_for_status(status, payload, "close session")

    def close_all(self, timeout: float) -> None:
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.lost.is_set()]
        deadline = time.monotonic() + timeout
        for session in sessions:
            try:
                self.close(session, max(deadline, time.monotonic() + 0.1))
            except RaftsyncError:
                pass

    def stop(self) -> None:
        with self._default_ready:
            self._default_ready.notify_all()
        with self._watchdog_wake:
            self._watchdog_wake.notify_all()

    # -- lookups -----------------------------------------------------------------------

    def by_id(self, session_id: int) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def for_ttl(self, ttl: float, deadline: float) -> Session:
        """A shared session with this TTL (for locks given their own ttl), reopened when lost.
        Waiting for another thread's open of it is bounded by ``deadline`` and NoQuorum."""
        self._replica.check_owner()  # before a lock a forked child may have inherited held
        if ttl == self._replica.config.session_ttl:
            return self.default(deadline)
        started = time.monotonic()
        while not self._by_ttl_lock.acquire(timeout=self._replica.quorum_wait_slice(started, deadline)):
            if time.monotonic() >= deadline:
                raise Timeout(f"no session with ttl {ttl} yet (another thread is opening it)")
        try:
            session = self._by_ttl.get(ttl)
            if session is None or session.lost.is_set():
                session = self._by_ttl[ttl] = self.open(ttl, deadline)
            return session
        finally:
            self._by_ttl_lock.release()

    def default(self, deadline: float, no_quorum: bool = True) -> Session:
        """The node's current default session, waiting until ``deadline`` for one to open.

        ``no_quorum``: raise NoQuorum once the cluster has had no leader with a quorum for
        ``quorum_timeout`` during this call (so that no call without a deadline hangs)."""
        self._replica.check_owner()  # before a lock a forked child may have inherited held
        started = time.monotonic()
        with self._default_ready:
            while True:
                self._replica.check_open()
                session = self._default
                if session is not None and not session.lost.is_set():
                    return session
                # Woken when a session opens; re-checks the quorum between.
                pause = self._replica.quorum_wait_slice(started, deadline) if no_quorum \
                    else max(0.0, min(deadline - time.monotonic(), 1.0))
                if time.monotonic() >= deadline:
                    raise Timeout("no open session yet (is there a leader?)")
                self._default_ready.wait(pause)

    # -- loss ------------------------------------------------------------------------

    def lose(self, session: Session, reason: str, ended_in_cluster: bool = False) -> None:
        """Report ``session`` lost to the app, stop its keepalives and, unless the cluster
        already ended it, close it there too.

        Every grant of the session is marked lost before anything is written to the
        channel: with the engine stalled, this process still learns of the loss at once."""
        callbacks = session._mark_lost(reason)
        with self._lock:
            if self._sessions.pop(session.id, None) is None:
                return
        replica = self._replica
        for listener in self._loss_listeners:
            try:
                listener(session.id)
            except Exception:
                log.exception("session loss listener failed")
        for callback in callbacks:
            replica.call_soon(callback, session)
        try:
            replica.disown(session.id)
        except RaftsyncError:
            pass
        if not ended_in_cluster and replica.serving:
            # The app has been told it is lost: make that true in the cluster too.
            threading.Thread(target=self._close_lost, args=(session,), daemon=True).start()
        if session is self._default:
            with self._default_ready:
                self._default_ready.notify_all()

    def _close_lost(self, session: Session) -> None:
        try:
            self._replica.finish(session, Op.CLOSE_SESSION, [], time.monotonic() + session.ttl,
                                 "close lost session", allow_lost=True)
        except RaftsyncError:
            pass  # still proposed in the background; it also expires on its own

    def on_loss(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(session_id)`` when a session is lost, before anything is written
        to the channel. It must be quick and must not block."""
        self._loss_listeners.append(listener)

    def on_keepalive_ack(self, effect: list[Any]) -> None:
        _, session_ids, sent_at = effect
        with self._lock:
            for session_id in session_ids:
                session = self._sessions.get(session_id)
                if session is not None:
                    session._extend(sent_at)
            self._watchdog_wake.notify_all()

    def on_session_ended(self, effect: list[Any]) -> None:
        session = self.by_id(effect[1])
        if session is None:
            return
        self.lose(session, f"session {effect[2]} by the cluster", ended_in_cluster=True)

    def on_engine_gone(self) -> None:
        with self._default_ready:
            self._default_ready.notify_all()
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self.lose(session, "engine exited", ended_in_cluster=True)

    # -- background threads ----------------------------------------------------------

    def _watchdog_loop(self) -> None:
        with self._watchdog_wake:
            while self._replica.serving:
                now = time.monotonic()
                live = [s for s in self._sessions.values() if not s.lost.is_set()]
                expired = [s for s in live if s.safe_until <= now]
                if expired:
                    self._watchdog_wake.release()
                    try:
                        for session in expired:
                            self.lose(session, "no keepalive acknowledged within the TTL")
                    finally:
                        self._watchdog_wake.acquire()
                    continue
                next_deadline = min((s.safe_until for s in live), default=now + 60.0)
                self._watchdog_wake.wait(min(60.0, max(0.0, next_deadline - now)))

    def _keep_default(self) -> None:
        """Open the default session, and a fresh one whenever it is lost."""
        replica = self._replica
        while replica.serving:
            try:
                session = self.open(replica.config.session_ttl, float("inf"))
            except NoQuorum:
                continue
            except RaftsyncError:
                if not replica.serving:
                    return
                time.sleep(0.1)  # e.g. a rejected open: do not spin
                continue
            with self._default_ready:
                self._default = session
                self._default_ready.notify_all()
                while not session.lost.is_set() and replica.serving:
                    self._default_ready.wait()
