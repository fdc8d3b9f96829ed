"""Linearizable reads: each waits for a BARRIER entry proposed after the read arrived.

A read is answered from this replica's state right after some barrier proposed after
its arrival has applied here: that state includes every write committed before the
read began. Reads arriving while a barrier is in flight share the next one.

PySyncObj may never call a barrier's callback (a forwarded command or its answer lost
without a leader change, a snapshot installed past it), and under a slow commit it
calls it late. So a barrier has a deadline, after which the next barrier goes out for
the reads still waiting; the late one still counts if it comes, and a read is answered
by whichever barrier eligible for it (proposed after it arrived) applies first. Reads
fail only when a barrier fails outright with none left that could answer them (the
app retries them), or after READ_MAX_AGE (the app has given up on them by then).

Runs on the tick thread with the rest of the engine.
"""

from __future__ import annotations

import time
from typing import Callable

# The live barrier is joined by the next one after this long without applying.
BARRIER_TIMEOUT = 0.5
# A read (and a barrier that could answer one) is dropped after this long.
READ_MAX_AGE = 60.0


class _Read:
    __slots__ = ("request_id", "query", "eligible_from", "arrived_at")

    def __init__(self, request_id: int, query: bytes, eligible_from: int, arrived_at: float) -> None:
        self.request_id = request_id
        self.query = query
        self.eligible_from = eligible_from  # the first barrier proposed after it arrived
        self.arrived_at = arrived_at


class ReadBarriers:
    def __init__(self, propose: Callable[[Callable[[bool, int], None]], None],
                 answer: Callable[[int, bytes], None], fail: Callable[[int, int], None],
                 drop_callback: Callable[[], bool], clock: Callable[[], float] = time.monotonic) -> None:
        """``propose(done)`` proposes a barrier, ``done(ok, failure)`` runs when it applies
        or fails; ``answer(request_id, query)`` and ``fail(request_id, failure)`` reply to
        a read; ``drop_callback()`` is a test hook that pretends a callback never came."""
        self._propose = propose
        self._answer = answer
        self._fail = fail
        self._drop_callback = drop_callback
        self._clock = clock
        self._retry_at = 0.0  # after a failed barrier, the next waits a little (no hot loop)
        self._reads: list[_Read] = []
        self._last_id = 0  # barriers proposed so far
        self._in_flight: dict[int, float] = {}  # barrier id -> proposed at
        self._live: tuple[int, float] | None = None  # (id, deadline) of the barrier reads wait on
        self.abandoned = 0

    @property
    def pending(self) -> int:
        return len(self._reads)

    def read(self, request_id: int, query: bytes, now: float) -> None:
        self._reads.append(_Read(request_id, query, self._last_id + 1, now))
        self._start(now)

    def _start(self, now: float) -> None:
        if self._live is not None or not self._reads or now < self._retry_at:
            return
        self._last_id += 1
        barrier_id = self._last_id
        self._in_flight[barrier_id] = now
        self._live = (barrier_id, now + BARRIER_TIMEOUT)
        self._propose(lambda ok, failure: self._done(barrier_id, ok, failure))

    def _done(self, barrier_id: int, ok: bool, failure: int) -> None:
        if self._drop_callback() or self._in_flight.pop(barrier_id, None) is None:
            return  # a test pretends it never came, or it aged out
        if self._live is not None and self._live[0] == barrier_id:
            self._live = None
        if ok:
            # Runs right after the barrier applied here.
            answered = [r for r in self._reads if r.eligible_from <= barrier_id]
            self._reads = [r for r in self._reads if r.eligible_from > barrier_id]
            for read in answered:
                self._answer(read.request_id, read.query)
        else:
            # Fail the reads no barrier still in flight can answer; the app retries them.
            hopeless = [r for r in self._reads if not any(b >= r.eligible_from for b in self._in_flight)]
            self._reads = [r for r in self._reads if r not in hopeless]
            for read in hopeless:
                self._fail(read.request_id, failure)
            self._retry_at = self._clock() + BARRIER_TIMEOUT
        self._start(self._clock())

    def tick(self, now: float) -> None:
        """Join a barrier that is late with the next one; drop what is too old."""
        if self._live is not None and now >= self._live[1]:
            self._live = None
            self.abandoned += 1
        for barrier_id in [b for b, at in self._in_flight.items() if now - at > READ_MAX_AGE]:
            del self._in_flight[barrier_id]
        expired = [r for r in self._reads if now - r.arrived_at > READ_MAX_AGE]
        if expired:
            self._reads = [r for r in self._reads if now - r.arrived_at <= READ_MAX_AGE]
            for read in expired:
                self._fail(read.request_id, 0)
        self._start(now)
