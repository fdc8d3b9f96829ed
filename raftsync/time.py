"""Synchronized wall-clock time and hybrid logical clocks (``raftsync.time``).

Every clock answers:

- ``now()``: the current UTC time, an aware ``datetime``;
- ``now_interval()``: ``TimeInterval(earliest, latest)``, which contains the true UTC
  time whenever the clock's assumptions (below) hold — or raises
  :class:`~raftsync.errors.ClockUnsynchronized` when the clock cannot give a bound;
- ``physical_time()``: seconds since the epoch, best effort; never blocks, never raises
  (it drives the hybrid logical clock, which must always answer).

``LocalClock`` reads this host's wall clock. Its bound is the one the kernel keeps
(Linux ``adjtimex``: the ``maxerror`` that chronyd or ntpd maintain and that the kernel
grows by 500 ppm between their updates), or ``max_error=`` if you know better. When the
kernel says its clock is unsynchronized (no time daemon), ``now_interval()`` raises.

``NtpClock(servers)`` asks NTP servers itself (ntplib); it never sets the host's clock.

Guarantees of ``NtpClock``:

- Bound. A server's answer gives the interval offset ± (root delay/2 + root dispersion
  + round trip/2 + the server's precision + how far this host's wall and monotonic
  clocks disagreed during the exchange). The answers of one round are combined by
  interval intersection (Marzullo): the result is the smallest interval that holds
  every point covered by the intervals of MORE THAN HALF of the servers that answered;
  a server whose interval holds no such point is a falseticker and is ignored.
  ``now_interval()`` contains true UTC if (a) more than half of the servers that
  answered that round were truechimers (their true time within their own claimed
  error) and (b) this host's monotonic clock ran within ``drift_ppm`` (default
  15 ppm, NTP's PHI) of the true rate since then: the interval is carried forward on
  the monotonic clock and widens by ``drift_ppm`` x the time since that round.
  Classic Marzullo keeps only the largest clique's intersection; that can exclude the
  truth when a falseticker overlaps some truechimers (see ``marzullo``), so the
  majority hull is used instead: wider only where the answers are ambiguous.
- Never hung on. A daemon thread polls every server in parallel, each query bounded by
  ``timeout``, every ``poll_interval`` seconds; the first round starts when the clock
  is made. ``now()``/``now_interval()`` wait for that first round only (until at
  most ``timeout`` + 0.6 s after the clock was made) and never for later ones; a server whose name resolution hangs
  is reported and skipped until its stuck query returns.
- Honest when unsure. With no agreeing majority in any round so far (no answers, or
  answers that disagree) ``now()``/``now_interval()``/``time()`` raise
  ``ClockUnsynchronized``: a careful caller wants to know, and a silent fallback to
  the local clock with a made-up bound would be consumed by code that trusts the bound.
  (``physical_time()`` does fall back to the local clock: ordering never fails.)

Failure modes: a later round with no majority, or with no answers at all, keeps the
previous estimate, whose bound keeps growing at ``drift_ppm``; ``status()`` says what
happened to every server (unreachable, timed out, unsynchronized, kiss-o'-death,
falseticker). ``now()`` may step backwards between rounds (a correction, each answer
within its bound): order events with the hybrid logical clock, not ``now()``. A step of
the host's wall clock between rounds does not move an ``NtpClock`` (it runs on the
monotonic clock); a step during an exchange widens or rejects that answer. In a child
made by ``os.fork()`` the poller thread is gone: the estimate ages, its bound grows.

Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014):
``HybridLogicalClock.now()`` stamps a local or send event, ``update(received)`` a
receive event, merging the sender's stamp. Stamps are ``HLCTimestamp(physical_ms,
logical)``, ordered as pairs, sent as a msgpack pair. Guarantees: stamps of one clock
strictly increase, even when its physical clock steps back; if event e happened before
f (same clock, or f's clock merged e's stamp or a later one), stamp(e) < stamp(f);
``physical_ms`` is the largest physical time (ms) that reached the clock, so it stays
within the cluster's clock skew of real time. ``logical`` stays <= 65535: when it would
overflow, ``physical_ms`` moves on by 1 ms instead (order is kept).
"""

