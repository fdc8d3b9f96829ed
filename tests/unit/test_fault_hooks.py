"""The test-only fault hooks: what they do to received Raft messages, and that an
engine without ``test_hooks`` in its config refuses them."""

import socket

from raftsync.channel import Failure, Msg
from raftsync.engine.core import Engine
from raftsync.engine.faults import InboundFaults


class _Peer:
    def __init__(self, address):
        self.address = address


A, B = _Peer("127.0.0.1:1"), _Peer("127.0.0.1:2")


def _faults():
    delivered = []
    return InboundFaults(lambda node, message: delivered.append((node.address, message))), delivered


def _append(n, entries=True, **extra):
    return {"type": "append_entries", "n": n, "entries": [("c", n, 1)] if entries else [], **extra}


def test_inert_until_a_hook_is_set():
    faults, _ = _faults()
    assert not faults.active


def test_cut_drops_everything_from_the_cut_peers_until_healed():
    faults, delivered = _faults()
    faults.configure("cut", {"peers": [A.address]})
    faults.receive(A, _append(1))
    faults.receive(A, {"type": "request_vote"})
    faults.receive(B, _append(2))
    assert [m["n"] for _, m in delivered] == [2] and faults.stats()["dropped"] == 2
    faults.configure("cut", {"peers": []})
    faults.receive(A, _append(3))
    assert delivered[-1] == (A.address, _append(3))


def test_a_duplicated_append_is_delivered_again_when_released():
    faults, delivered = _faults()
    faults.configure("delay_appends", {"peers": [A.address], "delay": None, "duplicate": True, "count": 1,
                                       "with_entries": True})
    faults.receive(A, _append(0, entries=False))  # a heartbeat: not counted
    faults.receive(A, _append(1))
    faults.receive(A, _append(2))  # count used up: passes
    faults.tick()
    assert [m["n"] for _, m in delivered] == [0, 1, 2] and faults.stats()["holding"] == 1
    faults.configure("release_held", {})
    assert [m["n"] for _, m in delivered] == [0, 1, 2, 1] and faults.stats()["holding"] == 0


def test_delayed_appends_keep_their_order_and_arrive_when_due():
    faults, delivered = _faults()
    faults.configure("delay_appends", {"peers": [A.address], "delay": 0.0})
    faults.receive(A, _append(1))
    faults.receive(A, {"type": "next_node_idx"})
    faults.receive(A, _append(2))
    assert [m["type"] for _, m in delivered] == ["next_node_idx"]
    faults.tick()
    assert [m.get("n") for _, m in delivered] == [None, 1, 2]


def test_withheld_snapshot_chunks_arrive_as_snapshot_not_ready():
    faults, delivered = _faults()
    faults.configure("withhold_snapshot", {"peers": [A.address], "count": 1})
    chunk = {"type": "append_entries", "term": 2, "commit_index": 9, "serialized": (b"data", True, False)}
    faults.receive(A, chunk)
    faults.receive(A, chunk)
    assert "serialized" not in delivered[0][1] and delivered[0][1]["commit_index"] == 9
    assert delivered[1][1] is chunk and faults.stats()["withheld_snapshots"] == 1


def test_clear_drops_held_messages_and_every_hook():
    faults, delivered = _faults()
    faults.configure("cut", {"peers": [B.address]})
    faults.configure("delay_appends", {"peers": [A.address], "delay": None})
    faults.receive(A, _append(1))
    faults.configure("clear", {})
    assert not faults.active and faults.stats()["holding"] == 0
    faults.receive(B, _append(2))
    assert [m["n"] for _, m in delivered] == [2]


def test_an_engine_without_test_hooks_refuses_them():
    app, engine_side = socket.socketpair()
    try:
        engine = Engine(engine_side, in_process=True)
        engine._config = {"test_hooks": False}
        assert engine._test_hook(7, "cut", {"peers": []}) == [Msg.FAILED, 7, Failure.REJECTED]
        assert engine._test_hook(8, "drop_replies", {"count": 1}) == [Msg.FAILED, 8, Failure.REJECTED]
        assert not engine._hooks
    finally:
        app.close()
        engine_side.close()
