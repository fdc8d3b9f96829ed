"""Fixed fault schedules against docker-compose.yml's members in network namespaces.

Each schedule breaks the running group (nftables partitions inside the namespaces, SIGKILL
or SIGSTOP of a member's whole process group, wall-clock skew), then stops the faults and
checks:

- liveness: every member commits writes, reads its peers and acquires the lock again;
- liveness also for events and tasks: every member publishes and consumes events, runs
  a job on its worker and sees a job it submitted finish;
- safety, over the workload histories of every member: the KV registers are
  linearizable, no acknowledged write is lost, lock and election holds never overlap and
  their tokens increase, at most one Raft leader per term; every acknowledged event is
  in the topic exactly once at its offset and consumers see offsets in order; every
  acknowledged job completed or dead-lettered, none run twice under one fencing token,
  an idempotent resubmit returned the same job.

Four schedules (leader isolated, leader paused past the session TTL, lock holder paused
past the session TTL, clock skew) run in the default test command; the rest are slow.
"""

import os
import re
import time

import pytest

from cluster.history import check_workload
from cluster.nemesis import Nemesis, missing_nftables
from cluster.netns import find_faketime

from cluster.workload_log import log_marks, peer_counters_seen

from .netns_util import compose_cluster, history_paths, require_namespaces, wait_all_live, wait_new_leader
from .util import wait_for

SESSION_TTL = 3.0          # the schedules below pause members past it
ELECTION_TIMEOUT_MAX = 0.8  # raftsync's default (0.4-0.8 s)


def _require(why):
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the fault tests cannot run: {why}")
        pytest.skip(why)


@pytest.fixture
def group(tmp_path, schedule):
    require_namespaces()
    _require(missing_nftables())
    faketime = getattr(schedule, "faketime", False)
    if faketime and find_faketime() is None:
        _require("needs libfaketime (apt-get install faketime)")
    cluster = compose_cluster(tmp_path / "run", faketime=faketime, RAFTSYNC_SESSION_TTL=str(SESSION_TTL),
                              **getattr(schedule, "environment", {}))
    nemesis = Nemesis(cluster)
    try:
        cluster.start(timeout=60)
        wait_for(lambda: all(len(peer_counters_seen(s.log_text())) == 2 for s in cluster.services.values()),
                 60, "replication before the faults")
        yield cluster, nemesis
    finally:
        try:
            nemesis.stop_all()
        except Exception:
            pass
        cluster.close()


def _others(nemesis, member):
    return [m for m in nemesis.members if m != member]


# -- schedules: each returns once its faults are in place or over ----------------------------------


def isolate_leader(cluster, nemesis):
    leader = nemesis.raft_leader()
    marks = log_marks(cluster)
    nemesis.isolate(leader)
    wait_new_leader(cluster, _others(nemesis, leader), leader, marks)


def isolate_follower(cluster, nemesis):
    follower = _others(nemesis, nemesis.raft_leader())[0]
    nemesis.isolate(follower)
    time.sleep(3 * ELECTION_TIMEOUT_MAX)   # the fault's duration: the minority campaigns in vain


def bridge_leader(cluster, nemesis):
    nemesis.bridge(nemesis.raft_leader())
    time.sleep(3 * ELECTION_TIMEOUT_MAX)


def bridge_follower(cluster, nemesis):
    leader = nemesis.raft_leader()
    nemesis.bridge(_others(nemesis, leader)[0])
    time.sleep(3 * ELECTION_TIMEOUT_MAX)


def leader_cannot_send(cluster, nemesis):
    leader = nemesis.raft_leader()
    marks = log_marks(cluster)
    nemesis.cut([(leader, other) for other in _others(nemesis, leader)], "one-way from leader")
    wait_new_leader(cluster, _others(nemesis, leader), leader, marks)


def leader_cannot_hear(cluster, nemesis):
    leader = nemesis.raft_leader()
    nemesis.cut([(other, leader) for other in _others(nemesis, leader)], "one-way to leader")
    time.sleep(3 * ELECTION_TIMEOUT_MAX)


def flapping(cluster, nemesis):
    a, b, c = nemesis.members
    nemesis.flap([[{a}, {b, c}], [{b}, {a, c}], [{c}, {a, b}]], period=0.4, count=8)


def pause_leader_past_session_ttl(cluster, nemesis):
    leader = nemesis.raft_leader()
    marks = log_marks(cluster)
    nemesis.pause(leader)
    wait_new_leader(cluster, _others(nemesis, leader), leader, marks)
    time.sleep(SESSION_TTL + 1)   # the pause outlives the paused member's sessions
    nemesis.resume(leader)


def _lock_lines(text):
    """[(kind, token, outcome)] of the workload's lock lines: kind "held" or "release"."""
    held = [("held", int(t), "") for t in re.findall(r"lock demo/lock -> held token=(\d+)", text)]
    released = [("release", int(t), o) for t, o in re.findall(r"release demo/lock token=(\d+) -> (.*)", text)]
    return held + released