from __future__ import annotations

import ctypes
import math
import threading
import time as _time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import ntplib

from .errors import BadRequest, ClockUnsynchronized, Closed, ConfigError, Timeout

__all__ = [
    "Clock", "LocalClock", "NtpClock", "TimeInterval", "ClockStatus", "ServerStatus",
    "HybridLogicalClock", "HLCTimestamp", "Agreement", "marzullo", "parse_server", "clock_from_config",
]

NTP_PORT = 123
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A round may finish this long after ``timeout``: the query threads' sockets time out
# at ``timeout`` and need a moment to report it.
_ROUND_GRACE = 0.1
# The first read waits for the first round until that round's deadline plus this
# (the poller thread may be slow to publish the result on a loaded machine).
_FIRST_READ_SLACK = 0.5
# Two floats ~3.9e9 (NTP seconds) differ by 4.8e-7 s per ulp: timestamps that went
# through ntplib's float arithmetic are compared with this slack.
_FLOAT_SLACK = 1e-5


def _utc(seconds: float, rounding: Callable[[float], float] = round) -> datetime:
    """UTC seconds since the epoch as an aware datetime, rounded to microseconds."""
    return _EPOCH + timedelta(microseconds=int(rounding(seconds * 1e6)))


class TimeInterval(NamedTuple):
    """The true UTC time lies within [earliest, latest] (aware datetimes)."""

    earliest: datetime
    latest: datetime

    @property
    def midpoint(self) -> datetime:
        return self.earliest + (self.latest - self.earliest) / 2

    @property
    def error(self) -> timedelta:
        """Half the interval's width: how far ``midpoint`` may be from the true time."""
        return (self.latest - self.earliest) / 2

    def holds(self, moment: datetime) -> bool:
        return self.earliest <= moment <= self.latest


def _interval(low: float, high: float) -> TimeInterval:
    # Round outwards to whole microseconds so the rounding never narrows the bound.
    return TimeInterval(_utc(low, math.floor), _utc(high, math.ceil))


@dataclass(frozen=True)
class ServerStatus:
    """What the last polling round learned from one NTP server."""

    server: str                 # "host:port"
    reachable: bool             # gave a usable answer in the last round
    offset: float | None        # last usable answer: server time - this host's wall clock, s
    delay: float | None         # its round trip, s
    error: float | None         # half-width of its interval when it answered, s
    stratum: int | None
    falseticker: bool           # last round: its interval held no point a majority agreed on
    problem: str | None         # why the last round got no usable answer from it
    age: float | None           # seconds since its last usable answer


@dataclass(frozen=True)
class ClockStatus:
    """A clock's state: whether it can bound the time, and how well."""

    synchronized: bool          # now_interval() answers (else it raises ClockUnsynchronized)
    offset: float | None        # estimated true UTC - this host's wall clock, s
    error: float | None         # half-width of now_interval() at this moment, s
    problem: str | None         # why it is not synchronized, or what went wrong last round
    rounds: int = 0             # polling rounds finished
    servers: tuple[ServerStatus, ...] = ()


