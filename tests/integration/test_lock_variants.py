"""Sessions, semaphores and read/write locks on real three-process clusters."""

import threading
import time

import pytest

from raftsync.errors import BadRequest, NotHeld
from tests.integration.util import wait_queued


def _contend(cluster, name, per_node, iterations, hold, kinds):
    results, errors = [], []

    def run(node, kind, permits):
        try:
            for hold_ in node.call("lock_contend", name=name, iterations=iterations, hold=hold, kind=kind,
                                   permits=permits):
                results.append([kind, *hold_])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(node, kind, permits))
               for node in cluster.nodes for kind, permits in kinds for _ in range(per_node)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not errors, errors
    return results


def _max_overlap(holds, weight=lambda h: 1):
    points = sorted([(h[2], weight(h)) for h in holds] + [(h[3], -weight(h)) for h in holds],
                    key=lambda p: (p[0], p[1]))
    current = peak = 0
    for _, delta in points:
        current += delta
        peak = max(peak, current)
    return peak


def test_semaphore_never_exceeds_its_permits(cluster):
    holds = _contend(cluster, "pool", 2, 10, 0.005, [("sem", 2)])
    assert len(holds) == 60
    assert _max_overlap(holds) == 2  # reached, never exceeded
    tokens = [h[1] for h in holds]
    assert len(set(tokens)) == len(tokens)


def test_semaphore_permits_must_agree(cluster):
    a, b, _ = cluster.nodes
    a.call("lock_acquire", handle="x", name="p", kind="sem", permits=3)
    with pytest.raises(BadRequest):
        b.call("lock_acquire", handle="y", name="p", kind="sem", permits=4, timeout=1)


def test_rwlock_writers_exclude_everyone_readers_share(cluster):
    holds = _contend(cluster, "doc", 1, 8, 0.004, [("read", 1), ("read", 1), ("write", 1)])
    writes = [h for h in holds if h[0] == "write"]
    reads = [h for h in holds if h[0] == "read"]
    assert len(writes) == 24 and len(reads) == 48
    for w in writes:
        for other in holds:
            if other is not w:
                assert other[3] <= w[2] or w[3] <= other[2], f"writer {w} overlaps {other}"
    assert _max_overlap(reads) >= 2, "readers never shared the lock"


def test_closing_a_session_releases_its_locks_at_once(cluster):
    a, b, _ = cluster.nodes
    a.call("session_open", name="worker", ttl=30.0)
    a.call("lock_acquire", handle="h", name="job", session="worker")
    started = time.monotonic()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "token", b.call("lock_acquire", handle="w", name="job", timeout=20)))
    thread.start()
    wait_queued(a, "job", 1)
    a.call("session_close", name="worker")
    thread.join(20)
    # Released by the close, long before the 30 s TTL could have run out.
    assert time.monotonic() - started < 10
    assert result["token"] > 0
    with pytest.raises(NotHeld):
        a.call("lock_release", handle="h")


def test_lock_ttl_bounds_how_long_a_dead_holder_blocks(cluster):
    import signal

    # Holder and waiter on followers: the bound below is about the lock's lease, not an
    # election (killing the leader's app would take its engine and the leader with it).
    leader = cluster.leader()
    a, b = [node for node in cluster.nodes if node is not leader]
    token = a.call("lock_acquire", handle="h", name="short", ttl=0.5)
    a.signal_app(signal.SIGKILL)
    started = time.monotonic()
    new_token = b.call("lock_acquire", handle="w", name="short", timeout=10)
    assert new_token > token
    # Under the node's 3 s session the wait would be at least 2 s (TTL minus the last
    # keepalive's age); the lock's own 0.5 s lease frees it well before that.
    assert time.monotonic() - started < 2.0
