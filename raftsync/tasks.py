"""Tasks: distributed job execution across a pool of workers (go-sync's ``task.Run``).

``tasks = node.tasks(pool=4)`` is both a submitter and, once it has handlers, a worker
with ``pool`` threads::

    @tasks.handler("resize")
    def resize(job):                      # job: JobContext
        job.progress({"done": 0.5})
        return {"ok": job.payload["path"]}

    job = tasks.submit("resize", {"path": "/x.png"}, key="x.png", retries=3, timeout=60)
    job.result(timeout=30)                # any node: tasks.job(job_id).result()

Guarantees
- A job is claimed by exactly one live worker that registered its handler, in the
  log entry that made it runnable or freed a slot; the claim is handed to that worker's
  node by notification (no polling) and bound to the worker's session and to a
  visibility deadline (the job's ``timeout``) measured by the Raft leader.
- A claim's fencing token (``job.token``) is the log index of the assignment; a result,
  failure or progress report of a claim that is no longer the job's current one (its
  worker died, paused past its session, overran, or the job was cancelled) is refused.
- A dead or paused worker's claims are queued again when its session ends, an
  overrunning one's when its deadline passes; every claim counts as an attempt
  (``job.attempt``). A handler that raises (any BaseException, asyncio.CancelledError
  and SystemExit included: the pool thread serves on) is retried after an exponential
  backoff (``backoff * 2**(attempt-1)``) until ``retries + 1`` attempts, then the job is
  dead-lettered with the error text: ``Job.result`` raises ``JobFailed``.
- A worker tells the cluster how many of its threads are free: a thread still running a
  handler whose claim ended (overran, cancelled, session lost) is not, until the handler
  returns. A claim the worker cannot start (no free thread, or the handler was
  unregistered meanwhile) is given back at once without using an attempt, as are a
  closing worker's unstarted claims (``stats["returned"]``).
- ``key`` makes submission idempotent: a second submit with the same key returns the
  same job (``Job.created`` is False) for as long as the cluster keeps that job.
- ``schedule(name, handler, every=s | cron="…")`` enqueues each due run exactly once
  across leader changes: slots are de-duplicated by id in the state machine. ``every``
  slots are numbered 1, 2, 3, ... and spaced by the leader's monotonic clock (a new
  leader waits one full period before its first); cron slots (5 fields, UTC) are the
  epoch minute by the leader's wall clock, so skew shifts a run but never doubles it,
  and after an outage only the latest missed run is made. A schedule holds at most one
  waiting run: a slot due while its previous run is still queued or delayed (no worker
  takes it) is skipped (``ScheduleInfo.skipped``).

Failure modes
- Delivery is at least once: a handler whose result was refused, or whose worker died
  after the side effect, may run again elsewhere. Fence side effects with ``job.token``
  (or make them idempotent on ``job.id``).
- A handler still running after its claim ended keeps its pool thread (the worker takes
  one job less meanwhile); its result is refused. ``job.cancelled`` is set when the claim
  ends (cancelled, timed out, session lost, or ended while this node was cut off and
  learnt from a snapshot): long handlers should check it.
- A leader whose wall clock is ahead by D runs a cron slot up to D early and that slot
  becomes the schedule's last: no run happens until real time reaches it, so a clock D
  ahead (even briefly) suppresses the schedule's runs for up to D. It is not corrected
  (the cluster cannot tell it from a catch-up after an outage, and moving the last slot
  back would let a slow clock run a slot twice); ``ScheduleInfo.last_time`` in the
  future shows it and the leader logs a warning. Keep clocks synchronized (NTP).
- ``close()`` during an outage: its leave keeps being proposed until it applies (or the
  worker's session ends); a claim for a worker nothing on this node serves is given back.
- A delay or backoff measured across a leader change restarts in full on the new
  leader (a job starts late, never early).
- Terminal jobs are kept in a bounded window (10 000 jobs / 16 MiB); ``result()`` of an
  evicted job raises NotFound.
- Payloads and results are msgpack values of at most 32 KiB (TooLarge); jobs not yet
  finished hold at most 100 000 jobs / 64 MiB (payload, key, progress, last error):
  beyond, ``submit`` and a growing ``progress`` raise TooLarge and a failure's error text
  is cut. An unknown handler name raises UnknownHandler; a bad cron text, or one that
  never fires ("0 0 31 2 *"), BadRequest.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .codec import Op, Query, Status, check_key, encode_query, pack_value, raise_for_status, unpack_value
from .errors import (BadRequest, Closed, JobFailed, NotFound, NotHeld, RaftsyncError, SessionExpired, Timeout,
                     UnknownHandler)
from .machine.tasks import (MAX_BACKOFF_MS, MAX_DELAY_MS, MAX_ERROR_BYTES, MAX_EVERY_MS, MAX_PAYLOAD_BYTES, MAX_POOL,
                            MAX_PROGRESS_BYTES, MAX_RETRIES, MAX_TIMEOUT_MS, MAX_WORKER_NAMES, MIN_EVERY_MS,
                            MIN_TIMEOUT_MS, TERMINAL, UNKNOWN_HANDLER, check_cron)
from .ownership import check_name, session_for
from .replica import Replica, deadline_after
from .session import Session

log = logging.getLogger("raftsync.tasks")

_watch_ids = itertools.count(1 << 40)  # apart from WatchStream's ids, on the same replica
# claims a worker finished, remembered so a re-announcement (after a snapshot install) is
# not run again
_RECENT_CLAIMS = 4096


def _pack(value: Any, what: str, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    return pack_value(value, what, limit)


def _seconds(value: Any, what: str, minimum_ms: int, maximum_ms: int) -> int:
    """A number of seconds as whole milliseconds within bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest(f"{what} must be a number of seconds")
    ms = int(round(value * 1000))
    if not minimum_ms <= ms <= maximum_ms:
        raise BadRequest(f"{what} must be between {minimum_ms / 1000:g} and {maximum_ms / 1000:g} seconds")
    return ms


