"""The task table of the pure state machine (raftsync/machine/tasks.py) and its cron duty.

Every command goes through the codec as bytes, as a replica applies it. Examples first
(claims, fencing, retries, dead letters, keys, cancel, schedules), then properties with
hypothesis: determinism, snapshot equivalence, never INTERNAL, and the queue's
invariants (every job in exactly one place, one claim per job, capacity respected,
bounded memory).
"""

from __future__ import annotations

import calendar
import random
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from raftsync.codec import CODEC_VERSION, Op, Query, Status, decode_result, encode_command, encode_query
from raftsync.machine import StateMachine
from raftsync.machine import tasks as task_module
from raftsync.machine.tasks import CronDuty, check_cron, cron_latest, cron_next

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Cluster:
    """A machine and per-session sequence numbers; every apply returns (status, payload, effects)."""

    def __init__(self, sessions=(1, 2, 3)) -> None:
        self.m = StateMachine()
        self.seq: dict[int, int] = {}
        self.commands: list[bytes] = []
        for sid in sessions:
            self.open(sid)

    def raw(self, command: bytes):
        self.commands.append(command)
        effects: list = []
        result = self.m.apply(command, effects)
        status, payload = decode_result(result)
        assert status != Status.INTERNAL, payload
        return status, payload, effects

    def open(self, sid: int, ttl_ms: int = 1000):
        self.seq[sid] = 0
        return self.raw(encode_command(Op.OPEN_SESSION, sid, 0, 0, [ttl_ms]))

    def do(self, sid: int, op: Op, *args):
        self.seq[sid] += 1
        return self.raw(encode_command(op, sid, self.seq[sid], self.seq[sid], list(args)))

    def engine(self, op: Op, *args):
        return self.raw(encode_command(op, 0, 0, 0, list(args)))

    def expire_session(self, sid: int):
        _, info = decode_result(self.m.query(encode_query(Query.SESSION_INFO, [sid])))
        return self.engine(Op.EXPIRE_SESSION, sid, info[1])

    def worker(self, sid: int, names, capacity: int, worker_id: int = 7):
        return self.do(sid, Op.TASK_WORKER, worker_id, list(names), capacity)

    def submit(self, sid: int, name: str, payload=b"\xc0", key=None, delay_ms=0, retries=3, timeout_ms=1000,
               backoff_ms=100):
        return self.do(sid, Op.TASK_SUBMIT, name, payload, key, delay_ms, retries, timeout_ms, backoff_ms)

    def job(self, job_id: int):
        status, view = decode_result(self.m.query(encode_query(Query.TASK_JOB, [job_id])))
        return view if status == Status.OK else None

    def info(self):
        return decode_result(self.m.query(encode_query(Query.TASK_INFO, [])))[1]


def assigned(effects):
    return [e for e in effects if e[0] == "task_assigned"]


def kinds(effects):
    return [e[0] for e in effects]


# -- examples ------------------------------------------------------------------------------


def test_unknown_handler_is_refused_until_some_worker_registers_it():
    c = Cluster()
    status, payload, _ = c.submit(1, "resize")
    assert (status, payload) == (Status.NOT_FOUND, task_module.UNKNOWN_HANDLER)
    c.worker(2, ["resize"], 1)
    status, (job_id, created), effects = c.submit(1, "resize", b"\x01")
    assert status == Status.OK and created and job_id == c.m.index
    # the claim goes to the worker's session only, with the leader-measured deadline
    [claim] = assigned(effects)
    assert claim.owner == 2 and claim.deadline == ("task_claim", job_id, job_id, 1.0)
    assert (claim.job_id, claim.token, claim.payload, claim.attempt) == (job_id, c.m.index, b"\x01", 1)
    # a name stays known after its worker left: its claim and new jobs wait in the queue
    c.expire_session(2)
    status, (queued_id, _), effects = c.submit(1, "resize")
    assert status == Status.OK and assigned(effects) == []
    assert c.info()["queued"] == {"resize": 2}


def test_completion_frees_the_slot_and_hands_the_next_job_over_in_the_same_command():
    c = Cluster()
    c.worker(2, ["a"], 2)
    ids = [c.submit(1, "a", bytes([i]))[1][0] for i in range(3)]
    assert c.info()["queued"] == {"a": 1}
    first = c.job(ids[0])
    assert first[2] == "running" and first[5] == ids[0]
    status, _, effects = c.do(2, Op.TASK_COMPLETE, ids[0], ids[0], b"\x2a")
    assert status == Status.OK
    assert kinds(effects) == ["task_claim_ended", "task_finished", "task_assigned"]
    assert effects[0].deadline == ("task_claim", ids[0], None, None)  # stop measuring it
    assert assigned(effects)[0].job_id == ids[2]  # FIFO
    done = c.job(ids[0])
    assert done[2] == "done" and done[8] == b"\x2a"
    assert c.info()["queued"] == {}


def test_jobs_spread_over_workers_by_free_slots():
    c = Cluster()
    c.worker(2, ["a"], 2)
    c.worker(3, ["a"], 2)
    owners = [assigned(c.submit(1, "a")[2])[0].owner for _ in range(4)]
    assert sorted(owners) == [2, 2, 3, 3] and owners[0] != owners[1]


