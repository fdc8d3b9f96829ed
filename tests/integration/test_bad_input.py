"""Bad input gets a clear typed error, loses nothing, and the node keeps serving."""

import pytest

from cluster.launcher import free_ports
from raftsync import Node
from raftsync.codec import Op
from raftsync.errors import BadRequest, Closed, ConfigError, NotHeld, TooLarge
from raftsync.replica import deadline_after


def test_wrong_types_and_sizes_raise_typed_errors_and_the_node_keeps_serving(node):
    kv = node.data()
    kv.write("keep", b"1")
    cases = [
        (BadRequest, lambda: kv.write(1, b"x")),
        (BadRequest, lambda: kv.write("", b"x")),
        (TooLarge, lambda: kv.write("k" * 2000, b"x")),
        (BadRequest, lambda: kv.write("k", 5)),
        (TooLarge, lambda: kv.write("k", b"x" * (1 << 20))),
        (BadRequest, lambda: kv.write("k", b"x", ttl=-1)),
        (BadRequest, lambda: kv.write("k", b"x", if_version="1")),
        (BadRequest, lambda: kv.read("k", consistency="sometimes")),
        (BadRequest, lambda: kv.watch(5)),
        (BadRequest, lambda: node.lock(None)),
        (BadRequest, lambda: node.lock("l").acquire(timeout=-1)),
        (BadRequest, lambda: node.lock("l").acquire(timeout="soon")),
        (NotHeld, lambda: node.lock("l").release()),
        (BadRequest, lambda: node.semaphore("s", 0)),
        (BadRequest, lambda: node.leader("g").campaign(7)),
        (BadRequest, lambda: node.leader("g").campaign("c", value="str")),
        (BadRequest, lambda: node.session(ttl=0)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
    # Garbage submitted straight through the replica is answered, not applied.
    replica = node._replica
    session = replica.sessions.default(deadline_after(1))
    for op, args in [(99, []), (Op.KV_PUT, [1, 2]), (Op.LOCK_ACQUIRE, ["x"]), (Op.EXPIRE_SESSION, ["a", "b"])]:
        status, _ = replica.submit(session, op, args, deadline_after(5))
        assert status != 0
    status, _ = replica.submit_engine_command(b"\x01not msgpack", deadline_after(5), "garbage")
    assert status != 0
    assert kv.read("keep").value == b"1"
    assert kv.write("after", b"ok").version == 1


def test_calls_after_close_raise_closed(tmp_path):
    member = Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], engine="thread", session_ttl=3, data_dir=tmp_path)
    member.start().wait_ready(10)
    kv, lock = member.data(), member.lock("l")
    member.close()
    for call in (lambda: kv.write("k", b"v"), lambda: kv.read("k"), lambda: lock.acquire(timeout=1),
                 lambda: member.status(), lambda: member.data()):
        with pytest.raises(Closed):
            call()
    member.close()  # idempotent


def test_missing_or_bad_config_is_a_config_error(monkeypatch):
    for variable in ("RAFTSYNC_SELF", "RAFTSYNC_PEERS", "RAFTSYNC_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match="self_address"):
        Node.from_env()
    monkeypatch.setenv("RAFTSYNC_SELF", "192.0.2.10:7001")
    monkeypatch.setenv("RAFTSYNC_PEERS", "192.0.2.11:7001,192.0.2.12:7001")
    with pytest.raises(ConfigError, match="password"):
        Node.from_env()


def test_port_in_use_is_a_config_error_naming_the_address(tmp_path):
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    address = f"127.0.0.1:{blocker.getsockname()[1]}"
    try:
        with pytest.raises(ConfigError, match="self_address"):
            Node(address, peers=[], engine="thread", bind_retries=1, data_dir=tmp_path).start()
    finally:
        blocker.close()


def test_raft_port_binds_only_the_nodes_own_address(node):
    import socket

    port = int(node.address.rsplit(":", 1)[1])
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # Had PySyncObj bound 0.0.0.0, any other local address would reach the port too.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()
