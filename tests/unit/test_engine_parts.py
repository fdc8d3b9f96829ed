"""The engine's pure parts, without a cluster: deadlines and watch fan-out."""

from raftsync.channel import Msg
from raftsync.codec import Op, encode_command
from raftsync.engine.deadlines import Deadlines
from raftsync.engine.watches import Watches
import raftsync.machine.kv as kv_module
from raftsync.machine import StateMachine


def test_deadlines_expire_once_per_token_and_renewal_wins():
    deadlines = Deadlines()
    deadlines.observe("s", token=5, ttl=1.0, now=100.0)
    assert deadlines.due(100.9) == []
    assert deadlines.due(101.1) == [("s", 5)]
    assert deadlines.due(101.2) == []  # already proposed
    deadlines.proposal_failed("s", 5)
    assert deadlines.due(101.3) == [("s", 5)]  # proposed again after a failure
    deadlines.observe("s", token=9, ttl=1.0, now=101.4)  # a renewal
    assert deadlines.due(102.0) == []
    assert abs(deadlines.remaining("s", 9, 102.0) - 0.4) < 1e-9
    assert deadlines.remaining("s", 5, 102.0) is None


def test_a_new_leader_restarts_every_clock():
    deadlines = Deadlines()
    deadlines.observe("old", token=1, ttl=1.0, now=0.0)
    deadlines.reset([("old", 1, 1.0), ("other", 2, 2.0)], now=50.0)
    assert deadlines.due(50.9) == []
    assert deadlines.due(51.5) == [("old", 1)]


class _Collector:
    def __init__(self):
        self.sent = []

    def __call__(self, message):
        assert message[0] == Msg.NOTIFY
        self.sent.append(message[1][1:])


def _apply(machine, watches, op, session_id, seq, args):
    effects = []
    machine.apply(encode_command(op, session_id, seq, seq, args), effects)
    watches.on_applied(machine)


def test_kv_watch_replays_history_then_live_changes_in_order():
    machine, sent = StateMachine(), _Collector()
    watches = Watches(sent)
    machine.apply(encode_command(Op.OPEN_SESSION, 7, 0, 0, [3000]))
    _apply(machine, watches, Op.KV_PUT, 7, 1, ["a/1", b"x", None])
    start = machine.index
    _apply(machine, watches, Op.KV_PUT, 7, 2, ["a/2", b"y", None])
    _apply(machine, watches, Op.KV_PUT, 7, 3, ["b/1", b"z", None])
    watches.add(machine, 1, "kv", "a/", start)
    _apply(machine, watches, Op.KV_DELETE, 7, 4, ["a/1", None])
    _apply(machine, watches, Op.KV_PUT, 7, 5, ["b/2", b"w", None])
    assert sent.sent == [[1, "kv", [start + 1, "a/2", b"y", 1]], [1, "kv", [start + 3, "a/1", None, 0]]]


def test_kv_watch_from_a_trimmed_revision_reports_compacted(monkeypatch):
    monkeypatch.setattr(kv_module, "HISTORY_MAX_ENTRIES", 3)
    machine, sent = StateMachine(), _Collector()
    watches = Watches(sent)
    machine.apply(encode_command(Op.OPEN_SESSION, 7, 0, 0, [3000]))
    for seq in range(1, 6):
        _apply(machine, watches, Op.KV_PUT, 7, seq, [f"k{seq}", b"v", None])
    assert machine.kv.history.compacted_revision > 1
    watches.add(machine, 1, "kv", "", 1)
    assert sent.sent == [[1, "compacted", machine.kv.history.compacted_revision]]
    watches.add(machine, 2, "kv", "", machine.kv.history.compacted_revision)
    assert [m[2][1] for m in sent.sent[1:]] == ["k3", "k4", "k5"]


def test_watch_catches_up_after_a_snapshot_replaced_the_machine():
    machine, sent = StateMachine(), _Collector()
    watches = Watches(sent)
    machine.apply(encode_command(Op.OPEN_SESSION, 7, 0, 0, [3000]))
    watches.add(machine, 1, "kv", "", None)
    watches.add(machine, 2, "leader", "g", None)
    ahead = StateMachine.restore(machine.snapshot())
    ahead.apply(encode_command(Op.KV_PUT, 7, 1, 1, ["k", b"1", None]))
    ahead.apply(encode_command(Op.LEADER_CAMPAIGN, 7, 2, 2, ["g", 1, "c", b"v", True]))
    watches.on_applied(ahead)  # the effects of those two commands were never seen here
    assert sent.sent == [[2, "leader", None], [1, "kv", [ahead.index - 1, "k", b"1", 1]],
                         [2, "leader", ["c", b"v", ahead.index]]]