def test_a_superseded_claims_result_and_progress_are_refused():
    c = Cluster()
    c.worker(2, ["a"], 1)
    c.worker(3, ["a"], 1, worker_id=8)
    _, (job_id, _), effects = c.submit(1, "a")
    old = assigned(effects)[0]
    # the claim overruns its visibility deadline: revoked (told to its worker), queued again
    # and handed to the other worker, which has room, with a new token
    status, _, effects = c.engine(Op.TASK_EXPIRE, job_id, old.token)
    assert status == Status.OK
    revoked = [e for e in effects if e[0] == "task_revoked"]
    assert revoked and revoked[0].owner == old.owner and revoked[0].reason == "timed out"
    [new] = assigned(effects)
    assert new.owner != old.owner and new.token > old.token and new.attempt == 2
    # a repeated expiry of the old claim changes nothing
    assert c.engine(Op.TASK_EXPIRE, job_id, old.token)[0] == Status.STALE
    assert c.do(old.owner, Op.TASK_PROGRESS, job_id, old.token, b"\x01")[0] == Status.NOT_HELD
    assert c.do(old.owner, Op.TASK_COMPLETE, job_id, old.token, b"\x01")[0] == Status.NOT_HELD
    # the right token from the wrong session is refused too
    assert c.do(old.owner, Op.TASK_COMPLETE, job_id, new.token, b"\x01")[0] == Status.NOT_HELD
    assert c.do(new.owner, Op.TASK_PROGRESS, job_id, new.token, b"\x05")[0] == Status.OK
    assert c.job(job_id)[7] == b"\x05"
    assert c.do(new.owner, Op.TASK_COMPLETE, job_id, new.token, b"\x02")[0] == Status.OK
    assert c.job(job_id)[2:5] == ["done", 2, 4]
    assert c.do(new.owner, Op.TASK_COMPLETE, job_id, new.token, b"\x03")[0] == Status.NOT_HELD


def test_an_overrunning_worker_gets_its_job_back_only_if_nobody_else_has_room():
    c = Cluster()
    c.worker(2, ["a"], 1)
    _, (job_id, _), effects = c.submit(1, "a")
    token = assigned(effects)[0].token
    _, _, effects = c.engine(Op.TASK_EXPIRE, job_id, token)
    [again] = assigned(effects)
    assert again.owner == 2 and again.attempt == 2
    # the late result of the first claim comes from the same session: its token tells
    assert c.do(2, Op.TASK_COMPLETE, job_id, token, b"\x01")[0] == Status.NOT_HELD
    assert c.do(2, Op.TASK_COMPLETE, job_id, again.token, b"\x02")[0] == Status.OK
    assert c.job(job_id)[8] == b"\x02"


def test_a_dead_workers_claims_are_queued_again_and_count_as_attempts():
    c = Cluster()
    c.worker(2, ["a"], 4)
    ids = [c.submit(1, "a", retries=1)[1][0] for _ in range(2)]
    status, _, effects = c.expire_session(2)
    assert status == Status.OK
    assert c.info()["queued"] == {"a": 2} and c.info()["workers"] == []
    c.worker(3, ["a"], 1)
    job = c.job(ids[0])
    assert job[2] == "running" and job[3] == 2  # the older one first, second attempt
    c.expire_session(3)  # its second (and last) attempt dies with its worker too
    job = c.job(ids[0])
    assert job[2] == "dead" and "worker session ended" in job[9]
    assert c.job(ids[1])[2] == "queued"


def test_a_worker_that_leaves_gives_its_claims_back_without_using_an_attempt():
    c = Cluster()
    c.worker(2, ["a"], 1)
    _, (job_id, _), _ = c.submit(1, "a", retries=0)
    c.worker(2, ["a"], 0)  # draining: keeps its claim, takes no new one
    assert c.job(job_id)[2] == "running"
    c.submit(1, "a")
    assert c.info()["queued"] == {"a": 1}
    c.worker(2, [], 0)  # leaves
    assert c.job(job_id)[2] == "queued"
    _, _, effects = c.worker(3, ["a"], 2)
    assert [e.job_id for e in assigned(effects)][0] == job_id


def test_a_worker_gives_back_claims_it_cannot_start_without_using_an_attempt():
    c = Cluster()
    c.worker(2, ["a"], 2)
    _, (first, _), effects = c.submit(1, "a", retries=0)
    one = assigned(effects)[0]
    _, (second, _), effects = c.submit(1, "a", retries=0)
    two = assigned(effects)[0]
    # a handler thread is stuck: the worker has one free thread and gives both claims back
    # (stale ones, or another worker's, are ignored)
    status, _, effects = c.do(2, Op.TASK_WORKER, 7, ["a"], 1,
                              [[first, one.token], [second, two.token], [second, two.token + 1], [999, 1]])
    assert status == Status.OK
    ended = [e for e in effects if e[0] == "task_claim_ended"]
    assert sorted(e.job_id for e in ended) == [first, second] and all(not e.tell for e in ended)
    assert {e.deadline for e in ended} == {("task_claim", first, None, None), ("task_claim", second, None, None)}
    # it had room for one: the oldest comes straight back to it, still as a first attempt
    [again] = assigned(effects)
    assert (again.job_id, again.attempt, again.owner) == (first, 1, 2)
    assert c.job(second)[2:4] == ["queued", 0]
    _, _, effects = c.worker(3, ["a"], 1, worker_id=8)
    assert [(e.job_id, e.attempt) for e in assigned(effects)] == [(second, 1)]
    assert c.do(3, Op.TASK_WORKER, 7, ["a"], 1, [[first, again.token]])[0] == Status.OK  # not its claim
    assert c.job(first)[2] == "running"
    for junk in ([[first]], [[first, "x"]], "x", [[1, 1]] * (task_module.MAX_POOL + 1)):
        assert c.do(2, Op.TASK_WORKER, 7, ["a"], 1, junk)[0] == Status.BAD_COMMAND


