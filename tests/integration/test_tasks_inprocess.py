"""The Tasks API end to end on one in-process node (engine="thread"): handlers, run,
progress, status, waiting from another Tasks object, closing a worker, schedules."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from raftsync import JobFailed, UnknownHandler
from raftsync.errors import BadRequest, Closed, NotFound, Timeout, TooLarge
from tests.integration.util import wait_for


def test_handlers_run_progress_and_status(node):
    tasks = node.tasks(pool=2)
    seen = []
    release = threading.Event()

    @tasks.handler("resize")
    def resize(job):
        seen.append((job.id, job.name, job.payload, job.attempt, job.token, job.schedule, job.slot))
        job.progress({"step": 1})
        release.wait(10)
        return {"size": job.payload["w"] * 2}

    job = tasks.submit("resize", {"w": 21}, timeout=30)
    assert job.created and job.name == "resize"
    other = node.tasks()  # any Tasks object (any node) can follow a job by id
    followed = other.job(job.id)
    with pytest.raises(Timeout):
        followed.result(timeout=0.2)
    wait_for(lambda: followed.status().progress == {"step": 1}, 10, "progress visible while it runs")
    status = followed.status()
    assert (status.state, status.attempt, status.max_attempts, status.finished) == ("running", 1, 4, False)
    release.set()
    assert followed.result(timeout=10) == {"size": 42}
    [(job_id, name, payload, attempt, token, schedule, slot)] = seen
    assert (job_id, name, payload, attempt, schedule, slot) == (job.id, "resize", {"w": 21}, 1, None, None)
    final = job.wait(timeout=5)
    assert (final.state, final.token, final.result, final.error) == ("done", token, {"size": 42}, None)
    # go-sync's Run: register and run one job, return its result
    assert tasks.run("double", lambda job: job.payload * 2, payload=4, timeout=10) == 8
    with pytest.raises(JobFailed) as failed:
        tasks.run("boom", lambda job: 1 / 0, retries=0, timeout=10)
    assert failed.value.state == "dead" and "ZeroDivisionError" in failed.value.error
    info = tasks.info()
    assert set(info["handlers"]) >= {"resize", "double", "boom"} and info["queued"] == {}


def test_bad_input_gets_typed_errors(node):
    tasks = node.tasks()
    with pytest.raises(UnknownHandler):
        tasks.submit("nobody")
    tasks.register("echo", lambda job: job.payload)
    with pytest.raises(TooLarge):
        tasks.submit("echo", b"x" * 40_000)
    with pytest.raises(BadRequest):
        tasks.submit("echo", {1, 2})  # not a msgpack value
    with pytest.raises(BadRequest):
        tasks.submit("echo", delay=-1)
    with pytest.raises(BadRequest):
        tasks.submit("echo", retries=1.5)
    with pytest.raises(BadRequest):
        tasks.schedule("s", "echo", cron="* * *")
    with pytest.raises(BadRequest):
        tasks.schedule("s", "echo", cron="0 25 * * *")
    with pytest.raises(BadRequest, match="never fires"):
        tasks.schedule("s", "echo", cron="0 0 31 2 *")
    with pytest.raises(BadRequest):
        tasks.schedule("s", "echo")
    with pytest.raises(BadRequest):
        tasks.schedule("s", "echo", every=0.01)
    with pytest.raises(UnknownHandler):
        tasks.schedule("s", "nobody", every=1)
    with pytest.raises(NotFound):
        tasks.unschedule("never-made")
    with pytest.raises(NotFound):
        tasks.job(10**9).status()
    with pytest.raises(BadRequest):
        node.tasks(pool=0)
    # a result that is not a msgpack value dead-letters at once (retrying cannot help)
    tasks.register("odd", lambda job: object())
    with pytest.raises(JobFailed) as failed:
        tasks.submit("odd", retries=3).result(timeout=10)
    assert failed.value.state == "dead" and "msgpack" in failed.value.error
    assert tasks.job(failed.value.job_id).status().attempt == 1


def test_closing_a_worker_gives_its_unfinished_claims_back_without_using_an_attempt(node):
    first = node.tasks(pool=1)
    started, release = threading.Event(), threading.Event()
    seen_cancelled = []

    def stuck(job):
        started.set()
        release.wait(10)
        seen_cancelled.append(job.cancelled.is_set())
        return "late"

    first.register("work", stuck)
    job = first.submit("work", retries=0)
    assert started.wait(10)
    first.close(timeout=0.3)  # the handler is still running: its claim goes back
    # (by a leave that close proposes, and keeps proposing in the background if slow)
    wait_for(lambda: job.status().state == "queued", 10, "the claim to be given back")
    with pytest.raises(Closed):
        first.register("other", stuck)
    second = node.tasks(pool=1)
    second.register("work", lambda job: f"attempt {job.attempt}")
    assert job.result(timeout=10) == "attempt 2"  # not dead-lettered despite retries=0
    release.set()
    # the first worker's late result was refused: the job keeps the second one's
    wait_for(lambda: first.stats["refused"] == 1, 10, "the late result to be refused")
    assert seen_cancelled == [True]  # the handler could tell its claim had ended
    assert job.result(timeout=1) == "attempt 2"


def test_every_schedule_runs_slots_in_order_until_removed(node):
    tasks = node.tasks()
    runs = []
    three = threading.Event()

    @tasks.handler("beat")
    def beat(job):
        runs.append((job.schedule, job.slot, job.payload))
        if len(runs) >= 3:
            three.set()

    version = tasks.schedule("heartbeat", "beat", every=0.5, payload="hb")
    [info] = tasks.schedules()
    assert (info.name, info.handler, info.every, info.cron, info.version) == ("heartbeat", "beat", 0.5, None, version)
    assert three.wait(10)
    tasks.unschedule("heartbeat")
    assert tasks.schedules() == []
    assert runs[:3] == [("heartbeat", 1, "hb"), ("heartbeat", 2, "hb"), ("heartbeat", 3, "hb")]
    cron_version = tasks.schedule("nightly", "beat", cron="0 3 * * *")
    assert [s.cron for s in tasks.schedules()] == ["0 3 * * *"] and cron_version > version
    assert tasks.schedules()[0].last_time is None  # no run yet
    assert dataclasses.replace(tasks.schedules()[0], last_slot=28_401_120).last_time == 28_401_120 * 60.0