def pause_lock_holder_past_session_ttl(cluster, nemesis):
    """A member paused while it holds the lock, for longer than its session TTL: another
    member gets the lock (with a higher token) once the lease expires, and the paused
    holder, resumed, finds its lease gone; the checker finds no overlapping holds."""
    marks = log_marks(cluster)
    holder = {}

    def someone_holds():
        for name, service in cluster.services.items():
            lines = _lock_lines(service.log_text()[marks[name]:])
            held = [token for kind, token, _ in lines if kind == "held"]
            done = {token for kind, token, _ in lines if kind == "release"}
            if held and held[-1] not in done:
                holder.update(name=name, token=held[-1])
                nemesis.pause(name)
                return True
        return False
    wait_for(someone_holds, 30, "a member holding the lock")
    name, token = holder["name"], holder["token"]
    after_pause = log_marks(cluster)

    def another_member_took_it():
        return any(kind == "held" and t > token for other, s in cluster.services.items() if other != name
                   for kind, t, _ in _lock_lines(s.log_text()[after_pause[other]:]))
    wait_for(another_member_took_it, 30, "the lock granted to another member after the lease expired")
    nemesis.resume(name)

    def release_answered():
        return [o for kind, t, o in _lock_lines(cluster.services[name].log_text()) if kind == "release" and t == token]
    wait_for(release_answered, 30, "the resumed holder's release")
    assert release_answered()[0] != "ok", "the cluster accepted the release of an expired lease"


pause_lock_holder_past_session_ttl.environment = {"RAFTSYNC_DEMO_LOCK_HOLD": "1.5"}


def pause_follower_past_election_timeout(cluster, nemesis):
    follower = _others(nemesis, nemesis.raft_leader())[0]
    nemesis.pause(follower)
    time.sleep(3 * ELECTION_TIMEOUT_MAX)
    nemesis.resume(follower)


def kill_and_restart_leader(cluster, nemesis):
    leader = nemesis.raft_leader()
    marks = log_marks(cluster)
    nemesis.kill(leader)
    wait_new_leader(cluster, _others(nemesis, leader), leader, marks)
    nemesis.restart(leader)


def clock_skew(cluster, nemesis):
    """Members' wall clocks hours apart, then jumping, while the leader is cut off: nothing
    raftsync decides may depend on comparing them."""
    a, b, c = nemesis.members
    nemesis.skew(a, 3600)
    nemesis.skew(b, -3600)
    for name, offset in ((a, 3600), (b, -3600), (c, 0)):
        service = cluster.services[name]
        seen = cluster.exec(name, [cluster.python, "-c", "import time; print(time.time())"], env=service.env)
        assert abs(float(seen.stdout) - time.time() - offset) < 60, seen
    leader = nemesis.raft_leader()
    marks = log_marks(cluster)
    nemesis.isolate(leader)
    nemesis.skew(c, 7200)
    wait_new_leader(cluster, _others(nemesis, leader), leader, marks)
    nemesis.skew(a, -86400)
    nemesis.heal()
    time.sleep(SESSION_TTL)   # the skews stay on while the group recovers


clock_skew.faketime = True


SCHEDULES = [
    isolate_leader,
    pause_leader_past_session_ttl,
    pause_lock_holder_past_session_ttl,
    clock_skew,
    pytest.param(isolate_follower, marks=pytest.mark.slow),
    pytest.param(bridge_leader, marks=pytest.mark.slow),
    pytest.param(bridge_follower, marks=pytest.mark.slow),
    pytest.param(leader_cannot_send, marks=pytest.mark.slow),
    pytest.param(leader_cannot_hear, marks=pytest.mark.slow),
    pytest.param(flapping, marks=pytest.mark.slow),
    pytest.param(pause_follower_past_election_timeout, marks=pytest.mark.slow),
    pytest.param(kill_and_restart_leader, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.__name__)
def test_fault_schedule_keeps_safety_and_recovers(group, schedule):
    cluster, nemesis = group
    schedule(cluster, nemesis)
    nemesis.stop_all()
    wait_all_live(cluster, log_marks(cluster))
    codes = cluster.stop_services()
    assert all(code is not None for code in codes.values()), codes
    report = check_workload(history_paths(cluster), deaths=nemesis.deaths, time_limit=60)
    assert report.ok, report.explain() + "\nfaults: " + repr(nemesis.log)
    assert report.kv.operations >= 30
    # the events and tasks checks had something to check: acknowledged publishes against
    # the final reads, and acknowledged jobs against their final status
    assert report.events["checked"] > 0 and report.events["deliveries"] > 0, report.explain()
    assert report.tasks["checked"] > 0 and report.tasks["effects"] > 0, report.explain()