def test_a_worker_leaving_with_claims_it_gives_back_frees_them_uncounted():
    c = Cluster()
    c.worker(2, ["a"], 2)
    _, (started, _), effects = c.submit(1, "a", retries=0)
    started_token = assigned(effects)[0].token
    _, (unstarted, _), effects = c.submit(1, "a", retries=0)
    status, _, _ = c.do(2, Op.TASK_WORKER, 7, [], 0, [[unstarted, assigned(effects)[0].token]])
    assert status == Status.OK and c.info()["workers"] == []
    # the one it never started did not use an attempt; the one it ran did (as before)
    assert c.job(unstarted)[2:4] == ["queued", 0] and c.job(started)[2:4] == ["queued", 1]
    assert list(c.m.tasks.queues["a"]) == [started, unstarted] and started_token == started


def test_active_jobs_are_bounded_by_the_bytes_they_hold(monkeypatch):
    c = Cluster()
    c.worker(2, ["a"], 8)
    table = c.m.tasks
    for i in range(20):
        key = f"{i:04d}" + "k" * 1020
        _, (job_id, _), effects = c.submit(1, "a", b"\xc0", key=key, retries=5, backoff_ms=3_600_000)
        token = assigned(effects)[0].token if assigned(effects) else None
        if token is not None:
            c.do(2, Op.TASK_PROGRESS, job_id, token, b"p" * task_module.MAX_PROGRESS_BYTES)
            c.do(2, Op.TASK_FAIL, job_id, token, "e" * task_module.MAX_ERROR_BYTES, True)  # retried later
    held = sum(job.held_bytes() for job in table.jobs.values())
    assert table.active == 20 and held > 20 * 1024 + 8 * 8 * 1024
    assert table.active_bytes == held  # key, progress and last error counted, not only the payload
    # at the budget: a submit is refused, a growing progress report too, an error is cut to fit
    monkeypatch.setattr(task_module, "MAX_ACTIVE_BYTES", held + 100)
    assert c.submit(1, "a", b"\xc0", key="x" * 200)[:2] == (Status.TOO_LARGE, "task queue full")
    _, (job_id, _), effects = c.submit(1, "a", b"\xc0", retries=2)
    token = assigned(effects)[0].token
    assert c.do(2, Op.TASK_PROGRESS, job_id, token, b"p" * 200)[0] == Status.TOO_LARGE
    assert c.do(2, Op.TASK_PROGRESS, job_id, token, b"p" * 50)[0] == Status.OK
    c.do(2, Op.TASK_FAIL, job_id, token, "e" * 1000, True)
    assert 0 < len(table.jobs[job_id].error) < 1000
    assert table.active_bytes == sum(job.held_bytes() for job in table.jobs.values()) <= held + 100
    restored = StateMachine.restore(c.m.snapshot()).tasks
    assert restored.active_bytes == table.active_bytes


def test_failures_back_off_exponentially_then_dead_letter_with_the_error_text():
    c = Cluster()
    c.worker(2, ["a"], 1)
    _, (job_id, _), effects = c.submit(1, "a", retries=2, backoff_ms=100)
    delays = []
    for attempt in (1, 2, 3):
        token = assigned(effects)[0].token
        assert assigned(effects)[0].attempt == attempt
        status, _, effects = c.do(2, Op.TASK_FAIL, job_id, token, f"boom {attempt}", True)
        assert status == Status.OK
        if attempt == 3:
            break
        [timer] = [e for e in effects if e[0] == "task_delay"]
        delays.append(timer.deadline[3])
        assert c.job(job_id)[2] == "delayed"
        # an expiry naming something else is stale; the right one makes it runnable
        assert c.engine(Op.TASK_EXPIRE, job_id, timer.token + 1)[0] == Status.STALE
        status, _, effects = c.engine(Op.TASK_EXPIRE, job_id, timer.token)
        assert status == Status.OK
    assert delays == [0.1, 0.2]
    job = c.job(job_id)
    assert job[2] == "dead" and job[9] == "boom 3" and job[3] == 3
    # a permanent failure dead-letters at once
    _, (other, _), effects = c.submit(1, "a", retries=5)
    c.do(2, Op.TASK_FAIL, other, assigned(effects)[0].token, "bad input", False)
    assert c.job(other)[2] == "dead" and c.job(other)[3] == 1


def test_delayed_submit_waits_for_its_deadline():
    c = Cluster()
    c.worker(2, ["a"], 1)
    _, (job_id, _), effects = c.submit(1, "a", delay_ms=5000)
    assert assigned(effects) == [] and c.job(job_id)[2] == "delayed"
    [timer] = effects
    assert timer.deadline == ("task_delay", job_id, job_id, 5.0)
    assert list(c.m.deadlines()).count(("task_delay", job_id, job_id, 5.0)) == 1
    _, _, effects = c.engine(Op.TASK_EXPIRE, job_id, job_id)
    assert assigned(effects)[0].job_id == job_id
    assert ("task_delay", job_id, None, None) in [e.deadline for e in effects]


def test_a_key_makes_submission_idempotent_while_the_job_is_kept(monkeypatch):
    monkeypatch.setattr(task_module, "MAX_FINISHED_JOBS", 2)
    c = Cluster()
    c.worker(2, ["a"], 5)
    _, (first, created), _ = c.submit(1, "a", b"\x01", key="order-1")
    assert created
    _, (again, created), effects = c.submit(3, "a", b"\x02", key="order-1")
    assert (again, created, effects) == (first, False, [])
    token = c.job(first)[5]
    c.do(2, Op.TASK_COMPLETE, first, token, b"\x00")
    assert c.submit(1, "a", key="order-1")[1] == [first, False]
    for _ in range(2):  # two newer finished jobs push it out of the window, key and all
        _, (job_id, _), _ = c.submit(1, "a")
        c.do(2, Op.TASK_COMPLETE, job_id, c.job(job_id)[5], b"\x00")
    assert c.job(first) is None
    _, (fresh, created), _ = c.submit(1, "a", key="order-1")
    assert created and fresh != first


