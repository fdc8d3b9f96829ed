"""Read barriers: every read is answered after a barrier proposed after it arrived, also
when barriers apply late, never, or fail (engine/reads.py, without a cluster)."""

from raftsync.engine.reads import BARRIER_TIMEOUT, READ_MAX_AGE, ReadBarriers


class _Harness:
    def __init__(self) -> None:
        self.now = 0.0
        self.proposed = []  # done callbacks, in proposal order
        self.answered = []
        self.failed = []
        self.drop_next = 0
        self.reads = ReadBarriers(self.proposed.append, lambda rid, q: self.answered.append(rid),
                                  lambda rid, failure: self.failed.append(rid), self._drop, lambda: self.now)

    def _drop(self) -> bool:
        if self.drop_next:
            self.drop_next -= 1
            return True
        return False


def test_reads_share_a_barrier_and_later_reads_wait_for_the_next():
    h = _Harness()
    h.reads.read(1, b"q", 0.0)
    h.reads.read(2, b"q", 0.0)  # arrives while barrier 1 is in flight: needs barrier 2
    assert len(h.proposed) == 1
    h.proposed[0](True, 0)
    assert h.answered == [1] and len(h.proposed) == 2
    h.proposed[1](True, 0)
    assert h.answered == [1, 2] and h.reads.pending == 0


def test_a_slow_barrier_still_answers_after_the_next_one_went_out():
    h = _Harness()
    h.reads.read(1, b"q", 0.0)
    h.reads.tick(BARRIER_TIMEOUT + 0.01)  # barrier 1 is late: barrier 2 goes out
    assert len(h.proposed) == 2 and h.reads.abandoned == 1
    h.proposed[0](True, 0)  # the late one applies first: it was proposed after the read
    assert h.answered == [1]
    h.proposed[1](True, 0)
    assert h.answered == [1]  # answered once


def test_a_lost_barrier_callback_is_replaced_and_a_failure_only_fails_hopeless_reads():
    h = _Harness()
    h.drop_next = 1
    h.reads.read(1, b"q", 0.0)
    h.proposed[0](True, 0)  # never "arrives"
    assert h.answered == []
    h.reads.tick(BARRIER_TIMEOUT + 0.01)
    h.now = BARRIER_TIMEOUT + 0.02
    h.proposed[1](False, 2)  # the replacement fails, but barrier 1 may still come
    assert h.failed == [] and h.reads.pending == 1
    assert len(h.proposed) == 2  # no new barrier right after a failure: no hot loop
    h.reads.tick(h.now + BARRIER_TIMEOUT)
    assert len(h.proposed) == 3
    h.reads.tick(READ_MAX_AGE + 1)  # barrier 1 aged out: the read is failed for a retry
    assert h.failed == [1] and h.reads.pending == 0


def test_a_failed_barrier_fails_its_reads_when_nothing_else_can_answer_them():
    h = _Harness()
    h.reads.read(1, b"q", 0.0)
    h.proposed[0](False, 2)
    assert h.failed == [1] and h.reads.pending == 0 and len(h.proposed) == 1