def _retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise BadRequest(f"retries must be an int between 0 and {MAX_RETRIES}")
    return value


def _raise_for(status: int, payload: Any, what: str, name: str = "") -> None:
    if status == Status.NOT_FOUND and payload == UNKNOWN_HANDLER:
        raise UnknownHandler(f"{what}: no worker has registered handler {name!r}")
    raise_for_status(status, payload, what)


@dataclass(frozen=True)
class JobStatus:
    """A job as the cluster knows it. ``state``: queued, delayed, running, done, dead or
    cancelled; ``attempt``: claims so far; ``token``: while running (and once done or
    dead-lettered) the fencing token of its claim; ``progress`` is the handler's last
    report; ``result`` (done) and ``error`` (dead, cancelled, or the last failed
    attempt's) as kept by the cluster."""

    id: int
    name: str | None
    state: str
    attempt: int = 0
    max_attempts: int = 0
    token: int = 0
    worker_session: int | None = None
    progress: Any = None
    result: Any = None
    error: str | None = None
    schedule: str | None = None
    slot: int | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_view(cls, view: list[Any]) -> "JobStatus":
        if len(view) == 3:  # a terminal entry whose job was evicted since
            return cls(view[0], view[1], view[2])
        job_id, name, state, attempt, max_attempts, token, session, progress, result, error, origin = view
        schedule, slot = origin if origin else (None, None)
        return cls(job_id, name, state, attempt, max_attempts, token, session, unpack_value(progress), unpack_value(result),
                   error, schedule, slot)


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    handler: str
    every: float | None
    cron: str | None
    last_slot: int
    version: int
    skipped: int
    retries: int
    timeout: float

    @property
    def last_time(self) -> float | None:
        """A cron schedule's last run: the epoch seconds (UTC) of its last slot (None for
        ``every`` schedules, or before the first). Later than now: a leader with a fast
        clock ran it, and no run comes before then."""
        return self.last_slot * 60.0 if self.cron is not None and self.last_slot else None


