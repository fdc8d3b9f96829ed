"""KV watches and TTLs across three node processes."""

import os
import signal
import time

import pytest

from tests.integration.util import events, wait_for

from cluster.stopping import stop_and_wait
from raftsync.errors import NotFound






def test_watch_sees_every_change_from_every_node_in_commit_order(cluster):
    a, b, c = cluster.nodes
    c.call("watch_start", name="w", prefix="cfg/")
    expected = []
    for i in range(30):
        writer = cluster.nodes[i % 3]
        version, revision = writer.call("kv_write", key=f"cfg/{i % 5}", value=b"%d" % i)
        expected.append([revision, f"cfg/{i % 5}", b"%d" % i, version])
        writer.call("kv_write", key=f"other/{i}", value=b"x")  # outside the prefix
    revision = a.call("kv_delete", key="cfg/0")
    expected.append([revision, "cfg/0", None, 0])
    wait_for(lambda: len(events(c, "change", "w")) >= len(expected), what="all changes")
    assert events(c, "change", "w") == expected
    # A watch from an old revision replays the same history first.
    b.call("watch_start", name="replay", prefix="cfg/", from_revision=expected[9][0])
    wait_for(lambda: len(events(b, "change", "replay")) >= len(expected) - 10, what="replay")
    assert events(b, "change", "replay") == expected[10:]


def test_record_ttl_expires_through_the_leader_and_watchers_see_it(cluster):
    a, b, c = cluster.nodes
    b.call("watch_start", name="w", prefix="tmp/")
    started = time.monotonic()
    a.call("kv_write", key="tmp/session", value=b"v", ttl=1.0)
    a.call("kv_write", key="tmp/keep", value=b"v")
    assert c.call("kv_read", key="tmp/session")[0] == b"v"
    wait_for(lambda: any(ch[1] == "tmp/session" and ch[2] is None for ch in events(b, "change", "w")), timeout=10,
              what="expiry")
    assert time.monotonic() - started >= 1.0
    with pytest.raises(NotFound):
        c.call("kv_read", key="tmp/session")
    assert c.call("kv_read", key="tmp/keep")[0] == b"v"
    # Rewriting a record renews its TTL: a stale expiry for the old revision is ignored.
    a.call("kv_write", key="tmp/renewed", value=b"1", ttl=1.5)
    time.sleep(1.0)  # the passage of time is what is under test here
    a.call("kv_write", key="tmp/renewed", value=b"2", ttl=1.5)
    time.sleep(0.8)
    assert c.call("kv_read", key="tmp/renewed")[0] == b"2"


def test_watch_on_a_follower_survives_a_snapshot_install(make_cluster):
    cluster = make_cluster(3, compaction_min_entries=50)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    follower.call("watch_start", name="w", prefix="s/")
    expected = []
    for i in range(10):
        version, revision = leader.call("kv_write", key=f"s/{i}", value=b"a")
        expected.append([revision, f"s/{i}", b"a", version])
    wait_for(lambda: len(events(follower, "change", "w")) == 10, what="first changes")
    # Pause only the follower's engine (its app and the watch in it keep running) until
    # the leader drops the connection: entries sent while it merely sleeps would wait in
    # its socket buffer, and it would catch up without a snapshot.
    stop_and_wait(follower.engine_pid)
    try:
        for i in range(200):
            version, revision = leader.call("kv_write", key=f"s/{i % 20}", value=b"%d" % i)
            expected.append([revision, f"s/{i % 20}", b"%d" % i, version])
        # the leader compacts in a forked child: wait until the missed entries are gone
        wait_for(lambda: leader.call("status")["log_length"] < 150, 20, "leader compaction")
        wait_for(lambda: not leader.call("status")["peers_connected"][follower.address], 20,
                 "the leader to drop the paused follower")
    finally:
        os.kill(follower.engine_pid, signal.SIGCONT)
    wait_for(lambda: len(events(follower, "change", "w")) >= len(expected), timeout=20, what="catch-up")
    assert follower.call("status")["snapshots_restored"] >= 1
    assert events(follower, "change", "w") == expected
