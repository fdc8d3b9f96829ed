"""Basic behaviour of a real three-process cluster on loopback."""

import signal

import pytest

from raftsync.errors import Conflict, NotFound


def test_read_after_acknowledged_write_on_another_node_sees_it(cluster):
    for i, writer in enumerate(cluster.nodes):
        key = f"k{i}"
        version, revision = writer.call("kv_write", key=key, value=b"v%d" % i)
        for reader in cluster.nodes:
            value, read_version, read_revision = reader.call("kv_read", key=key)
            assert (value, read_version, read_revision) == (b"v%d" % i, version, revision)


def test_cas_and_delete_across_nodes(cluster):
    a, b, c = cluster.nodes
    version, _ = a.call("kv_write", key="cfg", value=b"1", if_version=0)
    assert version == 1
    with pytest.raises(Conflict):
        b.call("kv_write", key="cfg", value=b"2", if_version=0)
    assert b.call("kv_write", key="cfg", value=b"2", if_version=1)[0] == 2
    with pytest.raises(Conflict):
        c.call("kv_delete", key="cfg", if_version=1)
    c.call("kv_delete", key="cfg", if_version=2)
    with pytest.raises(NotFound):
        a.call("kv_read", key="cfg")
    a.call("kv_write", key="p/1", value=b"x")
    a.call("kv_write", key="p/2", value=b"y")
    a.call("kv_write", key="q/1", value=b"z")
    assert [r[0] for r in b.call("kv_dump", prefix="p/")] == ["p/1", "p/2"]


def test_lost_reply_is_retried_and_applies_once(cluster):
    node = cluster.nodes[1]
    version, revision = node.call("kv_write", key="once", value=b"a")
    node.call("test_hook", name="drop_replies", count=1)
    new_version, new_revision = node.call("kv_write", key="once", value=b"b")
    assert node.call("status")["hooks_fired"]["drop_replies"] == 1, "the test hook did not drop the reply"
    # The first attempt's result was dropped; the retry got the machine's cached answer.
    assert new_version == version + 1
    value, read_version, read_revision = node.call("kv_read", key="once")
    assert (value, read_version, read_revision) == (b"b", new_version, new_revision)


def test_leader_sigkill_writes_resume_and_new_term_everywhere(cluster):
    leader = cluster.leader()
    survivors = [n for n in cluster.nodes if n is not leader]
    old_term = survivors[0].call("status")["term"]
    survivors[0].call("kv_write", key="before", value=b"1")
    leader.kill()
    # A write through a survivor must commit under the new leader.
    survivors[0].call("kv_write", key="after", value=b"2", timeout=15)
    for node in survivors:
        status = node.call("status")
        assert status["term"] > old_term
        assert status["leader"] in {s.address for s in survivors}
        assert node.call("kv_read", key="before")[0] == b"1"
        assert node.call("kv_read", key="after")[0] == b"2"


def test_app_sigkill_makes_its_engine_exit(cluster):
    node = cluster.nodes[2]
    assert node.engine_pid is not None
    node.signal_app(signal.SIGKILL)
    assert node.wait_engine_exit(timeout=10), "engine outlived its app"
    # The other two keep a quorum and keep serving.
    cluster.nodes[0].call("kv_write", key="still", value=b"ok", timeout=15)
    assert cluster.nodes[1].call("kv_read", key="still")[0] == b"ok"