class JobContext:
    """What a handler receives: the job's ``payload`` (a msgpack value), its ``attempt``
    (1 for the first claim), its claim's fencing ``token``, ``schedule``/``slot`` for a
    scheduled run, and ``cancelled`` (a threading.Event set when this claim ends without
    us: cancelled, timed out, session lost)."""

    def __init__(self, tasks: "Tasks", session: Session, effect: list[Any],
                 handler: Callable[["JobContext"], Any]) -> None:
        _, _, _, job_id, token, name, payload, attempt, timeout_ms, origin = effect
        self.id: int = job_id
        self.token: int = token
        self.name: str = name
        self.attempt: int = attempt
        self.timeout: float = timeout_ms / 1000.0
        self.schedule, self.slot = origin if origin else (None, None)
        self.session = session
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        self._payload = payload
        self._tasks = tasks
        self._handler = handler  # the one registered when the claim came: it runs even if unregistered since
        self._started = False    # a pool thread took it (under Tasks._guard)

    @property
    def payload(self) -> Any:
        return unpack_value(self._payload)

    def progress(self, value: Any, timeout: float | None = 5.0) -> None:
        """Report progress (a msgpack value of at most 4 KiB), visible to ``status()``.
        Raises NotHeld once this claim is no longer the job's current one, TooLarge if the
        cluster's budget for unfinished jobs has no room for it."""
        data = _pack(value, "progress", MAX_PROGRESS_BYTES)
        replica = self._tasks._replica
        try:
            status, payload = replica.submit(self.session, Op.TASK_PROGRESS, [self.id, self.token, data],
                                             deadline_after(timeout), f"progress of job {self.id}")
        except SessionExpired:
            raise NotHeld(f"job {self.id}: the claim's session is lost") from None
        if status in (Status.NOT_HELD, Status.SESSION_EXPIRED):
            raise NotHeld(f"job {self.id}: claim {self.token} is no longer current")
        raise_for_status(status, payload, f"progress of job {self.id}")

    def _revoke(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def __repr__(self) -> str:
        return f"<JobContext {self.name!r} id={self.id} attempt={self.attempt} token={self.token}>"


class Job:
    """A handle on a job, from any node: ``result()``, ``status()``, ``cancel()``."""

    def __init__(self, tasks: "Tasks", job_id: int, name: str | None = None, created: bool = True) -> None:
        self.id = job_id
        self.name = name
        self.created = created  # False: an earlier submit with the same key made it
        self._tasks = tasks

    def status(self, consistency: str = "linearizable", timeout: float | None = None) -> JobStatus:
        """The job now (NotFound if the cluster does not know it, or no longer keeps it)."""
        status, payload = self._tasks._replica.query(encode_query(Query.TASK_JOB, [self.id]), consistency,
                                                     deadline_after(timeout))
        if status == Status.NOT_FOUND:
            raise NotFound(f"job {self.id}")
        raise_for_status(status, payload, f"status of job {self.id}")
        return JobStatus.from_view(payload)

    def result(self, timeout: float | None = None) -> Any:
        """Wait until the job finishes and return its result (a msgpack value). Raises
        JobFailed (dead-lettered, or cancelled), Timeout, NotFound (unknown or evicted)."""
        status = self._wait_finished(deadline_after(timeout), timeout)
        if status.state == "done":
            if status.name is None:
                raise NotFound(f"job {self.id} finished but its result is no longer kept")
            return status.result
        raise JobFailed(f"job {self.id} {status.state}: {status.error}", self.id, status.state, status.error)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Wait until the job finishes; its final status (never raises JobFailed)."""
        return self._wait_finished(deadline_after(timeout), timeout)

    def _wait_finished(self, deadline: float, timeout: float | None) -> JobStatus:
        """Watch the job's terminal change (the watch first sends its current view)."""
        replica = self._tasks._replica
        started = time.monotonic()
        while True:
            event = threading.Event()
            box: dict[str, Any] = {}

            def deliver(kind: str, payload: Any, box: dict[str, Any] = box, event: threading.Event = event) -> None:
                if kind == "task":
                    if payload is None:
                        box["missing"] = True
                    elif payload[2] in TERMINAL:
                        box["view"] = payload
                    else:
                        return
                else:  # compacted, invalid, closed
                    box["end"] = kind
                event.set()

            watch_id = next(_watch_ids)
            replica.watch(watch_id, "task", str(self.id), None, deliver)
            try:
                while True:
                    if not replica.wait_for(event, deadline, started):
                        raise Timeout(f"job {self.id} not finished within {timeout}s")
                    if "view" in box:
                        return JobStatus.from_view(box["view"])
                    if box.get("end") == "closed":
                        raise Closed("the node closed")
                    if box.pop("missing", False):
                        # Not on this replica (yet): the cluster says whether it exists.
                        current = self.status(timeout=max(0.0, deadline - time.monotonic())
                                              if deadline != float("inf") else None)
                        if current.finished:
                            return current
                        event.clear()
                        if "view" in box:
                            return JobStatus.from_view(box["view"])
                        continue
                    break  # compacted (a snapshot skipped it) or refused: look again
            finally:
                replica.remove_watch(watch_id)
            if box.get("end") == "invalid":
                raise BadRequest(f"job {self.id}: watch refused by the engine")
            current = self.status(consistency="local")
            if current.finished:
                return current

    def cancel(self, timeout: float | None = None) -> bool:
        """Cancel the job unless it already finished: True if this call cancelled it. A
        running handler's ``job.cancelled`` is set and its result will be refused."""
        tasks = self._tasks
        deadline = deadline_after(timeout)
        status, payload = tasks._replica.submit(tasks._submit_session(deadline), Op.TASK_CANCEL, [self.id],
                                                deadline, f"cancel job {self.id}")
        if status == Status.NOT_FOUND:
            raise NotFound(f"job {self.id}")
        raise_for_status(status, payload, f"cancel job {self.id}")
        return bool(payload[1])

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.name!r}>"


