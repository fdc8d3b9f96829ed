"""The events table of the pure state machine: offsets, retention, groups, limits,
snapshots and the leader-side retention by age, driven through encoded command bytes
as a replica applies them (no cluster)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftsync.codec import CODEC_VERSION, Op, Query, Status, decode_command, decode_result, encode_command, encode_query
from raftsync.machine import StateMachine
from raftsync.machine import events as ev

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SID = 7


class Client:
    def __init__(self, machine: StateMachine, sid: int = SID) -> None:
        self.m = machine
        self.sid = sid
        self.seq = 0
        assert self.apply(encode_command(Op.OPEN_SESSION, sid, 0, 0, [10000]))[0] == Status.OK

    def apply(self, command: bytes, effects: list | None = None):
        return list(decode_result(self.m.apply(command, effects)))

    def command(self, op: Op, *args) -> bytes:
        self.seq += 1
        return encode_command(op, self.sid, self.seq, self.seq, list(args))

    def do(self, op: Op, *args, effects: list | None = None):
        return self.apply(self.command(op, *args), effects)

    def publish(self, topic: str, *payloads: bytes, key: str | None = None, effects: list | None = None):
        return self.do(Op.EVENTS_PUBLISH, topic, [[p, key, [1000 + i, i]] for i, p in enumerate(payloads)],
                       effects=effects)


def read(machine: StateMachine, topic: str, offset: int | None = None, count: int = 1000, size: int = 1 << 22):
    """[incarnation, first, next, events from ``offset``] (default: from the oldest retained)."""
    if offset is None:
        offset = read(machine, topic, 0, 1, 1)[1]
    status, payload = decode_result(machine.query(encode_query(Query.EVENTS_READ, [topic, offset, count, size])))
    assert status == Status.OK
    return payload


def info(machine: StateMachine, topic: str):
    status, payload = decode_result(machine.query(encode_query(Query.EVENTS_INFO, [topic])))
    return payload if status == Status.OK else None


def trim(machine: StateMachine, topic: str, incarnation: int, up_to: int):
    return list(decode_result(machine.apply(encode_command(Op.EVENTS_TRIM, 0, 0, 0, [topic, incarnation, up_to]))))


@pytest.fixture
def client():
    return Client(StateMachine())


# -- offsets and publishing ----------------------------------------------------------------

def test_offsets_are_dense_from_zero_per_topic_and_batches_are_consecutive(client):
    assert client.publish("a", b"1") == [Status.OK, [0, client.m.index]]
    incarnation = client.m.index
    assert client.publish("a", b"2", b"3", b"4")[1] == [1, incarnation]
    assert client.publish("b", b"x")[1][0] == 0
    assert client.publish("a", b"5", key="k")[1] == [4, incarnation]
    incarnation_, first, end, events = read(client.m, "a")
    assert (incarnation_, first, end) == (incarnation, 0, 5)
    assert [e[0] for e in events] == [b"1", b"2", b"3", b"4", b"5"]
    assert events[4][1] == "k" and events[2][2] == [1001, 1]
    assert [e[0] for e in read(client.m, "a", 3)[3]] == [b"4", b"5"]
    assert read(client.m, "a", 5)[3] == [] and read(client.m, "a", 99)[3] == []
    assert read(client.m, "missing") == [0, 0, 0, []]


def test_a_retried_publish_applies_once_and_answers_the_same(client):
    command = client.command(Op.EVENTS_PUBLISH, "t", [[b"once", None, [1, 0]]])
    first = client.m.apply(command)
    assert client.m.apply(command) == first
    assert read(client.m, "t")[2] == 1


def test_a_publish_is_all_or_nothing(client):
    client.publish("t", b"keep")
    before = client.m.snapshot()
    bad_batches = [
        [[b"ok", None, [1, 0]], [b"bad", None, [1]]],  # one malformed stamp
        [[b"ok", None, [1, 0]], ["not bytes", None, [1, 0]]],
        [[b"ok", None, [1, 0]], [b"x" * (ev.MAX_EVENT_BYTES + 1), None, [1, 0]]],
        [[b"ok", 5, [1, 0]]],
        [],
        [[b"e", None, [0, 0]]] * (ev.MAX_BATCH_EVENTS + 1),
    ]
    for batch in bad_batches:
        status, _ = client.do(Op.EVENTS_PUBLISH, "t", batch)
        assert status == Status.BAD_COMMAND
    for bad_topic in ("", 5, None, "t" * (ev.MAX_NAME_BYTES + 1)):
        assert client.do(Op.EVENTS_PUBLISH, bad_topic, [[b"e", None, [0, 0]]])[0] == Status.BAD_COMMAND
    after = msgpack.unpackb(client.m.snapshot(), raw=False, strict_map_key=False)
    original = msgpack.unpackb(before, raw=False, strict_map_key=False)
    assert after["events"] == original["events"]


def test_a_publish_wakes_the_topic_watch_kind(client):
    effects: list = []
    client.publish("t", b"a", b"b", effects=effects)
    assert effects == [("events_changed", "t", client.m.index, 2)]
    spec = client.m.watch_kinds["events"]
    entries = spec.history().since(0, lambda name: spec.match("t", name))
    assert [spec.payload(e) for e in entries] == [[client.m.index, 2]]


# -- retention ------------------------------------------------------------------------------

def test_retention_by_count_and_bytes_trims_the_oldest_and_reads_report_it(client):
    assert client.do(Op.EVENTS_CONFIGURE, "t", 3, 2048, None)[0] == Status.OK
    for i in range(5):
        client.publish("t", bytes([i]) * 10)
    incarnation, first, end, events = read(client.m, "t")
    assert (first, end) == (2, 5) and [e[0][0] for e in events] == [2, 3, 4]
    # a read below the oldest retained answers no events and says where it starts
    assert read(client.m, "t", 0)[1:] == [2, 5, []]
    client.publish("t", b"x" * 2040)  # 2040 + 10 > 2048: both older ones go
    _, first, end, events = read(client.m, "t")
    assert (first, end) == (5, 6) and ev.event_bytes(events[0]) == 2040
    # shrinking the retention trims at once
    client.publish("t", b"y" * 100)
    client.do(Op.EVENTS_CONFIGURE, "t", 1, None, None)
    assert read(client.m, "t")[1:3] == [6, 7]


def test_a_batch_over_the_topics_retention_is_refused_whole(client):
    client.do(Op.EVENTS_CONFIGURE, "t", 2, None, None)
    client.publish("t", b"keep")
    status, _ = client.publish("t", b"1", b"2", b"3")
    assert status == Status.TOO_LARGE
    assert read(client.m, "t")[1:3] == [0, 1]


def test_limits_on_topics_reservations_and_groups_are_typed_and_change_nothing(client):
    for i in range(ev.MAX_TOPICS):
        assert client.publish(f"t{i}", b"x")[0] == Status.OK
    assert client.publish("one-too-many", b"x")[0] == Status.TOO_LARGE
    assert info(client.m, "one-too-many") is None
    assert client.do(Op.EVENTS_CONFIGURE, "one-too-many", None, None, None)[0] == Status.TOO_LARGE
    # every default topic reserved its share: none may grow now
    assert client.do(Op.EVENTS_CONFIGURE, "t0", None, 2 * ev.DEFAULT_MAX_BYTES, None)[0] == Status.TOO_LARGE
    assert client.do(Op.EVENTS_CONFIGURE, "t0", ev.DEFAULT_MAX_EVENTS + 1, None, None)[0] == Status.TOO_LARGE
    assert client.do(Op.EVENTS_DELETE, "t1")[0] == Status.OK
    assert client.do(Op.EVENTS_CONFIGURE, "t0", None, 2 * ev.DEFAULT_MAX_BYTES, None)[0] == Status.OK
    for i in range(ev.MAX_GROUPS_PER_TOPIC):
        assert client.do(Op.EVENTS_COMMIT, "t2", f"g{i}", 1, 0)[0] == Status.OK
    assert client.do(Op.EVENTS_COMMIT, "t2", "one-more", 1, 0)[0] == Status.TOO_LARGE
    assert client.do(Op.EVENTS_COMMIT, "t2", "g0", 0, 0)[0] == Status.OK  # an existing group still commits
    table = client.m.events
    assert table.reserved_events == sum(t.max_events for t in table.topics.values())
    assert table.reserved_bytes == sum(t.max_bytes for t in table.topics.values()) <= ev.TOTAL_MAX_BYTES


def test_configure_checks_its_limits(client):
    for args in ((0, None, None), (None, 10, None), (None, None, 0), ("x", None, None),
                 (ev.TOTAL_MAX_EVENTS + 1, None, None), (None, None, ev.MAX_AGE_MS + 1)):
        assert client.do(Op.EVENTS_CONFIGURE, "t", *args)[0] == Status.BAD_COMMAND
    status, payload = client.do(Op.EVENTS_CONFIGURE, "t", 10, 4096, 1500)
    assert status == Status.OK and payload[4:7] == [10, 4096, 1500]


# -- groups ---------------------------------------------------------------------------------

def test_group_offsets_only_move_forward_and_never_past_the_end(client):
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 0, 0)[0] == Status.NOT_FOUND
    client.publish("t", b"a", b"b", b"c")
    incarnation = info(client.m, "t")[0]
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 2, incarnation) == [Status.OK, [2]]
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 1, 0) == [Status.OK, [2]]  # a late commit never rewinds
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 3, 0) == [Status.OK, [3]]
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 4, 0)[0] == Status.BAD_COMMAND
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 3, incarnation + 1) == [Status.CONFLICT, [incarnation]]
    assert info(client.m, "t")[7] == [["g", 3]]
    assert client.do(Op.EVENTS_DELETE_GROUP, "t", "g")[0] == Status.OK
    assert client.do(Op.EVENTS_DELETE_GROUP, "t", "g")[0] == Status.NOT_FOUND
    assert info(client.m, "t")[7] == []


def test_a_deleted_topic_comes_back_as_a_new_incarnation_from_offset_zero(client):
    client.publish("t", b"a", b"b")
    old = info(client.m, "t")[0]
    client.do(Op.EVENTS_COMMIT, "t", "g", 2, old)
    effects: list = []
    assert client.do(Op.EVENTS_DELETE, "t", effects=effects)[0] == Status.OK
    assert effects == [("events_changed", "t", 0, 0)]
    assert client.do(Op.EVENTS_DELETE, "t")[0] == Status.NOT_FOUND
    assert client.publish("t", b"new")[1][0] == 0
    new = info(client.m, "t")
    assert new[0] > old and new[7] == []
    assert client.do(Op.EVENTS_COMMIT, "t", "g", 1, old)[0] == Status.CONFLICT


def test_trim_names_the_incarnation_and_is_idempotent(client):
    client.publish("t", b"a", b"b", b"c")
    incarnation = info(client.m, "t")[0]
    assert trim(client.m, "t", incarnation + 1, 2)[0] == Status.STALE
    assert trim(client.m, "t", incarnation, 2) == [Status.OK, [2]]
    assert trim(client.m, "t", incarnation, 2)[0] == Status.STALE
    assert trim(client.m, "t", incarnation, 99) == [Status.OK, [3]]  # never past the end
    assert read(client.m, "t")[1:] == [3, 3, []]
    assert client.publish("t", b"d")[1][0] == 3


# -- determinism, snapshots, bounds, never raising -----------------------------------------

TOPICS = ["a", "b"]
step = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(TOPICS), st.lists(st.binary(max_size=300), min_size=1, max_size=4),
              st.one_of(st.none(), st.sampled_from(["k", "é"]))),
    st.tuples(st.just("configure"), st.sampled_from(TOPICS), st.one_of(st.none(), st.integers(1, 6)),
              st.one_of(st.none(), st.integers(1024, 3000)), st.one_of(st.none(), st.integers(1, 10))),
    st.tuples(st.just("commit"), st.sampled_from(TOPICS), st.sampled_from(["g", "h"]), st.integers(0, 30)),
    st.tuples(st.just("delete"), st.sampled_from(TOPICS)),
    st.tuples(st.just("delete_group"), st.sampled_from(TOPICS), st.sampled_from(["g", "h"])),
    st.tuples(st.just("trim"), st.sampled_from(TOPICS), st.integers(0, 30)),
    st.tuples(st.just("snapshot")),
)


def drive(steps) -> list[bytes]:
    """The command bytes of ``steps`` (a trim names the topic's current incarnation)."""
    machine = StateMachine()
    client = Client(machine)
    commands = [encode_command(Op.OPEN_SESSION, SID, 0, 0, [10000])]
    for item in steps:
        kind = item[0]
        if kind == "snapshot":
            continue
        if kind == "publish":
            command = client.command(Op.EVENTS_PUBLISH, item[1], [[p, item[3], [5, i]] for i, p in enumerate(item[2])])
        elif kind == "configure":
            command = client.command(Op.EVENTS_CONFIGURE, *item[1:])
        elif kind == "commit":
            command = client.command(Op.EVENTS_COMMIT, item[1], item[2], item[3], 0)
        elif kind == "delete":
            command = client.command(Op.EVENTS_DELETE, item[1])
        elif kind == "delete_group":
            command = client.command(Op.EVENTS_DELETE_GROUP, *item[1:])
        else:
            topic = machine.events.topics.get(item[1])
            command = encode_command(Op.EVENTS_TRIM, 0, 0, 0, [item[1], topic.incarnation if topic else 1, item[2]])
        machine.apply(command)
        commands.append(command)
    return commands


def check_bounded(machine: StateMachine) -> None:
    table = machine.events
    assert len(table.topics) <= ev.MAX_TOPICS
    assert table.reserved_events == sum(t.max_events for t in table.topics.values()) <= ev.TOTAL_MAX_EVENTS
    assert table.reserved_bytes == sum(t.max_bytes for t in table.topics.values()) <= ev.TOTAL_MAX_BYTES
    for topic in table.topics.values():
        assert len(topic.events) <= topic.max_events
        assert topic.bytes == sum(ev.event_bytes(e) for e in topic.events) <= topic.max_bytes
        assert len(topic.groups) <= ev.MAX_GROUPS_PER_TOPIC
        assert all(0 <= offset <= topic.next for offset in topic.groups.values())
    assert len(table.history.entries) <= ev.HISTORY_MAX_ENTRIES


@SETTINGS
@given(steps=st.lists(step, min_size=1, max_size=40))
def test_replicas_agree_snapshots_continue_identically_and_memory_stays_bounded(steps):
    commands = drive(steps)
    snapshot_points = [i for i, item in enumerate(steps, start=1) if item[0] == "snapshot"]
    straight = StateMachine()
    results = [straight.apply(c) for c in commands]
    for result in results:
        assert decode_result(result)[0] != Status.INTERNAL
    check_bounded(straight)
    hopping = StateMachine()
    hopping_results = []
    for i, command in enumerate(commands):
        if i in snapshot_points:
            hopping = StateMachine.restore(hopping.snapshot())
        hopping_results.append(hopping.apply(command))
    assert hopping_results == results
    assert hopping.snapshot() == straight.snapshot()
    assert StateMachine.restore(straight.snapshot()).snapshot() == straight.snapshot()
    # offsets: every retained event sits at the offset its publish returned
    published: dict[str, list] = {}
    for command, result in zip(commands, results):
        op, _, _, _, args = decode_command(command)
        status, payload = decode_result(result)
        if op == Op.EVENTS_PUBLISH and status == Status.OK:
            published.setdefault(args[0], []).append((payload, [e[0] for e in args[1]]))
        if op == Op.EVENTS_DELETE and status == Status.OK:
            published.pop(args[0], None)
    for topic, batches in published.items():
        incarnation, first, end, events = read(straight, topic)
        for (offset, batch_incarnation), payloads in batches:
            if batch_incarnation != incarnation:
                continue
            for i, payload in enumerate(payloads):
                if first <= offset + i < end:
                    assert events[offset + i - first][0] == payload


VALID = {Op.EVENTS_PUBLISH: ["t", [[b"p", None, [1, 0]]]], Op.EVENTS_COMMIT: ["t", "g", 0, 0],
         Op.EVENTS_CONFIGURE: ["t", None, None, None], Op.EVENTS_DELETE: ["t"],
         Op.EVENTS_DELETE_GROUP: ["t", "g"], Op.EVENTS_TRIM: ["t", 1, 1]}
JUNK = [None, True, -1, 2**64 - 1, 1.5, "", "x", b"", b"x", [], [1], [[]], [[b"p"]], {}, {"a": 1},
        msgpack.ExtType(5, b"x"), "x" * 2000]


def test_every_argument_of_every_events_op_is_checked_not_crashed_on():
    base = Client(StateMachine())
    base.publish("t", b"a")
    snapshot = base.m.snapshot()
    for op, valid in VALID.items():
        variants = [valid + [junk] for junk in JUNK]
        variants += [valid[:i] + valid[i + 1:] for i in range(len(valid))]
        variants += [valid[:i] + [junk] + valid[i + 1:] for i in range(len(valid)) for junk in JUNK]
        for args in variants:
            machine = StateMachine.restore(snapshot)
            session = 0 if op == Op.EVENTS_TRIM else SID
            command = bytes((CODEC_VERSION,)) + msgpack.packb([int(op), session, 100, 0, args], use_bin_type=True)
            status, _ = decode_result(machine.apply(command))
            assert status != Status.INTERNAL, (op, args)
            assert StateMachine.restore(machine.snapshot()).snapshot() == machine.snapshot()
    for kind in (Query.EVENTS_READ, Query.EVENTS_INFO):
        for args in ([], ["t"], ["t", 0, 1, 1], ["t", -1, 0, 0], [5, "x", None, b""], ["t", 0, 2**64 - 1, 1]):
            status, _ = decode_result(base.m.query(encode_query(kind, args)))
            assert status in (Status.OK, Status.BAD_COMMAND, Status.NOT_FOUND)


def test_reads_are_bounded_by_count_and_bytes_but_answer_at_least_one_event(client):
    client.do(Op.EVENTS_CONFIGURE, "t", None, 1 << 20, None)
    client.publish("t", *[b"x" * 30000] * 1)
    client.publish("t", *[b"y" * 100] * 10)
    assert len(read(client.m, "t", 0, 1000, 1)[3]) == 1
    assert len(read(client.m, "t", 1, 3, 1 << 20)[3]) == 3
    assert len(read(client.m, "t", 0, 1000, 30250)[3]) == 3


# -- retention by age (the leader duty) ------------------------------------------------------

def age_duty(machine: StateMachine):
    duties = machine.events.leader_duties()
    assert len(duties) == 1
    return duties[0]


def apply_all(machine: StateMachine, commands: list[bytes]) -> None:
    for command in commands:
        assert decode_result(machine.apply(command))[0] in (Status.OK, Status.STALE)


def test_age_duty_trims_after_max_age_on_the_leaders_clock_never_before(client):
    machine = client.m
    client.do(Op.EVENTS_CONFIGURE, "t", None, None, 3200)  # granularity 0.1 s
    client.publish("old", b"kept: no age limit")
    duty = age_duty(machine)
    duty.became_leader(machine, 100.0, 0.0)
    client.publish("t", b"a", b"b")
    assert duty.due(machine, 100.0, 0.0) == []
    client.publish("t", b"c")
    assert duty.due(machine, 101.0, 0.0) == []
    assert duty.due(machine, 103.1, 0.0) == []  # 3.1 s after the first: not yet
    commands = duty.due(machine, 103.2, 0.0)
    assert [decode_command(c)[4] for c in commands] == [["t", info(machine, "t")[0], 2]]
    apply_all(machine, commands)
    assert read(machine, "t")[1:3] == [2, 3]
    assert duty.due(machine, 103.3, 0.0) == []
    commands = duty.due(machine, 104.2, 0.0)
    apply_all(machine, commands)
    assert read(machine, "t")[1:3] == [3, 3]
    assert read(machine, "old")[1:3] == [0, 1]


def test_a_new_leader_gives_every_event_a_fresh_full_max_age(client):
    machine = client.m
    client.do(Op.EVENTS_CONFIGURE, "t", None, None, 1000)
    client.publish("t", b"a")
    old_leader, new_leader = age_duty(machine), age_duty(machine)
    old_leader.became_leader(machine, 10.0, 0.0)
    assert old_leader.due(machine, 10.0, 0.0) == []
    new_leader.became_leader(machine, 10.9, 0.0)  # took over just before the old one would trim
    assert new_leader.due(machine, 10.9, 0.0) == []
    assert new_leader.due(machine, 11.5, 0.0) == []
    assert len(new_leader.due(machine, 11.95, 0.0)) == 1


def test_an_unapplied_trim_is_proposed_again_and_a_deleted_topics_marks_go(client):
    machine = client.m
    client.do(Op.EVENTS_CONFIGURE, "t", None, None, 100)
    client.publish("t", b"a")
    duty = age_duty(machine)
    duty.became_leader(machine, 0.0, 0.0)
    duty.due(machine, 0.0, 0.0)
    assert len(duty.due(machine, 0.2, 0.0)) == 1
    assert duty.due(machine, 0.5, 0.0) == []  # proposed and not answered yet
    again = duty.due(machine, 0.2 + ev.RETRY_SECONDS, 0.0)
    assert len(again) == 1
    apply_all(machine, again)
    assert duty.due(machine, 5.0, 0.0) == []
    client.publish("t", b"b")
    duty.due(machine, 6.0, 0.0)
    client.do(Op.EVENTS_DELETE, "t")
    assert duty.due(machine, 9.0, 0.0) == []
    assert duty._marks == {} and duty._proposed == {}


@SETTINGS
@given(schedule=st.lists(st.tuples(st.floats(0.0, 0.3), st.integers(0, 3), st.booleans()), min_size=1, max_size=40),
       max_age_ms=st.integers(50, 2000))
def test_age_duty_never_trims_an_event_younger_than_max_age_and_keeps_few_marks(schedule, max_age_ms):
    """Publishes at random times, ticks between them; every trim the duty proposes only
    covers events the duty saw at least max_age earlier, and no event outlives
    max_age + a granularity + the tick gap by more than the next tick."""
    client = Client(StateMachine())
    machine = client.m
    client.do(Op.EVENTS_CONFIGURE, "t", None, None, max_age_ms)
    duty = age_duty(machine)
    now = 0.0
    duty.became_leader(machine, now, 0.0)
    seen_at: dict[int, float] = {}  # offset -> first tick that could see it
    for gap, count, tick in schedule:
        now += gap
        if count:
            client.publish("t", *[b"e"] * count)
        if not tick:
            continue
        end = machine.events.topics["t"].next
        for offset in range(end):
            seen_at.setdefault(offset, now)
        for command in duty.due(machine, now, 0.0):
            up_to = decode_command(command)[4][2]
            assert all(now - seen_at[offset] >= max_age_ms / 1000 for offset in range(up_to)
                       if offset >= machine.events.topics["t"].first)
            apply_all(machine, [command])
        assert sum(len(marks) for marks in duty._marks.values()) <= ev.MARKS_PER_AGE + 2
    # long after the last publish everything has gone
    for extra in (0.0, max_age_ms / 1000 + 0.1):
        apply_all(machine, duty.due(machine, now + extra, 0.0))
    topic = machine.events.topics["t"]
    assert topic.first == topic.next