class Clock:
    """A source of UTC time with an error bound (see the module docstring)."""

    def time(self) -> float:
        """The current UTC time in seconds since the epoch (the best estimate)."""
        raise NotImplementedError

    def now(self) -> datetime:
        """The current UTC time, an aware datetime."""
        return _utc(self.time())

    def now_interval(self) -> TimeInterval:
        """An interval that contains the true UTC time; raises ``ClockUnsynchronized``."""
        raise NotImplementedError

    def physical_time(self) -> float:
        """Seconds since the epoch, best effort: never blocks, never raises."""
        return _time.time()

    def status(self) -> ClockStatus:
        raise NotImplementedError

    def close(self) -> None:
        """Stop background work (if any)."""

    def __enter__(self) -> "Clock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the local clock ------------------------------------------------------------------


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """Linux ``struct timex`` (include/uapi/linux/timex.h)."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11),
    ]


_TIME_ERROR = 5          # adjtimex's answer when the clock is not synchronized
_STA_UNSYNC = 0x0040


_adjtimex: Any = None


def _kernel_max_error() -> tuple[float | None, str]:
    """(the kernel's maximum error of the wall clock in seconds, or None; why not)."""
    global _adjtimex
    if _adjtimex is None:
        try:
            _adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
        except Exception:  # not Linux (no adjtimex), or no C library to load
            _adjtimex = False
    if _adjtimex is False:
        return None, "this platform does not report its clock's error (no adjtimex)"
    adjtimex = _adjtimex
    timex = _Timex()     # modes = 0: a read-only query, no privilege needed
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None, f"adjtimex failed (errno {ctypes.get_errno()})"
    if state == _TIME_ERROR or timex.status & _STA_UNSYNC:
        return None, "the kernel reports its clock unsynchronized (no NTP daemon disciplines it)"
    return timex.maxerror / 1e6, ""


class LocalClock(Clock):
    """This host's wall clock. ``max_error``: a bound you vouch for (seconds); by
    default the kernel's own ``maxerror`` (kept by chronyd/ntpd), when it has one."""

    def __init__(self, max_error: float | None = None) -> None:
        if max_error is not None and (isinstance(max_error, bool) or not isinstance(max_error, (int, float))
                                      or not 0 <= max_error < math.inf):
            raise ConfigError("max_error", f"must be a finite number of seconds >= 0, not {max_error!r}")
        self.max_error = max_error

    def time(self) -> float:
        return _time.time()

    def _error(self) -> tuple[float | None, str]:
        if self.max_error is not None:
            return float(self.max_error), ""
        return _kernel_max_error()

    def now_interval(self) -> TimeInterval:
        error, why = self._error()
        now = _time.time()
        if error is None:
            raise ClockUnsynchronized(f"LocalClock has no error bound: {why}; configure NTP servers "
                                      "(NtpClock, ntp_servers) or pass LocalClock(max_error=...)")
        return _interval(now - error, now + error)

    def status(self) -> ClockStatus:
        error, why = self._error()
        return ClockStatus(synchronized=error is not None, offset=0.0, error=error, problem=why or None)

    def __repr__(self) -> str:
        return f"LocalClock(max_error={self.max_error!r})"


# -- combining intervals --------------------------------------------------------------


class Agreement(NamedTuple):
    low: float                  # the majority hull: every point covered by > n/2 intervals
    high: float
    agreeing: frozenset[int]    # indices of intervals holding such a point (the truechimers)
    clique: int                 # the most intervals that share one point


def marzullo(intervals: Sequence[tuple[float, float]]) -> Agreement | None:
    """Intersect closed intervals the way NTP selects clocks (Marzullo's sweep).

    Returns the smallest interval holding every point that more than half of the
    intervals cover, the intervals that hold such a point, and the size of the
    largest clique; None when no point is covered by a majority. Intervals that only
    touch share their end point.

    Why the hull of the majority points and not the largest clique's intersection:
    if more than half of the intervals hold the truth, the truth is covered by more
    than half of them, so it lies in the hull; the largest clique can be elsewhere
    (two wide truechimers overlapping two falsetickers outnumber the three
    truechimers at the truth).
    """
    count = len(intervals)
    if count == 0:
        return None
    edges = []
    for index, (low, high) in enumerate(intervals):
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"interval {index} is not a finite [low, high]: {(low, high)!r}")
        edges.append((low, 0, index))    # 0 sorts before 1: at equal points, enter first
        edges.append((high, 1, index))
    edges.sort()
    needed = count // 2 + 1
    covering = clique = 0
    regions: list[tuple[float, float]] = []
    start = 0.0
    for point, kind, _ in edges:
        if kind == 0:
            covering += 1
            clique = max(clique, covering)
            if covering == needed:
                start = point
        else:
            if covering == needed:
                regions.append((start, point))
            covering -= 1
    if not regions:
        return None
    agreeing = frozenset(i for i, (low, high) in enumerate(intervals)
                         if any(low <= end and high >= begin for begin, end in regions))
    return Agreement(regions[0][0], regions[-1][1], agreeing, clique)