class _Router:
    """Per replica: routes claim notifications to the worker (Tasks) they name, and session
    loss to the workers registered under it. Runs on the reader thread: quick, no blocking."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.workers: dict[int, "Tasks"] = {}
        self.guard = threading.Lock()
        # (session id, worker id) of a worker the cluster lists but no Tasks here serves ->
        # its claims still to give back; present while a thread is giving them back
        self.orphans: dict[tuple[int, int], dict[tuple[int, int], None]] = {}
        replica.on_notice("task_assigned", self._on_assigned)
        replica.on_notice("task_revoked", self._on_revoked)
        replica.on_notice("holdings", self._on_holdings)
        replica.sessions.on_loss(self._on_session_lost)

    def _worker(self, worker_id: int) -> "Tasks | None":
        with self.guard:
            return self.workers.get(worker_id)

    def _on_assigned(self, effect: list[Any]) -> None:
        worker = self._worker(effect[2])
        if worker is not None:
            worker._on_assigned(effect)
        else:
            self._give_back_orphan(effect)

    def _give_back_orphan(self, effect: list[Any]) -> None:
        """A claim for a worker id nothing here serves (a worker closed while the cluster was
        unavailable, whose leave has not applied yet): give it back without using an
        attempt, and take that worker off the cluster's list."""
        session_id, worker_id, job_id, token = effect[1], effect[2], effect[3], effect[4]
        session = self.replica.sessions.by_id(session_id)
        if session is None:
            return  # a session this process lost: its end re-queues the claim
        key = (session_id, worker_id)
        with self.guard:
            pending = self.orphans.get(key)
            if pending is not None:  # a thread is at it: it sends this one too
                pending[(job_id, token)] = None
                return
            self.orphans[key] = {(job_id, token): None}
        threading.Thread(target=self._leave_orphan, args=(session, key), name="raftsync-task-orphan",
                         daemon=True).start()

    def _leave_orphan(self, session: Session, key: tuple[int, int]) -> None:
        while True:
            with self.guard:
                pending = self.orphans[key]
                if not pending:
                    del self.orphans[key]
                    return
                returned = [list(claim) for claim in pending]
                pending.clear()
            try:
                self.replica.finish(session, Op.TASK_WORKER, [key[1], [], 0, returned],
                                    time.monotonic() + self.replica.config.quorum_timeout,
                                    f"give back claims of unknown task worker {key[1]:#x}")
            except RaftsyncError:
                pass  # still proposed in the background, or the session is lost (its end frees them)

    def _on_holdings(self, effect: list[Any]) -> None:
        # After a snapshot install: every claim our sessions hold now. A claim taken here
        # that is not listed ended in the entries the snapshot skipped.
        _, session_ids, holdings = effect
        current = {(grant[3], grant[4]) for grant in holdings if grant[0] == "task_assigned"}
        with self.guard:
            workers = list(self.workers.values())
        for worker in workers:
            worker._on_holdings(set(session_ids), current)

    def _on_revoked(self, effect: list[Any]) -> None:
        worker = self._worker(effect[2])
        if worker is not None:
            worker._on_revoked(effect)

    def _on_session_lost(self, session_id: int) -> None:
        with self.guard:
            workers = list(self.workers.values())
        for worker in workers:
            worker._on_session_lost(session_id)


