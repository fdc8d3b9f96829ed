"""A single Node in this process, both engine modes: the public API end to end."""

import pytest

from cluster.launcher import free_ports
from raftsync import Node
from raftsync.errors import BadRequest, Closed, Conflict, NotFound, TooLarge


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_single_node_data_roundtrip(engine, tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    with Node(address, peers=[], engine=engine, data_dir=tmp_path, session_ttl=3) as node:
        node.wait_ready(10)
        kv = node.data("app/")
        record = kv.write("a", b"1")
        assert (record.key, record.value, record.version) == ("a", b"1", 1)
        assert kv.read("a") == record
        assert kv.read("a", consistency="local") == record
        with pytest.raises(Conflict):
            kv.write("a", b"2", if_version=0)
        assert kv.write("a", b"2", if_version=1).version == 2
        assert [r.key for r in kv.dump()] == ["a"]
        kv.delete("a")
        with pytest.raises(NotFound):
            kv.read("a")
        with pytest.raises(BadRequest):
            kv.write(b"bytes-key", b"x")
        with pytest.raises(BadRequest):
            kv.write("k", "not bytes")
        with pytest.raises(TooLarge):
            kv.write("k", b"x" * 100_000)
        with pytest.raises(BadRequest):
            kv.read("a", consistency="eventual")
        # the node still serves after bad input
        assert kv.write("b", b"ok").version == 1
        status = node.status()
        assert status["role"] == "leader" and status["has_quorum"]
    with pytest.raises(Closed):
        kv.read("b")
