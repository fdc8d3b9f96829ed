"""The demo workload a member runs beside itself when ``RAFTSYNC_DEMO_WORKLOAD=1``.

``raftsync node run`` starts it once the node is ready. It loops until the node stops,
at most one operation per ``RAFTSYNC_DEMO_INTERVAL`` seconds (default 0.5): KV writes,
linearizable reads and compare-and-sets on a few shared registers, a counter of its own
that it also reads on the other members' behalf, a lock acquire/hold/release, an
election campaign, now and then the node's Raft status, events published to a shared
topic and consumed by this member's consumer group, and task jobs submitted to (and run
by) every member's worker. One line per operation:

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

Events and tasks (bounded per incarnation by ``RAFTSYNC_DEMO_MAX_EVENTS``, default 2000
events, and ``RAFTSYNC_DEMO_MAX_JOBS``, default 500 jobs):

- ``publish`` (invoke ``ids``: unique payload ids ``member/pid/op.i``; ok ``offsets``)
  to topic ``demo/events``, whose retention the workload first sets to 50 000 events so
  that nothing is trimmed during a run; ``subscribe`` (ok ``position``: where the
  subscription starts) as group ``demo/consumer/<member>``, then ``consume`` events
  (records of type ``event`` with ``events``: [offset, payload id] in delivery order);
- ``submit`` of a job (``sid``: a unique submit id, the idempotency ``key`` where there
  is one, which is then also the sid; ok ``job``, ``created``), some resubmitted with
  the same key; ``task-effect`` events written by the handler as it runs a claim
  (``job``, ``attempt``, fencing ``token``, ``sid``): the effect the checker counts;
- on SIGTERM, after the KV final reads: the workload waits (at most 5 s) for its
  outstanding jobs, then ``events-final`` reads the topic from its oldest retained
  offset (ok ``first``, ``next``, ``events``) and ``job-final`` reads the status of
  every job this member ever submitted (also before a restart, found in the history
  file): ok ``state``, ``attempt``, ``max_attempts``, ``token``, ``result``.

Errors after which a publish or submit certainly did not apply (``BadRequest``,
``TooLarge``, ``SessionExpired``, and ``Timeout``/``NoQuorum`` other than
``OutcomeUnknown``: nothing was sent) are ``fail``; any other error is ``unknown``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from typing import Any, Callable, TextIO

from .errors import (BadRequest, Compacted, Conflict, LockTimeout, NoQuorum, NotFound, NotHeld, OutcomeUnknown,
                     RaftsyncError, SessionExpired, Timeout, TooLarge)

REGISTERS = 3
REGISTER_PREFIX = "demo/reg/"
COUNTER_PREFIX = "demo/count/"
LOCK_NAME = "demo/lock"
ELECTION_GROUP = "demo/leader"
TOPIC = "demo/events"
# Retention large enough that nothing is trimmed during a run (the checker still
# accounts for a trimmed prefix): ~150 bytes per retained event and replica.
TOPIC_MAX_EVENTS = 50_000
TOPIC_MAX_BYTES = 16 * 1024 * 1024
GROUP_PREFIX = "demo/consumer/"
JOB_HANDLER = "demo/job"
JOB_TIMEOUT = 2.0          # each claim's visibility deadline
JOB_WORK_MAX = 0.5         # the handler's work, well within JOB_TIMEOUT
JOB_BACKOFF = 0.1
JOB_POOL = 2
JOBS_WAIT = 5.0            # on SIGTERM, how long to wait for outstanding jobs
FINISHED_PREFIX = "demo/finished/"   # each member's "running" / "done": the shutdown barrier
BARRIER_WAIT = 3.0
SHUTDOWN_BUDGET = 15.0     # the whole final phase (cli.py waits a little longer for it)
# Errors after which a write certainly did not reach the log; any other error leaves it unknown.
_DEFINITE_FAILURES = (BadRequest, TooLarge)


def _not_applied(exc: BaseException) -> bool:
    """After this error a publish or submit certainly did not apply: refused by the
    machine or the engine, or (Timeout, NoQuorum other than OutcomeUnknown) never sent."""
    if isinstance(exc, OutcomeUnknown):
        return False
    return isinstance(exc, (BadRequest, TooLarge, SessionExpired, Timeout, NoQuorum))


def enabled(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("RAFTSYNC_DEMO_WORKLOAD", "").strip().lower() in ("1", "true", "yes", "on")


def start(node: Any, stop: threading.Event, environ: dict[str, str] | None = None) -> threading.Thread:
    """Run the workload on a daemon thread until ``stop`` is set; returns the thread."""
    environ = os.environ if environ is None else environ
    interval = _seconds(environ, "RAFTSYNC_DEMO_INTERVAL", 0.5)
    workload = Workload(node, stop, interval=max(interval, 0.01),
                        history_path=environ.get("RAFTSYNC_WORKLOAD_HISTORY") or None,
                        lock_hold=_seconds(environ, "RAFTSYNC_DEMO_LOCK_HOLD", min(interval, 0.2)),
                        max_events=int(_seconds(environ, "RAFTSYNC_DEMO_MAX_EVENTS", 2000)),
                        max_jobs=int(_seconds(environ, "RAFTSYNC_DEMO_MAX_JOBS", 500)))
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
        self.earlier_jobs = _jobs_submitted(path, process) if path else []
        self._file = open(path, "a", encoding="utf-8") if path else None
        if self._file is not None and self._file.tell() and not _ends_with_newline(path):
            self._file.write("\n")  # after a line cut short by SIGKILL: keep our first record whole
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
            if self._file.closed:
                return  # a late callback (a lock lost, a job run) after the workload ended
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _jobs_submitted(path: str, process: str) -> list[int]:
    """The jobs an earlier incarnation of ``process`` submitted (its acknowledged submits
    in the history file): their final status is read on the way out too."""
    jobs: list[int] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if '"job"' not in line or '"created"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by SIGKILL
                result = record.get("result")
                if (record.get("process") == process and record.get("type") == "ok" and isinstance(result, dict)
                        and "created" in result and isinstance(result.get("job"), int)):
                    jobs.append(result["job"])
    except OSError:
        pass
    return list(dict.fromkeys(jobs))


class Workload:
    def __init__(self, node: Any, stop: threading.Event, interval: float = 0.5,
                 history_path: str | None = None, out: TextIO | None = None, seed: int | None = None,
                 lock_hold: float = 0.2, max_events: int = 2000, max_jobs: int = 500) -> None:
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
        self._say_lock = threading.Lock()
        # events
        self.events = node.events(TOPIC)
        self.group = f"{GROUP_PREFIX}{self.name}"
        self.topic_configured = False
        self.subscription: Any = None
        self.subscriptions = 0
        self.max_events = max_events
        self.published = 0
        # tasks: created in run() (registering the handler waits for the cluster)
        self.tasks: Any = None
        self.max_jobs = max_jobs
        self.submits = 0
        self.jobs: list[int] = list(self.history.earlier_jobs)   # every job this member submitted
        self.outstanding: dict[int, str] = dict.fromkeys(self.history.earlier_jobs, "")  # not seen finished
        self.resubmits: dict[str, tuple[Any, int]] = {}  # key -> (payload, retries) to submit again

    # -- loop ------------------------------------------------------------------------------

    def run(self) -> None:
        operations: list[tuple[Callable[[], None], int]] = [
            (self.write, 3), (self.read, 3), (self.compare_and_set, 2), (self.count, 2),
            (self.lock_cycle, 1), (self.campaign, 1), (self.publish, 2), (self.consume, 2),
            (self.submit_job, 2), (self.poll_job, 1),
        ]
        choices = [op for op, weight in operations for _ in range(weight)]
        try:
            self.start_worker()
            self._mark(b"running")
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
            deadline = time.monotonic() + SHUTDOWN_BUDGET
            # the worker drains while every member is still there (its own jobs are over by
            # now; the others' can run on theirs), then the barrier keeps this member in the
            # quorum until the others have read too
            for final in (self.resign, self.final_reads, self.wait_for_jobs, self.final_events, self.final_jobs,
                          self.close_clients, self.barrier):
                try:
                    final() if final == self.resign else final(deadline)
                except Exception as exc:  # one failed step must not skip the others
                    self.say(f"error {type(exc).__name__} in {final.__name__}: {exc}")
            self.say(f"stopped ({SHUTDOWN_BUDGET - (deadline - time.monotonic()):.1f}s after the stop)")
            self.history.close()

    def say(self, text: str) -> None:
        line = f"workload {self.name} #{self.number} {text}\n"
        with self._say_lock:  # handlers print from the task pool's threads too
            self.out.write(line)
            self.out.flush()

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

    def final_reads(self, deadline: float | None = None, budget: float = 5.0) -> None:
        """On the way out: read every key this workload touches once more (marked
        ``final`` in the history, where lost acknowledged writes would show)."""
        deadline = min(time.monotonic() + budget, deadline or math.inf)
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

    # -- events ----------------------------------------------------------------------------

    def _topic_ready(self) -> bool:
        """Set the topic's retention once per incarnation before publishing (the same
        values every time, so configuring again trims nothing)."""
        if not self.topic_configured:
            try:
                self.events.configure(max_events=TOPIC_MAX_EVENTS, max_bytes=TOPIC_MAX_BYTES, timeout=2.0)
            except RaftsyncError as exc:
                self.say(f"configure {TOPIC} -> {type(exc).__name__}")
                return False
            self.topic_configured = True
            self.say(f"configure {TOPIC} -> ok max_events={TOPIC_MAX_EVENTS}")
        return True

    def _request_timeout(self) -> float:
        """Often shorter than a leader change, so some publishes and submits end unknown
        (and keyed submits are retried with their key to learn their job)."""
        return self.random.choice((0.5, 2.0))

    def publish(self) -> None:
        if self.published >= self.max_events or not self._topic_ready():
            return
        op = self.history.next_id()
        ids = [f"{self.name}/{os.getpid()}/{op}.{i}" for i in range(self.random.choice((1, 1, 1, 2, 3)))]
        self.published += len(ids)
        self.history.record(op, "invoke", f="publish", topic=TOPIC, ids=ids)
        timeout = self._request_timeout()
        try:
            if len(ids) == 1:
                offsets = [self.events.publish({"id": ids[0]}, timeout=timeout)]
            else:
                offsets = self.events.publish_many([{"id": event_id} for event_id in ids], timeout=timeout)
        except RaftsyncError as exc:
            # publish_many: the chunks before a failed one are published (their offsets)
            published = list(getattr(exc, "published", []) or [])
            kind = "fail" if _not_applied(exc) and not published else "unknown"
            self.history.record(op, kind, error=type(exc).__name__, result={"offsets": published})
            self.say(f"publish {TOPIC} {ids} -> {kind} ({type(exc).__name__})")
            return
        self.history.record(op, "ok", result={"offsets": offsets})
        self.say(f"publish {TOPIC} {ids} -> ok offsets={offsets}")

    def consume(self) -> None:
        """Take what this member's consumer group has next (acknowledged by the next fetch)."""
        if self.subscription is None:
            self.subscriptions += 1
            op = self.history.next_id()
            self.history.record(op, "invoke", f="subscribe", topic=TOPIC, group=self.group, sub=self.subscriptions)
            try:
                self.subscription = self.events.subscribe(group=self.group, batch_size=64, timeout=2.0)
            except RaftsyncError as exc:
                self.history.record(op, "fail", error=type(exc).__name__)
                self.say(f"subscribe {TOPIC} group={self.group} -> {type(exc).__name__}")
                return
            self.history.record(op, "ok", result={"position": self.subscription.position})
            self.say(f"subscribe {TOPIC} group={self.group} -> ok from offset {self.subscription.position}")
        try:
            batch = self.subscription.get_batch(max_events=64, timeout=0.2)
        except Timeout as exc:  # also OutcomeUnknown of the batch's acknowledgement: nothing handed out
            self.say(f"consume {TOPIC} -> nothing ({type(exc).__name__})")
            return
        except (Compacted, StopIteration) as exc:
            self.say(f"consume {TOPIC} -> subscription ended ({type(exc).__name__}: {exc})")
            self.subscription.close()
            self.subscription = None
            return
        except RaftsyncError as exc:  # NoQuorum: the subscription goes on waiting next time
            self.say(f"consume {TOPIC} -> {type(exc).__name__}")
            return
        events = [[event.offset, _payload_id(event.payload)] for event in batch]
        self.history.record(self.history.next_id(), "event", f="consume", topic=TOPIC, group=self.group,
                            sub=self.subscriptions, events=events)
        self.say(f"consume {TOPIC} -> {len(events)} events at offsets {events[0][0]}..{events[-1][0]}")

    def final_events(self, deadline: float) -> None:
        """Read the whole topic from its oldest retained offset (``events-final``)."""
        if time.monotonic() > deadline - 1.0:
            return
        op = self.history.next_id()
        self.history.record(op, "invoke", f="events-final", topic=TOPIC)
        try:
            result = self._read_topic(deadline)
        except RaftsyncError as exc:
            self.history.record(op, "unknown", error=type(exc).__name__)
            self.say(f"final read {TOPIC} -> {type(exc).__name__}")
            return
        self.history.record(op, "ok", result=result)
        self.say(f"final read {TOPIC} -> ok offsets {result['first']}..{result['next'] - 1}, "
                 f"{len(result['events'])} events")

    def _read_topic(self, deadline: float) -> dict[str, Any]:
        for _ in range(3):  # the first offset may be trimmed between info and read: again
            remaining = lambda: max(0.1, deadline - time.monotonic())  # noqa: E731
            try:
                info = self.events.info(timeout=min(2.0, remaining()))
            except NotFound:
                return {"first": 0, "next": 0, "events": [], "missing": True}
            events: list[list[Any]] = []
            offset = info.first_offset
            try:
                while offset < info.next_offset:
                    batch = self.events.read(offset, timeout=min(2.0, remaining()))
                    if not batch:
                        break  # a hole below next_offset: the checker sees the count short
                    events += [[event.offset, _payload_id(event.payload)] for event in batch]
                    offset = batch[-1].offset + 1
            except Compacted:
                continue
            return {"first": info.first_offset, "next": info.next_offset, "events": events}
        raise Compacted(f"{TOPIC}: trimmed under every read")

    # -- tasks -----------------------------------------------------------------------------

    def start_worker(self) -> None:
        """Serve the demo handler here; registration goes on in the background if it fails."""
        self.tasks = self.node.tasks(pool=JOB_POOL)
        try:
            self.tasks.register(JOB_HANDLER, self._run_job, timeout=5.0)
        except RaftsyncError as exc:
            self.say(f"worker {JOB_HANDLER} -> {type(exc).__name__} (registering in the background)")
            return
        self.say(f"worker {JOB_HANDLER} -> registered, pool {JOB_POOL}")

    def _run_job(self, job: Any) -> dict[str, Any]:
        """The handler (on the pool's threads). Its effect is the history record, written
        before anything else: the checker wants each (job, token) at most once."""
        payload = job.payload if isinstance(job.payload, dict) else {}
        sid = payload.get("sid")
        self.history.record(self.history.next_id(), "event", f="task-effect", job=job.id, attempt=job.attempt,
                            token=job.token, sid=sid)
        self.say(f"task job={job.id} attempt={job.attempt} token={job.token} runs {sid}")
        time.sleep(min(JOB_WORK_MAX, float(payload.get("work", 0))))   # the job's work
        if job.attempt <= int(payload.get("fail", 0)):
            raise RuntimeError(f"fails on attempt {job.attempt}")
        return {"sid": sid, "token": job.token, "attempt": job.attempt, "by": self.name}

    def submit_job(self) -> None:
        if self.tasks is None:
            return
        if self.resubmits and self.random.random() < 0.4:
            key = self.random.choice(sorted(self.resubmits))
            payload, retries = self.resubmits[key]
            self._submit(key, key, payload, retries, resubmit=True)
            return
        if self.submits >= self.max_jobs:
            return
        self.submits += 1
        op = self.history.next_id()
        keyed = self.random.random() < 0.3
        sid = f"{self.name}/{os.getpid()}/{'k' if keyed else ''}{op}"
        # most succeed at once; some on a retry; some fail every attempt (dead-lettered)
        # most are quick; some work long enough that a pause or kill catches them running
        work = self.random.uniform(0, 0.03) if self.random.random() < 0.8 else self.random.uniform(0.2, 0.5)
        payload = {"sid": sid, "fail": self.random.choice((0, 0, 0, 0, 1, 9)), "work": round(work, 3)}
        self._submit(sid, sid if keyed else None, payload, self.random.randint(0, 2), op=op)

    def _submit(self, sid: str, key: str | None, payload: dict[str, Any], retries: int, resubmit: bool = False,
                op: int | None = None) -> None:
        op = op or self.history.next_id()
        self.history.record(op, "invoke", f="submit", handler=JOB_HANDLER, sid=sid, key=key, retries=retries,
                            fail=payload["fail"], **({"resubmit": True} if resubmit else {}))
        try:
            job = self.tasks.submit(JOB_HANDLER, payload, key=key, retries=retries, timeout=JOB_TIMEOUT,
                                    backoff=JOB_BACKOFF, request_timeout=self._request_timeout())
        except RaftsyncError as exc:
            kind = "fail" if _not_applied(exc) else "unknown"
            self.history.record(op, kind, error=type(exc).__name__)
            if key is not None and kind == "unknown":
                self.resubmits[key] = (payload, retries)  # the same key again tells which job it made
            self.say(f"submit {sid} -> {kind} ({type(exc).__name__})")
            return
        self.history.record(op, "ok", result={"job": job.id, "created": job.created})
        self.say(f"submit {sid}{' again' if resubmit else ''} -> ok job={job.id} created={job.created}")
        if job.id not in self.outstanding and job.id not in self.jobs:
            self.outstanding[job.id] = sid
        if job.id not in self.jobs:
            self.jobs.append(job.id)
        if resubmit:
            self.resubmits.pop(key, None)
        elif key is not None and self.random.random() < 0.5:
            self.resubmits[key] = (payload, retries)  # it must come back as the same job

    def poll_job(self) -> None:
        """Look at the job not seen finished yet that was looked at least recently."""
        if self.tasks is None or not self.outstanding:
            return
        job_id = next(iter(self.outstanding))
        self.outstanding[job_id] = self.outstanding.pop(job_id)  # to the back of the line
        try:
            status = self.tasks.job(job_id).status(timeout=1.0)
        except RaftsyncError as exc:
            self.say(f"job {job_id} -> {type(exc).__name__}")
            return
        if status.finished:
            del self.outstanding[job_id]
        self.say(f"job {job_id} -> {status.state} attempt={status.attempt}/{status.max_attempts} token={status.token}")

    def wait_for_jobs(self, deadline: float) -> None:
        """On the way out, while every member still serves: let outstanding jobs finish."""
        until = min(deadline, time.monotonic() + JOBS_WAIT)
        for job_id in list(self.outstanding):
            if self.tasks is None or time.monotonic() >= until:
                return
            try:
                status = self.tasks.job(job_id).wait(timeout=max(0.0, until - time.monotonic()))
            except RaftsyncError as exc:
                self.say(f"wait for job {job_id} -> {type(exc).__name__}")
                continue
            self.outstanding.pop(job_id, None)
            self.say(f"job {job_id} -> {status.state} attempt={status.attempt}/{status.max_attempts}")

    def final_jobs(self, deadline: float) -> None:
        """The status of every job this member submitted (``job-final``)."""
        if self.tasks is None:
            return
        failures = 0
        for job_id in self.jobs:
            if time.monotonic() >= deadline or failures >= 2:
                return  # out of time, or no quorum left: the rest stay unchecked
            op = self.history.next_id()
            self.history.record(op, "invoke", f="job-final", job=job_id)
            try:
                status = self.tasks.job(job_id).status(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            except NotFound:
                self.history.record(op, "ok", result={"state": "missing"})
                self.say(f"final status job {job_id} -> missing")
                continue
            except RaftsyncError as exc:
                failures += 1
                self.history.record(op, "unknown", error=type(exc).__name__)
                self.say(f"final status job {job_id} -> {type(exc).__name__}")
                continue
            failures = 0
            result = status.result if isinstance(status.result, dict) else None
            self.history.record(op, "ok", result={"state": status.state, "attempt": status.attempt,
                                                  "max_attempts": status.max_attempts, "token": status.token,
                                                  "result": result})
        self.say(f"final status of {len(self.jobs)} jobs read")

    def _mark(self, state: bytes) -> bool:
        try:
            self.data.write(f"{FINISHED_PREFIX}{self.name}", state, timeout=2.0)
            return True
        except RaftsyncError as exc:
            self.say(f"mark {state.decode()} -> {type(exc).__name__}")
            return False

    def barrier(self, deadline: float) -> None:
        """Leave only once every member has read what it checks at the end (or after
        BARRIER_WAIT): all members stop at once on SIGTERM, and one that left early would
        take the quorum from the others' final reads."""
        if not self._mark(b"done"):
            return
        until = min(deadline, time.monotonic() + BARRIER_WAIT)
        waiting = list(self.peers)
        while waiting and time.monotonic() < until:
            try:
                record = self.data.read(f"{FINISHED_PREFIX}{waiting[0]}", timeout=0.5)
                if record.value == b"done":
                    waiting.pop(0)
                    continue
            except RaftsyncError:
                break  # the others have left already (no quorum): nobody is left to wait for
            time.sleep(0.05)  # polling the peers' marks, within BARRIER_WAIT
        self.say(f"barrier -> {'all members done' if not waiting else f'left without {waiting}'}")

    def close_clients(self, deadline: float) -> None:
        if self.subscription is not None:
            self.subscription.close()
        if self.tasks is not None:
            self.tasks.close(timeout=max(0.5, min(3.0, deadline - time.monotonic())))

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


def _payload_id(payload: Any) -> Any:
    """The unique id the workload put in an event's payload (None for anyone else's)."""
    return payload.get("id") if isinstance(payload, dict) else None