# -- the NTP clock ----------------------------------------------------------------------


def parse_server(server: Any, setting: str = "servers") -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[v6addr]:port"``, a bare IPv6 address or a
    ``(host, port)`` pair, as ``(host, port)``; the port defaults to 123."""
    if isinstance(server, (tuple, list)) and len(server) == 2:
        host, port = server
    elif isinstance(server, str):
        text = server.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (NTP_PORT if not rest else None)
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:                          # a name, an IPv4 address, or a bare IPv6 address
            host, port = text, NTP_PORT
    else:
        raise ConfigError(setting, f"{server!r} is not 'host', 'host:port' or (host, port)")
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ConfigError(setting, f"{server!r}: the host must be a non-empty name or address")
    try:
        number = int(port) if not isinstance(port, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number < 65536:
        raise ConfigError(setting, f"{server!r}: the port must be in 1..65535")
    return host, number


def _server_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Unusable(Exception):
    """An answer (or its absence) that cannot be used; the text says why."""


@dataclass(frozen=True)
class _Sample:
    center: float       # estimated true UTC seconds at monotonic time ``at``
    half: float         # half-width of the interval around ``center``
    at: float           # this host's monotonic clock when the answer came
    offset: float
    delay: float
    stratum: int


@dataclass(frozen=True)
class _Estimate:
    low: float          # true UTC lies in [low, high] at monotonic time ``at``
    high: float
    at: float


class _Round:
    """The answers of one polling round; answers after it closed are dropped."""

    def __init__(self, size: int) -> None:
        self._cond = threading.Condition()
        self._answers: dict[int, _Sample | str] = {}
        self._size = size
        self._closed = False

    def put(self, index: int, answer: _Sample | str) -> None:
        with self._cond:
            if not self._closed:
                self._answers[index] = answer
                self._cond.notify_all()

    def close(self, deadline: float) -> dict[int, _Sample | str]:
        with self._cond:
            self._cond.wait_for(lambda: len(self._answers) >= self._size,
                                max(0.0, deadline - _time.monotonic()))
            self._closed = True
            return dict(self._answers)


class NtpClock(Clock):
    """UTC from several NTP servers, combined by interval intersection (see module doc).

    ``servers``: ``"host"``, ``"host:port"`` or ``(host, port)``; ``timeout``: seconds
    per query (the first ``now()`` waits for the first round: about that long); ``poll_interval``: seconds
    between rounds; ``drift_ppm``: the assumed worst rate error of this host's
    monotonic clock; ``min_agreeing``: a round also needs at least this many servers
    agreeing (a majority of one is one server's word); ``version``: NTP version sent.
    """

    def __init__(self, servers: Iterable[Any], timeout: float = 1.0, poll_interval: float = 64.0, *,
                 drift_ppm: float = 15.0, min_agreeing: int = 1, version: int = 4) -> None:
        if isinstance(servers, (str, bytes)):
            raise ConfigError("servers", "must be a list of servers, not one string")
        try:
            self._servers = [parse_server(s) for s in servers]
        except TypeError:
            raise ConfigError("servers", f"must be a list of servers, not {servers!r}") from None
        if not self._servers:
            raise ConfigError("servers", "at least one NTP server is needed")
        for name, value, low in (("timeout", timeout, 0.0), ("poll_interval", poll_interval, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
                raise ConfigError(name, f"must be a finite number of seconds > 0, not {value!r}")
        if isinstance(drift_ppm, bool) or not isinstance(drift_ppm, (int, float)) or not 0 <= drift_ppm < 1e6:
            raise ConfigError("drift_ppm", f"must be a number in [0, 1e6), not {drift_ppm!r}")
        if isinstance(min_agreeing, bool) or not isinstance(min_agreeing, int) or not 1 <= min_agreeing <= len(self._servers):
            raise ConfigError("min_agreeing", f"must be an int in 1..{len(self._servers)}, not {min_agreeing!r}")
        if version not in (1, 2, 3, 4):
            raise ConfigError("version", f"NTP versions are 1..4, not {version!r}")
        self.servers = [_server_name(h, p) for h, p in self._servers]
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.drift = drift_ppm * 1e-6
        self.min_agreeing = min_agreeing
        self.version = version

        self._cond = threading.Condition()
        self._estimate: _Estimate | None = None
        self._rounds = 0
        self._round_running = False
        self._poll_requested = False
        self._closed = False
        self._problem: str | None = "the first polling round has not finished"
        self._server_state: list[dict[str, Any]] = [
            dict(reachable=False, sample=None, answered_at=None, falseticker=False, problem="not polled yet")
            for _ in self._servers]
        self._queries: list[threading.Thread | None] = [None] * len(self._servers)
        self._first_round = threading.Event()
        # The first round's deadline counts from here, so the first read knows how
        # long it may have to wait however late the poller thread gets going.
        self._first_deadline = _time.monotonic() + self.timeout + _ROUND_GRACE
        self._poller = threading.Thread(target=self._poll_loop, name="raftsync-ntp-poller", daemon=True)
        self._poller.start()

    # -- reading -------------------------------------------------------------------

    def _current(self) -> _Estimate:
        if self._closed:
            raise Closed("NtpClock is closed")
        # Only the first round is ever waited for, and it is bounded by the timeout.
        self._first_round.wait(max(0.0, self._first_deadline + _FIRST_READ_SLACK - _time.monotonic()))
        with self._cond:
            estimate, problem = self._estimate, self._problem
        if estimate is None:
            raise ClockUnsynchronized(f"NtpClock({', '.join(self.servers)}): {problem}")
        return estimate

    def _bounds(self, estimate: _Estimate, now: float) -> tuple[float, float]:
        elapsed = max(0.0, now - estimate.at)
        return (estimate.low + elapsed - self.drift * elapsed,
                estimate.high + elapsed + self.drift * elapsed)

    def now_interval(self) -> TimeInterval:
        estimate = self._current()
        return _interval(*self._bounds(estimate, _time.monotonic()))

    def time(self) -> float:
        low, high = self._bounds(self._current(), _time.monotonic())
        return (low + high) / 2

    def physical_time(self) -> float:
        with self._cond:
            estimate = self._estimate
        if estimate is None:
            return _time.time()
        low, high = self._bounds(estimate, _time.monotonic())
        return (low + high) / 2

    def status(self) -> ClockStatus:
        with self._cond:
            estimate, problem, rounds = self._estimate, self._problem, self._rounds
            states = [dict(s) for s in self._server_state]
        now = _time.monotonic()
        offset = error = None
        if estimate is not None:
            low, high = self._bounds(estimate, now)
            offset, error = (low + high) / 2 - _time.time(), (high - low) / 2
        servers = []
        for name, state in zip(self.servers, states):
            sample: _Sample | None = state["sample"]
            servers.append(ServerStatus(
                server=name, reachable=state["reachable"], offset=sample.offset if sample else None,
                delay=sample.delay if sample else None, error=sample.half if sample else None,
                stratum=sample.stratum if sample else None, falseticker=state["falseticker"],
                problem=state["problem"],
                age=None if state["answered_at"] is None else max(0.0, now - state["answered_at"])))
        return ClockStatus(synchronized=estimate is not None and not self._closed, offset=offset, error=error,
                           problem=problem, rounds=rounds, servers=tuple(servers))

    # -- polling -------------------------------------------------------------------

    def poll(self, timeout: float | None = None) -> ClockStatus:
        """Run a polling round now and wait until one that started after this call has
        finished (default wait: two rounds' worth); raises ``Timeout`` past that."""
        wait = 2 * (self.timeout + _ROUND_GRACE) + 1.0 if timeout is None else timeout
        with self._cond:
            if self._closed:
                raise Closed("NtpClock is closed")
            target = self._rounds + (2 if self._round_running else 1)
            self._poll_requested = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._rounds >= target or self._closed, wait):
                raise Timeout(f"no NTP polling round finished within {wait:.2f} s")
            if self._rounds < target:
                raise Closed("NtpClock is closed")
        return self.status()

    def close(self) -> None:
        """Stop polling; later reads raise ``Closed``. Waits at most ``timeout`` + 1 s."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._poller is not threading.current_thread():
            self._poller.join(self.timeout + 1.0)

    def _poll_loop(self) -> None:
        deadline = self._first_deadline
        while True:
            with self._cond:
                if self._closed:
                    break
                self._round_running = True
                self._poll_requested = False
            try:
                self._run_round(deadline)
            except Exception as exc:  # the poller must outlive anything a round does
                with self._cond:
                    self._problem = f"polling round failed: {exc!r}"
            with self._cond:
                self._round_running = False
                self._rounds += 1
                self._cond.notify_all()
            self._first_round.set()
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._poll_requested, self.poll_interval)
            deadline = _time.monotonic() + self.timeout + _ROUND_GRACE
        self._first_round.set()

    def _run_round(self, deadline: float) -> None:
        answers = _Round(len(self._servers))
        for index, (host, port) in enumerate(self._servers):
            previous = self._queries[index]
            if previous is not None and previous.is_alive():
                answers.put(index, "its previous query has not returned yet (slow name resolution?)")
                continue
            query = threading.Thread(target=self._query_into, args=(answers, index, host, port), daemon=True,
                                     name=f"raftsync-ntp-{_server_name(host, port)}")
            self._queries[index] = query
            query.start()
        results = answers.close(deadline)
        for index in range(len(self._servers)):
            results.setdefault(index, f"no answer within {self.timeout:g} s")
        self._combine(results)

    def _query_into(self, answers: _Round, index: int, host: str, port: int) -> None:
        try:
            answers.put(index, self._query(host, port))
        except _Unusable as exc:
            answers.put(index, str(exc))
        except ntplib.NTPException as exc:     # ntplib's timeout, or a malformed packet
            timed_out = str(exc).startswith("No response")
            answers.put(index, f"no answer within {self.timeout:g} s" if timed_out else str(exc))
        except OSError as exc:                 # unresolvable name, unreachable network, ...
            answers.put(index, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # report anything else as this server's problem
            answers.put(index, f"unexpected {exc!r}")

    def _query(self, host: str, port: int) -> _Sample:
        mono_before, wall_before = _time.monotonic(), _time.time()
        stats = ntplib.NTPClient().request(host, version=self.version, port=port, timeout=self.timeout)
        wall_after, mono_after = _time.time(), _time.monotonic()
        if stats.mode != 4:
            raise _Unusable(f"answered in mode {stats.mode}, not as a server (4)")
        if stats.leap == 3:
            raise _Unusable("the server says its clock is unsynchronized (leap indicator 3)")
        if stats.stratum == 0:
            code = stats.ref_id.to_bytes(4, "big").decode("ascii", "replace").strip("\0")
            raise _Unusable(f"kiss-o'-death {code!r} (stratum 0)")
        if stats.stratum > 15:
            raise _Unusable(f"stratum {stats.stratum}: the server is unsynchronized")
        if stats.tx_timestamp == 0:
            raise _Unusable("the answer has no transmit timestamp")
        # ntplib takes any datagram from the server's address: make sure this one
        # answers our request (it echoes our transmit time), not an old or forged one.
        if not wall_before - _FLOAT_SLACK <= stats.orig_time <= wall_after + _FLOAT_SLACK:
            raise _Unusable("the answer's origin timestamp is not our request's (stale or forged reply)")
        delay = stats.delay
        if delay < -_FLOAT_SLACK:
            raise _Unusable(f"negative round trip {delay:.6f} s (server timestamps inconsistent)")
        delay = max(0.0, delay)
        # ntplib measures with the wall clock: if it was stepped or slewed during the
        # exchange the two local clocks disagree by that much, and so may the offset.
        skew = abs((wall_after - wall_before) - (mono_after - mono_before))
        if skew > 1.0:
            raise _Unusable(f"this host's wall clock stepped {skew:.3f} s during the exchange")
        half = (stats.root_delay / 2 + stats.root_dispersion + delay / 2 + 2.0 ** stats.precision
                + skew + abs(wall_after - stats.dest_time) + _FLOAT_SLACK)
        return _Sample(center=wall_after + stats.offset, half=half, at=mono_after, offset=stats.offset,
                       delay=delay, stratum=stats.stratum)

    def _combine(self, results: dict[int, _Sample | str]) -> None:
        samples = {i: a for i, a in results.items() if isinstance(a, _Sample)}
        agreement = estimate = None
        agreeing: set[int] = set()
        problem: str | None = None
        if not samples:
            problem = "no server gave a usable answer (" + "; ".join(
                f"{self.servers[i]}: {results[i]}" for i in sorted(results)) + ")"
        else:
            reference = max(s.at for s in samples.values())
            order = sorted(samples)
            intervals = []
            for index in order:
                sample = samples[index]
                age = reference - sample.at          # carry each answer to the same instant
                center = sample.center + age
                half = sample.half + self.drift * age
                intervals.append((center - half, center + half))
            agreement = marzullo(intervals)
            if agreement is None:
                problem = (f"the {len(samples)} answering servers do not agree: no instant lies within the "
                           f"bounds of more than half of them")
            elif agreement.clique < self.min_agreeing:
                problem = f"only {agreement.clique} servers agree, {self.min_agreeing} are required"
            else:
                estimate = _Estimate(agreement.low, agreement.high, reference)
            agreeing = {order[i] for i in agreement.agreeing} if agreement else set(samples)
        now = _time.monotonic()
        with self._cond:
            for index, answer in results.items():
                state = self._server_state[index]
                if isinstance(answer, _Sample):
                    state.update(reachable=True, sample=answer, answered_at=answer.at, problem=None,
                                 falseticker=index not in agreeing)
                    if index not in agreeing:
                        state["problem"] = "falseticker: its interval misses the majority's"
                else:
                    state.update(reachable=False, falseticker=False, problem=answer)
            if estimate is not None:
                self._estimate = estimate
                self._problem = None
            elif self._estimate is not None:
                kept = now - self._estimate.at
                self._problem = f"last round: {problem}; keeping the estimate from {kept:.1f} s ago"
            else:
                self._problem = problem

    def __repr__(self) -> str:
        return f"NtpClock({self.servers!r}, timeout={self.timeout:g}, poll_interval={self.poll_interval:g})"


def clock_from_config(config: Any) -> Clock:
    """The clock a node's config asks for: NTP when ``ntp_servers`` is set, else local."""
    servers = getattr(config, "ntp_servers", None)
    return NtpClock(servers) if servers else LocalClock()


# -- hybrid logical clock -------------------------------------------------------------

MAX_LOGICAL = 0xFFFF
_MAX_PHYSICAL_MS = (1 << 48) - 1     # 48 bits of milliseconds: until the year 10889


class HLCTimestamp(NamedTuple):
    """A hybrid logical clock stamp: compare as (physical_ms, logical); msgpack as a pair."""

    physical_ms: int
    logical: int

    @classmethod
    def from_pair(cls, value: Any) -> "HLCTimestamp":
        """A stamp from a received ``[physical_ms, logical]`` (raises ``BadRequest``)."""
        if isinstance(value, HLCTimestamp):
            return value
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise BadRequest(f"an HLC stamp is a pair [physical_ms, logical], not {value!r}")
        physical, logical = value
        for part, limit in ((physical, _MAX_PHYSICAL_MS), (logical, MAX_LOGICAL)):
            if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part <= limit:
                raise BadRequest(f"an HLC stamp holds ints in 0..{_MAX_PHYSICAL_MS} and 0..{MAX_LOGICAL}, "
                                 f"not {value!r}")
        return cls(physical, logical)

    def to_int(self) -> int:
        """One sortable 64-bit int: 48 bits of milliseconds, 16 of logical counter."""
        return self.physical_ms << 16 | self.logical

    @classmethod
    def from_int(cls, value: int) -> "HLCTimestamp":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise BadRequest(f"an HLC stamp as an int is in 0..2**64-1, not {value!r}")
        return cls(value >> 16, value & MAX_LOGICAL)

    def to_datetime(self) -> datetime:
        """The physical part as an aware UTC datetime."""
        return _EPOCH + timedelta(milliseconds=self.physical_ms)


class HybridLogicalClock:
    """Hybrid logical clock (see the module docstring). Thread-safe.

    ``physical``: a :class:`Clock` (its ``physical_time()`` is read) or a callable
    returning seconds since the epoch; default ``time.time``. ``max_offset``: refuse
    (``BadRequest``) a received stamp more than this many seconds ahead of the local
    physical clock, so one host with a wild clock cannot drag every clock it talks to
    into the future; None accepts any.
    """

    def __init__(self, physical: Clock | Callable[[], float] | None = None, max_offset: float | None = None) -> None:
        if isinstance(physical, Clock):
            self._read = physical.physical_time
        elif physical is None:
            self._read = _time.time
        elif callable(physical):
            self._read = physical
        else:
            raise ConfigError("physical", f"must be a Clock or a callable returning seconds, not {physical!r}")
        if max_offset is not None and (isinstance(max_offset, bool) or not isinstance(max_offset, (int, float))
                                       or not max_offset >= 0):
            raise ConfigError("max_offset", f"must be seconds >= 0 or None, not {max_offset!r}")
        self.max_offset = max_offset
        self._lock = threading.Lock()
        self._last = HLCTimestamp(0, 0)

    def _physical_ms(self) -> int:
        return min(_MAX_PHYSICAL_MS, max(0, math.floor(self._read() * 1000)))

    def now(self) -> HLCTimestamp:
        """A stamp for a local or send event: larger than every stamp this clock issued."""
        with self._lock:
            physical = self._physical_ms()
            last = self._last
            if physical > last.physical_ms:
                return self._issue(physical, 0)
            return self._issue(last.physical_ms, last.logical + 1)

    def update(self, received: Any) -> HLCTimestamp:
        """A stamp for receiving a message stamped ``received``: larger than it and than
        every stamp this clock issued. Raises ``BadRequest`` for a malformed stamp (or
        one beyond ``max_offset``), leaving the clock unchanged."""
        remote = HLCTimestamp.from_pair(received)
        with self._lock:
            physical = self._physical_ms()
            if self.max_offset is not None and remote.physical_ms - physical > self.max_offset * 1000:
                raise BadRequest(f"received HLC stamp is {(remote.physical_ms - physical) / 1000:.3f} s ahead "
                                 f"of this clock, more than max_offset={self.max_offset:g} s")
            last = self._last
            top = max(last.physical_ms, remote.physical_ms, physical)
            if top == last.physical_ms == remote.physical_ms:
                logical = max(last.logical, remote.logical) + 1
            elif top == last.physical_ms:
                logical = last.logical + 1
            elif top == remote.physical_ms:
                logical = remote.logical + 1
            else:
                logical = 0
            return self._issue(top, logical)

    def last(self) -> HLCTimestamp:
        """The latest stamp issued (``(0, 0)`` before the first)."""
        with self._lock:
            return self._last

    def _issue(self, physical: int, logical: int) -> HLCTimestamp:
        if logical > MAX_LOGICAL:
            # The counter is full: borrow the next millisecond. Order is kept, and the
            # physical part runs ahead of real time by at most 1 ms per 65536 stamps.
            physical, logical = physical + 1, 0
        self._last = HLCTimestamp(physical, logical)
        return self._last


# The paper's name, for readers who know it by that.
HLC = HybridLogicalClock
