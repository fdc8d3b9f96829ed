"""Tasks: a replicated job queue, the workers that claim its jobs, and schedules.

Jobs
- ``TASK_SUBMIT`` creates a job (its id is the machine index of the submit) for a
  handler name that some worker has registered (an unknown name is refused), queued at
  once or, with a delay, "delayed" until a ``task_delay`` deadline the Raft leader
  measures has passed. An idempotency ``key`` maps to the job it first created, for as
  long as that job is kept.
- Workers register per session (``TASK_WORKER``: handler names and how many pool threads
  they have free for claims: the pool less the threads still stuck in a handler whose
  claim ended). A worker gives back, in the same command, claims it cannot start (no
  free thread, or it no longer serves the name): they are queued again at the front
  without using an attempt. A queued job is assigned, in the same command that made it runnable or freed a slot (submit,
  completion, failure, registration, re-queue, delay over), to the registered worker
  with the handler and the most free slots (then the one assigned to least recently):
  FIFO per handler name. The assignment is an effect owned by the worker's session, so
  only that worker's node hears of it: claims are handed out by notification.
- A claim's fencing token is the machine index of its assignment; completion, failure
  and progress name it and are refused (NOT_HELD) unless it is the job's current claim
  by the same session. Each claim is an attempt; ``max_attempts`` = retries + 1.
- A claim ends by completion (done), failure (retried after exponential backoff, or
  dead-lettered with the error text once attempts run out), its visibility deadline
  (``task_claim``: the job's timeout, measured by the leader; re-queued at once), its
  worker's session ending (re-queued at once), or cancellation.
- Active jobs (queued, delayed, running) are bounded in count and in the bytes they hold
  (payload, key, progress, last error): a submit beyond is refused, a progress report
  that does not fit is refused, a failure's error text is cut to what fits.
- Terminal jobs (done, dead, cancelled) keep their result or error in a bounded window
  (count and bytes), oldest evicted first with their keys; every terminal change is
  appended to a bounded history so ``Job.result`` can wait through a watch.

Schedules
- ``TASK_SCHEDULE`` stores (name -> handler, every_ms | cron, payload, ...). Each run is
  a slot with an id; the machine enqueues a slot only if its id is above the schedule's
  last one, so a slot runs at most once however often it is proposed. A slot that comes
  while the schedule's previous run is still queued or delayed (no worker takes it) is
  skipped and counted (``skipped``), so a schedule holds at most one waiting run.
- ``every``: a ``task_every`` deadline of ``every`` seconds, measured by the leader's
  monotonic clock from when it applied the previous slot; its expiry (``TASK_TICK``,
  naming the token of the last slot) enqueues slot last + 1. Slot ids are consecutive.
- ``cron`` (5 fields, UTC): the leader's :class:`CronDuty` proposes ``TASK_SLOT`` with
  slot id = the epoch minute of the latest due cron time by its wall clock. A leader
  whose clock is behind proposes a slot already applied (refused) or waits: skew shifts
  a run but never doubles it. After an outage only the latest missed slot runs.
  A leader whose clock is AHEAD by D runs the slot its clock names (up to D early) and
  that slot becomes the schedule's last: later leaders with correct clocks propose only
  newer slots, so no run happens until real time reaches that slot — a clock D ahead,
  even briefly, suppresses the schedule's runs for up to D. The machine cannot tell that
  from a legitimate catch-up after an outage (it has no clock), and letting a leader
  move the last slot back would let one whose clock is behind run a slot twice; so this
  is not corrected, only made visible: ``schedules()`` shows the last slot (an epoch
  minute in the future means it) and the duty logs a warning. Keep leader clocks
  synchronized (NTP) for cron schedules.

Pure and deterministic like every table: no clock, no randomness, nothing raised but
Invalid; every structure is bounded.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterable, NamedTuple

from ..codec import MAX_KEY_BYTES, MAX_NAME_BYTES, Op, Query, Status, encode_command, encode_result
from .history import History
from .table import Context, Invalid, LeaderDuty, Reader, Table, WatchKind, arity, bytes_arg, int_arg, str_arg

log = logging.getLogger("raftsync.tasks")

MAX_PAYLOAD_BYTES = 32 * 1024       # a job's payload or result (msgpack bytes)
MAX_PROGRESS_BYTES = 4 * 1024
MAX_ERROR_BYTES = 4 * 1024
MAX_ACTIVE_JOBS = 100_000           # queued, delayed or running
MAX_ACTIVE_BYTES = 64 * 1024 * 1024
MAX_FINISHED_JOBS = 10_000          # terminal jobs kept for result(), status() and keys
MAX_FINISHED_BYTES = 16 * 1024 * 1024
MAX_WORKERS = 4096
MAX_WORKER_NAMES = 64
MAX_POOL = 1024
MAX_CATALOG = 4096                  # handler names known to the cluster
MAX_SCHEDULES = 256
MAX_CRON_BYTES = 128
MAX_RETRIES = 100
MIN_TIMEOUT_MS = 100
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_DELAY_MS = 30 * 24 * 3600 * 1000
MAX_BACKOFF_MS = 3600 * 1000        # cap of one retry's backoff
MIN_EVERY_MS = 500
MAX_EVERY_MS = 30 * 24 * 3600 * 1000
HISTORY_MAX_ENTRIES = 20_000
HISTORY_MAX_BYTES = 2 * 1024 * 1024

QUEUED, DELAYED, RUNNING, DONE, DEAD, CANCELLED = "queued", "delayed", "running", "done", "dead", "cancelled"
TERMINAL = (DONE, DEAD, CANCELLED)
UNKNOWN_HANDLER = "unknown handler"
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
OK = encode_result(Status.OK)

WorkerKey = tuple[int, int]  # (session_id, worker_id)


# -- effects -------------------------------------------------------------------------------


class TaskAssigned(NamedTuple):
    """A job claimed for a worker: told to the worker's node only; the leader measures the
    claim's visibility deadline (the job's timeout)."""

    kind: str
    session_id: int
    worker_id: int
    job_id: int
    token: int
    name: str
    payload: bytes
    attempt: int
    timeout_ms: int
    origin: Any  # [schedule name, slot id] or None

    owner = property(lambda self: self.session_id)
    deadline = property(lambda self: ("task_claim", self.job_id, self.token, self.timeout_ms / 1000.0))


class ClaimEnded(NamedTuple):
    """A claim is over; ``tell``: its worker must hear of it (revoked: timed out,
    cancelled), not when the worker itself ended it."""

    kind: str
    session_id: int
    worker_id: int
    job_id: int
    token: int
    reason: str
    tell: bool

    owner = property(lambda self: self.session_id if self.tell else 0)
    deadline = property(lambda self: ("task_claim", self.job_id, None, None))


class Timer(NamedTuple):
    """Start (``ms``) or stop (``token`` None) a delay or an ``every`` schedule's period."""

    kind: str  # "task_delay" (key: job id) or "task_every" (key: schedule name)
    key: Any
    token: Any
    ms: Any

    owner = property(lambda self: 0)

    @property
    def deadline(self) -> tuple:
        if self.token is None:
            return (self.kind, self.key, None, None)
        return (self.kind, self.key, self.token, self.ms / 1000.0)


