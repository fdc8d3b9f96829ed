"""A Tasks worker's pool on one in-process node (engine="thread"): it never advertises a
thread stuck in a handler as free, gives back (without using an attempt) claims it cannot
start, survives handlers raising BaseException, learns of claims that ended while it was
away, and leaves for good when closed during an outage."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from raftsync import JobFailed
from raftsync.codec import Op, Status
from raftsync.errors import Timeout
from tests.integration.util import wait_for


def registration(tasks, worker_id=None):
    """(session id, capacity) the cluster lists for this worker (None if not listed)."""
    worker_id = tasks.worker_id if worker_id is None else worker_id
    for session_id, listed_id, _, capacity, _ in tasks.info()["workers"]:
        if listed_id == worker_id:
            return session_id, capacity
    return None


def capacity(tasks):
    listed = registration(tasks)
    return None if listed is None else listed[1]


def test_a_hung_handler_keeps_its_thread_and_the_worker_takes_no_job_it_cannot_start(node):
    tasks = node.tasks(pool=1)
    release = threading.Event()

    def hang(job):
        if job.attempt == 1:
            release.wait(30)  # ignores job.cancelled: overruns its 0.5 s deadline
        return job.attempt

    tasks.register("hang", hang)
    tasks.register("echo", lambda job: job.payload)
    try:
        # Only the first attempt is meant to overrun; a spare retry keeps a slow machine
        # (a later attempt over 0.5 s) from dead-lettering the job.
        hung = tasks.submit("hang", retries=2, timeout=0.5, backoff=0)
        # Its claim times out; nobody else has room, so the cluster hands the job straight
        # back to this worker, whose only thread is stuck: the worker gives it back unstarted
        # (no attempt used) and advertises no free thread until the handler returns.
        wait_for(lambda: capacity(tasks) == 0, 10, "the worker to advertise its stuck thread")
        wait_for(lambda: hung.status().state == "queued", 10, "the claim it cannot start to be given back")
        assert hung.status().attempt == 1
        echo = tasks.submit("echo", 7, retries=0, timeout=5)
        status = echo.status()
        assert (status.state, status.attempt) == ("queued", 0)  # waits for a thread, burns no attempt
    finally:
        release.set()
    assert hung.result(timeout=10) >= 2  # the stuck first attempt's result never counts
    assert echo.result(timeout=10) == 7
    wait_for(lambda: capacity(tasks) == 1, 10, "the thread to count as free again")


def test_jobs_go_to_a_worker_with_a_free_thread_not_to_one_stuck_in_a_handler(node):
    stuck, healthy = node.tasks(pool=1), node.tasks(pool=1)
    release = threading.Event()
    stuck.register("hang", lambda job: release.wait(30))
    ran_on = []
    for worker in (stuck, healthy):
        worker.register("echo", lambda job, worker=worker: ran_on.append(worker.worker_id) or job.payload)
    try:
        with pytest.raises(JobFailed):
            stuck.submit("hang", retries=0, timeout=0.5).result(timeout=10)
        wait_for(lambda: capacity(stuck) == 0, 10, "the stuck worker to advertise no free thread")
        jobs = [healthy.submit("echo", i, retries=0, timeout=2) for i in range(4)]
        assert [job.result(timeout=10) for job in jobs] == [0, 1, 2, 3]
        assert set(ran_on) == {healthy.worker_id}
    finally:
        release.set()


def test_a_worker_that_lost_its_session_mid_job_registers_again_without_its_stuck_thread(node):
    tasks = node.tasks(pool=2)
    started, release = threading.Event(), threading.Event()

    def stubborn(job):
        started.set()
        release.wait(30)  # does not look at job.cancelled

    tasks.register("stubborn", stubborn)
    old_session = registration(tasks)[0]
    try:
        job = tasks.submit("stubborn", timeout=60)
        assert started.wait(10)
        # what the session watchdog does when the process was paused past the TTL
        tasks._replica.sessions.lose(tasks._replica.sessions.by_id(old_session), "test: paused past the TTL")
        wait_for(lambda: (registration(tasks) or (old_session,))[0] != old_session, 10,
                 "the worker to register under its new session")
        assert capacity(tasks) == 1  # one of its two threads is still in the old claim's handler
    finally:
        release.set()
    wait_for(lambda: capacity(tasks) == 2, 10, "the thread to count as free again")
    assert job.wait(timeout=10).state == "done"


@pytest.mark.parametrize("raised", [asyncio.CancelledError, SystemExit], ids=["CancelledError", "SystemExit"])
def test_a_handler_raising_a_base_exception_fails_its_attempt_and_the_thread_serves_on(node, raised):
    tasks = node.tasks(pool=1)

    def handler(job):
        raise raised()

    tasks.register("raises", handler)
    tasks.register("echo", lambda job: job.payload)
    with pytest.raises(JobFailed) as failed:
        tasks.submit("raises", retries=0, timeout=30).result(timeout=10)
    assert failed.value.state == "dead" and raised.__name__ in failed.value.error
    assert tasks.submit("echo", 1, retries=0, timeout=30).result(timeout=10) == 1
    assert all(thread.is_alive() for thread in tasks._threads)


def test_a_claim_that_ended_while_the_worker_was_away_is_revoked_on_the_worker(node):
    """The engine's list of what our sessions hold after a snapshot install (the
    cluster test in test_tasks.py makes a real one): a claim not in it is over."""
    tasks = node.tasks(pool=1)
    started, seen = threading.Event(), []

    def waits(job):
        started.set()
        seen.append(job.cancelled.wait(30))

    tasks.register("waits", waits)
    job = tasks.submit("waits", timeout=60)
    assert started.wait(10)
    replica = tasks._replica
    session = registration(tasks)[0]
    replica._notice_handlers["task_revoked"] = []  # the revocation is in entries the snapshot skipped
    assert job.cancel(timeout=10) is True
    replica._on_notify(["holdings", [session], []])
    wait_for(lambda: seen == [True], 10, "the handler to see its claim end")


def test_a_worker_closed_while_its_leave_cannot_be_sent_leaves_once_it_can(node, monkeypatch):
    worker = node.tasks(pool=2)
    worker.register("echo", lambda job: job.payload)
    replica = worker._replica
    real_submit = replica.submit

    def unavailable(session, op, *args, **kwargs):  # what a short loss of quorum looks like
        if op == Op.TASK_WORKER:
            raise Timeout("no leader before the deadline")
        return real_submit(session, op, *args, **kwargs)

    monkeypatch.setattr(replica, "submit", unavailable)
    worker.close(timeout=0.5)
    monkeypatch.undo()  # the cluster is back
    submitter = node.tasks()
    wait_for(lambda: registration(submitter, worker.worker_id) is None, 10, "the closed worker's leave to apply")
    job = submitter.submit("echo", 1, retries=0, timeout=0.5)
    status = job.status()
    assert (status.state, status.attempt) == ("queued", 0)  # not claimed by a worker that is gone


def test_claims_for_a_worker_nothing_here_serves_are_given_back_without_an_attempt(node):
    tasks = node.tasks(pool=1)
    replica = tasks._replica
    ghost = 0x5EED
    deadline = time.monotonic() + 10
    status, _ = replica.submit(replica.sessions.default(deadline), Op.TASK_WORKER, [ghost, ["ghostly"], 2], deadline,
                               "a worker registered by a Tasks object that is gone")
    assert status == Status.OK
    job = tasks.submit("ghostly", retries=0, timeout=5)
    wait_for(lambda: registration(tasks, ghost) is None, 10, "the unknown worker to be taken off")
    status = job.status()
    assert (status.state, status.attempt) == ("queued", 0)
    tasks.register("ghostly", lambda job: job.attempt)
    assert job.result(timeout=10) == 1


def test_a_claim_taken_as_its_handler_is_unregistered_is_given_back_without_an_attempt(node, monkeypatch):
    tasks = node.tasks(pool=2)
    tasks.register("keep", lambda job: None)
    tasks.register("going", lambda job: "ran")
    replica = tasks._replica
    real_submit = replica.submit
    sending, gate = threading.Event(), threading.Event()

    def slow(session, op, args, *rest, **kwargs):  # the unregistration is slow to apply
        if op == Op.TASK_WORKER and "going" not in args[1]:
            sending.set()
            gate.wait(10)
        return real_submit(session, op, args, *rest, **kwargs)

    monkeypatch.setattr(replica, "submit", slow)
    leaving = threading.Thread(target=tasks.unregister, args=("going",))
    leaving.start()
    try:
        assert sending.wait(10)
        submitter = node.tasks()
        job = submitter.submit("going", retries=0, timeout=5)
        assert job.status().state == "running"  # claimed by this worker, which no longer has the handler
    finally:
        gate.set()
        leaving.join(10)
    wait_for(lambda: job.status().state != "running", 10, "the claim to be given back")
    other = node.tasks(pool=1)
    other.register("going", lambda job: job.attempt)
    assert job.result(timeout=10) == 1  # its first attempt: the given-back claim did not count
