"""Journal and snapshots in data_dir: restarts after SIGKILL keep what was acknowledged.

Clusters here compact their log every 50 entries so snapshots are really taken,
written, installed on lagging followers and loaded at restart.
"""

import threading
import time

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
    for node in cluster.nodes:
        grants[node.index] = node.call("lock_acquire", handle="h", name=f"held-{node.index}")
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
            i += 1

    threads = [threading.Thread(target=load, args=(node, f"n{node.index}")) for node in cluster.nodes]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
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
    new_token = cluster.nodes[1].call("lock_acquire", handle="again", name="held-0", timeout=20)
    assert new_token > grants[0]