class Tasks:
    """Submit jobs and schedules; with handlers, also a worker of ``pool`` threads.
    Create with ``node.tasks(pool=10)``."""

    def __init__(self, replica: Replica, pool: int = 10, session: Session | None = None) -> None:
        if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= MAX_POOL:
            raise BadRequest(f"pool must be an int between 1 and {MAX_POOL}")
        self._replica = replica
        self.pool = pool
        self._fixed_session = session
        self._worker_id = secrets.randbits(62)
        self._handlers: dict[str, Callable[[JobContext], Any]] = {}
        self._guard = threading.Lock()
        self._register_lock = threading.Lock()
        self._session: Session | None = None  # the session we are registered under
        self._registered: tuple | None = None  # (session id, names, capacity) last applied (_register_lock)
        self._stale = True  # the cluster may not have our current registration
        self._state = "serving"  # then "draining" (closing: no new claims), "left"
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._claims: dict[int, JobContext] = {}  # job id -> claim taken here, not yet finished
        self._running: set[JobContext] = set()    # claims whose handler is running (ended ones too)
        # (job id, token) -> session id: claims to give back unstarted with the next registration
        self._returning: dict[tuple[int, int], int] = {}
        self._recent: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._threads: list[threading.Thread] = []
        # wakes the keeper (registration failed or out of date, session lost, left)
        self._wake = threading.Event()
        self._busy = 0
        self._idle = threading.Condition(self._guard)
        self.stats = {"started": 0, "completed": 0, "failed": 0, "refused": 0, "revoked": 0, "returned": 0}
        self._router = replica.attachment("tasks", _Router)

    # -- submitting ----------------------------------------------------------------------

    def _submit_session(self, deadline: float) -> Session:
        return session_for(self._replica, self._fixed_session, None, deadline)

    def submit(self, name: str, payload: Any = None, key: str | None = None, delay: float = 0,
               retries: int = 3, timeout: float = 60.0, backoff: float = 1.0,
               request_timeout: float | None = None) -> Job:
        """Queue a job for handler ``name`` (run after ``delay`` seconds); ``timeout`` is
        each attempt's visibility deadline, ``retries`` how many times a failed attempt is
        retried, after ``backoff * 2**(attempt-1)`` seconds. ``key`` makes it idempotent.
        ``request_timeout`` bounds this call (OutcomeUnknown if sent and unanswered:
        resubmit with the same ``key`` to learn the job)."""
        check_name(name, "handler name")
        data = _pack(payload, "payload")
        if key is not None:
            check_key(key, "key")
        args = [name, data, key, _seconds(delay, "delay", 0, MAX_DELAY_MS), _retries(retries),
                _seconds(timeout, "timeout", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS),
                _seconds(backoff, "backoff", 0, MAX_BACKOFF_MS)]
        deadline = deadline_after(request_timeout)
        status, result = self._replica.submit(self._submit_session(deadline), Op.TASK_SUBMIT, args, deadline,
                                              f"submit {name!r}")
        _raise_for(status, result, f"submit {name!r}", name)
        job_id, created = result
        return Job(self, job_id, name, created)

    def job(self, job_id: int) -> Job:
        """A handle on the job ``job_id`` (submitted anywhere)."""
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
            raise BadRequest("job_id must be a positive int")
        return Job(self, job_id)

    def run(self, name: str, fn: Callable[[JobContext], Any], payload: Any = None, timeout: float | None = None,
            **submit_options: Any) -> Any:
        """go-sync's ``Run(Command{Name, Func})``: register ``fn`` as handler ``name`` on
        this worker, submit one job for it and return its result (the job runs on
        whichever worker with the handler claims it). Raises JobFailed, Timeout."""
        if self._handlers.get(name) is not fn:
            self.register(name, fn)
        return self.submit(name, payload, **submit_options).result(timeout)

    # -- schedules -------------------------------------------------------------------------

    def schedule(self, name: str, handler: str, every: float | None = None, cron: str | None = None,
                 payload: Any = None, retries: int = 3, timeout: float = 60.0, backoff: float = 1.0,
                 request_timeout: float | None = None) -> int:
        """Store a schedule (replacing one of the same name): a job for ``handler`` every
        ``every`` seconds, or at each time the 5-field ``cron`` expression names (UTC).
        Returns the schedule's version. Raises BadRequest (bad cron text), UnknownHandler."""
        check_name(name, "schedule name")
        check_name(handler, "handler name")
        if (every is None) == (cron is None):
            raise BadRequest("give exactly one of every= and cron=")
        every_ms = None if every is None else _seconds(every, "every", MIN_EVERY_MS, MAX_EVERY_MS)
        if cron is not None:
            try:
                cron = check_cron(cron)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        args = [name, handler, every_ms, cron, _pack(payload, "payload"), _retries(retries),
                _seconds(timeout, "timeout", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS),
                _seconds(backoff, "backoff", 0, MAX_BACKOFF_MS), int(time.time() * 1000)]
        deadline = deadline_after(request_timeout)
        status, version = self._replica.submit(self._submit_session(deadline), Op.TASK_SCHEDULE, args, deadline,
                                               f"schedule {name!r}")
        _raise_for(status, version, f"schedule {name!r}", handler)
        return version

    def unschedule(self, name: str, request_timeout: float | None = None) -> None:
        """Remove a schedule (NotFound if there is none); runs already queued stay."""
        check_name(name, "schedule name")
        deadline = deadline_after(request_timeout)
        status, payload = self._replica.submit(self._submit_session(deadline), Op.TASK_SCHEDULE, [name], deadline,
                                               f"unschedule {name!r}")
        if status == Status.NOT_FOUND:
            raise NotFound(f"schedule {name!r}")
        raise_for_status(status, payload, f"unschedule {name!r}")

    def schedules(self, consistency: str = "linearizable", timeout: float | None = None) -> list[ScheduleInfo]:
        status, payload = self._replica.query(encode_query(Query.TASK_SCHEDULES, []), consistency,
                                              deadline_after(timeout))
        raise_for_status(status, payload, "schedules")
        return [ScheduleInfo(name, handler, None if every_ms is None else every_ms / 1000.0, cron, last_slot, version,
                             skipped, retries, timeout_ms / 1000.0)
                for name, handler, every_ms, cron, last_slot, version, skipped, retries, timeout_ms in payload]

    def info(self, consistency: str = "linearizable", timeout: float | None = None) -> dict[str, Any]:
        """The cluster's queue: queued jobs per handler, workers, counts."""
        status, payload = self._replica.query(encode_query(Query.TASK_INFO, []), consistency, deadline_after(timeout))
        raise_for_status(status, payload, "task info")
        return payload

    # -- the worker --------------------------------------------------------------------------

    def handler(self, name: str) -> Callable[[Callable[[JobContext], Any]], Callable[[JobContext], Any]]:
        """Decorator: ``@tasks.handler("name")`` registers the function on this worker
        (blocking until the cluster knows it; see ``register``)."""
        def decorate(fn: Callable[[JobContext], Any]) -> Callable[[JobContext], Any]:
            self.register(name, fn)
            return fn
        return decorate

    def register(self, name: str, fn: Callable[[JobContext], Any], timeout: float | None = 10.0) -> None:
        """Serve handler ``name`` with ``fn(job)`` on this worker's pool. Returns once the
        cluster has the registration (jobs may be assigned from then on); if that takes
        longer than ``timeout`` it raises, and the registration goes on in the background."""
        check_name(name, "handler name")
        if not callable(fn):
            raise BadRequest("handler must be callable")
        self._replica.check_open()
        with self._guard:
            if self._state != "serving":
                raise Closed("this Tasks worker is closed")
            if name not in self._handlers and len(self._handlers) >= MAX_WORKER_NAMES:
                raise BadRequest(f"a worker serves at most {MAX_WORKER_NAMES} handler names")
            self._handlers[name] = fn
            with self._router.guard:
                self._router.workers[self._worker_id] = self
            self._start_threads()
        self._register(deadline_after(timeout))

    def unregister(self, name: str, timeout: float | None = 10.0) -> None:
        """Stop serving handler ``name`` here (claims already taken still run; one that
        comes meanwhile is given back without using an attempt)."""
        with self._guard:
            if self._handlers.pop(name, None) is None:
                return
        self._register(deadline_after(timeout))

    def _start_threads(self) -> None:
        """Call with _guard held."""
        if self._threads:
            return
        for number in range(self.pool):
            thread = threading.Thread(target=self._run_pool, name=f"raftsync-task-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._keep_registered, name="raftsync-task-keeper", daemon=True).start()

    def _register(self, deadline: float, if_changed: bool = False) -> None:
        """Tell the cluster which handlers this worker serves and how many pool threads it
        has free for claims (the pool less those still stuck in a handler whose claim
        ended), giving back the claims it could not start, under the current session (the
        node's default one, replaced when lost, unless a fixed one was given). On failure
        the keeper thread retries in the background. ``if_changed``: send nothing if the
        cluster already has exactly this (a handler that returned as its claim ended)."""
        with self._register_lock:
            with self._guard:
                names = sorted(self._handlers) if self._state != "left" else []
                capacity = self._free_capacity() if names and self._state == "serving" else 0
                returning = dict(self._returning)
                self._stale = False  # what we send now is current; a change from here on marks it again
            try:
                session = self._submit_session(deadline)
                self._session = session
                returned = [[job_id, token] for (job_id, token), session_id in returning.items()
                            if session_id == session.id]  # another session's claims end with it
                registration = (session.id, names, capacity)
                if not (if_changed and not returned and registration == self._registered):
                    args = [self._worker_id, names, capacity] + ([returned] if returned else [])
                    status, payload = self._replica.submit(session, Op.TASK_WORKER, args, deadline,
                                                           "register task worker")
                    raise_for_status(status, payload, "register task worker")
                    self._registered = registration
            except RaftsyncError:
                with self._guard:
                    self._stale = True
                self._wake.set()
                raise
            with self._guard:
                for claim in returning:
                    self._returning.pop(claim, None)

    def _free_capacity(self) -> int:
        """Pool threads free for claims (call with _guard held): a thread still running a
        handler whose claim ended (overran, cancelled, session lost) is not free, though
        the cluster no longer counts that claim."""
        stuck = sum(1 for claim in self._running if claim.cancelled.is_set())
        return max(0, self.pool - stuck)

    def _occupied(self) -> int:
        """Pool threads taken (call with _guard held): running a handler, or about to run a
        claim that is still current."""
        waiting = sum(1 for claim in self._claims.values() if not claim._started and not claim.cancelled.is_set())
        return len(self._running) + waiting

    def _keep_registered(self) -> None:
        """Register again whenever that failed, our session was lost (the node opens a new
        default session; the old one's end gives its claims back), a handler thread got
        stuck or came back, or a claim is to be given back."""
        attempt = 0
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._guard:
                if self._state == "left":
                    return
                stale = self._stale or self._session is None or self._session.lost.is_set()
            if not stale:
                continue
            if self._fixed_session is not None and self._fixed_session.lost.is_set():
                log.warning("task worker %#x: its session is lost; it serves no more jobs", self._worker_id)
                return
            try:
                self._register(time.monotonic() + self._replica.config.quorum_timeout, if_changed=True)
                attempt = 0
            except Closed:  # the node closed (its sessions ended: the cluster freed our claims)
                with self._guard:
                    self._state = "left"
                    unfinished = list(self._claims.values())
                self._end_claims(unfinished, "node closed")
                for _ in self._threads:
                    self._work.put(None)
                return
            except RaftsyncError as exc:
                attempt += 1
                log.info("task worker %#x: registering failed (%s); retrying", self._worker_id, exc)
                time.sleep(min(1.0, 0.05 * attempt))  # bounded pause before the next attempt

    def _end_claims(self, claims: list[JobContext], reason: str) -> None:
        """These claims are over without us (``job.cancelled`` is set). A handler still
        running one keeps its thread: the cluster is told we have one thread less."""
        with self._guard:
            stuck = False
            for claim in claims:
                if not claim.cancelled.is_set():
                    claim._revoke(reason)
                    stuck = stuck or claim in self._running
            if stuck and self._state == "serving":
                self._stale = True
                self._wake.set()

    def _on_session_lost(self, session_id: int) -> None:
        session = self._session
        if session is None or session.id != session_id:
            return
        with self._guard:
            claims = [claim for claim in self._claims.values() if claim.session.id == session_id]
            for claim, owner in list(self._returning.items()):
                if owner == session_id:
                    del self._returning[claim]
        self._end_claims(claims, "session lost")
        with self._guard:
            self._stale = True
        self._wake.set()

    def _on_holdings(self, session_ids: set[int], current: set[tuple[int, int]]) -> None:
        with self._guard:
            ended = [claim for claim in self._claims.values()
                     if claim.session.id in session_ids and (claim.id, claim.token) not in current]
            for claim, owner in list(self._returning.items()):
                if owner in session_ids and claim not in current:
                    del self._returning[claim]
        if ended:
            self._count("revoked", len(ended))
        self._end_claims(ended, "ended while this node was away")

    def _on_assigned(self, effect: list[Any]) -> None:
        session_id, job_id, token, name = effect[1], effect[3], effect[4], effect[5]
        session = self._replica.sessions.by_id(session_id)
        if session is None:
            return  # a session this process already lost: the cluster re-queues its claims
        superseded = None
        with self._guard:
            if (job_id, token) in self._recent or (job_id, token) in self._returning or self._state == "left":
                return  # re-announced after a snapshot install; or leaving: the leave frees it
            current = self._claims.get(job_id)
            if current is not None:
                if current.token == token:
                    return  # re-announced after a snapshot install
                superseded = current
            handler = self._handlers.get(name)
            if handler is None or self._occupied() - (superseded is not None and not superseded._started) >= self.pool:
                # No thread will be free for it (one is stuck in an overrunning handler the
                # cluster already counts free), or the name was unregistered: give it back
                # unstarted, without using an attempt, with our next registration.
                self._returning[(job_id, token)] = session_id
                self._stale = True
                claim = None
            else:
                claim = self._claims[job_id] = JobContext(self, session, effect, handler)
        if superseded is not None:
            self._end_claims([superseded], "superseded")
        if claim is None:
            self._count("returned")
            self._wake.set()
            return
        self._work.put(claim)

    def _on_revoked(self, effect: list[Any]) -> None:
        job_id, token, reason = effect[3], effect[4], effect[5]
        with self._guard:
            claim = self._claims.get(job_id)
        if claim is not None and claim.token == token:
            self._count("revoked")
            self._end_claims([claim], reason)

    def _run_pool(self) -> None:
        while True:
            claim = self._work.get()
            if claim is None:
                return
            with self._guard:
                self._busy += 1
                # revoked before it started: the cluster has already moved it on
                start = not claim.cancelled.is_set()
                claim._started = True
                if start:
                    self._running.add(claim)
            try:
                if start:
                    self._run_one(claim)
            except BaseException:  # the thread serves on, whatever a handler or report raised
                log.exception("task worker: running job %s failed", claim.id)
            finally:
                with self._guard:
                    self._handler_returned(claim)
                    self._busy -= 1
                    if self._claims.get(claim.id) is claim:
                        del self._claims[claim.id]
                    self._recent[(claim.id, claim.token)] = None
                    while len(self._recent) > _RECENT_CLAIMS:
                        self._recent.popitem(last=False)
                    self._idle.notify_all()

    def _handler_returned(self, claim: JobContext) -> None:
        """Call with _guard held: its thread is free again (for the cluster too if the
        claim had ended while the handler still ran)."""
        if claim in self._running:
            self._running.discard(claim)
            if claim.cancelled.is_set() and self._state == "serving":
                self._stale = True
                self._wake.set()

    def _run_one(self, claim: JobContext) -> None:
        self._count("started")
        try:
            result = claim._handler(claim)
        except BaseException as exc:  # also asyncio.CancelledError, SystemExit: a failed attempt
            error = f"{type(exc).__name__}: {exc}".encode("utf-8")[:MAX_ERROR_BYTES].decode("utf-8", "ignore")
            with self._guard:
                self._handler_returned(claim)
            self._report(claim, Op.TASK_FAIL, [error, True])
            return
        with self._guard:
            self._handler_returned(claim)
        try:
            data = _pack(result, "result")
        except RaftsyncError as exc:  # retrying would not help
            self._report(claim, Op.TASK_FAIL, [str(exc)[:MAX_ERROR_BYTES], False])
            return
        self._report(claim, Op.TASK_COMPLETE, [data])

    def _report(self, claim: JobContext, op: int, args: list[Any]) -> None:
        """Send a claim's outcome; it keeps being proposed past the deadline until answered
        or the session is lost. A superseded claim's outcome is refused."""
        what = f"{'complete' if op == Op.TASK_COMPLETE else 'fail'} job {claim.id}"

        def done(status: int | None, payload: Any) -> None:
            if status == Status.OK:
                self._count("completed" if op == Op.TASK_COMPLETE else "failed")
            else:
                self._count("refused")
                log.info("%s (claim %s) refused: %s", what, claim.token,
                         "session lost" if status is None else Status(status).name)

        try:
            self._replica.finish(claim.session, op, [claim.id, claim.token, *args],
                                 time.monotonic() + self._replica.config.quorum_timeout, what, on_done=done)
        except SessionExpired:
            pass  # lost before it could be sent: done() counted it refused
        except RaftsyncError as exc:
            log.info("%s: %s (still proposed in the background)", what, exc)

    def _count(self, what: str, how_many: int = 1) -> None:
        with self._guard:
            self.stats[what] += how_many

    @property
    def worker_id(self) -> int:
        return self._worker_id

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, let the handlers running here finish (up to ``timeout``), then
        leave: whatever is still claimed here is queued again at once (not counted as a
        failed attempt). The leave keeps being proposed in the background until it applies
        (or our session ends, which frees the same claims)."""
        with self._guard:
            if self._state != "serving":
                return
            self._state = "draining"
            registered = bool(self._threads)
        if not registered:
            with self._guard:
                self._state = "left"
            return
        deadline = time.monotonic() + timeout
        try:
            self._register(deadline)  # capacity 0: no new claims, ours stay ours
        except RaftsyncError as exc:
            log.info("task worker %#x: draining failed (%s)", self._worker_id, exc)
        with self._guard:
            while (self._busy or self._claims) and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            self._state = "left"
            unstarted = [claim for claim in self._claims.values()
                         if not claim._started and not claim.cancelled.is_set()]
            for claim in unstarted:  # no pool thread starts them now (it checks under _guard)
                claim._revoke("worker closed")
        self._leave(max(deadline, time.monotonic() + 1.0), unstarted)
        with self._guard:
            unfinished = list(self._claims.values())
        self._end_claims(unfinished, "worker closed")  # given back: whatever they still report is refused
        with self._router.guard:
            self._router.workers.pop(self._worker_id, None)
        for _ in self._threads:
            self._work.put(None)
        self._wake.set()

    def _leave(self, deadline: float, unstarted: list[JobContext]) -> None:
        """Unregister (through ``finish``: retried until it applies or the session is lost,
        so no ghost worker keeps getting claims), giving back unstarted claims uncounted."""
        with self._register_lock:
            session = self._session
            if session is None:
                return
            with self._guard:
                returned = {claim: None for claim, owner in self._returning.items() if owner == session.id}
                self._returning.clear()
            returned.update({(claim.id, claim.token): None for claim in unstarted if claim.session.id == session.id})
            args = [self._worker_id, [], 0] + ([[list(claim) for claim in returned]] if returned else [])
            try:
                self._replica.finish(session, Op.TASK_WORKER, args, deadline, "leave as task worker")
            except SessionExpired:
                pass  # its end frees our claims
            except RaftsyncError as exc:
                log.info("task worker %#x: leaving not applied yet (%s); still proposed in the background",
                         self._worker_id, exc)

    def __enter__(self) -> "Tasks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
