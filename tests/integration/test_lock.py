"""Lock behaviour on real three-process clusters (session TTL 3 s, election 0.4-0.8 s)."""

import signal
import threading
import time

import pytest

from tests.integration.util import events, wait_for, wait_queued

from raftsync.codec import Op
from raftsync.errors import LockTimeout, NotHeld

TTL = 3.0
ELECTION_MAX = 0.8
# Scheduling slack for a loaded 2-core CI box; the bound under test is TTL + election.
SLACK = 3.0


def test_mutual_exclusion_under_contention_and_fifo_tokens(cluster):
    results = []
    errors = []

    def contend(node):
        try:
            results.extend(node.call("lock_contend", name="shared", iterations=15, hold=0.002))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(node,)) for node in cluster.nodes for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not errors
    assert len(results) == 6 * 15
    holds = sorted(results, key=lambda h: h[1])
    for previous, current in zip(holds, holds[1:]):
        assert previous[2] <= current[1], f"overlapping holds {previous} {current}"
        assert previous[0] < current[0], f"token order differs from grant order {previous} {current}"


def _lock_commands_submitted(cluster):
    lock_ops = (int(Op.LOCK_ACQUIRE), int(Op.LOCK_RELEASE), int(Op.LOCK_WITHDRAW))
    return sum(node.call("status")["submitted_ops"].get(op, 0) for node in cluster.nodes for op in lock_ops)


def test_handoff_with_eight_waiters_costs_constant_commands(cluster):
    a, b, c = cluster.nodes
    first = a.call("lock_acquire", handle="h0", name="fifo")
    # 8 waiters spread over the three nodes, queued in a known order.
    waiters = []
    for i in range(8):
        node = cluster.nodes[i % 3]
        done = {}
        thread = threading.Thread(target=lambda n=node, i=i, d=done: d.setdefault(
            "token", n.call("lock_acquire", handle=f"w{i}", name="fifo", timeout=60)))
        thread.start()
        waiters.append((node, f"w{i}", thread, done))
        wait_queued(a, "fifo", i + 1)
    before = _lock_commands_submitted(cluster)
    a.call("lock_release", handle="h0")
    node0, handle0, thread0, done0 = waiters[0]
    thread0.join(10)
    # One release command granted the next waiter; no waiter retried or re-acquired.
    # (Counted at the submitting engines: keepalives and barriers are not lock commands.)
    after = _lock_commands_submitted(cluster)
    assert after - before == 1, f"hand-off submitted {after - before} lock commands"
    assert done0["token"] > first
    assert all(not node.call("lock_state", handle=h)["held"] for node, h, _, _ in waiters[1:])
    # The rest are served in FIFO order with increasing tokens.
    tokens = [done0["token"]]
    node0.call("lock_release", handle=handle0)
    for node, handle, thread, done in waiters[1:]:
        thread.join(10)
        tokens.append(done["token"])
        node.call("lock_release", handle=handle)
    assert tokens == sorted(tokens) and len(set(tokens)) == 8