class JobFinished(NamedTuple):
    """A job reached a terminal state (watches of it catch up after this apply)."""

    kind: str
    job_id: int
    state: str

    owner = property(lambda self: 0)
    deadline = property(lambda self: None)


# -- records -------------------------------------------------------------------------------


class Job:
    __slots__ = ("id", "name", "payload", "key", "max_attempts", "timeout_ms", "backoff_ms", "state", "attempt",
                 "token", "worker", "progress", "result", "error", "origin")

    def __init__(self, job_id: int, name: str, payload: bytes, key: str | None, max_attempts: int,
                 timeout_ms: int, backoff_ms: int, origin: list[Any] | None) -> None:
        self.id = job_id
        self.name = name
        self.payload: bytes | None = payload  # dropped once terminal
        self.key = key
        self.max_attempts = max_attempts
        self.timeout_ms = timeout_ms
        self.backoff_ms = backoff_ms
        self.state = QUEUED
        self.attempt = 0                    # claims so far
        self.token = 0                      # running: the claim's token; delayed: the delay's
        self.worker: WorkerKey | None = None  # while running
        self.progress: bytes | None = None
        self.result: bytes | None = None
        self.error: str | None = None
        self.origin = origin                # [schedule, slot] for a scheduled run

    def view(self) -> list[Any]:
        """What status queries and watches answer."""
        return [self.id, self.name, self.state, self.attempt, self.max_attempts, self.token,
                self.worker[0] if self.worker else None, self.progress, self.result, self.error, self.origin]

    def kept_bytes(self) -> int:
        """Bytes a terminal job keeps."""
        return len(self.result or b"") + _text_bytes(self.error) + len(self.progress or b"") + _text_bytes(self.key)

    def held_bytes(self) -> int:
        """Bytes an active (queued, delayed, running) job holds: what MAX_ACTIVE_BYTES bounds."""
        return len(self.payload or b"") + _text_bytes(self.key) + len(self.progress or b"") + _text_bytes(self.error)

    def to_state(self) -> list[Any]:
        return [self.id, self.name, self.payload, self.key, self.max_attempts, self.timeout_ms, self.backoff_ms,
                self.state, self.attempt, self.token, list(self.worker) if self.worker else None, self.progress,
                self.result, self.error, self.origin]

    @classmethod
    def from_state(cls, state: list[Any]) -> "Job":
        (job_id, name, payload, key, max_attempts, timeout_ms, backoff_ms, job_state, attempt, token, worker,
         progress, result, error, origin) = state
        job = cls(job_id, name, payload, key, max_attempts, timeout_ms, backoff_ms, origin)
        job.state, job.attempt, job.token = job_state, attempt, token
        job.worker = tuple(worker) if worker else None
        job.progress, job.result, job.error = progress, result, error
        return job


class Worker:
    __slots__ = ("session_id", "worker_id", "names", "capacity", "claims", "last_assigned")

    def __init__(self, session_id: int, worker_id: int) -> None:
        self.session_id = session_id
        self.worker_id = worker_id
        self.names: list[str] = []
        self.capacity = 0
        self.claims: dict[int, int] = {}  # job id -> token, in claim order
        self.last_assigned = 0

    @property
    def key(self) -> WorkerKey:
        return (self.session_id, self.worker_id)

    def to_state(self) -> list[Any]:
        return [self.session_id, self.worker_id, self.names, self.capacity, list(self.claims.items()),
                self.last_assigned]


class Schedule:
    __slots__ = ("name", "handler", "every_ms", "cron", "payload", "max_attempts", "timeout_ms", "backoff_ms",
                 "anchor_ms", "version", "last_slot", "tick_token", "skipped", "last_job")

    def __init__(self, name: str, handler: str, every_ms: int | None, cron: str | None, payload: bytes,
                 max_attempts: int, timeout_ms: int, backoff_ms: int, anchor_ms: int, version: int) -> None:
        self.name = name
        self.handler = handler
        self.every_ms = every_ms
        self.cron = cron
        self.payload = payload
        self.max_attempts = max_attempts
        self.timeout_ms = timeout_ms
        self.backoff_ms = backoff_ms
        self.anchor_ms = anchor_ms  # the definer's wall clock: a cron's first slot comes after it
        self.version = version      # machine index of the definition
        self.last_slot = 0
        self.tick_token = 0         # every: index of the last slot (or the definition)
        self.skipped = 0            # slots due while the queue was full or its previous run still waited
        self.last_job = 0           # id of the job its latest run created

    def view(self) -> list[Any]:
        return [self.name, self.handler, self.every_ms, self.cron, self.last_slot, self.version, self.skipped,
                self.max_attempts - 1, self.timeout_ms]

    def to_state(self) -> list[Any]:
        return [self.name, self.handler, self.every_ms, self.cron, self.payload, self.max_attempts, self.timeout_ms,
                self.backoff_ms, self.anchor_ms, self.version, self.last_slot, self.tick_token, self.skipped,
                self.last_job]

    @classmethod
    def from_state(cls, state: list[Any]) -> "Schedule":
        schedule = cls(*state[:10])
        schedule.last_slot, schedule.tick_token, schedule.skipped = state[10:13]
        schedule.last_job = state[13] if len(state) > 13 else 0  # snapshots from before last_job
        return schedule


