"""Groups of other sizes than 3: a 4- and a 7-member cluster elect, write and survive a
leader kill (4 tolerates one failure like 3, 7 tolerates three)."""

import pytest

from tests.integration.util import wait_for


@pytest.mark.parametrize("size", [4, 7])
def test_a_group_elects_writes_and_survives_a_leader_kill(make_cluster, size):
    cluster = make_cluster(size)
    leader = cluster.leader()
    followers = [node for node in cluster.nodes if node is not leader]
    followers[0].call("kv_write", key="before", value=b"1")
    leader.kill()
    followers[-1].call("kv_write", key="after", value=b"2", timeout=20)
    new_leader = cluster.leader()
    assert new_leader is not leader
    for node in followers:
        assert node.call("kv_read", key="before")[0] == b"1"
        assert node.call("kv_read", key="after")[0] == b"2"
    leader.start()
    leader.call("wait_ready", timeout=20)
    assert leader.call("kv_read", key="after")[0] == b"2"  # caught up, answers linearizably
    wait_for(lambda: all(n.call("status")["has_quorum"] for n in cluster.nodes), 10, "every member in the group")
    for node in cluster.nodes:
        node.call("lock_acquire", handle="check", name="free", timeout=10)
        node.call("lock_release", handle="check")
    if size % 2 == 0:
        assert "prefer an odd number" in leader.log_tail(200)
