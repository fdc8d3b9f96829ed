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
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .channel import BlockingChannel, ChannelClosed, ChannelStalled, Failure, Msg
from .codec import NOT_APPLIED, Status, decode_result, encode_command
from .config import NodeConfig
from .errors import (BadRequest, Closed, ConfigError, NoQuorum, OutcomeUnknown, QuorumLostOutcomeUnknown,
                     RaftsyncError, SessionExpired, Timeout)
from .fork_guard import track as track_for_fork
from .session import Session, SessionKeeper

log = logging.getLogger("raftsync.replica")

PING_INTERVAL = 0.1
# The engine sends a STATE frame at least every 0.25 s; silence this long means it is
# stopped or starved, and calls treat the cluster as unavailable (NoQuorum, not a hang).
ENGINE_SILENCE_LIMIT = 1.0
# A gap this long between two turns of the 0.1 s ping loop means this process itself
# was stopped or starved: silence it could not have heard is not held against the engine.
APP_STALL_LIMIT = 0.5
INFINITY = float("inf")


class _Pending:
    """The reply one call waits for. Every attempt of the call registers its request id
    here, so an answer to any attempt, however late, completes the call: under a slow
    commit the first attempt's answer arrives after the second attempt went out."""

    __slots__ = ("event", "reply", "latest")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: list[Any] | None = None
        self.latest = 0  # the request id of the newest attempt

    def take_failure(self) -> list[Any] | None:
        """The newest attempt's FAILED reply, cleared for the next attempt (None if the
        call holds a RESULT or nothing)."""
        reply = self.reply
        if reply is None or reply[0] != Msg.FAILED:
            return None
        self.reply = None
        self.event.clear()
        return reply


