"""The demo workload a member runs beside itself when ``RAFTSYNC_DEMO_WORKLOAD=1``.

``raftsync node run`` starts it once the node is ready. It loops until the node stops,
at most one operation per ``RAFTSYNC_DEMO_INTERVAL`` seconds (default 0.5): KV writes,
linearizable reads and compare-and-sets on a few shared registers, a counter of its own
that it also reads on the other members' behalf, a lock acquire/hold/release, an
election campaign, and now and then the node's Raft status. One line per operation:

    workload node1:7000 #12 write demo/reg/1 = 'node1:7000/12' -> ok version=7

``RAFTSYNC_DEMO_LOCK_HOLD`` sets how long it keeps the lock (default: the interval, at
most 0.2 s). ``RAFTSYNC_WORKLOAD_HISTORY=<path>`` also appends every operation to ``path`` as JSON
lines for the fault-test checker (cluster/checker.py), one record at its invoke and
one at its completion, times from ``time.monotonic()`` (one clock for every process
of a host, so histories of several members can be merged):

    {"t": 12.5, "process": "node1:7000", "pid": 41, "id": 12, "type": "invoke", "f": "write", "key": "demo/reg/1", "value": "..."}
    {"t": 12.6, "process": "node1:7000", "pid": 41, "id": 12, "type": "ok", "result": {"version": 7}}

``type`` of a completion: ``ok`` (it happened; a compare-and-set that found another
version is ``ok`` with ``result.conflict``), ``fail`` (it certainly did not happen),
``unknown`` (it may or may not have happened, now or later). Lock and election
notifications (``lost``, ``revoked``) are records of type ``event``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from typing import Any, Callable, TextIO

from .errors import (BadRequest, Conflict, LockTimeout, NotFound, NotHeld, RaftsyncError, Timeout,
                     TooLarge)

REGISTERS = 3
REGISTER_PREFIX = "demo/reg/"
COUNTER_PREFIX = "demo/count/"
LOCK_NAME = "demo/lock"
ELECTION_GROUP = "demo/leader"
# Errors after which a write certainly did not reach the log; any other error leaves it unknown.
_DEFINITE_FAILURES = (BadRequest, TooLarge)


def enabled(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("RAFTSYNC_DEMO_WORKLOAD", "").strip().lower() in ("1", "true", "yes", "on")


def start(node: Any, stop: threading.Event, environ: dict[str, str] | None = None) -> threading.Thread:
    """Run the workload on a daemon thread until ``stop`` is set; returns the thread."""
    environ = os.environ if environ is None else environ
    interval = _seconds(environ, "RAFTSYNC_DEMO_INTERVAL", 0.5)
    workload = Workload(node, stop, interval=max(interval, 0.01),
                        history_path=environ.get("RAFTSYNC_WORKLOAD_HISTORY") or None,
                        lock_hold=_seconds(environ, "RAFTSYNC_DEMO_LOCK_HOLD", min(interval, 0.2)))
    thread = threading.Thread(target=workload.run, name="raftsync-demo-workload", daemon=True)
    thread.start()
    return thread


def _seconds(environ: dict[str, str], name: str, default: float) -> float:
    try:
        return max(0.0, float(environ.get(name, default)))
    except ValueError:
        return default


class History:
    """Appends operation records as JSON lines (thread-safe: lock callbacks come from
    raftsync threads). Each line is flushed so a SIGKILLed member loses no record."""

    def __init__(self, path: str | None, process: str) -> None:
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._process = process
        self._lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def record(self, op_id: int, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        entry = {"t": time.monotonic(), "process": self._process, "pid": os.getpid(), "id": op_id, "type": kind,
                 **fields}
        line = json.dumps(entry, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()


class Workload:
    def __init__(self, node: Any, stop: threading.Event, interval: float = 0.5,
                 history_path: str | None = None, out: TextIO | None = None, seed: int | None = None,
                 lock_hold: float = 0.2) -> None:
        self.node = node
        self.name = node.address
        self.stop = stop
        self.interval = interval
        self.lock_hold = lock_hold
        self.history = History(history_path, self.name)
        self.out = out or sys.stdout
        self.random = random.Random(seed if seed is not None else f"{self.name}/{os.getpid()}")
        self.data = node.data()
        self.lock = node.lock(LOCK_NAME)
        self.election = node.leader(ELECTION_GROUP)
        self.term: Any = None
        self.term_ops_left = 0
        self.last_version: dict[str, int] = {}
        self.counter = 0
        self.number = 0
        self.peers = [p for p in node.config.peers]

    # -- loop ------------------------------------------------------------------------------

    def run(self) -> None:
        operations: list[tuple[Callable[[], None], int]] = [
            (self.write, 3), (self.read, 3), (self.compare_and_set, 2), (self.count, 2),
            (self.lock_cycle, 1), (self.campaign, 1),
        ]
        choices = [op for op, weight in operations for _ in range(weight)]
        try:
            while not self.stop.is_set():
                self.number += 1
                try:
                    if self.number % 10 == 1:
                        self.status()
                    else:
                        self.random.choice(choices)()
                except Exception as exc:  # the demo keeps going; the line says what happened
                    self.say(f"error {type(exc).__name__}: {exc}")
                # the bounded rate of the demo, not a synchronisation
                self.stop.wait(self.interval)
        finally:
            self.resign()
            self.final_reads()
            self.history.close()

    def say(self, text: str) -> None:
        print(f"workload {self.name} #{self.number} {text}", file=self.out, flush=True)

    # -- KV --------------------------------------------------------------------------------

    def _register(self) -> str:
        return f"{REGISTER_PREFIX}{self.random.randrange(REGISTERS)}"

    def write(self, key: str | None = None, value: str | None = None) -> None:
        key = key or self._register()
        value = value or f"{self.name}/{self.number}"
        op = self.history.next_id()
        self.history.record(op, "invoke", f="write", key=key, value=value)
        try:
            record = self.data.write(key, value.encode(), timeout=2.0)
        except _DEFINITE_FAILURES as exc:
            self.history.record(op, "fail", error=type(exc).__name__)
            self.say(f"write {key} = {value!r} -> fail {type(exc).__name__}")
            return
        except RaftsyncError as exc:
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"write {key} = {value!r} -> unknown ({type(exc).__name__}: may still apply)")
            return
        self.last_version[key] = record.version
        self.history.record(op, "ok", result={"version": record.version})
        self.say(f"write {key} = {value!r} -> ok version={record.version}")

    def read(self, key: str | None = None, final: bool = False) -> tuple[str | None, int] | None:
        key = key or self._register()
        op = self.history.next_id()
        self.history.record(op, "invoke", f="read", key=key, **({"final": True} if final else {}))
        try:
            record = self.data.read(key, timeout=2.0)
        except NotFound:
            self.history.record(op, "ok", result={"value": None, "version": 0})
            self.say(f"read {key} -> ok (absent)")
            return None, 0
        except RaftsyncError as exc:
            # a read changes nothing: not knowing its outcome is harmless
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"read {key} -> unknown ({type(exc).__name__})")
            return None
        value = record.value.decode(errors="replace")
        self.last_version[key] = record.version
        self.history.record(op, "ok", result={"value": value, "version": record.version})
        self.say(f"read {key} -> ok {value!r} version={record.version}")
        return value, record.version

    def final_reads(self, budget: float = 5.0) -> None:
        """On the way out: read every key this workload touches once more (marked
        ``final`` in the history, where lost acknowledged writes would show)."""
        deadline = time.monotonic() + budget
        keys = [f"{REGISTER_PREFIX}{i}" for i in range(REGISTERS)]
        keys += [f"{COUNTER_PREFIX}{member}" for member in [self.name, *self.peers]]
        for key in keys:
            if time.monotonic() > deadline:
                return
            self.read(key, final=True)

    def compare_and_set(self) -> None:
        key = self._register()
        expected = self.last_version.get(key, 0)
        value = f"{self.name}/{self.number}"
        op = self.history.next_id()
        self.history.record(op, "invoke", f="cas", key=key, value=value, if_version=expected)
        try:
            record = self.data.write(key, value.encode(), if_version=expected, timeout=2.0)
        except Conflict:
            self.last_version.pop(key, None)
            self.history.record(op, "ok", result={"conflict": True})
            self.say(f"cas {key} if version={expected} = {value!r} -> conflict (someone wrote first)")
            return
        except _DEFINITE_FAILURES as exc:
            self.history.record(op, "fail", error=type(exc).__name__)
            self.say(f"cas {key} -> fail {type(exc).__name__}")
            return
        except RaftsyncError as exc:
            self.last_version.pop(key, None)
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"cas {key} if version={expected} -> unknown ({type(exc).__name__}: may still apply)")
            return
        self.last_version[key] = record.version
        self.history.record(op, "ok", result={"conflict": False, "version": record.version})
        self.say(f"cas {key} if version={expected} = {value!r} -> ok version={record.version}")

    def count(self) -> None:
        """Bump this member's counter, then read another member's: replication, visibly."""
        self.counter += 1
        self.write(f"{COUNTER_PREFIX}{self.name}", str(self.counter))
        if self.peers:
            self.read(f"{COUNTER_PREFIX}{self.random.choice(self.peers)}")

    # -- lock and election ------------------------------------------------------------------

    def lock_cycle(self) -> None:
        op = self.history.next_id()
        self.history.record(op, "invoke", f="acquire", lock=LOCK_NAME)
        try:
            lease = self.lock.acquire(timeout=1.0)
        except LockTimeout:
            self.history.record(op, "fail", error="LockTimeout")
            self.say(f"lock {LOCK_NAME} -> busy")
            return
        except RaftsyncError as exc:
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"lock {LOCK_NAME} -> unknown ({type(exc).__name__})")
            return
        token = lease.token
        self.history.record(op, "ok", lock=LOCK_NAME, result={"token": token},
                            safe_until=lease.session.safe_until)
        # safe_until: the holder's last word on how long the lease was certainly valid; a
        # paused holder hears of the loss late, but never later than this
        lease.on_lost(lambda lost: self.history.record(self.history.next_id(), "event", f="lost",
                                                       lock=LOCK_NAME, token=lost.token,
                                                       safe_until=lost.session.safe_until))
        self.say(f"lock {LOCK_NAME} -> held token={token}")
        self.stop.wait(self.lock_hold)  # hold it a while (RAFTSYNC_DEMO_LOCK_HOLD)
        op = self.history.next_id()
        self.history.record(op, "invoke", f="release", lock=LOCK_NAME, token=token,
                            safe_until=lease.session.safe_until)
        try:
            self.lock.release()
        except NotHeld:
            self.history.record(op, "ok", result={"lost": True})
            self.say(f"release {LOCK_NAME} token={token} -> it was lost already")
            return
        except RaftsyncError as exc:
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"release {LOCK_NAME} token={token} -> unknown ({type(exc).__name__})")
            return
        self.history.record(op, "ok", result={"lost": False})
        self.say(f"release {LOCK_NAME} token={token} -> ok")

    def campaign(self) -> None:
        if self.term is not None and not self.term.revoked.is_set():
            self.term_ops_left -= 1
            if self.term_ops_left <= 0:
                self.resign()
            else:
                self.say(f"election {ELECTION_GROUP} -> still leading term={self.term.term}")
            return
        op = self.history.next_id()
        self.history.record(op, "invoke", f="campaign", group=ELECTION_GROUP)
        try:
            term = self.election.campaign(self.name, value=self.name.encode(), timeout=0)
        except Timeout:
            self.history.record(op, "fail", error="Timeout")
            current = self._current_leader()
            self.say(f"election {ELECTION_GROUP} -> follower (leader {current})")
            return
        except RaftsyncError as exc:
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"election {ELECTION_GROUP} -> unknown ({type(exc).__name__})")
            return
        self.term, self.term_ops_left = term, 3
        self.history.record(op, "ok", group=ELECTION_GROUP, result={"term": term.term},
                            safe_until=term.session.safe_until)
        term.on_revoked(lambda revoked: self.history.record(self.history.next_id(), "event", f="revoked",
                                                            group=ELECTION_GROUP, term=revoked.term,
                                                            safe_until=revoked.session.safe_until))
        self.say(f"election {ELECTION_GROUP} -> leader term={term.term}")

    def _current_leader(self) -> str:
        try:
            info = self.election.current(timeout=2.0)
        except RaftsyncError as exc:
            return f"unknown: {type(exc).__name__}"
        return "none" if info is None else f"{info.id} term={info.term}"

    def resign(self) -> None:
        term, self.term = self.term, None
        if term is None or term.revoked.is_set():
            return
        op = self.history.next_id()
        self.history.record(op, "invoke", f="resign", group=ELECTION_GROUP, term=term.term,
                            safe_until=term.session.safe_until)
        try:
            term.resign(timeout=2.0)
        except RaftsyncError as exc:
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"election {ELECTION_GROUP} resign term={term.term} -> {type(exc).__name__}")
            return
        self.history.record(op, "ok")
        self.say(f"election {ELECTION_GROUP} resign term={term.term} -> ok")

    # -- Raft ------------------------------------------------------------------------------

    def status(self) -> None:
        try:
            status = self.node.status(timeout=2.0)
        except RaftsyncError as exc:
            self.say(f"status -> {type(exc).__name__}")
            return
        self.history.record(self.history.next_id(), "event", f="raft", role=status.get("role"),
                            term=status.get("term"), leader=status.get("leader"))
        self.say(f"status role={status.get('role')} leader={status.get('leader')} term={status.get('term')} "
                 f"commit={status.get('commit_index')} applied={status.get('applied_index')}")
