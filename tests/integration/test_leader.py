"""Leader election across three node processes."""

import signal
import threading
import time

import pytest

from raftsync.errors import NotHeld, Timeout

TTL = 3.0


def _observed(node, name):
    return [e[3] for e in node.call("events") if e[1] == "observed" and e[2] == name]


def _wait_for(predicate, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_leader_fifo_succession_and_every_node_observes_the_same_history(cluster):
    a, b, c = cluster.nodes
    for node in cluster.nodes:
        node.call("observe_start", name="o", group="svc")
    first = a.call("leader_campaign", handle="e", group="svc", candidate_id="a", value=b"addr-a")
    with pytest.raises(Timeout):
        b.call("leader_campaign", handle="e", group="svc", candidate_id="b", timeout=0)
    results = {}
    threads = []
    for queued, (node, name) in enumerate(((b, "b"), (c, "c")), start=1):
        thread = threading.Thread(target=lambda n=node, m=name: results.setdefault(m, n.call(
            "leader_campaign", handle="e", group="svc", candidate_id=m, value=b"addr-" + m.encode(),
            timeout=30)))
        thread.start()
        threads.append(thread)
        # queue the candidates in a known order: b, then c
        _wait_for(lambda: len(a.call("lock_info", name="svc", table="leader")[2]) == queued, what="queued")
    a.call("leader_proclaim", handle="e", value=b"addr-a2")
    assert b.call("leader_current", group="svc") == ["a", b"addr-a2", first]
    a.call("leader_resign", handle="e")
    threads[0].join(10)
    second = results["b"]
    assert second > first
    b.call("leader_resign", handle="e")
    threads[1].join(10)
    third = results["c"]
    assert third > second
    with pytest.raises(Exception):
        a.call("leader_proclaim", handle="e", value=b"stale")
    expected = [None, ["a", b"addr-a", first], ["a", b"addr-a2", first], ["b", b"addr-b", second],
                ["c", b"addr-c", third]]
    for node in cluster.nodes:
        _wait_for(lambda: len(_observed(node, "o")) >= len(expected), what="observations")
        assert _observed(node, "o") == expected


def test_dead_leader_is_replaced_with_a_larger_term(cluster):
    a, b, c = cluster.nodes
    c.call("observe_start", name="o", group="jobs")
    first = a.call("leader_campaign", handle="e", group="jobs", candidate_id="a")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("term", b.call(
        "leader_campaign", handle="e", group="jobs", candidate_id="b", timeout=TTL + 6)))
    thread.start()
    _wait_for(lambda: len(c.call("lock_info", name="jobs", table="leader")[2]) == 1, what="queued")
    a.signal_app(signal.SIGKILL)
    thread.join(20)
    assert result["term"] > first
    assert c.call("leader_current", group="jobs") == ["b", b"", result["term"]]
    _wait_for(lambda: _observed(c, "o")[-1:] == [["b", b"", result["term"]]], what="observer")
    # Never two leaders at once: the observed history goes straight from a to b.
    assert [o[0] if o else None for o in _observed(c, "o")] == [None, "a", "b"]


def test_revoked_on_resign_and_session_loss(cluster):
    a, b, c = cluster.nodes
    a.call("leader_campaign", handle="e", group="g1", candidate_id="a")
    a.call("leader_resign", handle="e")
    assert [e[1] for e in a.call("events") if e[2] == "e"] == ["elected", "revoked"]
    with pytest.raises(Exception):
        a.call("leader_resign", handle="e")
    term = a.call("leader_campaign", handle="f", group="g2", candidate_id="a")
    for node in (b, c):
        node.signal_group(signal.SIGSTOP)
    try:
        _wait_for(lambda: any(e[1] == "revoked" and e[2] == "f" for e in a.call("events")),
                  timeout=TTL + 3, what="revocation while cut off")
    finally:
        for node in (b, c):
            node.signal_group(signal.SIGCONT)
    new_term = b.call("leader_campaign", handle="e", group="g2", candidate_id="b", timeout=TTL + 10)
    assert new_term > term