class Replica:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._channel: BlockingChannel | None = None
        self._engine_process: subprocess.Popen | None = None
        self._engine_thread: threading.Thread | None = None
        self._thread_engine: Any = None  # the in-process engine (engine="thread")
        self._owner_pid: int | None = None  # the process that started this replica
        self._sockets: tuple[socket.socket, ...] = ()  # both channel ends, for fork children to close
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
        self._last_engine_frame = time.monotonic()
        self._ping_turn = time.monotonic()  # the ping loop's last turn
        self._awake_since = time.monotonic()  # the end of this process's last stall
        # notice kind (a machine effect forwarded for one of our sessions) -> handlers
        self._notice_handlers: dict[str, list[Callable[[list[Any]], None]]] = {}
        self._watches: dict[int, Callable[[str, Any], None]] = {}
        self._attachments: dict[str, Any] = {}
        self._attachments_lock = threading.Lock()
        self._callbacks: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._engine_gone = threading.Event()
        self.engine_pid: int | None = None
        self.sessions = SessionKeeper(self)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._owner_pid = os.getpid()
        track_for_fork(self)
        self._sockets = app_end, engine_end = socket.socketpair()
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
        while reply is not None and reply[0] not in (Msg.READY, Msg.FATAL):
            reply = self._channel.recv()  # e.g. a notice from loading the data dir's snapshot
        if reply is None or reply[0] != Msg.READY:
            reason = reply[1] if reply and reply[0] == Msg.FATAL else "engine exited during start"
            self._shutdown_engine()
            if "BindError" in str(reason):
                raise ConfigError("self_address", f"cannot bind {self.config.self_address}: {reason}")
            raise RaftsyncError(f"engine failed to start: {reason}")
        self.engine_pid = reply[1].get("pid")
        app_end.settimeout(None)
        for target, name in ((self._read_loop, "reader"), (self._ping_loop, "pinger"),
                             (self._dispatch_loop, "callbacks")):
            threading.Thread(target=target, name=f"raftsync-{name}", daemon=True).start()
        self.sessions.start()

    def _run_engine_thread(self, sock: socket.socket) -> None:
        from .engine.core import run_engine

        try:
            engine = run_engine(sock, in_process=True)
        except Exception:
            return
        self._thread_engine = engine
        engine.join()

    def close(self, timeout: float = 5.0) -> None:
        if self._owner_pid not in (None, os.getpid()):
            return  # a forked child: the node is its parent's to close
        if self._closing.is_set():
            return
        self._closing.set()  # no replacement default session from here on
        deadline = time.monotonic() + timeout
        self.sessions.close_all(timeout)
        self._closed.set()
        self.sessions.stop()
        try:
            self._channel.send([Msg.CLOSE])
        except OSError:
            pass
        self._shutdown_engine(max(0.5, deadline - time.monotonic()))
        self._channel.close()
        self._callbacks.put(None)

    def _shutdown_engine(self, timeout: float = 2.0) -> None:
        if self._engine_process is not None:
            try:
                self._engine_process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._engine_process.kill()
                self._engine_process.wait()
        if self._engine_thread is not None:
            self._engine_thread.join(timeout)

    @property
    def serving(self) -> bool:
        """False once the node is closing or its engine has exited."""
        return not self._closing.is_set() and not self._engine_gone.is_set()

    def check_owner(self) -> None:
        """Raise Closed in a process forked from the one that started this replica."""
        owner = self._owner_pid
        if owner is not None and owner != os.getpid():
            raise Closed(f"this Node belongs to process {owner}; a forked child must create its own Node")

    def check_open(self) -> None:
        self.check_owner()
        if self._closed.is_set():
            raise Closed("node is closed")
        if self._engine_gone.is_set():
            raise Closed("the node's engine has exited")

    def _release_after_fork(self) -> None:
        """In a forked child (at-fork hook; the child has no raftsync threads): close
        this process's copies of the channel, and of an in-process engine's sockets."""
        if self._channel is not None:
            self._channel.abandon()
        for sock in self._sockets:
            sock.close()
        if self._thread_engine is not None:
            self._thread_engine.release_in_fork_child()

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
        for deliver in list(self._watches.values()):
            deliver("closed", None)
        if not self._closed.is_set():
            log.error("raftsync engine exited; this node can no longer serve")
        self.sessions.on_engine_gone()

    def _on_message(self, message: list[Any]) -> None:
        self._last_engine_frame = time.monotonic()
        kind = message[0]
        if kind in (Msg.RESULT, Msg.FAILED):
            with self._requests_lock:
                pending = self._requests.get(message[1])
                # A failure of an older attempt is moot (a newer one is under way); an
                # answer to any attempt completes the call, even over a failure not yet seen.
                if pending is not None and (
                        (kind == Msg.RESULT and (pending.reply is None or pending.reply[0] != Msg.RESULT))
                        or (kind == Msg.FAILED and pending.reply is None and message[1] == pending.latest)):
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
        if kind == "watch":
            deliver = self._watches.get(effect[1])
            if deliver is not None:
                deliver(effect[2], effect[3])
        elif kind == "keepalive_ack":
            self.sessions.on_keepalive_ack(effect)
        elif kind == "session_ended":
            self.sessions.on_session_ended(effect)
        else:
            for handler in self._notice_handlers.get(kind, ()):
                try:
                    handler(effect)
                except Exception:
                    log.exception("handler for %s failed", kind)

    def on_notice(self, kind: str, handler: Callable[[list[Any]], None]) -> None:
        """Run ``handler(effect)`` on the reader thread for each forwarded machine effect of
        ``kind`` (e.g. a grant to one of this node's sessions). It must be quick and must
        not block."""
        self._notice_handlers.setdefault(kind, []).append(handler)

    def attachment(self, key: str, factory: Callable[["Replica"], Any]) -> Any:
        """One shared helper object per replica (e.g. a primitive's notification router)."""
        with self._attachments_lock:
            item = self._attachments.get(key)
            if item is None:
                item = self._attachments[key] = factory(self)
            return item

    # -- background threads ----------------------------------------------------------

    def _ping_loop(self) -> None:
        # Tells the engine this process is alive; without it keepalives stop.
        while not self._closed.wait(PING_INTERVAL):
            now = time.monotonic()
            if now - self._ping_turn > APP_STALL_LIMIT:
                self._awake_since = now
            self._ping_turn = now
            if self._channel.backlog_bytes:
                continue  # the engine is not reading: frames are already waiting for it
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

    # -- requests --------------------------------------------------------------------

    def _send_attempt(self, pending: _Pending, message: list[Any], deadline: float) -> None:
        """Send one attempt of a call (message[1] gets a fresh request id that answers to
        ``pending``). Raises ChannelStalled if it could not even be queued by ``deadline``."""
        request_id = next(self._request_ids)
        message[1] = request_id
        with self._requests_lock:
            self._requests[request_id] = pending
            pending.latest = request_id
        try:
            self._channel.send(message, deadline)
        except ChannelClosed:
            self.check_open()
            raise

    def _forget(self, pending: _Pending) -> None:
        with self._requests_lock:
            for request_id in [rid for rid, item in self._requests.items() if item is pending]:
                del self._requests[request_id]

    def _request(self, message: list[Any], deadline: float) -> list[Any] | None:
        """One attempt: send a request frame and wait for its reply until ``deadline``.
        None: no reply in time."""
        pending = _Pending()
        try:
            self._send_attempt(pending, message, deadline)
            pending.event.wait(max(0.0, deadline - time.monotonic()))
            if pending.reply is None:
                self.check_open()
            return pending.reply
        finally:
            self._forget(pending)

    def _engine_silent_since(self, now: float) -> float | None:
        """When the engine, silent (stopped, starved), started to count as unavailable:
        ENGINE_SILENCE_LIMIT after its last frame or after this process last woke from a
        stall of its own, whichever is later; None if it is not silent."""
        if now - self._ping_turn > APP_STALL_LIMIT:
            return None  # this process has not been running: it cannot judge
        since = max(self._last_engine_frame, self._awake_since) + ENGINE_SILENCE_LIMIT
        return since if now >= since else None

    def _available(self, now: float) -> bool:
        return self.leader is not None and self.has_quorum and self._engine_silent_since(now) is None

    def unavailable_for(self) -> float:
        """Seconds since the engine last knew a leader with a quorum (0 if it knows one);
        a silent engine counts as unavailable (see _engine_silent_since)."""
        now = time.monotonic()
        since = self._unavailable_since
        silent_since = self._engine_silent_since(now)
        if silent_since is not None:
            since = silent_since if since is None else min(since, silent_since)
        return 0.0 if since is None else max(0.0, now - since)

    def quorum_wait_slice(self, started: float, deadline: float) -> float:
        """The one NoQuorum rule of every wait: raise NoQuorum once the cluster has been
        unavailable for ``quorum_timeout`` during a wait that began at ``started``;
        otherwise how long the waiter may sleep before it must look again (never past
        ``deadline``, and at most ENGINE_SILENCE_LIMIT: silence sends no notification)."""
        self.check_open()
        now = time.monotonic()
        quorum_timeout = self.config.quorum_timeout
        unavailable = min(self.unavailable_for(), now - started)
        if unavailable >= quorum_timeout:
            raise NoQuorum(f"no leader with a quorum for {unavailable:.1f}s")
        return max(0.0, min(deadline - now, quorum_timeout - unavailable + 0.01, ENGINE_SILENCE_LIMIT))

    def wait_for(self, event: threading.Event, deadline: float, started: float) -> bool:
        """Wait until ``event`` is set (True) or ``deadline`` passes (False), under the
        NoQuorum rule of :meth:`quorum_wait_slice`."""
        while not event.is_set():
            pause = self.quorum_wait_slice(started, deadline)
            if time.monotonic() >= deadline:
                return event.is_set()
            event.wait(pause)
        return True

    def _wait_available(self, deadline: float, started: float) -> None:
        """Block until the engine knows a leader with a quorum; NoQuorum once it has not for
        quorum_timeout (counted from ``started`` at the earliest); Timeout at the deadline."""
        with self._state_changed:
            while not self._available(time.monotonic()):
                pause = self.quorum_wait_slice(started, deadline)
                if time.monotonic() >= deadline:
                    raise Timeout("no leader before the deadline")
                self._state_changed.wait(pause)

    def _backoff(self, attempt: int, deadline: float) -> None:
        """After a failed attempt wait for a state change, at most a short backoff."""
        pause = min(0.5, 0.01 * (2 ** min(attempt, 6)))
        with self._state_changed:
            self._state_changed.wait(max(0.0, min(deadline - time.monotonic(), pause)))

    def _exchange(self, make_message: Callable[[], list[Any]], deadline: float, what: str,
                  command: bool) -> tuple[bytes, bool]:
        """The one retry loop: resend until a RESULT arrives (to any attempt), the deadline,
        or NoQuorum.

        Returns (result bytes, whether an earlier attempt went unanswered). For a
        ``command``, once anything was sent, running out of time is OutcomeUnknown (it may
        still apply); before that, and for reads, it is Timeout / NoQuorum. Without a
        deadline, a call that got no answer for ``quorum_timeout`` after it was sent
        gives up too (NoQuorum, or QuorumLostOutcomeUnknown): no call hangs on a cluster
        that looks available but answers nothing."""
        self.check_open()
        started = time.monotonic()
        quorum_timeout = self.config.quorum_timeout
        attempt = 0
        unanswered = False  # an attempt was sent and got no reply: it may have applied
        first_sent: float | None = None
        pending = _Pending()

        def out_of_time(error: type[RaftsyncError], detail: str) -> RaftsyncError:
            if command and unanswered:
                error = QuorumLostOutcomeUnknown if issubclass(error, NoQuorum) else OutcomeUnknown
                return error(f"{what}: {detail}; it may still apply")
            return error(f"{what}: {detail}")

        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise out_of_time(Timeout, "no answer by the deadline")
                if first_sent is not None and deadline == INFINITY and now - first_sent >= quorum_timeout:
                    raise out_of_time(NoQuorum, f"no answer for {now - first_sent:.1f}s")
                try:
                    self._wait_available(deadline, started)
                except NoQuorum as exc:
                    raise out_of_time(NoQuorum, str(exc)) from None
                except Timeout:
                    raise out_of_time(Timeout, "no leader before the deadline") from None
                # Attempts get longer (1, 2, 4 x attempt_timeout): each resend is one more entry.
                attempt_deadline = min(deadline, time.monotonic() + self.config.attempt_timeout * (1 << min(attempt, 2)))
                attempt += 1
                try:
                    self._send_attempt(pending, make_message(), attempt_deadline)
                except ChannelStalled:
                    continue  # nothing of this attempt was sent; the checks above bound the wait
                first_sent = first_sent or time.monotonic()
                pending.event.wait(max(0.0, attempt_deadline - time.monotonic()))
                with self._requests_lock:
                    reply = pending.reply
                    failure = pending.take_failure()
                if reply is not None and reply[0] == Msg.RESULT:
                    return reply[2], unanswered
                self.check_open()
                if failure is not None and failure[2] == Failure.REJECTED:
                    raise BadRequest(f"{what}: rejected by the engine")
                # No reply, or a failure meaning the command may still apply.
                unanswered = True
                if failure is not None:
                    self._backoff(attempt, deadline)
                    with self._requests_lock:  # an earlier attempt may have been answered meanwhile
                        reply = pending.reply
                    if reply is not None and reply[0] == Msg.RESULT:
                        return reply[2], unanswered
        finally:
            self._forget(pending)

    def submit(self, session: Session, op: int, args: list[Any], deadline: float, what: str = "",
               allow_lost: bool = False,
               settle: Callable[[int | None, Any], None] | None = None) -> tuple[int, Any]:
        """Propose a command for ``session`` and return (status, payload).

        Raises OutcomeUnknown when it was sent and no answer came by ``deadline`` (also
        when the machine can no longer tell: result trimmed, session ended). With
        ``settle``, such a command keeps being retried in the background (same seq, so it
        applies at most once) and ``settle(status, payload)`` runs on a raftsync thread
        once it is answered, or ``settle(None, None)`` once its session is lost or the
        node closes (the cluster then releases what the session held).
        """
        if session.lost.is_set() and not allow_lost:
            raise SessionExpired(f"session {session.id:#x} is lost ({session.lost_reason})")
        what = what or f"op {op}"
        seq, acked_below = session._begin()
        command = encode_command(op, session.id, seq, acked_below, args)
        background = False
        try:
            result, retried = self._exchange(lambda: [Msg.SUBMIT, 0, command], deadline, what, True)
        except OutcomeUnknown:
            if settle is not None:
                background = True
                threading.Thread(target=self._settle, args=(session, seq, command, what, settle, allow_lost),
                                 name="raftsync-settle", daemon=True).start()
            raise
        finally:
            if not background:
                session._end(seq)
        status, payload = decode_result(result)
        unknown = self._unknown_outcome(status, payload, retried)
        if unknown is not None:
            if settle is not None:
                # Answered, but not whether it applied: settled now, as an answer would be.
                # (On another thread: a claim's settle waits for its caller's decision.)
                threading.Thread(target=settle, args=(status, payload), name="raftsync-settle", daemon=True).start()
            raise OutcomeUnknown(f"{what}: {unknown}; it may have applied")
        return status, payload

    @staticmethod
    def _unknown_outcome(status: int, payload: Any, retried: bool) -> str | None:
        """Why an answer cannot say whether the command applied, or None if it can."""
        if status == Status.STALE:
            return "its result was trimmed"
        if status == Status.SESSION_EXPIRED and retried and payload != NOT_APPLIED:
            # An earlier attempt may have applied before the session ended, and the ended
            # session's results are no longer kept.
            return "the session ended and its results are gone"
        return None

    def _settle(self, session: Session, seq: int, command: bytes, what: str,
                settle: Callable[[int | None, Any], None], allow_lost: bool) -> None:
        """Retry one command whose outcome was unknown until it is answered (or, unless it
        is meant for a lost session, until its session is lost: the cluster then releases
        everything the session held)."""
        answer: tuple[int | None, Any] = (None, None)
        try:
            exchanged = self._keep_proposing(
                session, allow_lost, lambda deadline: self._exchange(lambda: [Msg.SUBMIT, 0, command], deadline,
                                                                     what, True))
            if exchanged is not None:
                answer = decode_result(exchanged[0])
        finally:
            session._end(seq)
            try:
                settle(*answer)
            except Exception:
                log.exception("settling %s failed", what)

    def finish(self, session: Session, op: int, args: list[Any], deadline: float, what: str,
               allow_lost: bool = False,
               on_done: Callable[[int | None, Any], None] | None = None) -> tuple[int, Any]:
        """Propose a command that must apply in the end (a release, a withdrawal, a close).

        Returns its answer if it comes by ``deadline``. Otherwise raises OutcomeUnknown
        and keeps proposing it in the background, also when nothing could be sent yet,
        until it is answered or its session is lost (unless ``allow_lost``) or the node
        closes. ``on_done(status, payload)`` runs exactly once, whatever happens: with the
        answer, or ``(None, None)`` if it gave up (before ``finish`` returns or raises,
        unless it goes on in the background).
        """
        done = _once(on_done or _ignore_answer)
        try:
            answer = self.submit(session, op, args, deadline, what, allow_lost=allow_lost, settle=done)
        except OutcomeUnknown:
            raise  # settling goes on in the background and calls done
        except (Timeout, NoQuorum) as exc:  # nothing was sent yet
            threading.Thread(target=self._finish_later, args=(session, op, args, what, allow_lost, done),
                             name="raftsync-settle", daemon=True).start()
            error = QuorumLostOutcomeUnknown if isinstance(exc, NoQuorum) else OutcomeUnknown
            raise error(f"{what}: not applied yet ({exc}); it keeps being proposed") from None
        except BaseException:
            done(None, None)
            raise
        done(*answer)
        return answer

    def _finish_later(self, session: Session, op: int, args: list[Any], what: str, allow_lost: bool,
                      done: Callable[[int | None, Any], None]) -> None:
        def propose(deadline: float) -> Any:
            try:
                return self.submit(session, op, args, deadline, what, allow_lost=allow_lost, settle=done)
            except OutcomeUnknown:
                return _SETTLING  # sent: submit's settling carries on and calls done

        answer = self._keep_proposing(session, allow_lost, propose)
        if answer is not _SETTLING:
            done(*(answer or (None, None)))

    def _keep_proposing(self, session: Session, allow_lost: bool, propose: Callable[[float], Any]) -> Any:
        """``propose(deadline)`` (one quorum_timeout each), again after a Timeout or NoQuorum
        with backoff, while the node serves and, unless ``allow_lost``, the session lives.
        Its result, or None once it gave up (another error, the session lost, closed)."""
        attempt = 0
        while self.serving and (allow_lost or not session.lost.is_set()):
            try:
                return propose(time.monotonic() + self.config.quorum_timeout)
            except (Timeout, NoQuorum):
                attempt += 1
                self._backoff(attempt, time.monotonic() + 0.5)
            except RaftsyncError:
                break
        return None

    def submit_engine_command(self, command: bytes, deadline: float, what: str) -> tuple[int, Any]:
        """Propose a session-free command (e.g. OPEN_SESSION); it must be idempotent."""
        result, _ = self._exchange(lambda: [Msg.SUBMIT, 0, command], deadline, what, True)
        return decode_result(result)

    def query(self, query: bytes, consistency: str, deadline: float) -> tuple[int, Any]:
        if consistency not in ("linearizable", "local"):
            raise BadRequest("consistency must be 'linearizable' or 'local'")
        if consistency == "local":
            self.check_open()
            # A local read needs no leader, only a live engine: at least a short wait.
            reply = self._request([Msg.READ, 0, query, False], max(deadline, time.monotonic() + 1.0)
                                  if deadline != INFINITY else time.monotonic() + self.config.quorum_timeout)
            if reply is None or reply[0] != Msg.RESULT:
                if deadline == INFINITY:  # no deadline: the engine has been silent for quorum_timeout
                    raise NoQuorum("local read: no answer from the engine for the quorum timeout")
                raise Timeout("local read got no answer from the engine")
            return decode_result(reply[2])
        result, _ = self._exchange(lambda: [Msg.READ, 0, query, True], deadline, "read", False)
        return decode_result(result)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        self.check_open()
        reply = self._request([Msg.STATUS, 0], time.monotonic() + timeout)
        if reply is None:
            raise Timeout("engine status got no answer")
        return reply[2]

    # -- control frames (small; queued even when the engine is not reading) ----------

    def own(self, session_id: int, ttl: float) -> None:
        """Ask the engine to keep ``session_id`` alive while this process lives."""
        self._control([Msg.OWN, session_id, int(ttl * 1000)])

    def disown(self, session_id: int) -> None:
        self._control([Msg.DISOWN, session_id])

    def watch(self, watch_id: int, kind: str, key: str, from_revision: int | None,
              deliver: Callable[[str, Any], None]) -> None:
        self.check_open()
        self._watches[watch_id] = deliver
        self._control([Msg.WATCH, watch_id, kind, key, from_revision])

    def remove_watch(self, watch_id: int) -> None:
        if self._watches.pop(watch_id, None) is not None:
            try:
                self._control([Msg.UNWATCH, watch_id])
            except RaftsyncError:
                pass

    def _control(self, message: list[Any]) -> None:
        self.check_open()
        self._channel.send(message)

    def test_hook(self, name: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """Set a test hook in the engine (refused unless the config has test_hooks);
        returns once the engine applied it, with what the hook reports."""
        self.check_open()
        reply = self._request([Msg.TEST_HOOK, 0, name, args or {}], time.monotonic() + timeout)
        if reply is None:
            raise Timeout(f"test hook {name!r} got no answer")
        if reply[0] != Msg.RESULT:
            raise BadRequest(f"test hook {name!r} refused by the engine")
        return reply[2]


_SETTLING = object()  # _finish_later: the command was sent and is being settled in the background


def _ignore_answer(status: int | None, payload: Any) -> None:
    pass


def _once(callback: Callable[[int | None, Any], None]) -> Callable[[int | None, Any], None]:
    """``callback``, made to run at most once however many paths call it."""
    fired = threading.Event()
    guard = threading.Lock()

    def run(status: int | None, payload: Any) -> None:
        with guard:
            if fired.is_set():
                return
            fired.set()
        callback(status, payload)
    return run


def deadline_after(timeout: float | None) -> float:
    """The monotonic deadline of a public call's ``timeout`` (None: no deadline); one per
    call, carried down to every wait it makes. Raises BadRequest for a bad timeout."""
    if timeout is None:
        return INFINITY
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise BadRequest("timeout must be None or a number >= 0")
    return time.monotonic() + timeout
