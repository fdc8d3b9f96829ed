"""The claim, release, read and session paths under lost replies, lost barriers, stalled
engines and quorum loss (issue "Core under faults", items 2-8 and 11).

Each test makes a rare interleaving happen every time with an engine test hook (drop a
command's reply, drop a barrier's callback) or a pause, and checks what a user relies
on: every call returns by its deadline with a typed answer, nothing stays held by a
handle nobody has, and once the fault is gone every lock is acquirable and every node
answers reads. Bounds of a few seconds are liveness bounds, not performance claims.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cluster.stopping import stop_and_wait
from cluster.launcher import free_ports
from raftsync import Node
from raftsync.errors import NoQuorum, OutcomeUnknown, RaftsyncError, Timeout
from raftsync.replica import APP_STALL_LIMIT, ENGINE_SILENCE_LIMIT
from tests.integration.util import events, wait_for, wait_queued

TTL = 3.0  # the test clusters' session TTL


def _returns_lease_or_frees_it(node, other, handle, name, **acquire_args):
    """Acquire on ``node`` with its next reply dropped: the call returns the lease, or it
    raises and (once settled in the background) ``other`` can take the lock."""
    node.call("test_hook", name="drop_replies", count=1)
    try:
        token = node.call("lock_acquire", handle=handle, name=name, **acquire_args)
    except RaftsyncError as exc:
        assert isinstance(exc, Timeout), exc  # OutcomeUnknown arrives typed as a Timeout
        token = None
    assert node.call("status")["hooks_fired"].get("drop_replies") == 1
    if token is not None:
        assert node.call("lock_state", handle=handle)["held"]
        node.call("lock_release", handle=handle)
    assert other.call("lock_acquire", handle="other", name=name, timeout=3) > 0
    other.call("lock_release", handle="other")
    return token


def test_try_lock_with_a_lost_reply_returns_the_lease_or_frees_it(cluster):
    a, b, _ = cluster.nodes
    token = _returns_lease_or_frees_it(a, b, "try", "lost-reply-try", timeout=0)
    # The grant was applied and seen being applied: the caller gets it.
    assert token is not None and token > 0


def test_timed_acquire_outlasted_by_a_lost_reply_returns_the_lease_or_frees_it(cluster):
    a, b, _ = cluster.nodes
    # 0.9 s: shorter than the first attempt (1 s), so no retry can bring the answer;
    # the grant notice decides.
    token = _returns_lease_or_frees_it(a, b, "timed", "lost-reply-timed", timeout=0.9)
    assert token is not None and token > 0


def test_queued_acquire_with_a_lost_reply_is_withdrawn_in_the_background(cluster):
    holder, node, other = cluster.nodes
    holder.call("lock_acquire", handle="h", name="q")
    node.call("test_hook", name="drop_replies", count=1)
    with pytest.raises(Timeout):  # LockTimeout would say "queued and timed out"; this is unknown
        node.call("lock_acquire", handle="lost", name="q", timeout=0.5)
    # The answer ("queued") was lost; settling withdraws the wait, so the lock passes
    # straight to the next real waiter instead of a handle nobody has.
    wait_for(lambda: holder.call("lock_info", name="q")[2] == [], 5, "the withdrawal of the lost wait")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "token", other.call("lock_acquire", handle="o", name="q", timeout=10)))
    thread.start()
    wait_queued(holder, "q", 1)
    holder.call("lock_release", handle="h")
    thread.join(10)
    assert result.get("token", 0) > 0


def test_campaign_with_a_lost_reply_leads_or_frees_the_group(cluster):
    a, b, _ = cluster.nodes
    a.call("test_hook", name="drop_replies", count=1)
    try:
        term = a.call("leader_campaign", handle="e", group="lost-reply", candidate_id="a", timeout=0)
    except Timeout:
        term = None
    if term is not None:
        assert a.call("leader_current", group="lost-reply")[2] == term
        a.call("leader_resign", handle="e")
    assert b.call("leader_campaign", handle="e", group="lost-reply", candidate_id="b", timeout=3) > 0


def _pause(node):
    node.signal_group(signal.SIGSTOP)


def _resume(node):
    node.signal_group(signal.SIGCONT)


def test_release_during_quorum_loss_finishes_once_the_quorum_is_back(make_cluster):
    # A long TTL, so the pause (longer than quorum_timeout) ends no session.
    cluster = make_cluster(3, session_ttl=10.0, quorum_timeout=1.5)
    holder = cluster.nodes[0]
    waiter_node, third = cluster.nodes[1], cluster.nodes[2]
    holder.call("lock_acquire", handle="h", name="release-under-loss")
    result = {}

    def wait_for_the_lock():
        # The waiter's node is paused too; if no leader is back within its quorum_timeout
        # after the resume (reconnects, a split vote), its acquire raises NoQuorum, and it
        # asks again, as an application would.
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            try:
                result["token"] = waiter_node.call("lock_acquire", handle="w", name="release-under-loss",
                                                   timeout=give_up - time.monotonic())
                return
            except NoQuorum:
                continue

    thread = threading.Thread(target=wait_for_the_lock)
    thread.start()
    wait_queued(holder, "release-under-loss", 1)
    _pause(waiter_node)
    _pause(third)
    try:
        # The first attempt is lost on its way (as a forwarded command can be): only a
        # release that keeps being proposed can still apply.
        holder.call("test_hook", name="drop_submits", count=1)
        started = time.monotonic()
        with pytest.raises(OutcomeUnknown):
            holder.call("lock_release", handle="h", timeout=1.0)
        assert time.monotonic() - started < 1.0 + 1.0, "release overran its deadline"
        # Releasing that same lease again is a no-op, not NotHeld.
        holder.call("lock_release", handle="h", timeout=0.2)
        # Outlast the quorum timeout: a release that gave up by now would never apply.
        time.sleep(2.0)  # the length of the outage is what is under test
    finally:
        resumed_at = time.monotonic()
        _resume(waiter_node)
        _resume(third)
    thread.join(30)
    assert result.get("token", 0) > 0, "the waiter never got the lock the release gave back"
    granted_at = [e[0] for e in waiter_node.call("events") if e[1] == "granted" and e[2] == "w"][0]
    # A liveness bound (reconnects and an election may follow the pause), not a
    # performance figure: without the background release the lock stays held for good.
    assert granted_at - resumed_at < 5.0, f"granted {granted_at - resumed_at:.2f}s after the resume"
    waiter_node.call("lock_release", handle="w")
    _check_cluster_serves(cluster, "release-under-loss")


def test_stalled_engine_with_a_full_channel_still_reports_the_lease_lost_in_time(cluster):
    node, other, _ = cluster.nodes
    node.call("lock_acquire", handle="h", name="stalled")
    # Writers fill the channel to the engine with 32 KiB values while it is stopped.
    put_op = 10  # codec.Op.KV_PUT
    before = node.call("status")["submitted_ops"].get(put_op, 0)
    node.call("write_flood", name="f", threads=4, size=32 * 1024, seconds=TTL + 3, timeout=2.0)
    wait_for(lambda: node.call("status")["submitted_ops"].get(put_op, 0) >= before + 4, 5, "the writers to start")
    stopped_at = time.monotonic()
    stop_and_wait(node.engine_pid)
    try:
        wait_for(lambda: events(node, "lost", "h"), TTL + 2, "the lease to be reported lost")
        lost_at = [e[0] for e in node.call("events") if e[1] == "lost" and e[2] == "h"][0]
        # Reported lost before the cluster could hand the lock to anyone else.
        assert lost_at < stopped_at + TTL, f"lost {lost_at - stopped_at:.2f}s after the stop"
        state = node.call("lock_state", handle="h")
        assert state["lost"] and not state["valid"]
        # No writer hangs on the stalled engine: each call ends by its deadline.
        wait_for(lambda: len(events(node, "flood_done", "f")) == 4, TTL + 3 + 2.0 + 3, "the writers")
        for _, calls, slowest, errors in events(node, "flood_done", "f"):
            assert slowest < 2.0 + 1.0, f"a write took {slowest:.2f}s with a 2 s timeout"
    finally:
        os.kill(node.engine_pid, signal.SIGCONT)
    # Once the engine runs again the lock is free for others and the node serves.
    assert other.call("lock_acquire", handle="o", name="stalled", timeout=TTL + 5) > 0
    other.call("lock_release", handle="o")
    _check_cluster_serves(cluster, "stalled")


def test_observer_on_a_follower_sees_every_term_across_a_snapshot_install(make_cluster):
    cluster = make_cluster(3, compaction_min_entries=50)
    leader = cluster.leader()
    follower, other = [n for n in cluster.nodes if n is not leader]
    for node in (follower, leader):
        node.call("observe_start", name="o", group="g")
    wait_for(lambda: events(follower, "observed", "o") == [None], 5, "the first observation")
    stop_and_wait(follower.engine_pid)
    try:
        for round_ in range(4):  # four leaderships, each over before the follower resumes
            for candidate in (leader, other):
                candidate.call("leader_campaign", handle="e", group="g", candidate_id=candidate.address)
                candidate.call("leader_resign", handle="e")
            for i in range(40):
                leader.call("kv_write", key=f"fill/{i}", value=b"x")
        wait_for(lambda: leader.call("status")["log_length"] < 150, 20, "leader compaction")
        wait_for(lambda: not leader.call("status")["peers_connected"][follower.address], 20,
                 "the leader to drop the paused follower")
    finally:
        os.kill(follower.engine_pid, signal.SIGCONT)
    expected = events(leader, "observed", "o")
    assert len(expected) == 1 + 2 * 8
    wait_for(lambda: follower.call("status")["snapshots_restored"] >= 1, 20, "the snapshot install")
    wait_for(lambda: len(events(follower, "observed", "o")) >= len(expected), 10, "the replay")
    assert events(follower, "observed", "o") == expected
    _check_cluster_serves(cluster, "after-observe")


def test_lost_barrier_callback_does_not_wedge_linearizable_reads(cluster):
    _, follower, _ = cluster.nodes
    follower.call("kv_write", key="b", value=b"1")
    for _ in range(3):
        follower.call("test_hook", name="drop_barriers", count=1)
        started = time.monotonic()
        assert follower.call("kv_read", key="b", timeout=5)[0] == b"1"
        assert time.monotonic() - started < 5
    status = follower.call("status")
    assert status["hooks_fired"]["drop_barriers"] == 3
    # (A real barrier slower than its 0.5 s deadline on a loaded machine is abandoned too.)
    assert status["barriers_abandoned"] >= 3 and status["pending_reads"] == 0
    assert follower.call("leader_current", group="nobody") is None
    _check_cluster_serves(cluster, "after-lost-barriers")


def test_follower_that_installs_a_snapshot_keeps_serving_reads(make_cluster):
    cluster = make_cluster(3, compaction_min_entries=50)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    stop_and_wait(follower.engine_pid)
    try:
        for i in range(200):
            leader.call("kv_write", key=f"s/{i % 20}", value=b"%d" % i)
        wait_for(lambda: leader.call("status")["log_length"] < 150, 20, "leader compaction")
        wait_for(lambda: not leader.call("status")["peers_connected"][follower.address], 20,
                 "the leader to drop the paused follower")
        # Reads queued at the follower while it is stopped, answered after the install.
        results = []
        readers = [threading.Thread(target=lambda: results.append(
            follower.call("kv_read", key="s/19", timeout=10))) for _ in range(4)]
        for reader in readers:
            reader.start()
    finally:
        os.kill(follower.engine_pid, signal.SIGCONT)
    for reader in readers:
        reader.join(15)
    assert [r[0] for r in results] == [b"199"] * 4
    wait_for(lambda: follower.call("status")["snapshots_restored"] >= 1, 20, "the snapshot install")
    for i in range(20):
        assert follower.call("kv_read", key=f"s/{i}", timeout=5)[0] == b"%d" % (180 + i)
    _check_cluster_serves(cluster, "after-install")


def _check_cluster_serves(cluster, lock_name):
    """After a fault: every member answers linearizable reads and the lock is acquirable."""
    cluster.nodes[0].call("kv_write", key="after-fault", value=b"ok", timeout=10)
    for node in cluster.nodes:
        assert node.call("kv_read", key="after-fault", timeout=10)[0] == b"ok"
    for node in cluster.nodes:
        assert node.call("lock_acquire", handle=f"check-{node.index}", name=lock_name, timeout=10) > 0
        node.call("lock_release", handle=f"check-{node.index}")


# -- one node in this process ---------------------------------------------------------


@pytest.fixture
def member(tmp_path):
    with Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], data_dir=tmp_path / "data", session_ttl=3,
              test_hooks=True) as node:
        node.wait_ready(10)
        yield node


def test_write_that_applied_before_its_session_ended_returns_its_answer(member):
    kv = member.data()
    session = member.default_session
    member._replica.test_hook("drop_replies", {"count": 1})
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.setdefault("record", _catch(lambda: kv.write("k", b"v"))))
    writer.start()
    # The write applied (its reply was dropped); now its session ends before the retry.
    wait_for(lambda: _local_value(kv, "k") == b"v", 5, "the write to apply")
    session.close()
    writer.join(10)
    record = outcome["record"]
    assert not isinstance(record, Exception), f"a write that applied raised {record!r}"
    assert record.value == b"v" and record.version == 1
    assert kv.read("k").version == 1  # applied once


def test_session_close_is_one_log_entry_with_the_right_reason(member):
    session = member.session(ttl=5)
    lost = []
    session.on_lost(lambda s: lost.append(s.lost_reason))
    close_op = 3  # codec.Op.CLOSE_SESSION
    before = member.status()["submitted_ops"].get(close_op, 0)
    session.close()
    assert session.lost_reason == "closed"
    member.data().write("after-close", b"x")  # an entry after anything the close started
    assert member.status()["submitted_ops"].get(close_op, 0) - before == 1
    wait_for(lambda: lost == ["closed"], 5, "the on_lost callback")


def _catch(call):
    try:
        return call()
    except Exception as exc:
        return exc


def _local_value(kv, key):
    try:
        return kv.read(key, consistency="local").value
    except RaftsyncError:
        return None


def test_calls_without_a_timeout_raise_no_quorum_on_a_stalled_engine(tmp_path):
    with Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], data_dir=tmp_path / "data", session_ttl=30,
              quorum_timeout=2.0) as node:
        node.wait_ready(10)
        kv = node.data()
        kv.write("k", b"v")
        stop_and_wait(node.engine_pid)
        try:
            for call in (lambda: kv.write("k", b"w", timeout=None), lambda: kv.read("k", timeout=None),
                         lambda: node.lock("l").acquire(timeout=None)):
                started = time.monotonic()
                with pytest.raises(NoQuorum):
                    call()
                # quorum_timeout (2 s), counted from when the engine went silent (1 s)
                # at the earliest, later by up to the app-stall allowance if this process
                # was itself starved, plus slack
                assert time.monotonic() - started < 2.0 + ENGINE_SILENCE_LIMIT + APP_STALL_LIMIT + 2.0
        finally:
            os.kill(node.engine_pid, signal.SIGCONT)
        assert kv.read("k", timeout=10).value in (b"v", b"w")


def test_call_without_a_timeout_raises_no_quorum_when_the_majority_is_gone(make_cluster):
    cluster = make_cluster(3, quorum_timeout=2.0)
    survivor = cluster.nodes[0]
    for node in cluster.nodes[1:]:
        node.kill()
    # Its default session is lost once no keepalive is acknowledged; a write without a
    # timeout then waits for a session that cannot open: NoQuorum, not a hang.
    wait_for(lambda: any(s[3] for s in survivor.call("sessions")) or not survivor.call("sessions"),
             TTL + 2, "the default session to be lost")
    started = time.monotonic()
    with pytest.raises(NoQuorum):
        survivor.call("kv_write", key="k", value=b"v", timeout=None, rpc_timeout=30)
    assert time.monotonic() - started < 2.0 + 3.0