def test_cancel_queued_running_and_finished_jobs():
    c = Cluster()
    c.worker(2, ["a"], 1)
    _, (running, _), effects = c.submit(1, "a")
    token = assigned(effects)[0].token
    _, (queued, _), _ = c.submit(1, "a")
    assert c.do(3, Op.TASK_CANCEL, queued)[:2] == (Status.OK, ["queued", True])
    assert c.info()["queued"] == {}
    status, payload, effects = c.do(3, Op.TASK_CANCEL, running)
    assert (status, payload) == (Status.OK, ["running", True])
    revoked = [e for e in effects if e[0] == "task_revoked"]
    assert revoked[0].owner == 2 and revoked[0].reason == "cancelled"
    assert c.do(2, Op.TASK_COMPLETE, running, token, b"\x01")[0] == Status.NOT_HELD
    assert c.do(3, Op.TASK_CANCEL, running)[:2] == (Status.OK, ["cancelled", False])
    assert c.do(3, Op.TASK_CANCEL, 999_999)[0] == Status.NOT_FOUND
    assert c.job(running)[2] == "cancelled"


def test_terminal_changes_go_to_the_watchable_history():
    c = Cluster()
    c.worker(2, ["a"], 1)
    _, (job_id, _), effects = c.submit(1, "a")
    kind = c.m.watch_kinds["task"]
    assert kind.initial(str(job_id))[2] == "running"
    assert kind.initial("nonsense") is None and kind.initial("12345") is None
    c.do(2, Op.TASK_COMPLETE, job_id, assigned(effects)[0].token, b"\x07")
    entries = kind.history().since(0, lambda key: kind.match(str(job_id), key))
    assert [e[2] for e in entries] == ["done"]
    assert kind.payload(entries[0])[8] == b"\x07"


def test_every_schedule_slots_are_consecutive_and_each_runs_once():
    c = Cluster()
    c.worker(2, ["tick"], 10)
    status, version, effects = c.do(1, Op.TASK_SCHEDULE, "s", "tick", 1000, None, b"\x90", 0, 1000, 0, 0)
    assert status == Status.OK
    [timer] = effects
    assert timer.deadline == ("task_every", "s", version, 1.0)
    token = version
    slots = []
    for _ in range(3):
        status, slot, effects = c.engine(Op.TASK_TICK, "s", token)
        assert status == Status.OK
        slots.append(slot)
        # the same expiry proposed twice (two leaders, a retry) runs nothing twice
        assert c.engine(Op.TASK_TICK, "s", token)[0] == Status.STALE
        [claim] = assigned(effects)
        assert claim.origin == ["s", slot]
        token = [e for e in effects if e[0] == "task_every"][0].token
    assert slots == [1, 2, 3]
    # a redefinition keeps the numbering; removing it stops the timer
    _, version, _ = c.do(1, Op.TASK_SCHEDULE, "s", "tick", 2000, None, b"\x90", 0, 1000, 0, 0)
    assert c.engine(Op.TASK_TICK, "s", token)[0] == Status.STALE
    assert c.engine(Op.TASK_TICK, "s", version)[1] == 4
    status, _, effects = c.do(1, Op.TASK_SCHEDULE, "s")
    assert status == Status.OK and effects[0].deadline == ("task_every", "s", None, None)
    assert c.do(1, Op.TASK_SCHEDULE, "s")[0] == Status.NOT_FOUND


def test_a_schedule_holds_at_most_one_waiting_run(monkeypatch):
    c = Cluster()
    c.worker(1, ["report"], 1, worker_id=1)
    c.worker(1, [], 0, worker_id=1)          # the only "report" worker leaves
    c.worker(3, ["billing"], 8, worker_id=2)
    _, version, _ = c.do(2, Op.TASK_SCHEDULE, "nightly", "report", 500, None, b"\xc0", 0, 1000, 0, 0)
    token = version
    for _ in range(50):  # 25 s of periods with nobody to run them
        status, _, effects = c.engine(Op.TASK_TICK, "nightly", token)
        assert status == Status.OK
        token = [e for e in effects if e[0] == "task_every"][0].token
    assert c.info()["queued"] == {"report": 1} and c.m.tasks.active == 1
    [view] = decode_result(c.m.query(encode_query(Query.TASK_SCHEDULES, [])))[1]
    assert view[4] == 50 and view[6] == 49  # last slot, skipped
    assert c.submit(2, "billing")[0] == Status.OK  # the queue is not filled by the schedule
    # a redefinition keeps holding back while its run waits; once it runs, slots run again
    _, version, _ = c.do(2, Op.TASK_SCHEDULE, "nightly", "report", 600, None, b"\xc0", 0, 1000, 0, 0)
    assert c.engine(Op.TASK_TICK, "nightly", version)[0] == Status.OK and c.info()["queued"] == {"report": 1}
    _, _, effects = c.worker(3, ["report"], 1, worker_id=3)
    [claim] = assigned(effects)
    assert claim.origin == ["nightly", 1]
    token = c.m.tasks.schedules["nightly"].tick_token
    _, _, effects = c.engine(Op.TASK_TICK, "nightly", token)
    assert c.info()["queued"] == {"report": 1} and c.m.tasks.schedules["nightly"].skipped == 50


