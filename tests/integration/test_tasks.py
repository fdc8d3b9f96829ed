"""Tasks on real three-process clusters (session TTL 3 s, election 0.4-0.8 s): jobs over a
pool of workers on every node, a worker killed or paused mid-job, retries and dead
letters, idempotent submission, schedules through a leader kill."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

from cluster.stopping import stop_and_wait
from cluster import LocalCluster
from raftsync.errors import BadRequest, NotFound, TooLarge, UnknownHandler
from tests.integration.util import events, wait_for

TTL = 3.0
# Liveness bounds (not timings under test): TTL + an election + a loaded 2-core box.
REQUEUE_BOUND = TTL + 0.8 + 1.0 + 6.0


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """One healthy cluster shared by the tests that kill nothing; a worker (pool 4, every
    test handler) on each node."""
    cluster = LocalCluster(3, base_dir=tmp_path_factory.mktemp("tasks"), session_ttl=TTL, test_hooks=True)
    try:
        cluster.start()
        for node in cluster.nodes:
            node.call("tasks_start", pool=4)
        yield cluster
    finally:
        cluster.stop()


def runs_by_job(cluster, name):
    """job id -> [(node index, attempt, token)] of every start of handler ``name``."""
    runs: dict[int, list] = {}
    for node in cluster.nodes:
        if node.running:
            for job_id, attempt, token, *_ in events(node, "task_start", name):
                runs.setdefault(job_id, []).append((node.index, attempt, token))
    return runs


def check_serving(cluster, restart=()):
    """Liveness after faults: restart what was killed; every member then answers
    linearizable reads, a lock is acquirable and a job runs."""
    for node in restart:
        node.start()
        node.call("wait_ready", timeout=20, rpc_timeout=30)
    live = [node for node in cluster.nodes if node.running]
    assert len(live) == len(cluster.nodes)
    live[0].call("kv_write", key="alive", value=b"1", timeout=20)
    for node in live:
        assert node.call("kv_read", key="alive", timeout=20)[0] == b"1"
        node.call("lock_acquire", handle=f"after{node.index}", name="after", timeout=20)
        node.call("lock_release", handle=f"after{node.index}")
    job_id, _ = live[0].call("task_submit", name="echo", payload="after")
    assert live[-1].call("task_results", job_ids=[job_id], timeout=20)[0][1] == "done"


def test_500_jobs_over_three_workers_all_complete_exactly_once(workers):
    count = 500
    a, b, c = workers.nodes
    name = "noop"
    before = runs_by_job(workers, name)
    submitted: list = []
    shares = [count // 3 + (i < count % 3) for i in range(3)]
    threads = [threading.Thread(target=lambda n=n, share=share: submitted.extend(
        n.call("task_submit_many", name=name, count=share, threads=6)))
        for n, share in zip(workers.nodes, shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [outcome for outcome in submitted if outcome[0] is None] == []
    job_ids = [job_id for job_id, _ in submitted]
    assert len(job_ids) == len(set(job_ids)) == count
    # results waited for from one node, whoever submitted and ran them
    results = b.call("task_results", job_ids=job_ids, timeout=60)
    assert [state for _, state, _ in results] == ["done"] * count
    runs = {job_id: run for job_id, run in runs_by_job(workers, name).items() if job_id not in before}
    assert sorted(runs) == sorted(job_ids)
    assert all(len(run) == 1 and run[0][1] == 1 for run in runs.values()), "a job ran twice or was retried"
    per_node = Counter(run[0][0] for run in runs.values())
    assert set(per_node) == {0, 1, 2}, f"work did not spread over the pool: {per_node}"
    info = a.call("task_info")
    assert info["queued"] == {} and all(not w[4] for w in info["workers"])


def test_failing_handler_is_retried_with_backoff_then_dead_lettered(workers):
    a, b, _ = workers.nodes
    job_id, _ = a.call("task_submit", name="fail", retries=2, backoff=0.2)
    [[_, state, error]] = b.call("task_results", job_ids=[job_id], timeout=30)
    assert state == "dead" and error == "RuntimeError: failing on attempt 3"
    attempts = sorted(attempt for _, attempt, _ in runs_by_job(workers, "fail")[job_id])
    assert attempts == [1, 2, 3]
    status = workers.nodes[2].call("task_status", job_id=job_id)
    assert (status["state"], status["attempt"], status["max_attempts"]) == ("dead", 3, 3)
    # backoff between attempts: 0.2 s then 0.4 s at least (the leader's clock)
    starts = sorted(e[3][5] for node in workers.nodes for e in node.call("events")
                    if e[1] == "task_start" and e[3][0] == job_id)
    assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4


def test_idempotent_resubmit_returns_the_same_job(workers):
    a, b, c = workers.nodes
    first, created = a.call("task_submit", name="echo", payload=1, key="order-17")
    again, created_again = c.call("task_submit", name="echo", payload=2, key="order-17")
    assert (again, created, created_again) == (first, True, False)
    [[_, state, result]] = b.call("task_results", job_ids=[first], timeout=20)
    assert state == "done" and result["payload"] == 1
    assert c.call("task_submit", name="echo", payload=3, key="order-17") == [first, False]
    assert len(runs_by_job(workers, "echo")[first]) == 1


def test_overrunning_job_is_queued_again_and_the_late_result_refused(workers):
    a, b, c = workers.nodes
    refused_before = sum(node.call("task_stats")["refused"] for node in workers.nodes)
    # attempt 1 overruns its 1 s visibility deadline (the handler waits up to 20 s, or
    # until it sees its claim end); attempt 2 returns at once
    job_id, _ = a.call("task_submit", name="sleep", payload={"seconds": 20, "first_only": True}, timeout=1.0)
    [[_, state, result]] = b.call("task_results", job_ids=[job_id], timeout=20)
    assert state == "done" and result["attempt"] == 2
    runs = sorted(runs_by_job(workers, "sleep")[job_id], key=lambda run: run[1])
    assert [run[1] for run in runs] == [1, 2] and runs[1][2] > runs[0][2]
    # the first handler was told its claim ended, returned, and its result was refused
    wait_for(lambda: sum(node.call("task_stats")["refused"] for node in workers.nodes) == refused_before + 1, 10,
             "the overrun attempt's result to be refused")
    ends = [e for node in workers.nodes for e in events(node, "task_end", "sleep") if e[0] == job_id]
    assert sorted((attempt, cancelled) for _, attempt, _, cancelled in ends) == [(1, True), (2, False)]
    assert c.call("task_status", job_id=job_id)["result"]["token"] == runs[1][2]


def test_status_progress_cancel_and_typed_errors(workers):
    a, b, c = workers.nodes
    job_id, _ = a.call("task_submit", name="sleep", payload={"seconds": 30}, timeout=60)
    wait_for(lambda: job_id in runs_by_job(workers, "sleep"), 10, "the sleep job to start")
    status = c.call("task_status", job_id=job_id)
    assert status["state"] == "running" and status["attempt"] == 1 and status["token"] >= job_id
    assert b.call("task_cancel", job_id=job_id) is True
    [[_, state, error]] = c.call("task_results", job_ids=[job_id], timeout=10)
    assert (state, error) == ("cancelled", "cancelled")
    # the handler saw its claim end (job.cancelled) and stopped early
    wait_for(lambda: any(e[0] == job_id and e[3] for node in workers.nodes
                         for e in events(node, "task_end", "sleep")), 10, "the handler to see the cancel")
    assert b.call("task_cancel", job_id=job_id) is False
    with pytest.raises(UnknownHandler):
        a.call("task_submit", name="no-such-handler")
    with pytest.raises(TooLarge):
        a.call("task_submit", name="echo", payload="x" * 40_000)
    with pytest.raises(BadRequest):
        a.call("task_submit", name="echo", retries=-1)
    with pytest.raises(BadRequest):
        a.call("task_submit", name="echo", timeout=0)
    with pytest.raises(BadRequest):
        a.call("task_schedule", name="nightly", handler="echo", cron="61 * * * *")
    with pytest.raises(BadRequest):
        a.call("task_schedule", name="nightly", handler="echo", every=1, cron="* * * * *")
    with pytest.raises(UnknownHandler):
        a.call("task_schedule", name="nightly", handler="no-such-handler", every=1)
    with pytest.raises(NotFound):
        a.call("task_status", job_id=10**12)


def test_sigkilled_worker_job_runs_again_elsewhere_and_its_late_result_is_refused(make_cluster):
    cluster = make_cluster(3, session_ttl=TTL)
    for node in cluster.nodes:
        node.call("tasks_start", pool=2, handlers=["sleep", "echo"])
    submitter = cluster.nodes[0]
    job_id, _ = submitter.call("task_submit", name="sleep", payload={"seconds": 60, "first_only": True},
                               timeout=120, retries=3)
    wait_for(lambda: job_id in runs_by_job(cluster, "sleep"), 10, "the job to start")
    [(victim_index, attempt, old_token)] = runs_by_job(cluster, "sleep")[job_id]
    assert attempt == 1
    victim = cluster.nodes[victim_index]
    victim.kill()  # app and engine, mid-job
    survivors = [node for node in cluster.nodes if node.running]
    # re-queued when the dead worker's session ends (not after the 120 s visibility timeout)
    [[_, state, result]] = survivors[-1].call("task_results", job_ids=[job_id], timeout=REQUEUE_BOUND + 10)
    assert state == "done" and result["attempt"] == 2 and result["token"] > old_token
    assert result["node"] != victim.address
    runs = runs_by_job(cluster, "sleep")[job_id]
    assert [run[1] for run in runs] == [2]  # the survivors saw only the second run
    # the dead claim's result, arriving late, is refused and changes nothing
    assert survivors[0].call("task_complete_raw", job_id=job_id, token=old_token, result="late") == "NOT_HELD"
    assert survivors[1].call("task_status", job_id=job_id)["result"]["attempt"] == 2
    check_serving(cluster, restart=[victim])


def test_paused_worker_loses_its_job_and_its_result_after_resuming_is_refused(make_cluster):
    cluster = make_cluster(3, session_ttl=TTL)
    for node in cluster.nodes:
        node.call("tasks_start", pool=2, handlers=["sleep", "echo"])
    job_id, _ = cluster.nodes[0].call("task_submit", name="sleep", payload={"seconds": 2.0, "first_only": True},
                                      timeout=120)
    wait_for(lambda: job_id in runs_by_job(cluster, "sleep"), 10, "the job to start")
    [(paused_index, _, old_token)] = runs_by_job(cluster, "sleep")[job_id]
    paused = cluster.nodes[paused_index]
    paused.signal_app(signal.SIGSTOP)  # its engine stays a Raft member; keepalives stop
    others = [node for node in cluster.nodes if node is not paused]
    try:
        [[_, state, result]] = others[0].call("task_results", job_ids=[job_id], timeout=REQUEUE_BOUND + 10)
        assert state == "done" and result["attempt"] == 2 and result["node"] != paused.address
    finally:
        paused.signal_app(signal.SIGCONT)
    # resumed: its handler returns and reports the old claim, which the cluster refuses
    wait_for(lambda: paused.call("task_stats")["refused"] >= 1, 15, "the paused worker's result to be refused")
    assert paused.call("task_stats")["completed"] == 0
    status = others[1].call("task_status", job_id=job_id)
    assert status["result"]["token"] == result["token"] > old_token
    # it registered again under its new session and takes jobs again
    wait_for(lambda: sum(1 for w in others[0].call("task_info")["workers"] if w[3] > 0) == 3, 15,
             "the resumed worker to register again")
    check_serving(cluster)


def test_every_schedule_keeps_its_cadence_through_a_leader_kill(make_cluster):
    cluster = make_cluster(3, session_ttl=TTL)
    leader = cluster.leader()
    followers = [node for node in cluster.nodes if node is not leader]
    # workers only where nothing is killed: every slot then runs exactly once
    for node in followers:
        node.call("tasks_start", pool=2, handlers=["echo"])

    def slot_runs():
        return sorted((e[4], e[1], e[5]) for node in followers
                      for e in [ev[3] for ev in node.call("events") if ev[1] == "task_start" and ev[2] == "echo"]
                      if e[3] == "beat")  # (slot, attempt, start time)

    followers[0].call("task_schedule", name="beat", handler="echo", every=1.0, payload="beat")
    wait_for(lambda: len(slot_runs()) >= 3, 15, "three slots before the kill")
    killed_at = time.monotonic()
    leader.kill()
    wait_for(lambda: len([r for r in slot_runs() if r[2] > killed_at]) >= 4, 30, "four slots after the kill")
    followers[1].call("task_unschedule", name="beat")
    last_slot = {s[0]: s[4] for s in followers[0].call("task_schedules")}.get("beat")
    assert last_slot is None  # removed
    wait_for(lambda: len(slot_runs()) == max(r[0] for r in slot_runs()), 10, "every enqueued slot to run")
    runs = slot_runs()
    slots = [slot for slot, _, _ in runs]
    assert slots == list(range(1, len(runs) + 1)), f"a slot missed or doubled: {slots}"
    assert all(attempt == 1 for _, attempt, _ in runs)
    starts = [start for _, _, start in runs]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    # the cadence holds (a slot a second) apart from the failover gap: a new leader waits one
    # full period after its election
    assert max(gaps) < 1.0 + 0.8 + TTL + 3.0, gaps
    assert sorted(gaps)[len(gaps) // 2] < 2.5, gaps
    check_serving(cluster, restart=[leader])


@pytest.mark.slow
def test_jobs_survive_repeated_worker_kills(make_cluster):
    """Workers (with their engines) SIGKILLed and restarted while 300 jobs run: every job
    ends done; a job ran more than once only if a worker died holding it, and its result
    is that of its last claim."""
    cluster = make_cluster(3, session_ttl=TTL)
    for node in cluster.nodes:
        node.call("tasks_start", pool=3, handlers=["sleep", "echo"])
    submitted = cluster.nodes[0].call("task_submit_many", name="sleep", count=300, threads=4,
                                      payload={"seconds": 0.1}, timeout=30)
    job_ids = [job_id for job_id, _ in submitted]
    assert None not in job_ids and len(job_ids) == 300
    for round_ in range(4):
        victim = cluster.nodes[1 + round_ % 2]
        victim.kill()
        time.sleep(1.0)  # fault schedule: let jobs move while it is down
        victim.start()
        victim.call("wait_ready", timeout=20, rpc_timeout=30)
        victim.call("tasks_start", pool=3, handlers=["sleep", "echo"])
    results = cluster.nodes[0].call("task_results", job_ids=job_ids, timeout=120, rpc_timeout=150)
    assert [state for _, state, _ in results] == ["done"] * 300
    attempts = []
    for job_id, _, result in results:
        status = cluster.nodes[0].call("task_status", job_id=job_id)
        assert result["token"] == status["token"], "the result of a claim that was not the last one"
        attempts.append(status["attempt"])
    assert max(attempts) > 1, "no kill hit a running job: the fault was not exercised"
    check_serving(cluster)


def test_a_claim_that_ended_in_entries_a_snapshot_skipped_is_revoked_on_the_worker(make_cluster):
    """The worker's engine misses the cancel (paused while the leader compacts its log),
    catches up by a snapshot install, and its handler is still told the claim is over."""
    cluster = make_cluster(3, compaction_min_entries=50, session_ttl=30)
    leader = cluster.leader()
    worker = next(node for node in cluster.nodes if node is not leader)
    worker.call("tasks_start", pool=2, handlers=["sleep", "echo"])
    job_id, _ = leader.call("task_submit", name="sleep", payload={"seconds": 60}, timeout=120)
    wait_for(lambda: events(worker, "task_start", "sleep"), 10, "the job to start")
    stop_and_wait(worker.engine_pid)
    try:
        assert leader.call("task_cancel", job_id=job_id) is True
        for i in range(120):
            leader.call("kv_write", key=f"fill/{i}", value=b"x", timeout=10)
        wait_for(lambda: leader.call("status")["log_length"] < 150, 20, "the leader to compact its log")
        wait_for(lambda: not leader.call("status")["peers_connected"][worker.address], 20,
                 "the leader to drop the paused follower")
    finally:
        os.kill(worker.engine_pid, signal.SIGCONT)
    wait_for(lambda: worker.call("status")["snapshots_restored"] >= 1, 30, "the snapshot install")
    assert worker.call("task_status", job_id=job_id, consistency="local")["state"] == "cancelled"
    # the handler waits on job.cancelled: it is told its claim is over
    wait_for(lambda: events(worker, "task_end", "sleep"), 15, "the cancelled handler to be told")
    assert events(worker, "task_end", "sleep")[0][3] is True
    check_serving(cluster)