def _text_bytes(text: str | None) -> int:
    return len(text.encode("utf-8")) if text else 0


def _history_entry_bytes(entry: list[Any]) -> int:
    return len(entry[1]) + len(entry[2])


def cron_shape_ok(text: Any) -> bool:
    """The machine's own (dependency-free) check: 5 fields or an alias. Full parsing is the
    client's and the cron duty's (croniter)."""
    if not isinstance(text, str) or not text or len(text.encode("utf-8")) > MAX_CRON_BYTES:
        return False
    return text.strip() in CRON_ALIASES or len(text.split()) == 5


# -- the table -----------------------------------------------------------------------------


class TaskTable(Table):
    name = "task"
    expiry_ops = {"task_claim": Op.TASK_EXPIRE, "task_delay": Op.TASK_EXPIRE, "task_every": Op.TASK_TICK}

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.queues: dict[str, deque[int]] = {}        # handler name -> runnable job ids, FIFO
        self.workers: dict[WorkerKey, Worker] = {}
        self.by_name: dict[str, dict[WorkerKey, None]] = {}  # handler name -> workers serving it
        self.by_session: dict[int, list[int]] = {}      # session id -> its worker ids
        self.catalog: dict[str, int] = {}               # handler name -> index it was last registered
        self.keys: dict[str, int] = {}                  # idempotency key -> job id
        self.finished: deque[int] = deque()             # terminal job ids, oldest first
        self.active = 0
        self.active_bytes = 0
        self.finished_bytes = 0
        self.delays: dict[int, int] = {}                # delayed job id -> its delay (ms)
        self.schedules: dict[str, Schedule] = {}
        self.history = History(HISTORY_MAX_ENTRIES, HISTORY_MAX_BYTES, _history_entry_bytes)

    # -- the table interface ------------------------------------------------------------

    def commands(self) -> dict[int, Callable[[Context, int, list[Any]], bytes]]:
        return {Op.TASK_SUBMIT: self._submit_command, Op.TASK_WORKER: self._worker_command,
                Op.TASK_COMPLETE: self._complete_command, Op.TASK_FAIL: self._fail_command,
                Op.TASK_PROGRESS: self._progress_command, Op.TASK_CANCEL: self._cancel_command,
                Op.TASK_SCHEDULE: self._schedule_command}

    def engine_commands(self) -> dict[int, Callable[[Context, list[Any]], bytes]]:
        return {Op.TASK_EXPIRE: self._expire_command, Op.TASK_SLOT: self._slot_command,
                Op.TASK_TICK: self._tick_command}

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        return {Query.TASK_JOB: self._job_query, Query.TASK_INFO: self._info_query,
                Query.TASK_SCHEDULES: lambda args, reader: encode_result(
                    Status.OK, [s.view() for _, s in sorted(self.schedules.items())])}

    def watch_kinds(self) -> dict[str, WatchKind]:
        return {"task": WatchKind(history=lambda: self.history, match=lambda key, entry_key: key == entry_key,
                                  payload=lambda entry: self._watch_view(entry[1], entry[2]),
                                  initial=lambda key: self._watch_view(key, None))}

    def leader_duties(self) -> list[LeaderDuty]:
        return [CronDuty()]

    def end_session(self, ctx: Context, session_id: int) -> None:
        names: dict[str, None] = {}
        for worker_id in self.by_session.pop(session_id, []):
            worker = self.workers.get((session_id, worker_id))
            if worker is not None:
                names.update(dict.fromkeys(self._remove_worker(ctx, worker, "worker session ended", counted=True)))
        self._dispatch(ctx, sorted(names))

    def holdings(self) -> Iterable[tuple]:
        for worker in self.workers.values():
            for job_id in worker.claims:
                job = self.jobs[job_id]
                yield self._assigned_effect(job, worker)

    def deadlines(self) -> Iterable[tuple[str, Any, int, float]]:
        for job in self.jobs.values():
            if job.state == RUNNING:
                yield "task_claim", job.id, job.token, job.timeout_ms / 1000.0
            elif job.state == DELAYED:
                # A new leader cannot know how much of the delay passed: it runs again in
                # full (a retry or delayed job starts late, never early).
                yield "task_delay", job.id, job.token, self._delay_ms(job) / 1000.0
        for schedule in self.schedules.values():
            if schedule.every_ms:
                yield "task_every", schedule.name, schedule.tick_token, schedule.every_ms / 1000.0

    # -- commands -------------------------------------------------------------------------

    def _submit_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (7,), "TASK_SUBMIT takes [name, payload, key, delay_ms, retries, timeout_ms, backoff_ms]")
        name = str_arg(args[0], MAX_NAME_BYTES, "handler name")
        payload = bytes_arg(args[1], MAX_PAYLOAD_BYTES, "payload")
        key = None if args[2] is None else str_arg(args[2], MAX_KEY_BYTES, "key")
        delay_ms = _bounded_int(args[3], "delay_ms", 0, MAX_DELAY_MS)
        retries = _bounded_int(args[4], "retries", 0, MAX_RETRIES)
        timeout_ms = _bounded_int(args[5], "timeout_ms", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS)
        backoff_ms = _bounded_int(args[6], "backoff_ms", 0, MAX_BACKOFF_MS)
        if key is not None and key in self.keys:
            return encode_result(Status.OK, [self.keys[key], False])
        if name not in self.catalog:
            return encode_result(Status.NOT_FOUND, UNKNOWN_HANDLER)
        if not self._room_for(len(payload) + _text_bytes(key)):
            return encode_result(Status.TOO_LARGE, "task queue full")
        job = self._create(ctx, name, payload, key, retries + 1, timeout_ms, backoff_ms, None, delay_ms)
        return encode_result(Status.OK, [job.id, True])

    def _worker_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        """Register (names, capacity: its free pool threads), drain (capacity 0) or leave (no
        names, capacity 0). ``returned``: claims of this worker it gives back unstarted (no
        pool thread was free, or it no longer serves the name): queued again at the front
        without using an attempt, before the registration takes effect."""
        arity(args, (3, 4), "TASK_WORKER takes [worker_id, names, capacity] or [..., returned]")
        worker_id = int_arg(args[0], "worker id")
        if not isinstance(args[1], list) or len(args[1]) > MAX_WORKER_NAMES:
            raise Invalid(f"names must be a list of at most {MAX_WORKER_NAMES} handler names")
        names = sorted({str_arg(name, MAX_NAME_BYTES, "handler name") for name in args[1]})
        capacity = _bounded_int(args[2], "capacity", 0, MAX_POOL)
        returned = _claim_list(args[3]) if len(args) == 4 else []
        key = (session_id, worker_id)
        worker = self.workers.get(key)
        given_back = self._give_back(ctx, worker, returned) if worker is not None else []
        if not names and capacity == 0:  # unregister: what it held is queued again, not counted
            if worker is None:
                return OK
            self.by_session[session_id].remove(worker_id)
            if not self.by_session[session_id]:
                del self.by_session[session_id]
            removed = self._remove_worker(ctx, worker, "worker left", counted=False)
            self._dispatch(ctx, sorted(set(removed) | set(given_back)))
            return OK
        new_names = [name for name in names if name not in self.catalog]
        if len(self.catalog) + len(new_names) > MAX_CATALOG and not self._evict_catalog(len(new_names)):
            self._dispatch(ctx, given_back, avoid=key)
            return encode_result(Status.TOO_LARGE, f"more than {MAX_CATALOG} handler names")
        if worker is None:
            if len(self.workers) >= MAX_WORKERS:
                return encode_result(Status.TOO_LARGE, f"more than {MAX_WORKERS} workers")
            worker = self.workers[key] = Worker(session_id, worker_id)
            self.by_session.setdefault(session_id, []).append(worker_id)
        for name in worker.names:
            if name not in names:
                self._unindex(name, key)
        for name in names:
            self.by_name.setdefault(name, {})[key] = None
            self.catalog[name] = ctx.index
        worker.names, worker.capacity = names, capacity
        self._dispatch(ctx, sorted(set(names) | set(given_back)), avoid=key if given_back else None)
        return OK

    def _complete_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (3,), "TASK_COMPLETE takes [job_id, token, result]")
        job = self._claimed(session_id, args)
        result = bytes_arg(args[2], MAX_PAYLOAD_BYTES, "result")
        if job is None:
            return encode_result(Status.NOT_HELD, "not the job's current claim")
        worker = self._end_claim(ctx, job, "completed", tell=False)
        self._finish(ctx, job, DONE, result=result)
        self._dispatch(ctx, worker.names if worker else [])
        return OK

    def _fail_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (4,), "TASK_FAIL takes [job_id, token, error, retry]")
        job = self._claimed(session_id, args)
        error = _text_arg(args[2], MAX_ERROR_BYTES, "error")
        if not isinstance(args[3], bool):
            raise Invalid("retry must be a bool")
        if job is None:
            return encode_result(Status.NOT_HELD, "not the job's current claim")
        worker = self._end_claim(ctx, job, "failed", tell=False)
        if args[3]:
            self._attempt_failed(ctx, job, error, backoff=True)
        else:
            self._finish(ctx, job, DEAD, error=error)
        self._dispatch(ctx, sorted(set(worker.names if worker else []) | {job.name}))
        return OK

    def _progress_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (3,), "TASK_PROGRESS takes [job_id, token, progress]")
        job = self._claimed(session_id, args)
        progress = bytes_arg(args[2], MAX_PROGRESS_BYTES, "progress")
        if job is None:
            return encode_result(Status.NOT_HELD, "not the job's current claim")
        grown = len(progress) - len(job.progress or b"")
        if grown > 0 and self.active_bytes + grown > MAX_ACTIVE_BYTES:
            return encode_result(Status.TOO_LARGE, "task queue full")
        self.active_bytes += grown
        job.progress = progress
        return OK

    def _cancel_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (1,), "TASK_CANCEL takes [job_id]")
        job = self.jobs.get(int_arg(args[0], "job id"))
        if job is None:
            return encode_result(Status.NOT_FOUND)
        before = job.state
        if before in TERMINAL:
            return encode_result(Status.OK, [before, False])
        names: list[str] = []
        if before == QUEUED:
            self.queues[job.name].remove(job.id)
            if not self.queues[job.name]:
                del self.queues[job.name]
        elif before == DELAYED:
            ctx.effects.append(Timer("task_delay", job.id, None, None))
        else:
            worker = self._end_claim(ctx, job, "cancelled", tell=True)
            names = worker.names if worker else []
        self._finish(ctx, job, CANCELLED, error="cancelled")
        self._dispatch(ctx, names)
        return encode_result(Status.OK, [before, True])

    def _schedule_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        if len(args) == 1:  # remove
            name = str_arg(args[0], MAX_NAME_BYTES, "schedule name")
            schedule = self.schedules.pop(name, None)
            if schedule is None:
                return encode_result(Status.NOT_FOUND)
            if schedule.every_ms:
                ctx.effects.append(Timer("task_every", name, None, None))
            return OK
        arity(args, (9,), "TASK_SCHEDULE takes [name, handler, every_ms, cron, payload, retries, timeout_ms, "
                          "backoff_ms, anchor_ms] or [name]")
        name = str_arg(args[0], MAX_NAME_BYTES, "schedule name")
        handler = str_arg(args[1], MAX_NAME_BYTES, "handler name")
        every_ms = None if args[2] is None else _bounded_int(args[2], "every_ms", MIN_EVERY_MS, MAX_EVERY_MS)
        cron = args[3]
        if (every_ms is None) == (cron is None):
            raise Invalid("give exactly one of every_ms and cron")
        if cron is not None and not cron_shape_ok(cron):
            raise Invalid("cron must have 5 fields (minute hour day-of-month month day-of-week) or be an alias")
        payload = bytes_arg(args[4], MAX_PAYLOAD_BYTES, "payload")
        retries = _bounded_int(args[5], "retries", 0, MAX_RETRIES)
        timeout_ms = _bounded_int(args[6], "timeout_ms", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS)
        backoff_ms = _bounded_int(args[7], "backoff_ms", 0, MAX_BACKOFF_MS)
        anchor_ms = int_arg(args[8], "anchor_ms")
        if handler not in self.catalog:
            return encode_result(Status.NOT_FOUND, UNKNOWN_HANDLER)
        old = self.schedules.get(name)
        if old is None and len(self.schedules) >= MAX_SCHEDULES:
            return encode_result(Status.TOO_LARGE, f"more than {MAX_SCHEDULES} schedules")
        schedule = Schedule(name, handler, every_ms, cron, payload, retries + 1, timeout_ms, backoff_ms, anchor_ms,
                            ctx.index)
        if old is not None:
            schedule.last_job = old.last_job  # its waiting run still holds back the next
        if old is not None and bool(old.every_ms) == bool(every_ms):
            # Same kind of slot ids: a redefinition never runs a slot that already ran.
            schedule.last_slot, schedule.skipped = old.last_slot, old.skipped
        self.schedules[name] = schedule
        if every_ms:
            schedule.tick_token = ctx.index
            ctx.effects.append(Timer("task_every", name, ctx.index, every_ms))
        elif old is not None and old.every_ms:
            ctx.effects.append(Timer("task_every", name, None, None))
        return encode_result(Status.OK, schedule.version)

    # -- engine commands (idempotent: each names what it expects) -------------------------

    def _expire_command(self, ctx: Context, args: list[Any]) -> bytes:
        arity(args, (2,), "TASK_EXPIRE takes [job_id, token]")
        job = self.jobs.get(int_arg(args[0], "job id"))
        token = int_arg(args[1], "token")
        if job is None or job.token != token:
            return encode_result(Status.STALE)
        if job.state == RUNNING:  # the visibility deadline passed: overrunning, paused or gone
            worker = self._end_claim(ctx, job, "timed out", tell=True)
            self._attempt_failed(ctx, job, f"timed out after {job.timeout_ms / 1000:g}s (attempt {job.attempt})",
                                 backoff=False, avoid=worker.key if worker else None)
            self._dispatch(ctx, worker.names if worker else [])
            return OK
        if job.state == DELAYED:
            ctx.effects.append(Timer("task_delay", job.id, None, None))
            self._make_runnable(ctx, job, front=False)
            return OK
        return encode_result(Status.STALE)

    def _slot_command(self, ctx: Context, args: list[Any]) -> bytes:
        arity(args, (3,), "TASK_SLOT takes [schedule, version, slot]")
        schedule = self.schedules.get(str_arg(args[0], MAX_NAME_BYTES, "schedule name"))
        version = int_arg(args[1], "version")
        slot = int_arg(args[2], "slot")
        if schedule is None or schedule.cron is None or schedule.version != version or slot <= schedule.last_slot:
            return encode_result(Status.STALE)
        self._run_slot(ctx, schedule, slot)
        return encode_result(Status.OK, slot)

    def _tick_command(self, ctx: Context, args: list[Any]) -> bytes:
        arity(args, (2,), "TASK_TICK takes [schedule, token]")
        schedule = self.schedules.get(str_arg(args[0], MAX_NAME_BYTES, "schedule name"))
        token = int_arg(args[1], "token")
        if schedule is None or not schedule.every_ms or schedule.tick_token != token:
            return encode_result(Status.STALE)
        schedule.tick_token = ctx.index
        ctx.effects.append(Timer("task_every", schedule.name, ctx.index, schedule.every_ms))
        self._run_slot(ctx, schedule, schedule.last_slot + 1)
        return encode_result(Status.OK, schedule.last_slot)

    # -- queries --------------------------------------------------------------------------

    def _job_query(self, args: list[Any], reader: Reader) -> bytes:
        job = self.jobs.get(int_arg(args[0], "job id"))
        if job is None:
            return encode_result(Status.NOT_FOUND)
        return encode_result(Status.OK, job.view())

    def _info_query(self, args: list[Any], reader: Reader) -> bytes:
        return encode_result(Status.OK, {
            "queued": {name: len(queue) for name, queue in sorted(self.queues.items())},
            "workers": [[w.session_id, w.worker_id, w.names, w.capacity, list(w.claims)]
                        for _, w in sorted(self.workers.items())],
            "active": self.active, "finished": len(self.finished), "handlers": sorted(self.catalog),
            "schedules": len(self.schedules)})

    def _watch_view(self, key: str, state: str | None) -> list[Any] | None:
        """The job's view (a watch's initial value: None if unknown here). A history entry
        whose job was evicted since answers [job_id, None, state] (no result kept)."""
        try:
            job_id = int(key)
        except ValueError:
            return None
        job = self.jobs.get(job_id)
        if job is not None:
            return job.view()
        return None if state is None else [job_id, None, state]

    # -- the queue ------------------------------------------------------------------------

    def _room_for(self, size: int) -> bool:
        """Room for one more active job holding ``size`` bytes (payload and key)."""
        return self.active < MAX_ACTIVE_JOBS and self.active_bytes + size <= MAX_ACTIVE_BYTES

    def _create(self, ctx: Context, name: str, payload: bytes, key: str | None, max_attempts: int,
                timeout_ms: int, backoff_ms: int, origin: list[Any] | None, delay_ms: int) -> Job:
        job = self.jobs[ctx.index] = Job(ctx.index, name, payload, key, max_attempts, timeout_ms, backoff_ms,
                                         origin)
        self.active += 1
        self.active_bytes += job.held_bytes()
        if key is not None:
            self.keys[key] = job.id
        if delay_ms:
            self._delay(ctx, job, delay_ms)
        else:
            self._make_runnable(ctx, job, front=False)
        return job

    def _delay(self, ctx: Context, job: Job, delay_ms: int) -> None:
        job.state, job.token = DELAYED, ctx.index
        self.delays[job.id] = delay_ms
        ctx.effects.append(Timer("task_delay", job.id, ctx.index, delay_ms))

    def _delay_ms(self, job: Job) -> int:
        return self.delays.get(job.id, 0)

    def _make_runnable(self, ctx: Context, job: Job, front: bool, avoid: WorkerKey | None = None) -> None:
        job.state = QUEUED
        self.delays.pop(job.id, None)
        queue = self.queues.setdefault(job.name, deque())
        if front:
            queue.appendleft(job.id)
        else:
            queue.append(job.id)
        self._dispatch(ctx, [job.name], avoid)

    def _dispatch(self, ctx: Context, names: Iterable[str], avoid: WorkerKey | None = None) -> None:
        """Hand queued jobs of these handler names to workers with free slots, the oldest
        waiting job first across the names (a worker serving two names with a backlog on
        one still gets the other's jobs in their turn)."""
        pending = [name for name in dict.fromkeys(names) if self.queues.get(name)]
        while pending:
            name = min(pending, key=lambda candidate: self.queues[candidate][0])
            worker = self._free_worker(name, avoid)
            if worker is None:
                pending.remove(name)
                continue
            queue = self.queues[name]
            self._assign(ctx, self.jobs[queue.popleft()], worker)
            if not queue:
                del self.queues[name]
                pending.remove(name)

    def _free_worker(self, name: str, avoid: WorkerKey | None) -> Worker | None:
        """The worker serving ``name`` with the most free slots, then the least recently
        assigned; ``avoid`` (the worker that just lost a job by overrunning) only if no
        other has room."""
        best: Worker | None = None
        best_rank: tuple = ()
        for key in self.by_name.get(name, ()):
            worker = self.workers[key]
            free = worker.capacity - len(worker.claims)
            if free <= 0:
                continue
            rank = (key == avoid, -free, worker.last_assigned, key)
            if best is None or rank < best_rank:
                best, best_rank = worker, rank
        return best

    def _assign(self, ctx: Context, job: Job, worker: Worker) -> None:
        job.state, job.token, job.worker = RUNNING, ctx.index, worker.key
        job.attempt += 1
        worker.claims[job.id] = ctx.index
        worker.last_assigned = ctx.index
        ctx.effects.append(self._assigned_effect(job, worker))

    @staticmethod
    def _assigned_effect(job: Job, worker: Worker) -> TaskAssigned:
        return TaskAssigned("task_assigned", worker.session_id, worker.worker_id, job.id, job.token, job.name,
                            job.payload or b"", job.attempt, job.timeout_ms, job.origin)

    def _claimed(self, session_id: int, args: list[Any]) -> Job | None:
        """The job named by [job_id, token, ...] if that is its current claim, by this session."""
        job = self.jobs.get(int_arg(args[0], "job id"))
        token = int_arg(args[1], "token")
        if job is None or job.state != RUNNING or job.token != token or job.worker[0] != session_id:
            return None
        return job

    def _end_claim(self, ctx: Context, job: Job, reason: str, tell: bool) -> Worker | None:
        worker = self.workers.get(job.worker) if job.worker else None
        if worker is not None:
            worker.claims.pop(job.id, None)
        session_id, worker_id = job.worker or (0, 0)
        ctx.effects.append(ClaimEnded("task_revoked" if tell else "task_claim_ended", session_id, worker_id, job.id,
                                      job.token, reason, tell))
        job.worker = None
        return worker

    def _attempt_failed(self, ctx: Context, job: Job, error: str, backoff: bool,
                        avoid: WorkerKey | None = None) -> None:
        """An attempt ended without a result: retry (after backoff) or dead-letter."""
        if job.attempt >= job.max_attempts:
            self._finish(ctx, job, DEAD, error=error)
            return
        self._set_error(job, error)
        delay_ms = min(MAX_BACKOFF_MS, job.backoff_ms * (1 << min(job.attempt - 1, 30))) if backoff else 0
        if delay_ms:
            self._delay(ctx, job, delay_ms)
        else:
            self._make_runnable(ctx, job, front=True, avoid=avoid)

    def _set_error(self, job: Job, error: str) -> None:
        """Keep an active job's last error, cut to what MAX_ACTIVE_BYTES still has room for
        (a failure cannot be refused)."""
        room = MAX_ACTIVE_BYTES - (self.active_bytes - _text_bytes(job.error))
        if _text_bytes(error) > room:
            error = error.encode("utf-8")[:room].decode("utf-8", "ignore")
        self.active_bytes += _text_bytes(error) - _text_bytes(job.error)
        job.error = error

    def _give_back(self, ctx: Context, worker: Worker, returned: list[tuple[int, int]]) -> list[str]:
        """Queue again, at the front and without using an attempt, the claims ``worker``
        never started (those still current); their handler names."""
        names = set()
        # newest first, each to the front: the oldest claim ends up first in its queue
        for job_id, token in sorted(returned, key=lambda claim: claim[1], reverse=True):
            job = self.jobs.get(job_id)
            if job is None or job.state != RUNNING or job.token != token or job.worker != worker.key:
                continue
            self._end_claim(ctx, job, "given back", tell=False)
            job.attempt -= 1
            job.state = QUEUED
            self.queues.setdefault(job.name, deque()).appendleft(job.id)
            names.add(job.name)
        return sorted(names)

    def _remove_worker(self, ctx: Context, worker: Worker, reason: str, counted: bool) -> list[str]:
        """Drop a worker; its claims are queued again (``counted``: as failed attempts, so a
        job that keeps killing its workers ends dead-lettered). Returns the handler names
        to dispatch."""
        key = worker.key
        del self.workers[key]
        for name in worker.names:
            self._unindex(name, key)
        names = set()
        # newest first, each to the front: the oldest claim ends up first in its queue
        for job_id in reversed(list(worker.claims)):
            job = self.jobs[job_id]
            self._end_claim(ctx, job, reason, tell=False)
            if counted:
                self._attempt_failed(ctx, job, f"{reason} (attempt {job.attempt})", backoff=False)
            else:
                self._make_runnable(ctx, job, front=True)
            names.add(job.name)
        return sorted(names)

    def _unindex(self, name: str, key: WorkerKey) -> None:
        serving = self.by_name.get(name)
        if serving is not None:
            serving.pop(key, None)
            if not serving:
                del self.by_name[name]

    def _evict_catalog(self, needed: int) -> bool:
        """Forget the oldest handler names nobody serves, queues or schedules."""
        in_use = set(self.by_name) | set(self.queues) | {s.handler for s in self.schedules.values()}
        in_use |= {job.name for job in self.jobs.values() if job.state not in TERMINAL}
        idle = sorted((index, name) for name, index in self.catalog.items() if name not in in_use)
        if len(self.catalog) - len(idle) + needed > MAX_CATALOG:
            return False
        for _, name in idle[:len(self.catalog) + needed - MAX_CATALOG]:
            del self.catalog[name]
        return True

    def _finish(self, ctx: Context, job: Job, state: str, result: bytes | None = None,
                error: str | None = None) -> None:
        self.active -= 1
        self.active_bytes -= job.held_bytes()
        self.delays.pop(job.id, None)
        job.state, job.result, job.payload = state, result, None
        if error is not None:
            job.error = error
        elif state == DONE:
            job.error = None
        self.finished.append(job.id)
        self.finished_bytes += job.kept_bytes()
        self.history.append([ctx.index, str(job.id), state])
        ctx.effects.append(JobFinished("task_finished", job.id, state))
        while self.finished and (len(self.finished) > MAX_FINISHED_JOBS or self.finished_bytes > MAX_FINISHED_BYTES):
            old = self.jobs.pop(self.finished.popleft())
            self.finished_bytes -= old.kept_bytes()
            if old.key is not None and self.keys.get(old.key) == old.id:
                del self.keys[old.key]

    def _run_slot(self, ctx: Context, schedule: Schedule, slot: int) -> None:
        """Enqueue the schedule's run for ``slot``, unless its previous run still waits
        (queued or delayed: no worker takes it, so runs would pile up) or the queue is full;
        a slot not run is counted in ``skipped``."""
        schedule.last_slot = slot
        previous = self.jobs.get(schedule.last_job)
        if (previous is not None and previous.state in (QUEUED, DELAYED)) or schedule.handler not in self.catalog \
                or not self._room_for(len(schedule.payload)):
            schedule.skipped += 1
            return
        job = self._create(ctx, schedule.handler, schedule.payload, None, schedule.max_attempts, schedule.timeout_ms,
                           schedule.backoff_ms, [schedule.name, slot], 0)
        schedule.last_job = job.id

    # -- snapshots ------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {"jobs": [job.to_state() for job in self.jobs.values()],
                "queues": [[name, list(queue)] for name, queue in self.queues.items()],
                "workers": [worker.to_state() for worker in self.workers.values()],
                "catalog": list(self.catalog.items()),
                "finished": list(self.finished),
                "delays": list(self.delays.items()),
                "schedules": [schedule.to_state() for schedule in self.schedules.values()],
                "history": self.history.to_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.__init__()
        for item in state["jobs"]:
            job = Job.from_state(item)
            self.jobs[job.id] = job
            if job.key is not None:
                self.keys[job.key] = job.id
            if job.state in TERMINAL:
                self.finished_bytes += job.kept_bytes()
            else:
                self.active += 1
                self.active_bytes += job.held_bytes()
        self.queues = {name: deque(ids) for name, ids in state["queues"]}
        for session_id, worker_id, names, capacity, claims, last_assigned in state["workers"]:
            worker = Worker(session_id, worker_id)
            worker.names, worker.capacity, worker.last_assigned = names, capacity, last_assigned
            worker.claims = {job_id: token for job_id, token in claims}
            self.workers[worker.key] = worker
            self.by_session.setdefault(session_id, []).append(worker_id)
            for name in names:
                self.by_name.setdefault(name, {})[worker.key] = None
        self.catalog = {name: index for name, index in state["catalog"]}
        self.finished = deque(state["finished"])
        self.delays.update({job_id: ms for job_id, ms in state["delays"]})
        for item in state["schedules"]:
            schedule = Schedule.from_state(item)
            self.schedules[schedule.name] = schedule
        self.history.load_state(state["history"])