def test_try_lock_timeout_and_release_errors(cluster):
    a, b, _ = cluster.nodes
    a.call("lock_acquire", handle="x", name="busy")
    with pytest.raises(LockTimeout):
        b.call("lock_acquire", handle="y", name="busy", timeout=0)
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        b.call("lock_acquire", handle="y", name="busy", timeout=0.5)
    assert time.monotonic() - started >= 0.5
    # the withdrawn wait (proposed in the background, so the call returned by its
    # deadline) leaves nothing behind: only the holder stays recorded
    wait_for(lambda: a.call("lock_info", name="busy")[2] == [], 5, "the withdrawal")
    with pytest.raises(NotHeld):
        b.call("lock_release", handle="y")
    a.call("lock_release", handle="x")
    assert b.call("lock_acquire", handle="y", name="busy", timeout=5) > 0


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_dead_or_paused_holder_loses_lock_to_waiter(cluster, how):
    holder, waiter_node, _ = cluster.nodes
    token = holder.call("lock_acquire", handle="h", name="crash")
    result = {}

    def wait():
        # Bound under test: TTL + an election (+ the engine's 1 s app-silence limit when
        # the app is paused rather than dead), plus scheduling slack.
        result["token"] = waiter_node.call("lock_acquire", handle="w", name="crash",
                                           timeout=TTL + ELECTION_MAX + 1.0 + SLACK)

    thread = threading.Thread(target=lambda: _catch(result, wait))
    thread.start()
    wait_queued(waiter_node, "crash", 1)
    failed_at = time.monotonic()
    holder.signal_app(signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
    thread.join(30)
    assert "error" not in result, result.get("error")
    assert result["token"] > token
    granted_at = [e[0] for e in waiter_node.call("events") if e[1] == "granted" and e[2] == "w"][0]
    # Never sooner than TTL after the holder's last keepalive, which was sent at most
    # TTL/3 before the failure.
    # (Keepalives come every TTL/3 plus the engine's tick lag: allow 0.1 s for that.)
    assert granted_at - failed_at >= TTL * 2 / 3 - 0.1
    if how == "sigstop":
        holder.signal_app(signal.SIGCONT)
        wait_for(lambda: holder.call("lock_state", handle="h")["lost"], 10, "the resumed holder to see its loss")
        with pytest.raises(NotHeld):
            holder.call("lock_release", handle="h")
    else:
        assert holder.wait_engine_exit(10)


def _catch(result, fn):
    try:
        fn()
    except Exception as exc:
        result["error"] = exc


def test_partitioned_holder_sees_lost_before_others_resume_then_waiter_wins(cluster):
    holder, b, c = cluster.nodes
    token = holder.call("lock_acquire", handle="h", name="iso")
    result = {}
    # The waiter's node is paused about as long as the holder's session lives, so its
    # own default session may end too when it resumes; the waiter keeps a session that
    # outlives the pause, since what is under test is the holder's side.
    b.call("session_open", name="waiter", ttl=30)
    waiter = threading.Thread(target=lambda: _catch(result, lambda: result.setdefault(
        "token", b.call("lock_acquire", handle="w", name="iso", timeout=60, session="waiter"))))
    waiter.start()
    wait_queued(b, "iso", 1)
    for node in (b, c):
        node.signal_group(signal.SIGSTOP)
    try:
        # The "lost" event is recorded by the callback, which runs just after the flag is set.
        wait_for(lambda: events(holder, "lost", "h"), TTL + 2.0, "the holder to see its loss")
        resume_at = time.monotonic()
    finally:
        for node in (b, c):
            node.signal_group(signal.SIGCONT)
    assert holder.call("lock_state", handle="h")["lost"]
    lost_at = [e[0] for e in holder.call("events") if e[1] == "lost" and e[2] == "h"][0]
    assert lost_at < resume_at
    waiter.join(60)
    assert "error" not in result, result.get("error")
    assert result["token"] > token
    with pytest.raises(NotHeld):
        holder.call("lock_release", handle="h")
    # The lost default session was closed and replaced: the holder's node works on.
    holder.call("kv_write", key="after-loss", value=b"ok")
    assert holder.call("lock_acquire", handle="h2", name="iso-2", timeout=10) > result["token"]


def test_busy_leader_app_causes_no_election_and_others_keep_committing(cluster):
    leader = cluster.leader()
    others = [n for n in cluster.nodes if n is not leader]
    before = leader.call("status")
    session_before = leader.call("session_id")
    leader.call("burn_cpu", threads=4, seconds=10.0)
    writes = 0
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        for node in others:
            node.call("lock_acquire", handle="busy", name=f"cycle-{node.index}", timeout=10)
            node.call("lock_release", handle="busy")
            writes += 1
    after = leader.call("status")
    assert after["role"] == "leader" and after["term"] == before["term"], (before, after)
    for node in others:
        status = node.call("status")
        assert status["leader"] == leader.address and status["term"] == before["term"]
    assert writes > 50
    # The busy app's own session survived: it stayed alive through the burn.
    assert leader.call("session_id") == session_before
    assert not events(leader, "lost", "busy")
