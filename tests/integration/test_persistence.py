"""Journal and snapshots in data_dir: restarts after SIGKILL keep what was acknowledged.

Clusters here compact their log every 50 (or 20) entries so snapshots are really taken,
written, installed on lagging followers and loaded at restart.
"""

import random
import signal
import threading
import time

import pytest

from cluster.launcher import AgentError
from raftsync.errors import RaftsyncError
from tests.integration.util import wait_for


def test_follower_killed_during_writes_catches_up_by_snapshot(make_cluster):
    cluster = make_cluster(3, compaction_min_entries=50)
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    for i in range(20):
        leader.call("kv_write", key=f"early/{i}", value=b"e")
    follower.kill()
    for i in range(300):
        leader.call("kv_write", key=f"late/{i}", value=b"%d" % i)
    # The leader compacts in a forked child; wait until the missed entries are gone.
    wait_for(lambda: leader.call("status")["log_length"] < 250, 20, "leader compaction")
    follower.start()
    follower.call("wait_ready", timeout=20)
    status = follower.call("status")
    assert status["snapshots_restored"] >= 1
    records = {r[0]: r[1] for r in follower.call("kv_dump", consistency="local")}
    assert all(records[f"late/{i}"] == b"%d" % i for i in range(300))
    assert all(f"early/{i}" in records for i in range(20))


def test_whole_cluster_sigkilled_mid_load_keeps_acknowledged_writes_and_grants(make_cluster):
    cluster = make_cluster(3, compaction_min_entries=50)
    grants = {}
    # The grants' own 8 s TTL outlasts the restart below even on a slow machine (the
    # first new leader gives the dead sessions a fresh TTL before the last node is up).
    for node in cluster.nodes:
        grants[node.index] = node.call("lock_acquire", handle="h", name=f"held-{node.index}", ttl=8)
    acknowledged = {}
    stop = threading.Event()

    def load(node, prefix):
        i = 0
        while not stop.is_set() and i < 5000:
            key = f"{prefix}/{i}"
            try:
                version, revision = node.call("kv_write", key=key, value=b"v", timeout=2, rpc_timeout=5)
            except (RaftsyncError, AgentError, OSError):
                return
            acknowledged[key] = revision
            if len(acknowledged) >= 300:
                enough.set()
            i += 1

    enough = threading.Event()
    threads = [threading.Thread(target=load, args=(node, f"n{node.index}")) for node in cluster.nodes]
    for thread in threads:
        thread.start()
    enough.wait(10)
    for node in cluster.nodes:  # all three at once, mid-load
        node.signal_group(9)
    stop.set()
    for thread in threads:
        thread.join(10)
    for node in cluster.nodes:
        node.kill()
    assert len(acknowledged) >= 300
    for node in cluster.nodes:
        node.start()
    cluster.wait_ready(30)
    reader = cluster.nodes[0]
    records = {r[0]: r[3] for r in reader.call("kv_dump")}
    missing = [k for k in acknowledged if k not in records]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    for node in cluster.nodes:
        holder, token, _ = reader.call("lock_info", name=f"held-{node.index}")
        assert token == grants[node.index], "an acknowledged lock grant was lost"
    # The restarted nodes' new handles queue behind the old grants and get larger tokens
    # once the dead sessions expire.
    new_token = cluster.nodes[1].call("lock_acquire", handle="again", name="held-0", timeout=30)
    assert new_token > grants[0]


def _write_until_stopped(node, prefix, acknowledged, stop, limit=5000):
    """Sequential writes of unique values; records each one whose success came back."""
    for i in range(limit):
        if stop.is_set():
            return
        key, value = f"{prefix}/{i}", f"{prefix}:{i}".encode()
        try:
            node.call("kv_write", key=key, value=value, timeout=2, rpc_timeout=5)
        except (RaftsyncError, AgentError, OSError):
            return
        acknowledged[key] = value


def _kill_the_whole_cluster_repeatedly(make_cluster, kills, seed):
    """Write from every member; at a random moment SIGKILL all of them (app, engine and a
    snapshot child, if any) at once; restart; every acknowledged write must be readable.
    A tiny compaction threshold makes snapshot/journal hand-overs happen all the time."""
    rng = random.Random(seed)
    cluster = make_cluster(3, compaction_min_entries=20)
    acknowledged = {}
    for round_ in range(kills):
        stop = threading.Event()
        threads = [threading.Thread(target=_write_until_stopped,
                                    args=(node, f"r{round_}/n{node.index}", acknowledged, stop))
                   for node in cluster.nodes]
        for thread in threads:
            thread.start()
        written_before = len(acknowledged)
        wait_for(lambda: len(acknowledged) > written_before + 20, 10, "writes under way")
        time.sleep(rng.uniform(0.0, 0.5))  # the random moment of the kill, not a synchronisation
        for node in cluster.nodes:
            node.signal_group(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(10)
        for node in cluster.nodes:
            node.kill()
        for node in cluster.nodes:
            node.start()
        cluster.wait_ready(30)
        assert sum(node.call("status")["snapshots_restored"] for node in cluster.nodes) >= 1
        records = {r[0]: r[1] for r in cluster.nodes[round_ % 3].call("kv_dump", prefix="r")}
        lost = [key for key, value in acknowledged.items() if records.get(key) != value]
        assert not lost, (f"after kill {round_ + 1}: {len(lost)} of {len(acknowledged)} acknowledged "
                          f"writes lost, e.g. {lost[:5]}")
    # Once the faults stop every member catches up and serves.
    for node in cluster.nodes:
        wait_for(lambda: len(node.call("kv_dump", prefix="r", consistency="local")) >= len(acknowledged),
                 20, f"{node.address} to catch up")
        assert node.call("kv_read", key=next(iter(acknowledged)))[0] is not None
        node.call("lock_acquire", handle="after", name="after-faults", timeout=20)
        node.call("lock_release", handle="after")
    return len(acknowledged)


def test_three_whole_cluster_sigkills_under_compaction_keep_every_acknowledged_write(make_cluster):
    _kill_the_whole_cluster_repeatedly(make_cluster, kills=3, seed=3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_thirty_whole_cluster_sigkills_under_compaction_keep_every_acknowledged_write(make_cluster):
    checked = _kill_the_whole_cluster_repeatedly(make_cluster, kills=30, seed=30)
    print(f"{checked} acknowledged writes checked after each of 30 whole-cluster SIGKILLs")