def _bounded_int(value: Any, what: str, minimum: int, maximum: int) -> int:
    value = int_arg(value, what, minimum)
    if value > maximum:
        raise Invalid(f"{what} must be at most {maximum}")
    return value


def _claim_list(value: Any) -> list[tuple[int, int]]:
    """[[job_id, token], ...]: claims a worker gives back."""
    if not isinstance(value, list) or len(value) > MAX_POOL:
        raise Invalid(f"returned must be a list of at most {MAX_POOL} [job_id, token] pairs")
    claims = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise Invalid("a returned claim is [job_id, token]")
        claims.append((int_arg(item[0], "job id"), int_arg(item[1], "token")))
    return claims


def _text_arg(value: Any, limit: int, what: str) -> str:
    if not isinstance(value, str) or len(value.encode("utf-8")) > limit:
        raise Invalid(f"{what} must be a str of at most {limit} bytes")
    return value


# -- cron, and the leader duty that proposes due cron slots ----------------------------------


def check_cron(text: Any) -> str:
    """``text`` if croniter accepts it as a 5-field expression (or an alias such as
    "@hourly"); raises ValueError saying why not."""
    if not cron_shape_ok(text):
        raise ValueError(f"cron must be 5 fields (minute hour day-of-month month day-of-week) or one of "
                         f"{', '.join(CRON_ALIASES)}, at most {MAX_CRON_BYTES} bytes: {text!r}")
    from croniter import croniter

    if not croniter.is_valid(text.strip()):
        raise ValueError(f"not a valid cron expression: {text!r}")
    try:
        cron_next(text.strip(), 0.0)
    except Exception:  # croniter's CroniterBadDateError: e.g. "0 0 31 2 *"
        raise ValueError(f"cron expression never fires: {text!r}") from None
    return text.strip()


