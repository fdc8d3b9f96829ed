"""The application side every primitive shares.

One submission path: a command gets ``(session_id, seq, acked_below)``; a reply lost
to a PySyncObj timeout, a leader change or a dropped frame means *unknown outcome*,
so the same bytes are sent again until an answer arrives or the caller's deadline
passes (then :class:`Timeout`; never a silent loss). The machine applies each
(session, seq) once and answers retries with the original result.

It also keeps each session's "safe until", wakes waiters from the engine's
notifications (no polling), and runs user callbacks on one dispatcher thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .channel import BlockingChannel, Failure, Msg
from .codec import Op, Status, decode_result, encode_command
from .config import NodeConfig
from .errors import (BadRequest, Closed, Conflict, ConfigError, NoQuorum, NotFound, NotHeld, RaftsyncError,
                     SessionExpired, Timeout, TooLarge)
from .session import MAX_TTL, MIN_TTL, Session

log = logging.getLogger("raftsync.replica")

PING_INTERVAL = 0.1


def raise_for_status(status: int, payload: Any, what: str = "") -> None:
    """Turn a machine result status into the matching typed exception."""
    if status == Status.OK:
        return
    detail = f"{what}: {payload}" if payload not in (None, []) else what
    if status == Status.NOT_FOUND:
        raise NotFound(what or "not found")
    if status == Status.CONFLICT:
        raise Conflict(detail)
    if status == Status.NOT_HELD:
        raise NotHeld(what or "not held")
    if status == Status.SESSION_EXPIRED:
        raise SessionExpired(what or "session expired")
    if status == Status.TOO_LARGE:
        raise TooLarge(detail)
    if status == Status.BAD_COMMAND:
        raise BadRequest(detail)
    raise RaftsyncError(f"state machine answered {Status(status).name}: {detail}")


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: list[Any] | None = None


class Replica:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._channel: BlockingChannel | None = None
        self._engine_process: subprocess.Popen | None = None
        self._engine_thread: threading.Thread | None = None
        self._requests: dict[int, _Pending] = {}
        self._requests_lock = threading.Lock()
        self._request_ids = itertools.count(1)
        # engine state, pushed by STATE frames
        self._state_changed = threading.Condition()
        self.role = "follower"
        self.leader: str | None = None
        self.term = 0
        self.has_quorum = False
        self._unavailable_since: float | None = time.monotonic()
        # sessions
        self._sessions: dict[int, Session] = {}
        self._sessions_lock = threading.Lock()
        self._watchdog_wake = threading.Condition(self._sessions_lock)
        self._default: Session | None = None
        self._default_ready = threading.Condition()
        self._listeners: dict[str, list[Callable[[list[Any]], None]]] = {}
        self._watches: dict[int, Callable[[str, Any], None]] = {}
        self._attachments: dict[str, Any] = {}
        self._attachments_lock = threading.Lock()
        self._ttl_sessions: dict[float, Session] = {}
        self._ttl_sessions_lock = threading.Lock()
        self._callbacks: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._engine_gone = threading.Event()
        self.engine_pid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        app_end, engine_end = socket.socketpair()
        if self.config.engine == "process":
            self._engine_process = subprocess.Popen(
                [sys.executable, "-m", "raftsync.engine", "--fd", str(engine_end.fileno()),
                 "--parent", str(os.getpid())],
                pass_fds=[engine_end.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
            engine_end.close()
        else:
            self._engine_thread = threading.Thread(target=self._run_engine_thread, args=(engine_end,),
                                                   name="raftsync-engine", daemon=True)
            self._engine_thread.start()
        self._channel = BlockingChannel(app_end)
        app_end.settimeout(self.config.start_timeout)
        self._channel.send([Msg.HELLO, self.config.engine_config()])
        reply = self._channel.recv()
        if reply is None or reply[0] != Msg.READY:
            reason = reply[1] if reply and reply[0] == Msg.FATAL else "engine exited during start"
            self._shutdown_engine()
            if "BindError" in str(reason):
                raise ConfigError("self_address", f"cannot bind {self.config.self_address}: {reason}")
            raise RaftsyncError(f"engine failed to start: {reason}")
        self.engine_pid = reply[1].get("pid")
        app_end.settimeout(None)
        for target, name in ((self._read_loop, "reader"), (self._ping_loop, "pinger"),
                             (self._watchdog_loop, "watchdog"), (self._dispatch_loop, "callbacks")):
            threading.Thread(target=target, name=f"raftsync-{name}", daemon=True).start()
        threading.Thread(target=self._keep_default_session, name="raftsync-session", daemon=True).start()

    def _run_engine_thread(self, sock: socket.socket) -> None:
        from .engine.core import run_engine

        try:
            engine = run_engine(sock, in_process=True)
        except Exception:
            return
        engine.stopped.wait()

    def close(self, timeout: float = 5.0) -> None:
        if self._closing.is_set():
            return
        self._closing.set()  # no replacement default session from here on
        with self._sessions_lock:
            sessions = [s for s in self._sessions.values() if not s.lost.is_set()]
        deadline = time.monotonic() + timeout
        for session in sessions:
            try:
                self.close_session(session, max(0.1, deadline - time.monotonic()))
            except RaftsyncError:
                pass
        self._closed.set()
        with self._default_ready:
            self._default_ready.notify_all()
        try:
            self._channel.send([Msg.CLOSE])
        except OSError:
            pass
        self._shutdown_engine(max(0.5, deadline - time.monotonic()))
        self._channel.close()
        self._callbacks.put(None)
        with self._watchdog_wake:
            self._watchdog_wake.notify_all()

    def _shutdown_engine(self, timeout: float = 2.0) -> None:
        if self._engine_process is not None:
            try:
                self._engine_process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._engine_process.kill()
                self._engine_process.wait()
        if self._engine_thread is not None:
            self._engine_thread.join(timeout)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise Closed("node is closed")
        if self._engine_gone.is_set():
            raise Closed("the node's engine has exited")

    # -- channel reader ----------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            message = self._channel.recv()
            if message is None:
                break
            try:
                self._on_message(message)
            except Exception:
                log.exception("failed to handle %r", message[:1])
        self._engine_gone.set()
        with self._requests_lock:
            pending = list(self._requests.values())
        for item in pending:
            item.event.set()
        with self._state_changed:
            self._state_changed.notify_all()
        with self._default_ready:
            self._default_ready.notify_all()
        for deliver in list(self._watches.values()):
            deliver("closed", None)
        if not self._closed.is_set():
            log.error("raftsync engine exited; this node can no longer serve")
            for session in list(self._sessions.values()):
                self._lose(session, "engine exited")

    def _on_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind in (Msg.RESULT, Msg.FAILED):
            with self._requests_lock:
                pending = self._requests.get(message[1])
            if pending is not None:
                pending.reply = message
                pending.event.set()
        elif kind == Msg.STATE:
            with self._state_changed:
                self.role, self.leader, self.term, self.has_quorum = message[1:5]
                if self.leader is not None and self.has_quorum:
                    self._unavailable_since = None
                elif self._unavailable_since is None:
                    self._unavailable_since = time.monotonic()
                self._state_changed.notify_all()
        elif kind == Msg.NOTIFY:
            self._on_notify(message[1])

    def _on_notify(self, effect: list[Any]) -> None:
        kind = effect[0]
        if kind == "keepalive_ack":
            with self._sessions_lock:
                for session_id in effect[1]:
                    session = self._sessions.get(session_id)
                    if session is not None:
                        session._extend(effect[2])
                self._watchdog_wake.notify_all()
        elif kind == "session_ended":
            session = self._sessions.get(effect[1])
            if session is not None:
                self._lose(session, f"session {effect[2]} by the cluster")
        elif kind == "watch":
            deliver = self._watches.get(effect[1])
            if deliver is not None:
                deliver(effect[2], effect[3])
            return
        for listener in self._listeners.get(kind, ()):
            listener(effect)

    def add_listener(self, kind: str, listener: Callable[[list[Any]], None]) -> None:
        """Run ``listener(effect)`` on the reader thread for each notification of ``kind``.
        Listeners must be quick and must not block."""
        self._listeners.setdefault(kind, []).append(listener)

    def add_watch(self, watch_id: int, deliver: Callable[[str, Any], None]) -> None:
        self._check_open()
        self._watches[watch_id] = deliver

    def remove_watch(self, watch_id: int) -> None:
        if self._watches.pop(watch_id, None) is not None:
            try:
                self._channel.send([Msg.UNWATCH, watch_id])
            except OSError:
                pass

    def send_frame(self, message: list[Any]) -> None:
        self._check_open()
        self._channel.send(message)

    def attachment(self, key: str, factory: Callable[["Replica"], Any]) -> Any:
        """One shared helper object per replica (e.g. a primitive's notification router)."""
        with self._attachments_lock:
            item = self._attachments.get(key)
            if item is None:
                item = self._attachments[key] = factory(self)
            return item

    def unavailable_for(self) -> float:
        """Seconds since the engine last knew a leader with a quorum (0 if it knows one)."""
        since = self._unavailable_since
        return 0.0 if since is None else time.monotonic() - since

    # -- background threads ----------------------------------------------------------

    def _ping_loop(self) -> None:
        # Tells the engine this process is alive; without it keepalives stop.
        while not self._closed.wait(PING_INTERVAL):
            try:
                self._channel.send([Msg.PING])
            except OSError:
                return

    def _dispatch_loop(self) -> None:
        while True:
            item = self._callbacks.get()
            if item is None:
                return
            callback, args = item
            try:
                callback(*args)
            except Exception:
                log.exception("user callback %r raised", callback)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run a user callback on the dispatcher thread."""
        self._callbacks.put((callback, args))

    def _watchdog_loop(self) -> None:
        with self._watchdog_wake:
            while not self._closed.is_set():
                now = time.monotonic()
                live = [s for s in self._sessions.values() if not s.lost.is_set()]
                expired = [s for s in live if s.safe_until <= now]
                if expired:
                    self._watchdog_wake.release()
                    try:
                        for session in expired:
                            self._lose(session, "no keepalive acknowledged within the TTL")
                    finally:
                        self._watchdog_wake.acquire()
                    continue
                next_deadline = min((s.safe_until for s in live), default=now + 60.0)
                self._watchdog_wake.wait(min(60.0, max(0.0, next_deadline - now)))

    # -- requests --------------------------------------------------------------------

    def _request(self, message: list[Any], deadline: float) -> list[Any] | None:
        """Send a request frame (message[1] is filled with a fresh id); wait for its reply."""
        request_id = next(self._request_ids)
        message[1] = request_id
        pending = _Pending()
        with self._requests_lock:
            self._requests[request_id] = pending
        try:
            try:
                self._channel.send(message)
            except OSError:
                self._check_open()
                raise Closed("channel to the engine is closed") from None
            pending.event.wait(max(0.0, deadline - time.monotonic()))
            if pending.reply is None:
                self._check_open()
            return pending.reply
        finally:
            with self._requests_lock:
                self._requests.pop(request_id, None)

    def _wait_available(self, deadline: float, started: float) -> None:
        """Block until the engine knows a leader with a quorum; NoQuorum past quorum_timeout."""
        with self._state_changed:
            while True:
                self._check_open()
                if self.leader is not None and self.has_quorum:
                    return
                now = time.monotonic()
                since = max(self._unavailable_since or now, started)
                if now - since >= self.config.quorum_timeout:
                    raise NoQuorum(f"no leader with a quorum for {now - since:.1f}s")
                if now >= deadline:
                    raise Timeout("no leader before the deadline")
                self._state_changed.wait(min(deadline, since + self.config.quorum_timeout) - now)

    def _backoff(self, attempt: int, deadline: float) -> None:
        """After a failed attempt wait for a state change, at most a short backoff."""
        pause = min(0.5, 0.01 * (2 ** min(attempt, 6)))
        with self._state_changed:
            self._state_changed.wait(max(0.0, min(deadline - time.monotonic(), pause)))

    def _exchange(self, make_message: Callable[[], list[Any]], timeout: float | None, what: str) -> Any:
        """The one retry loop: resend until a RESULT arrives, the deadline or NoQuorum."""
        self._check_open()
        started = time.monotonic()
        deadline = started + timeout if timeout is not None else float("inf")
        attempt = 0
        while True:
            self._wait_available(deadline, started)
            attempt_deadline = min(deadline, time.monotonic() + self.config.attempt_timeout)
            reply = self._request(make_message(), attempt_deadline)
            if reply is not None and reply[0] == Msg.RESULT:
                return reply[2]
            if reply is not None and reply[2] == Failure.REJECTED:
                raise BadRequest(f"{what}: rejected by the engine")
            if time.monotonic() >= deadline:
                raise Timeout(f"{what}: no answer within {timeout}s (a write may still apply)")
            attempt += 1
            if reply is not None:
                self._backoff(attempt, deadline)

    def submit(self, session: Session, op: int, args: list[Any], timeout: float | None,
               what: str = "") -> tuple[int, Any]:
        """Propose a command for ``session`` and return (status, payload)."""
        if session.lost.is_set():
            raise SessionExpired(f"session {session.id:#x} is lost ({session.lost_reason})")
        seq, acked_below = session._begin()
        try:
            command = encode_command(op, session.id, seq, acked_below, args)
            result = self._exchange(lambda: [Msg.SUBMIT, 0, command], timeout, what or f"op {op}")
        finally:
            session._end(seq)
        return decode_result(result)

    def submit_engine_command(self, command: bytes, timeout: float | None, what: str) -> tuple[int, Any]:
        """Propose a session-free command (e.g. OPEN_SESSION); it must be idempotent."""
        return decode_result(self._exchange(lambda: [Msg.SUBMIT, 0, command], timeout, what))

    def query(self, query: bytes, consistency: str, timeout: float | None) -> tuple[int, Any]:
        if consistency not in ("linearizable", "local"):
            raise BadRequest("consistency must be 'linearizable' or 'local'")
        linearizable = consistency == "linearizable"
        if not linearizable:
            self._check_open()
            reply = self._request([Msg.READ, 0, query, False], time.monotonic() + (timeout or 30.0))
            if reply is None or reply[0] != Msg.RESULT:
                raise Timeout("local read got no answer")
            return decode_result(reply[2])
        return decode_result(self._exchange(lambda: [Msg.READ, 0, query, True], timeout, "read"))

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        self._check_open()
        reply = self._request([Msg.STATUS, 0], time.monotonic() + timeout)
        if reply is None:
            raise Timeout("engine status got no answer")
        return reply[2]

    def test_drop_replies(self, count: int) -> None:
        """Test hook: the engine drops the next ``count`` command results."""
        self._channel.send([Msg.TEST_DROP_REPLY, count])

    # -- sessions --------------------------------------------------------------------

    def open_session(self, ttl: float, timeout: float | None = None) -> Session:
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not MIN_TTL <= ttl <= MAX_TTL:
            raise BadRequest(f"ttl must be a number of seconds between {MIN_TTL} and {MAX_TTL}")
        session = Session(secrets.randbits(62) | 1, float(ttl), self)
        command = encode_command(Op.OPEN_SESSION, session.id, 0, 0, [int(ttl * 1000)])
        sent_at = time.monotonic()
        status, payload = self.submit_engine_command(command, timeout, "open session")
        raise_for_status(status, payload, "open session")
        with self._sessions_lock:
            self._sessions[session.id] = session
            session._extend(sent_at)
            self._watchdog_wake.notify_all()
        self._channel.send([Msg.OWN, session.id, int(ttl * 1000)])
        return session

    def session_by_id(self, session_id: int) -> Session | None:
        with self._sessions_lock:
            return self._sessions.get(session_id)

    def session_for_ttl(self, ttl: float, timeout: float | None) -> Session:
        """A shared session with this TTL (for locks given their own ttl), reopened when lost."""
        if ttl == self.config.session_ttl:
            return self.default_session(timeout)
        with self._ttl_sessions_lock:
            session = self._ttl_sessions.get(ttl)
            if session is None or session.lost.is_set():
                session = self._ttl_sessions[ttl] = self.open_session(ttl, timeout)
            return session

    def close_session(self, session: Session, timeout: float | None) -> None:
        if session.lost.is_set():
            return
        try:
            status, payload = self.submit(session, Op.CLOSE_SESSION, [], timeout, "close session")
            if status not in (Status.OK, Status.SESSION_EXPIRED):
                raise_for_status(status, payload, "close session")
        finally:
            self._lose(session, "closed")

    def _lose(self, session: Session, reason: str) -> None:
        callbacks = session._mark_lost(reason)
        with self._sessions_lock:
            if self._sessions.pop(session.id, None) is None:
                return
        try:
            self._channel.send([Msg.DISOWN, session.id])
        except OSError:
            pass
        for callback in callbacks:
            self.call_soon(callback, session)
        for listener in self._listeners.get("session_lost", ()):
            listener(["session_lost", session.id])
        if reason != "closed" and not self._closing.is_set() and not self._engine_gone.is_set():
            # The app has been told it is lost: make that true in the cluster too.
            threading.Thread(target=self._close_quietly, args=(session,), daemon=True).start()
        if session is self._default:
            with self._default_ready:
                self._default_ready.notify_all()

    def _close_quietly(self, session: Session) -> None:
        seq, acked_below = session._begin()
        command = encode_command(Op.CLOSE_SESSION, session.id, seq, acked_below, [])
        try:
            self._exchange(lambda: [Msg.SUBMIT, 0, command], session.ttl * 3, "close lost session")
        except RaftsyncError:
            pass  # it expires on its own: nothing keeps it alive any more

    def _keep_default_session(self) -> None:
        """Open the default session, and a fresh one whenever it is lost."""
        while not self._closing.is_set() and not self._engine_gone.is_set():
            try:
                session = self.open_session(self.config.session_ttl, timeout=None)
            except NoQuorum:
                continue
            except RaftsyncError:
                if self._closed.is_set() or self._engine_gone.is_set():
                    return
                time.sleep(0.1)
                continue
            with self._default_ready:
                self._default = session
                self._default_ready.notify_all()
                while not session.lost.is_set() and not self._closed.is_set():
                    self._default_ready.wait()

    def default_session(self, timeout: float | None = None) -> Session:
        """The node's current default session, waiting for one to open if needed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._default_ready:
            while True:
                self._check_open()
                session = self._default
                if session is not None and not session.lost.is_set():
                    return session
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Timeout("no open session yet (is there a leader?)")
                self._default_ready.wait(remaining)