def test_cron_slots_run_only_if_newer_than_the_last():
    c = Cluster()
    c.worker(2, ["r"], 10)
    assert c.do(1, Op.TASK_SCHEDULE, "c", "r", None, "61 * * *", b"\xc0", 0, 1000, 0, 0)[0] == Status.BAD_COMMAND
    assert c.do(1, Op.TASK_SCHEDULE, "c", "nope", None, "* * * * *", b"\xc0", 0, 1000, 0, 0)[:2] == \
        (Status.NOT_FOUND, task_module.UNKNOWN_HANDLER)
    _, version, _ = c.do(1, Op.TASK_SCHEDULE, "c", "r", None, "*/5 * * * *", b"\xc0", 0, 1000, 0, 0)
    assert c.engine(Op.TASK_SLOT, "c", version, 100)[:2] == (Status.OK, 100)
    for stale in ([version, 100], [version, 99], [version - 1, 105]):
        assert c.engine(Op.TASK_SLOT, "c", *stale)[0] == Status.STALE
    assert c.engine(Op.TASK_SLOT, "c", version, 105)[0] == Status.OK
    assert [j[10] for j in map(c.job, sorted(c.m.tasks.jobs))] == [["c", 100], ["c", 105]]


def test_bad_arguments_are_bad_commands_not_crashes():
    c = Cluster()
    c.worker(2, ["a"], 1)
    valid = {
        Op.TASK_SUBMIT: ["a", b"", None, 0, 3, 1000, 0], Op.TASK_WORKER: [1, ["a"], 1],
        Op.TASK_COMPLETE: [1, 1, b""], Op.TASK_FAIL: [1, 1, "e", True], Op.TASK_PROGRESS: [1, 1, b""],
        Op.TASK_CANCEL: [1], Op.TASK_EXPIRE: [1, 1], Op.TASK_SCHEDULE: ["s", "a", 1000, None, b"", 0, 1000, 0, 0],
        Op.TASK_SLOT: ["s", 1, 1], Op.TASK_TICK: ["s", 1],
    }
    junk = [None, True, -1, 2**64 - 1, 1.5, "", "x" * 3000, b"x" * 40000, [], [1, 2], {"a": 1}]
    snapshot = c.m.snapshot()
    for op, args in valid.items():
        variants = [args + [None], args[:-1]] + [args[:i] + [j] + args[i + 1:] for i in range(len(args)) for j in junk]
        for variant in variants:
            m = StateMachine.restore(snapshot)
            seq = 100
            command = bytes((CODEC_VERSION,)) + msgpack.packb([int(op), 2, seq, 0, variant], use_bin_type=True)
            status, payload = decode_result(m.apply(command, []))
            assert status != Status.INTERNAL, (op, variant, payload)
            assert StateMachine.restore(m.snapshot()).snapshot() == m.snapshot()


# -- the cron duty (leader side, fake clocks) ------------------------------------------------


