"""The engine: one SyncObj, driven entirely from PySyncObj's tick thread.

Everything here runs on the tick thread: the channel socket is registered in
PySyncObj's own poller, so frames from the app, log application, result callbacks and
our periodic duties never race each other and need no locks. Nothing here may block
or raise (an exception escaping a PySyncObj callback can make an entry apply twice);
every entry point catches and logs.

Duties:
- SUBMIT: propose the app's command bytes through the one ``@replicated`` entry point
  and send back the result bytes, or a FAILED reason meaning *unknown outcome*.
- READ: ``local`` answers from this replica at once; ``linearizable`` waits for a
  BARRIER command proposed after the read arrived (reads arriving while one barrier is
  in flight share the next one); see reads.py for barriers that come late or never.
- Keepalives: every TTL/3 for the sessions the app owns, but only while the app has
  sent a frame recently, so a dead or stopped app loses its sessions.
- Deadlines (Raft leader only): expire a session whose last keepalive was applied
  more than its TTL ago by this leader's monotonic clock, naming that keepalive; on
  becoming leader every session first gets a fresh full TTL.
- Fan-out: effects concerning the app's sessions become NOTIFY frames.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.poller import POLL_EVENT_TYPE

from ..channel import Failure, FrameDecoder, Msg, pack_frame
from ..codec import MAX_COMMAND_BYTES, Op, decode_result, encode_command
from ..machine import StateMachine
from ..machine.effects import SessionEnded
from ..machine.table import Reader
from . import lifeline
from .deadlines import Deadlines
from .durability import DurabilityMixin
from .reads import ReadBarriers
from .replication import ReplicationFixes
from .watches import Watches

log = logging.getLogger("raftsync.engine")

_FAILURES = {
    FAIL_REASON.QUEUE_FULL: Failure.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER: Failure.NO_LEADER,
    FAIL_REASON.DISCARDED: Failure.DISCARDED,
    FAIL_REASON.NOT_LEADER: Failure.LEADER_CHANGED,
    FAIL_REASON.LEADER_CHANGED: Failure.LEADER_CHANGED,
    FAIL_REASON.REQUEST_DENIED: Failure.REJECTED,
    FAIL_REASON.UNKNOWN_OUTCOME: Failure.UNKNOWN,
}
_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
_BARRIER = encode_command(Op.BARRIER, 0, 0, 0, [])
# An app that stops reading is treated as dead rather than letting us buffer forever.
MAX_OUTGOING_BYTES = 256 * 1024 * 1024
# Keepalives continue only while the app sent a frame within min(this, ttl/3).
APP_SILENCE_LIMIT = 1.0
# A STATE frame goes to the app at least this often, so the app can tell a stalled
# engine from a quiet one.
STATE_INTERVAL = 0.25
def _log_failed_duty(result: Any, error: int) -> None:
    if error != FAIL_REASON.SUCCESS:
        log.debug("a leader duty's proposal failed (%s); the duty proposes again when due", error)


class _MachineConsumer(SyncObjConsumer):
    """Holds the machine so snapshots contain only machine state (as msgpack bytes)."""

    def __init__(self, engine: "Engine") -> None:
        self._engine = engine
        super().__init__()
        self.machine = StateMachine()

    @replicated
    def apply(self, command: bytes) -> bytes:
        effects: list = []
        result = self.machine.apply(command, effects)
        if effects:
            self._engine._on_effects(effects)
        return result

    def _serialize(self) -> dict[str, Any]:
        return {"machine": self.machine.snapshot()}

    def _deserialize(self, data: dict[str, Any]) -> None:
        try:
            machine = StateMachine.restore(data["machine"])
        except Exception as exc:
            # PySyncObj would log this and carry on with a half-loaded node that never
            # applies anything again: stop instead, so the app sees the engine gone.
            log.critical("cannot restore the snapshot (%s: %s): stopping", type(exc).__name__, exc)
            self._engine.fatal = f"cannot restore the snapshot: {type(exc).__name__}: {exc}"
            raise
        self.machine = machine
        self._engine._on_restored()


def build_conf(config: dict[str, Any], in_process: bool) -> SyncObjConf:
    data_dir = config.get("data_dir")
    journal = snapshot = None
    if data_dir:
        os.makedirs(data_dir, exist_ok=True)
        journal = os.path.join(data_dir, "journal.bin")
        snapshot = os.path.join(data_dir, "snapshot.bin")
    election_min, election_max = config["election_timeout"]
    return SyncObjConf(
        password=config.get("password") or None,
        bindAddress=config["self_address"],
        # Ship each entry at once instead of on the 0.1 s batch timer: ~100x lower
        # latency per synchronous command (see README "PySyncObj settings").
        appendEntriesUseBatch=False,
        appendEntriesPeriod=config["heartbeat_interval"],
        raftMinTimeout=election_min,
        raftMaxTimeout=election_max,
        # A deposed leader stops believing it leads after this long without a quorum.
        leaderFallbackTimeout=max(2 * election_max, 4 * config["heartbeat_interval"]),
        connectionTimeout=max(3.5, election_max),
        connectionRetryTime=0.5,
        commandsWaitLeader=True,
        journalFile=journal,
        fullDumpFile=snapshot,
        logCompactionMinEntries=config["compaction_min_entries"],
        logCompactionMinTime=config.get("compaction_min_time", 300),
        # Never fork a process that has application threads in it.
        useFork=not in_process,
        bindRetryTime=0.5,
        maxBindRetries=config.get("bind_retries", 20),
        dynamicMembershipChange=False,
    )


class _RaftNode(ReplicationFixes, DurabilityMixin, SyncObj):
    pass


class Engine:
    def __init__(self, sock: socket.socket, in_process: bool) -> None:
        self._sock = sock
        self._in_process = in_process
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._want_write = False
        self.stopped = threading.Event()
        self.fatal: str | None = None  # why this engine cannot go on (it stops)
        self._raft: _RaftNode | None = None
        self._consumer = _MachineConsumer(self)
        self._config: dict[str, Any] = {}
        self._subscribed = False
        self._last_app_frame = time.monotonic()
        # sessions this app owns: id -> ttl seconds, and when each is next due
        self._owned: dict[int, float] = {}
        self._keepalive_due: dict[int, float] = {}
        # TTLs measured here, keyed (deadline kind, key); expiries proposed only while
        # this node leads
        self._deadlines = Deadlines()
        # leader-only work of the tables that needs this node's clocks (engine-side state)
        self._duties = self._consumer.machine.leader_duties()
        self._failed_duties: list[Any] = []
        self._watches = Watches(self._send)
        self._was_leader = False
        self._state: tuple | None = None
        self._state_sent_at = 0.0
        self._reads = ReadBarriers(
            self._propose_barrier, lambda request_id, query: self._send([Msg.RESULT, request_id, self._answer(query)]),
            lambda request_id, failure: self._send([Msg.FAILED, request_id, failure or Failure.UNKNOWN]),
            lambda: self._hook_fires("drop_barriers"))
        self._snapshots_restored = 0
        # command op -> SUBMIT frames seen (how many log entries the app asked for)
        self._submitted_ops: dict[int, int] = {}
        # test hooks (only with test_hooks): name -> how many more times to fire
        self._hooks: dict[str, int] = {}
        self._hooks_fired: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------

    def start(self, config: dict[str, Any]) -> None:
        """Create the SyncObj (binding its port). Raises on a bind failure."""
        self._config = config
        others = [p for p in config["peers"] if p != config["self_address"]]
        from .transport import RaftTransport  # the Raft port's hardened transport

        self._raft = _RaftNode(config["self_address"], others, build_conf(config, self._in_process),
                               consumers=[self._consumer], transportClass=RaftTransport)
        if self.fatal is not None:  # the snapshot in data_dir could not be restored
            raise RuntimeError(self.fatal)
        self._raft.addOnTickCallback(self._on_tick)
        self._raft.waitBinded()

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self._raft is not None:
            self._raft.destroy()
        try:
            self._sock.close()
        except OSError:
            pass

    def join(self, timeout: float = 2.0) -> None:
        """Wait for stop() and then for the tick thread to close the Raft port and journal.
        The thread that created the SyncObj must call this before it ends: PySyncObj's
        tick thread quits without that cleanup once its creating thread is gone."""
        self.stopped.wait()
        thread = self._raft._SyncObj__thread if self._raft is not None else None
        if thread is not None:
            thread.join(timeout)

    def release_in_fork_child(self) -> None:
        """In a forked child of the app (in-process engine; no tick thread exists there)."""
        lifeline.release_in_fork_child(self._sock, self._raft)

    @property
    def machine(self) -> StateMachine:
        return self._consumer.machine

    # -- channel I/O (tick thread) -------------------------------------------------

    def _send(self, message: list[Any]) -> None:
        if self.stopped.is_set():
            return
        self._out += pack_frame(message)
        if len(self._out) > MAX_OUTGOING_BYTES:
            log.error("app is not reading its channel; stopping")
            self.stop()
            return
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                sent = self._sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.stop()
                return
            del self._out[:sent]
        want_write = bool(self._out)
        if want_write != self._want_write and self._subscribed:
            self._want_write = want_write
            self._subscribe()

    def _subscribe(self) -> None:
        mask = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
        if self._want_write:
            mask |= POLL_EVENT_TYPE.WRITE
        self._raft._poller.subscribe(self._sock.fileno(), self._on_socket, mask)

    def _on_socket(self, descr: int, event: int) -> None:
        try:
            if event & POLL_EVENT_TYPE.READ:
                self._read_socket()
            if event & POLL_EVENT_TYPE.WRITE:
                self._flush()
            if event & POLL_EVENT_TYPE.ERROR and not event & POLL_EVENT_TYPE.READ:
                self._on_app_gone()
        except Exception:
            log.exception("channel handling failed")
            self._on_app_gone()

    def _read_socket(self) -> None:
        while not self.stopped.is_set():
            try:
                data = self._sock.recv(256 * 1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._on_app_gone()
                return
            self._last_app_frame = time.monotonic()
            for message in self._decoder.feed(data):
                self._handle(message)

    def _on_app_gone(self) -> None:
        if self._raft is not None:
            self._raft._poller.unsubscribe(self._sock.fileno())
        self.stop()

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == Msg.SUBMIT:
            self._submit(message[1], message[2])
        elif kind == Msg.READ:
            self._read(message[1], message[2], bool(message[3]))
        elif kind == Msg.PING:
            pass
        elif kind == Msg.OWN:
            session_id, ttl_ms = message[1], message[2]
            self._owned[session_id] = ttl_ms / 1000.0
            self._keepalive_due[session_id] = time.monotonic() + ttl_ms / 3000.0
        elif kind == Msg.DISOWN:
            self._owned.pop(message[1], None)
            self._keepalive_due.pop(message[1], None)
        elif kind == Msg.STATUS:
            self._send([Msg.RESULT, message[1], self.status()])
        elif kind == Msg.WATCH:
            self._watches.add(self.machine, message[1], message[2], message[3], message[4])
        elif kind == Msg.UNWATCH:
            self._watches.remove(message[1])
        elif kind == Msg.TEST_HOOK:
            self._send(self._test_hook(message[1], message[2], message[3]))
        elif kind == Msg.CLOSE:
            self.stop()
        else:
            log.warning("unknown channel message kind %r", kind)

    # -- test hooks ------------------------------------------------------------------

    # name -> what it does, each for the next ``count`` occasions; other names are the
    # transport's hooks on received Raft messages (engine/faults.py)
    _TEST_HOOKS = {
        "drop_replies": "drop the result of an app's command (it applied; the app never hears)",
        "drop_barriers": "never run a read barrier's callback (as PySyncObj may not)",
        "drop_submits": "discard an app's command before proposing it (as a lost forward would)",
    }

    def _test_hook(self, request_id: int, name: str, args: dict[str, Any]) -> list[Any]:
        """A test's fault hook (refused unless the config has test_hooks)."""
        if not self._config.get("test_hooks"):
            log.warning("refused test hook %r: test_hooks is off", name)
            return [Msg.FAILED, request_id, Failure.REJECTED]
        try:
            if name in self._TEST_HOOKS:
                self._hooks[name] = self._hooks.get(name, 0) + int(args.get("count", 1))
                return [Msg.RESULT, request_id, {"armed": self._hooks[name]}]
            # The transport SyncObj made for us (pysyncobj 0.3.17 keeps it name-mangled).
            transport = self._raft._SyncObj__transport
            return [Msg.RESULT, request_id, transport.faults.configure(name, args)]
        except Exception:
            log.exception("test hook %r failed", name)
            return [Msg.FAILED, request_id, Failure.REJECTED]

    def _hook_fires(self, name: str) -> bool:
        if not self._hooks.get(name):
            return False
        self._hooks[name] -= 1
        self._hooks_fired[name] = self._hooks_fired.get(name, 0) + 1
        return True

    # -- commands and reads ----------------------------------------------------------

    def _propose(self, command: bytes, callback) -> None:
        self._consumer.apply(command, callback=callback)

    def _submit(self, request_id: int, command: Any) -> None:
        if not isinstance(command, bytes) or len(command) > MAX_COMMAND_BYTES:
            self._send([Msg.FAILED, request_id, Failure.REJECTED])
            return
        # codec: version byte, then the 5-array header 0x95 and the op as a fixint
        op = command[2] if len(command) > 2 and command[1] == 0x95 else -1
        self._submitted_ops[op] = self._submitted_ops.get(op, 0) + 1
        if self._hook_fires("drop_submits"):
            return

        def done(result: Any, error: int) -> None:
            try:
                if error == FAIL_REASON.SUCCESS:
                    if self._hook_fires("drop_replies"):
                        return
                    self._send([Msg.RESULT, request_id, result])
                else:
                    self._send([Msg.FAILED, request_id, _FAILURES.get(error, Failure.UNKNOWN)])
            except Exception:
                log.exception("submit callback failed")

        self._propose(command, done)

    def _read(self, request_id: int, query: Any, linearizable: bool) -> None:
        if not isinstance(query, bytes):
            self._send([Msg.FAILED, request_id, Failure.REJECTED])
            return
        if not linearizable:
            self._send([Msg.RESULT, request_id, self._answer(query)])
            return
        self._reads.read(request_id, query, time.monotonic())

    def _propose_barrier(self, done) -> None:
        def callback(result: Any, error: int) -> None:
            try:
                done(error == FAIL_REASON.SUCCESS, _FAILURES.get(error, Failure.UNKNOWN))
            except Exception:
                log.exception("barrier callback failed")
        self._propose(_BARRIER, callback)

    def _answer(self, query: bytes) -> bytes:
        """Run a query. Where a result shows a TTL, it is this node's estimate of the
        seconds left: expiry itself is the leader's decision."""
        now = time.monotonic()
        return self.machine.query(query, Reader(
            lambda kind, key, token: self._deadlines.remaining((kind, key), token, now)))

    # -- effects (called from apply, tick thread) --------------------------------------

    def _on_effects(self, effects: list) -> None:
        """Measure the TTLs effects start or stop, and tell the app what concerns the
        sessions it owns. Nothing here knows which primitive an effect comes from."""
        try:
            now = time.monotonic()
            for effect in effects:
                deadline = effect.deadline
                if deadline is not None:
                    kind, key, token, ttl = deadline
                    if token is None:
                        self._deadlines.forget((kind, key))
                    else:
                        self._deadlines.observe((kind, key), token, ttl, now)
                owner = effect.owner
                if owner and owner in self._owned:
                    if isinstance(effect, SessionEnded):
                        self._owned.pop(owner, None)
                        self._keepalive_due.pop(owner, None)
                    self._send([Msg.NOTIFY, list(effect)])
            self._watches.on_applied(self.machine)
        except Exception:
            log.exception("effect fan-out failed")

    def _restart_deadlines(self, now: float) -> None:
        self._deadlines.reset((((kind, key), token, ttl) for kind, key, token, ttl in self.machine.deadlines()),
                              now)

    def _on_restored(self) -> None:
        """A snapshot replaced the machine: re-derive what the app must know."""
        self._snapshots_restored += 1
        try:
            self._restart_deadlines(time.monotonic())
            sessions = self.machine.sessions.by_id
            for session_id in list(self._owned):
                if session_id not in sessions:
                    self._owned.pop(session_id, None)
                    self._keepalive_due.pop(session_id, None)
                    self._send([Msg.NOTIFY, list(SessionEnded("session_ended", session_id, "expired"))])
            owned = [list(grant) for grant in self.machine.holdings() if grant.owner in self._owned]
            for grant in owned:  # grants the skipped entries made (a waiter may be woken)
                self._send([Msg.NOTIFY, grant])
            if self._owned:
                # ... and the whole list: a grant of ours it lacks ended in the skipped entries.
                self._send([Msg.NOTIFY, ["holdings", sorted(self._owned), owned]])
            self._watches.on_applied(self.machine)
        except Exception:
            log.exception("restore fan-out failed")

    # -- periodic duties (tick thread) ----------------------------------------------

    def _on_tick(self) -> None:
        if self.fatal is not None:
            self._send([Msg.FATAL, self.fatal])
            self.stop()
            return
        try:
            if not self._subscribed:
                self._subscribed = True
                self._sock.setblocking(False)
                self._subscribe()
                self._send([Msg.READY, {"self_address": self._config["self_address"], "pid": os.getpid()}])
            now = time.monotonic()
            self._push_state(now)
            self._reads.tick(now)
            self._keep_deadlines(now)
            self._send_keepalives(now)
            if self._out:
                self._flush()
        except Exception:
            log.exception("engine tick failed")

    def _push_state(self, now: float) -> None:
        raft = self._raft
        leader = raft._getLeader()
        state = (_ROLES.get(raft._SyncObj__raftState, "follower"), leader.address if leader else None,
                 raft.raftCurrentTerm, raft.hasQuorum)
        if state != self._state or now - self._state_sent_at >= STATE_INTERVAL:
            self._state, self._state_sent_at = state, now
            self._send([Msg.STATE, *state])

    def _keep_deadlines(self, now: float) -> None:
        is_leader = self._raft._isLeader()
        if is_leader and not self._was_leader:
            # A new leader cannot know when renewals reached the old one: every
            # deadline gets a fresh full TTL before anything is expired.
            self._restart_deadlines(now)
        became_leader, self._was_leader = is_leader and not self._was_leader, is_leader
        if not is_leader:
            return
        wall_now = time.time()
        for duty in self._duties:
            # One faulty duty must not stop expiries, keepalives or the other duties.
            try:
                if became_leader:
                    duty.became_leader(self.machine, now, wall_now)
                for command in duty.due(self.machine, now, wall_now):
                    self._propose(command, _log_failed_duty)
            except Exception:
                if duty not in self._failed_duties:  # once, not on every tick
                    self._failed_duties.append(duty)
                    log.exception("leader duty %r failed", duty)
        expiry_ops = self.machine.expiry_ops
        for (kind, key), token in self._deadlines.due(now):
            op = expiry_ops.get(kind)
            if op is None:  # a table's effect names a deadline kind it declares no expiry for
                log.error("no expiry command for deadline kind %r; not measuring it", kind)
                self._deadlines.forget((kind, key))
                continue
            # The expiry names the token it expects: a renewal applied meanwhile wins.
            self._propose(encode_command(op, 0, 0, 0, [key, token]), self._expiry_done((kind, key), token))

    def _expiry_done(self, key: Any, token: int):
        def done(result: Any, error: int) -> None:
            if error != FAIL_REASON.SUCCESS:
                self._deadlines.proposal_failed(key, token)
        return done

    def _send_keepalives(self, now: float) -> None:
        due = [sid for sid, at in self._keepalive_due.items() if now >= at]
        if not due:
            return
        silent_for = now - self._last_app_frame
        # Only while the app is alive: a SIGKILLed or SIGSTOPped app must lose its leases.
        sessions = [sid for sid in due if silent_for <= min(APP_SILENCE_LIMIT, self._owned[sid] / 3)]
        if not sessions:
            return
        for sid in sessions:
            self._keepalive_due[sid] = now + self._owned[sid] / 3

        def done(result: Any, error: int) -> None:
            try:
                if error == FAIL_REASON.SUCCESS:
                    _, missing = decode_result(result)
                    acked = [sid for sid in sessions if sid not in missing]
                    self._send([Msg.NOTIFY, ["keepalive_ack", acked, now]])
                else:
                    retry_at = time.monotonic() + 0.05
                    for sid in sessions:
                        if sid in self._keepalive_due:
                            self._keepalive_due[sid] = min(self._keepalive_due[sid], retry_at)
            except Exception:
                log.exception("keepalive callback failed")

        self._propose(encode_command(Op.KEEPALIVE, 0, 0, 0, [sessions]), done)

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        raft = self._raft
        status = raft.getStatus()
        leader = status["leader"]
        return {
            "self": self._config["self_address"],
            "role": _ROLES.get(status["state"], "follower"),
            "leader": leader.address if leader is not None else None,
            "term": status["raft_term"],
            "has_quorum": status["has_quorum"],
            "commit_index": status["commit_idx"],
            "applied_index": status["last_applied"],
            "log_length": status["log_len"],
            "machine_index": self.machine.index,
            "sessions": len(self.machine.sessions.by_id),
            "engine_pid": os.getpid(),
            "peers_connected": {node.address: raft.isNodeConnected(node) for node in raft.otherNodes},
            "snapshots_restored": self._snapshots_restored,
            "barriers_abandoned": self._reads.abandoned,
            "pending_reads": self._reads.pending,
            "submitted_ops": dict(self._submitted_ops),
            "hooks_fired": dict(self._hooks_fired),
        }


def run_engine(sock: socket.socket, in_process: bool, ready: threading.Event | None = None) -> Engine:
    """Read HELLO from ``sock``, start an engine and return it (its tick thread runs it).

    On a startup failure a FATAL frame carries the reason to the app.
    """
    from ..channel import BlockingChannel

    sock.settimeout(30)
    channel = BlockingChannel(sock)
    hello = channel.recv()
    if not hello or hello[0] != Msg.HELLO:
        raise RuntimeError("engine expected HELLO")
    config = hello[1]
    engine = Engine(sock, in_process)
    try:
        engine.start(config)
    except Exception as exc:
        try:
            channel.send([Msg.FATAL, f"{type(exc).__name__}: {exc}"])
        finally:
            engine.stop()
        raise
    return engine