def cron_next(text: str, after: float) -> float:
    """The first time (epoch seconds, UTC) strictly after ``after`` that ``text`` names."""
    from datetime import datetime, timezone

    from croniter import croniter

    return croniter(text, datetime.fromtimestamp(after, timezone.utc)).get_next(float)


def cron_latest(text: str, at: float) -> float:
    """The latest time (epoch seconds, UTC) at or before ``at`` that ``text`` names."""
    from datetime import datetime, timezone

    from croniter import croniter

    minute = datetime.fromtimestamp(at // 60 * 60, timezone.utc)
    if croniter.match(text, minute):
        return minute.timestamp()
    return croniter(text, minute).get_prev(float)


def _utc(seconds: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M")


class CronDuty(LeaderDuty):
    """The leader proposes each cron schedule's due slot (id = epoch minute of the latest
    cron time at or before its wall clock) once; the machine takes a slot only if it is
    newer than the schedule's last, so repeats and other leaders' proposals are harmless.
    A proposal not applied within RETRY seconds (lost in a leader change) is made again."""

    RETRY = 2.0
    # a last slot this far past our wall clock was run by a leader whose clock is ahead
    AHEAD_WARNING = 120.0

    def __init__(self) -> None:
        # (schedule, version, last slot) -> the next cron time after it (epoch s); a pure
        # function of its key, cached so a tick costs a comparison per schedule
        self._next: dict[tuple[str, int, int], float] = {}
        self._proposed: dict[tuple[str, int], tuple[int, float]] = {}  # -> (slot, when, monotonic)
        self._bad: set[tuple[str, int]] = set()
        self._warned_ahead: dict[tuple[str, int], int] = {}  # -> the last slot warned about

    def became_leader(self, machine: Any, monotonic_now: float, wall_now: float) -> None:
        self._proposed.clear()

    def due(self, machine: Any, monotonic_now: float, wall_now: float) -> list[bytes]:
        table: TaskTable = machine.tasks
        commands = []
        for schedule in table.schedules.values():
            if schedule.cron is None or (schedule.name, schedule.version) in self._bad:
                continue
            try:
                slot = self._due_slot(schedule, wall_now)
            except Exception as exc:  # a duty never raises; a bad expression is skipped
                log.warning("cron schedule %r: %s", schedule.name, exc)
                self._bad.add((schedule.name, schedule.version))
                continue
            if slot is None:
                continue
            proposed = self._proposed.get((schedule.name, schedule.version))
            if proposed is not None and proposed[0] == slot and monotonic_now - proposed[1] < self.RETRY:
                continue
            self._proposed[(schedule.name, schedule.version)] = (slot, monotonic_now)
            commands.append(encode_command(Op.TASK_SLOT, 0, 0, 0, [schedule.name, schedule.version, slot]))
        if len(self._next) > 2 * MAX_SCHEDULES:
            live = {(s.name, s.version, s.last_slot) for s in table.schedules.values()}
            self._next = {key: value for key, value in self._next.items() if key in live}
        self._forget_removed(table)
        return commands

    def _forget_removed(self, table: "TaskTable") -> None:
        """Keep per-schedule memory to schedules that exist (a redefinition is a new version)."""
        if len(self._proposed) + len(self._bad) + len(self._warned_ahead) <= len(table.schedules):
            return
        live = {(s.name, s.version) for s in table.schedules.values() if s.cron is not None}
        self._proposed = {key: value for key, value in self._proposed.items() if key in live}
        self._bad &= live
        self._warned_ahead = {key: value for key, value in self._warned_ahead.items() if key in live}

    def _due_slot(self, schedule: Schedule, wall_now: float) -> int | None:
        key = (schedule.name, schedule.version, schedule.last_slot)
        next_time = self._next.get(key)
        if next_time is None:
            after = schedule.last_slot * 60.0 if schedule.last_slot else schedule.anchor_ms / 1000.0
            next_time = self._next[key] = cron_next(schedule.cron, after)
        if wall_now < next_time:
            if schedule.last_slot * 60.0 > wall_now + self.AHEAD_WARNING \
                    and self._warned_ahead.get((schedule.name, schedule.version)) != schedule.last_slot:
                self._warned_ahead[(schedule.name, schedule.version)] = schedule.last_slot
                log.warning("cron schedule %r: its last run was for %s UTC, %.0f s past this leader's clock "
                            "(a leader with a fast clock ran it): no run until then", schedule.name,
                            _utc(schedule.last_slot * 60.0), schedule.last_slot * 60.0 - wall_now)
            return None
        # Only the latest due time runs: after an outage the backlog is one run, not many.
        slot = int(cron_latest(schedule.cron, wall_now) // 60)
        return slot if slot > schedule.last_slot else None