def epoch(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")))


def test_cron_helpers():
    assert check_cron(" */5 * * * * ") == "*/5 * * * *"
    assert check_cron("@hourly") == "@hourly"
    for bad in ("61 * * * *", "* * * *", "* * * * * *", "", "a b c d e", 5, None, "* " * 100):
        with pytest.raises(ValueError):
            check_cron(bad)
    assert cron_next("*/5 * * * *", epoch("2024-01-01 00:00:00")) == epoch("2024-01-01 00:05:00")
    assert cron_latest("*/5 * * * *", epoch("2024-01-01 00:07:59")) == epoch("2024-01-01 00:05:00")
    assert cron_latest("*/5 * * * *", epoch("2024-01-01 00:10:00")) == epoch("2024-01-01 00:10:00")


def propose(duty: CronDuty, c: Cluster, mono: float, wall: float) -> list[int]:
    """Run one leader tick; apply what it proposes; the slots it proposed."""
    slots = []
    for command in duty.due(c.m, mono, wall):
        args = msgpack.unpackb(command[1:], raw=False)[4]
        slots.append(args[2])
        c.raw(command)
    return slots


def test_cron_duty_proposes_each_due_slot_once_and_skew_never_doubles_a_run():
    c = Cluster()
    c.worker(2, ["r"], 100)
    start = epoch("2024-01-01 12:00:30")
    c.do(1, Op.TASK_SCHEDULE, "c", "r", None, "* * * * *", b"\xc0", 0, 1000, 0, int(start * 1000))
    leader = CronDuty()
    leader.became_leader(c.m, 0.0, start)
    assert propose(leader, c, 1.0, start + 10) == []           # 12:00:40: not due
    assert propose(leader, c, 2.0, start + 30) == [int((start + 30) // 60)]  # 12:01:00
    assert propose(leader, c, 2.1, start + 31) == []           # applied: not again
    # a new leader whose clock is 50 s behind: 12:00:41 by its clock, the 12:01 slot already ran
    behind = CronDuty()
    behind.became_leader(c.m, 0.0, start + 11)
    assert propose(behind, c, 0.1, start + 11) == []
    assert propose(behind, c, 50.0, start + 60) == []            # its 12:01:30: still nothing new
    minute_2 = int((start + 90) // 60)
    assert propose(behind, c, 60.0, start + 90) == [minute_2]    # its 12:02:00
    # a leader 40 s ahead proposes 12:03 early; the old one's late 12:03 is then stale
    ahead = CronDuty()
    ahead.became_leader(c.m, 0.0, start + 150)
    assert propose(ahead, c, 0.0, start + 150) == [minute_2 + 1]
    assert propose(behind, c, 61.0, start + 151) == []
    runs = [job[10][1] for job in map(c.job, sorted(c.m.tasks.jobs))]
    assert runs == sorted(set(runs)) == [minute_2 - 1, minute_2, minute_2 + 1]


def test_cron_duty_after_an_outage_runs_only_the_latest_missed_slot_and_retries_lost_proposals():
    c = Cluster()
    c.worker(2, ["r"], 100)
    start = epoch("2024-01-01 12:00:30")
    c.do(1, Op.TASK_SCHEDULE, "c", "r", None, "*/10 * * * *", b"\xc0", 0, 1000, 0, int(start * 1000))
    duty = CronDuty()
    duty.became_leader(c.m, 0.0, start)
    late = epoch("2024-01-01 13:05:00")
    commands = duty.due(c.m, 1.0, late)  # lost: never applied
    assert len(commands) == 1 and msgpack.unpackb(commands[0][1:], raw=False)[4][2] == int(
        epoch("2024-01-01 13:00:00") // 60)
    assert duty.due(c.m, 1.5, late) == []           # not re-proposed at once
    assert propose(duty, c, 1.0 + CronDuty.RETRY + 0.1, late) == [int(epoch("2024-01-01 13:00:00") // 60)]
    assert len(c.m.tasks.jobs) == 1


def test_cron_expressions_that_never_fire_are_refused():
    for never in ("0 0 31 2 *", "0 0 30 2 *", "0 0 31 4 *"):
        with pytest.raises(ValueError, match="never fires"):
            check_cron(never)
    assert check_cron("0 0 29 2 *") == "0 0 29 2 *"  # leap days come


def test_cron_duty_forgets_removed_and_redefined_schedules():
    c = Cluster()
    c.worker(1, ["h"], 4)
    duty = CronDuty()
    now = time.time()
    duty.became_leader(c.m, 0.0, now)
    for i in range(300):
        c.do(2, Op.TASK_SCHEDULE, "s", "h", None, "* * * * *", b"\xc0", 0, 1000, 0, int((now - 120) * 1000))
        c.do(2, Op.TASK_SCHEDULE, f"bad{i}", "h", None, "99 99 99 99 99", b"\xc0", 0, 1000, 0, 0)
        duty.due(c.m, float(i), now)
        c.do(2, Op.TASK_SCHEDULE, f"bad{i}")
    assert len(duty._proposed) <= 1 and len(duty._bad) <= 1 and len(duty._next) <= 2 * task_module.MAX_SCHEDULES


def test_a_leader_clock_ahead_suppresses_cron_runs_until_then_and_is_reported(caplog):
    """Documented, not corrected (see the module docstring): the slot a fast clock ran
    stays the last; correct leaders run nothing before it, and say so."""
    c = Cluster()
    c.worker(1, ["h"], 4)
    now = epoch("2024-01-01 12:00:30")
    c.do(2, Op.TASK_SCHEDULE, "s", "h", None, "* * * * *", b"\xc0", 0, 1000, 0, int((now - 120) * 1000))
    skewed = CronDuty()
    assert propose(skewed, c, 0.0, now + 3600) == [int((now + 3600) // 60)]
    good = CronDuty()
    with caplog.at_level("WARNING", logger="raftsync.tasks"):
        assert [slot for minute in range(30) for slot in propose(good, c, minute * 60.0, now + minute * 60)] == []
    warnings = [r.getMessage() for r in caplog.records if "past this leader's clock" in r.getMessage()]
    assert len(warnings) == 1 and "2024-01-01 13:00 UTC" in warnings[0]
    assert propose(good, c, 3660.0, now + 3660) == [int((now + 3660) // 60)]  # runs resume then


def test_cron_duty_skips_a_schedule_it_cannot_parse_without_raising():
    c = Cluster()
    c.worker(2, ["r"], 1)
    # the machine only checks the shape; an unparsable expression reaches the duty
    assert c.do(1, Op.TASK_SCHEDULE, "c", "r", None, "99 99 99 99 99", b"\xc0", 0, 1000, 0, 0)[0] == Status.OK
    duty = CronDuty()
    assert duty.due(c.m, 0.0, time.time()) == [] and duty.due(c.m, 1.0, time.time()) == []


# -- properties --------------------------------------------------------------------------------

SIDS = [1, 2, 3]
NAMES = ["a", "b"]
STEP = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(SIDS), st.sampled_from([1, 2]),
              st.lists(st.sampled_from(NAMES), max_size=2), st.integers(0, 3)),
    st.tuples(st.just("submit"), st.sampled_from(SIDS), st.sampled_from(NAMES + ["zz"]),
              st.sampled_from([None, "k1", "k2"]), st.sampled_from([0, 0, 500]), st.integers(0, 2)),
    st.tuples(st.just("complete"), st.integers(0, 8), st.booleans()),
    st.tuples(st.just("fail"), st.integers(0, 8), st.booleans(), st.booleans()),
    st.tuples(st.just("progress"), st.integers(0, 8), st.booleans()),
    st.tuples(st.just("cancel"), st.sampled_from(SIDS), st.integers(0, 8)),
    st.tuples(st.just("expire"), st.integers(0, 8), st.booleans()),
    st.tuples(st.just("end_session"), st.sampled_from(SIDS)),
    st.tuples(st.just("reopen"), st.integers(10, 12)),
    st.tuples(st.just("schedule"), st.sampled_from(SIDS), st.sampled_from(["s1", "s2"]),
              st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("unschedule"), st.sampled_from(SIDS), st.sampled_from(["s1", "s2"])),
    st.tuples(st.just("tick"), st.sampled_from(["s1", "s2"]), st.booleans()),
    st.tuples(st.just("slot"), st.sampled_from(["s1", "s2"]), st.integers(0, 3)),
    st.tuples(st.just("give_back"), st.integers(0, 8), st.booleans(), st.integers(0, 2)),
)
# submits, completions and timer expiries with the right token come more often, so runs
# reach every state (done, dead, retried, re-queued, scheduled) rather than refusals only
STEP = st.one_of(
    STEP,
    st.tuples(st.just("submit"), st.sampled_from(SIDS), st.sampled_from(NAMES), st.just(None), st.just(0),
              st.integers(0, 2)),
    st.tuples(st.just("complete"), st.integers(0, 8), st.just(True)),
    st.tuples(st.just("fail"), st.integers(0, 8), st.just(True), st.just(True)),
    st.tuples(st.just("tick"), st.sampled_from(["s1", "s2"]), st.just(True)),
    st.tuples(st.just("expire"), st.integers(0, 8), st.just(True)),
)
STEPS = st.lists(STEP, min_size=5, max_size=60)


def drive(steps) -> Cluster:
    """Turn abstract steps into commands on a fresh machine, picking right or wrong tokens
    by looking at it (as a worker or the leader would)."""
    c = Cluster()
    c.worker(1, ["a", "b"], 2)
    table = c.m.tasks
    live = set(SIDS)
    for step in steps:
        kind = step[0]
        claims_before = claims_by_worker(c)
        # claims are reported on mostly, so those commands pick among running jobs
        running = sorted(job_id for job_id, job in table.jobs.items() if job.state == "running")
        job_ids = running if kind in ("complete", "fail", "progress") and running else sorted(table.jobs)
        pick = (lambda i: job_ids[i % len(job_ids)]) if job_ids else (lambda i: 1)
        if kind == "register":
            _, sid, worker_id, names, capacity = step
            if sid in live:
                c.worker(sid, names, capacity, worker_id)
        elif kind == "submit":
            _, sid, name, key, delay, retries = step
            if sid in live:
                c.submit(sid, name, b"\x01", key, delay, retries, 1000, 10)
        elif kind in ("complete", "fail", "progress"):
            job = table.jobs.get(pick(step[1]))
            right = step[2]
            sid = job.worker[0] if job is not None and job.worker else 1
            token = (job.token if job else 0) + (0 if right else 1)
            if sid in c.seq and sid in live:
                if kind == "complete":
                    c.do(sid, Op.TASK_COMPLETE, pick(step[1]), token, b"\x02")
                elif kind == "fail":
                    c.do(sid, Op.TASK_FAIL, pick(step[1]), token, "err", step[3])
                else:
                    c.do(sid, Op.TASK_PROGRESS, pick(step[1]), token, b"\x03")
        elif kind == "cancel":
            if step[1] in live:
                c.do(step[1], Op.TASK_CANCEL, pick(step[2]))
        elif kind == "expire":
            job = table.jobs.get(pick(step[1]))
            c.engine(Op.TASK_EXPIRE, pick(step[1]), (job.token if job else 0) + (0 if step[2] else 1))
        elif kind == "end_session":
            if step[1] in live:
                c.expire_session(step[1])
                live.discard(step[1])
        elif kind == "reopen":
            if step[1] not in c.seq:
                c.open(step[1])
                c.worker(step[1], ["a", "b"], 2)
        elif kind == "schedule":
            _, sid, name, handler, every = step
            if sid in live:
                c.do(sid, Op.TASK_SCHEDULE, name, handler, 1000 if every else None, None if every else "* * * * *",
                     b"\xc0", 1, 1000, 10, 0)
        elif kind == "unschedule":
            if step[1] in live:
                c.do(step[1], Op.TASK_SCHEDULE, step[2])
        elif kind == "tick":
            schedule = table.schedules.get(step[1])
            c.engine(Op.TASK_TICK, step[1], (schedule.tick_token if schedule else 0) + (0 if step[2] else 1))
        elif kind == "slot":
            schedule = table.schedules.get(step[1])
            version = schedule.version if schedule else 0
            c.engine(Op.TASK_SLOT, step[1], version, (schedule.last_slot if schedule else 0) + step[2])
        elif kind == "give_back":
            # a worker gives back one claim it could not start (or names a stale one)
            job = table.jobs.get(pick(step[1]))
            if job is not None and job.worker and job.worker[0] in live:
                sid, worker_id = job.worker
                worker = table.workers[job.worker]
                c.do(sid, Op.TASK_WORKER, worker_id, worker.names, step[3],
                     [[job.id, job.token + (0 if step[2] else 1)]])
        check_invariants(c, claims_before)
    return c


def claims_by_worker(c: Cluster) -> dict:
    return {key: dict(worker.claims) for key, worker in c.m.tasks.workers.items()}


def check_invariants(c: Cluster, claims_before: dict | None = None) -> None:
    table = c.m.tasks
    queued = [job_id for queue in table.queues.values() for job_id in queue]
    assert len(queued) == len(set(queued)), "a job queued twice"
    claimed = {job_id: (worker.key, token) for worker in table.workers.values()
               for job_id, token in worker.claims.items()}
    for worker in table.workers.values():
        assert worker.key[0] in table.by_session
        # a worker may hold more claims than its capacity (it lowered it while busy), but
        # a claim is only ever handed to a worker with a free slot
        before = (claims_before or {}).get(worker.key, {})
        new = [job_id for job_id, token in worker.claims.items() if before.get(job_id) != token]
        assert not new or len(worker.claims) <= worker.capacity, (worker.key, new, worker.capacity)
    active = 0
    for job_id, job in table.jobs.items():
        in_queue = job_id in queued
        assert in_queue == (job.state == "queued"), (job_id, job.state)
        assert (job_id in claimed) == (job.state == "running")
        if job.state == "running":
            assert claimed[job_id] == (job.worker, job.token)
            assert job.attempt <= job.max_attempts
        if job.state == "delayed":
            assert job_id in table.delays
        if job.state in task_module.TERMINAL:
            assert job.payload is None and job.worker is None
        else:
            active += 1
        if job.key is not None:
            assert table.keys[job.key] == job_id
    assert active == table.active
    assert table.active_bytes == sum(job.held_bytes() for job in table.jobs.values()
                                     if job.state not in task_module.TERMINAL) <= task_module.MAX_ACTIVE_BYTES
    assert len(table.finished) <= task_module.MAX_FINISHED_JOBS
    # every queued job waits because no worker serving its name has room
    for name, queue in table.queues.items():
        for key in table.by_name.get(name, {}):
            worker = table.workers[key]
            assert len(worker.claims) >= worker.capacity, f"{name} queued while {key} has room"


@SETTINGS
@given(steps=STEPS)
def test_random_task_histories_keep_the_queue_consistent(steps):
    drive(steps)


@SETTINGS
@given(steps=STEPS, data=st.data())
def test_task_histories_are_deterministic_and_survive_snapshots(steps, data):
    c = drive(steps)
    commands = c.commands
    replica = StateMachine()
    results = []
    for command in commands:
        effects: list = []
        results.append((replica.apply(command, effects), effects))
    assert replica.snapshot() == c.m.snapshot()
    split = data.draw(st.integers(0, len(commands)), label="split")
    head = StateMachine()
    for command in commands[:split]:
        head.apply(command, [])
    restored = StateMachine.restore(head.snapshot())
    for i, command in enumerate(commands[split:], start=split):
        effects = []
        note(f"step {i}")
        assert (restored.apply(command, effects), effects) == results[i]
    assert restored.snapshot() == c.m.snapshot()
    assert sorted(restored.holdings()) == sorted(c.m.holdings())
    assert sorted(restored.deadlines(), key=repr) == sorted(c.m.deadlines(), key=repr)


def test_finished_jobs_and_history_stay_bounded(monkeypatch):
    monkeypatch.setattr(task_module, "MAX_FINISHED_JOBS", 50)
    c = Cluster()
    c.worker(2, ["a"], 1)
    for _ in range(200):
        _, (job_id, _), effects = c.submit(1, "a", key=f"k{c.m.index}")
        c.do(2, Op.TASK_COMPLETE, job_id, assigned(effects)[0].token, b"x" * 100)
    table = c.m.tasks
    assert len(table.jobs) == len(table.finished) == 50 and len(table.keys) == 50
    assert table.finished_bytes == sum(job.kept_bytes() for job in table.jobs.values())


def random_steps(rng, count: int) -> list[tuple]:
    """Long random histories weighted towards the work a busy queue sees."""
    makers = [
        (6, lambda: ("submit", rng.choice(SIDS), rng.choice(NAMES), rng.choice([None, None, "k1", "k2"]),
                     rng.choice([0, 0, 0, 500]), rng.randint(0, 2))),
        (5, lambda: ("complete", rng.randint(0, 8), rng.random() < 0.9)),
        (3, lambda: ("fail", rng.randint(0, 8), rng.random() < 0.9, rng.random() < 0.8)),
        (1, lambda: ("progress", rng.randint(0, 8), rng.random() < 0.8)),
        (1, lambda: ("cancel", rng.choice(SIDS), rng.randint(0, 8))),
        (3, lambda: ("expire", rng.randint(0, 8), rng.random() < 0.7)),
        (1, lambda: ("register", rng.choice(SIDS), rng.choice([1, 2]), rng.sample(NAMES, rng.randint(0, 2)),
                     rng.randint(0, 3))),
        (0.3, lambda: ("end_session", rng.choice(SIDS))),
        (0.5, lambda: ("reopen", rng.randint(10, 12))),
        (0.5, lambda: ("schedule", rng.choice(SIDS), rng.choice(["s1", "s2"]), rng.choice(NAMES),
                       rng.random() < 0.5)),
        (0.2, lambda: ("unschedule", rng.choice(SIDS), rng.choice(["s1", "s2"]))),
        (1, lambda: ("tick", rng.choice(["s1", "s2"]), rng.random() < 0.8)),
        (1, lambda: ("slot", rng.choice(["s1", "s2"]), rng.randint(0, 2))),
    ]
    weights = [weight for weight, _ in makers]
    steps = [rng.choices(makers, weights)[0][1]() for _ in range(count)]
    # claims given back, drawn apart so the histories above stay what they were
    extra = random.Random(rng.random())
    for _ in range(count // 30):
        steps.insert(extra.randrange(len(steps) + 1),
                     ("give_back", extra.randint(0, 8), extra.random() < 0.8, extra.randint(0, 2)))
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_long_random_histories_keep_the_invariants_and_replay_identically_through_snapshots(seed):
    c = drive(random_steps(random.Random(seed), 400))  # invariants checked after every step
    counts: dict[str, int] = {}
    for job in c.m.tasks.jobs.values():
        counts[job.state] = counts.get(job.state, 0) + 1
    assert counts.get("done") and len(counts) >= 4, counts  # a busy queue, not only refusals
    replica, hopping = StateMachine(), StateMachine()
    for command in c.commands:
        effects: list = []
        hop_effects: list = []
        result = replica.apply(command, effects)
        hopping = StateMachine.restore(hopping.snapshot())  # a snapshot installed before every entry
        assert (hopping.apply(command, hop_effects), hop_effects) == (result, effects)
    assert replica.snapshot() == c.m.snapshot() == hopping.snapshot()


def test_a_worker_serving_two_names_takes_the_oldest_waiting_job_first():
    c = Cluster()
    c.worker(2, ["a", "b"], 1)
    _, (running, _), effects = c.submit(1, "a")
    token = assigned(effects)[0].token
    backlog = [c.submit(1, "a")[1][0] for _ in range(2)]
    other = c.submit(1, "b")[1][0]
    later = c.submit(1, "a")[1][0]
    order = []
    for _ in range(4):
        _, _, effects = c.do(2, Op.TASK_COMPLETE, running, token, b"\xc0")
        [claim] = assigned(effects)
        order.append(claim.job_id)
        running, token = claim.job_id, claim.token
    assert order == [backlog[0], backlog[1], other, later]  # "b" is not starved by "a"'s backlog