def test_a_snapshot_the_machine_cannot_restore_stops_the_engine_with_the_reason():
    import socket

    import msgpack

    from raftsync.channel import FrameDecoder
    from raftsync.engine.core import Engine

    app, engine_side = socket.socketpair()
    try:
        engine = Engine(engine_side, in_process=True)
        try:
            engine._consumer._deserialize({"machine": msgpack.packb({"v": 99, "index": 3})})
        except ValueError:
            pass  # PySyncObj catches it and would carry on half-loaded
        assert "cannot restore the snapshot" in engine.fatal
        engine._on_tick()  # the next tick stops the engine and tells the app why
        assert engine.stopped.is_set()
        app.settimeout(2)
        frames = list(FrameDecoder().feed(app.recv(65536)))
        assert frames[0][0] == Msg.FATAL and "unsupported snapshot version 99" in frames[0][1]
    finally:
        app.close()
        engine_side.close()


def test_deadlines_keep_the_known_ttl_on_a_renewal_without_one():
    deadlines = Deadlines()
    deadlines.observe(("session", 7), token=1, ttl=3.0, now=0.0)
    deadlines.observe(("session", 7), token=2, ttl=None, now=2.0)  # a keepalive
    assert deadlines.due(4.9) == [] and deadlines.due(5.1) == [(("session", 7), 2)]
    deadlines.observe(("session", 8), token=1, ttl=None, now=0.0)  # unknown key: ignored
    assert deadlines.remaining(("session", 8), 1, 0.0) is None


class _NaiveDeadlines:
    """The reference: what Deadlines did before its heap (a scan of every item)."""

    def __init__(self):
        self.items, self.proposed = {}, {}

    def observe(self, key, token, ttl, now):
        if ttl is None:
            if key not in self.items:
                return
            ttl = self.items[key][2]
        self.items[key] = [token, now, ttl]
        self.proposed.pop(key, None)

    def forget(self, key):
        self.items.pop(key, None)
        self.proposed.pop(key, None)

    def reset(self, items, now):
        self.items = {key: [token, now, ttl] for key, token, ttl in items}
        self.proposed.clear()

    def due(self, now):
        due = []
        for key, (token, seen_at, ttl) in self.items.items():
            if now - seen_at > ttl and self.proposed.get(key) != token:
                self.proposed[key] = token
                due.append((key, token))
        return due

    def proposal_failed(self, key, token):
        if self.proposed.get(key) == token:
            del self.proposed[key]


from hypothesis import given, settings, strategies as st  # noqa: E402

_KEYS = st.sampled_from(["a", "b", "c", "d"])
_OPS = st.one_of(
    st.tuples(st.just("observe"), _KEYS, st.integers(1, 5), st.one_of(st.none(), st.sampled_from([0.5, 1.0, 3.0]))),
    st.tuples(st.just("forget"), _KEYS),
    st.tuples(st.just("reset"), st.lists(st.tuples(_KEYS, st.integers(1, 5), st.sampled_from([0.5, 2.0])),
                                         max_size=3, unique_by=lambda item: item[0])),
    st.tuples(st.just("due")),
    st.tuples(st.just("failed"), _KEYS, st.integers(1, 5)),
    st.tuples(st.just("tick"), st.sampled_from([0.1, 0.4, 1.1, 2.5])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_OPS, max_size=60))
def test_deadlines_heap_expires_exactly_what_a_scan_of_every_item_would(ops):
    fast, naive, now = Deadlines(), _NaiveDeadlines(), 0.0
    for op in ops:
        if op[0] == "tick":
            now += op[1]
        elif op[0] == "observe":
            fast.observe(op[1], op[2], op[3], now)
            naive.observe(op[1], op[2], op[3], now)
        elif op[0] == "forget":
            fast.forget(op[1])
            naive.forget(op[1])
        elif op[0] == "reset":
            fast.reset(op[1], now)
            naive.reset(op[1], now)
        elif op[0] == "failed":
            fast.proposal_failed(op[1], op[2])
            naive.proposal_failed(op[1], op[2])
        else:
            assert sorted(fast.due(now)) == sorted(naive.due(now))
