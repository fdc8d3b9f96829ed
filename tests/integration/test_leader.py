"""Leader election across three node processes."""

import signal
import threading

import pytest

from tests.integration.util import events, wait_for, wait_queued

from raftsync.errors import Timeout

TTL = 3.0






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
        wait_queued(a, "svc", queued, table="leader")
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
        wait_for(lambda: len(events(node, "observed", "o")) >= len(expected), what="observations")
        assert events(node, "observed", "o") == expected


def test_dead_leader_is_replaced_with_a_larger_term(cluster):
    a, b, c = cluster.nodes
    c.call("observe_start", name="o", group="jobs")
    first = a.call("leader_campaign", handle="e", group="jobs", candidate_id="a")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("term", b.call(
        "leader_campaign", handle="e", group="jobs", candidate_id="b", timeout=TTL + 6)))
    thread.start()
    wait_queued(c, "jobs", 1, table="leader")
    a.signal_app(signal.SIGKILL)
    thread.join(20)
    assert result["term"] > first
    assert c.call("leader_current", group="jobs") == ["b", b"", result["term"]]
    wait_for(lambda: events(c, "observed", "o")[-1:] == [["b", b"", result["term"]]], what="observer")
    # Never two leaders at once: the observed history goes straight from a to b.
    assert [o[0] if o else None for o in events(c, "observed", "o")] == [None, "a", "b"]


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
        wait_for(lambda: any(e[1] == "revoked" and e[2] == "f" for e in a.call("events")),
                  timeout=TTL + 3, what="revocation while cut off")
    finally:
        for node in (b, c):
            node.signal_group(signal.SIGCONT)
    new_term = b.call("leader_campaign", handle="e", group="g2", candidate_id="b", timeout=TTL + 10)
    assert new_term > term
