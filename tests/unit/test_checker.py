"""The fault-test checker must accept what a correct system may do and catch what it may not.

Known-good and known-bad histories, hand-written, plus generated histories from a real
register whose operations take effect at random instants inside their intervals.
"""

import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.checker import (Consumed, Effect, Hold, JobFinal, Op, Published, Submit, TopicRead, check_events,
                             check_holds, check_kv, check_leaders_per_term, check_tasks, check_write_counts,
                             linearizable, shrink)
from cluster.history import check_workload, consumed_events, holds, kv_ops, published_events, read_records

_ids = iter(range(1, 1 << 30))


def w(value, start, end, process="p1", key="k", outcome="ok", version=None):
    result = {"version": version} if version is not None else {}
    return Op(process, "write", key, start, end if outcome != "unknown" else None, outcome, value=value,
              result=result if outcome == "ok" else None, id=next(_ids))


def r(value, start, end, process="p2", key="k", version=None):
    result = {"value": value}
    if version is not None:
        result["version"] = version
    return Op(process, "read", key, start, end, "ok", result=result, id=next(_ids))


def cas(expected, value, start, end, process="p3", key="k", outcome="ok", conflict=False):
    result = {"conflict": conflict} if outcome == "ok" else None
    return Op(process, "cas", key, start, end if outcome != "unknown" else None, outcome, value=value,
              expected=expected, result=result, id=next(_ids))


def verdict(*ops):
    return check_kv(ops, time_limit=10).verdict


# -- registers: linearizable ---------------------------------------------------------------------


def test_sequential_write_then_read_is_linearizable():
    assert verdict(w(1, 0, 1), r(1, 2, 3)) == "ok"


def test_read_of_absent_key_before_any_write():
    assert verdict(r(None, 0, 1, version=0), w(1, 2, 3), r(1, 4, 5, version=1)) == "ok"


def test_concurrent_writes_either_order_is_fine():
    for seen in (1, 2):
        assert verdict(w(1, 0, 10, "a"), w(2, 0, 10, "b"), r(seen, 11, 12)) == "ok"


def test_read_concurrent_with_write_may_see_old_or_new():
    assert verdict(w(1, 0, 1), w(2, 2, 10), r(1, 3, 4)) == "ok"
    assert verdict(w(1, 0, 1), w(2, 2, 10), r(2, 3, 4)) == "ok"


def test_unknown_write_may_take_effect_long_after_its_invoke():
    history = [w(1, 0, 1), w(2, 2, None, outcome="unknown"), r(1, 10, 11), r(2, 12, 13)]
    assert verdict(*history) == "ok"


def test_unknown_write_may_never_take_effect():
    assert verdict(w(1, 0, 1), w(2, 2, None, outcome="unknown"), r(1, 10, 11), r(1, 12, 13)) == "ok"


def test_failed_write_is_ignored():
    assert verdict(w(1, 0, 1), w(2, 2, 3, outcome="fail"), r(1, 4, 5)) == "ok"


def test_cas_that_wins_and_cas_that_conflicts():
    history = [w(1, 0, 1, version=1), cas(1, "x", 2, 5, "a"), cas(1, "y", 2, 5, "b", conflict=True),
               r("x", 6, 7, version=2)]
    assert verdict(*history) == "ok"


def test_unknown_cas_may_or_may_not_apply():
    base = [w(1, 0, 1, version=1), cas(1, "x", 2, None, outcome="unknown")]
    assert verdict(*base, r(1, 5, 6)) == "ok"
    assert verdict(*base, r("x", 5, 6)) == "ok"


# -- registers: not linearizable -------------------------------------------------------------------


def test_stale_read_after_a_completed_write_is_caught():
    assert verdict(w(1, 0, 1), w(2, 2, 3), r(1, 4, 5)) == "violation"


def test_read_of_a_value_nobody_wrote_is_caught():
    assert verdict(w(1, 0, 10, "a"), w(2, 0, 10, "b"), r(3, 11, 12)) == "violation"


def test_reads_going_back_in_time_are_caught():
    # w2 is still running, but once a read saw 2 a later read cannot see 1 again
    assert verdict(w(1, 0, 1), w(2, 2, 10), r(2, 3, 4, "a"), r(1, 5, 6, "b")) == "violation"


def test_unknown_write_seen_then_unseen_is_caught():
    history = [w(1, 0, 1), w(2, 2, None, outcome="unknown"), r(2, 10, 11), r(1, 12, 13)]
    assert verdict(*history) == "violation"


def test_read_before_the_write_was_invoked_is_caught():
    assert verdict(r(1, 0, 1), w(1, 2, 3)) == "violation"


def test_failed_write_that_was_read_is_caught():
    assert verdict(w(1, 0, 1), w(2, 2, 3, outcome="fail"), r(2, 4, 5)) == "violation"


def test_two_winning_cas_on_one_version_are_caught():
    history = [w(1, 0, 1), cas(1, "x", 2, 5, "a"), cas(1, "y", 2, 5, "b")]
    assert verdict(*history) == "violation"


def test_conflict_when_nothing_else_wrote_is_caught():
    assert verdict(w(1, 0, 1, version=1), cas(1, "x", 2, 3, conflict=True)) == "violation"


def test_version_that_skips_a_write_is_caught():
    # a write applied twice (or a phantom write) shows as a version jump
    assert verdict(w(1, 0, 1, version=1), w(2, 2, 3, version=3)) == "violation"
    assert verdict(w(1, 0, 1), r(1, 2, 3, version=2)) == "violation"


def test_keys_are_checked_independently():
    result = check_kv([w(1, 0, 1, key="a"), w(2, 2, 3, key="a"), r(1, 4, 5, key="a"),
                       w(1, 0, 1, key="b"), r(1, 2, 3, key="b")], time_limit=10)
    assert result.verdict == "violation"
    assert set(result.violations) == {"a"}
    assert "then none of these fits" in result.explain()


def test_search_answers_unknown_instead_of_hanging():
    # 40 concurrent unknown writes and a read of a value none wrote: the search has to try
    # every subset before it can say "violation"; with a tiny budget it must say "unknown"
    history = [w(i, 0, None, process=f"p{i}", outcome="unknown") for i in range(40)]
    history += [w(i, 0, 100, process=f"q{i}") for i in range(100, 120)]
    history.append(r(-1, 200, 201))
    started = time.monotonic()
    result = check_kv(history, time_limit=0.3)
    assert result.verdict == "unknown"
    assert time.monotonic() - started < 10


def test_shrink_keeps_the_violation_and_drops_the_noise():
    noise = [w(10 + i, 20 + 2 * i, 21 + 2 * i, process="n") for i in range(15)]
    core = [w(1, 0, 1), w(2, 2, 3), r(1, 4, 5)]
    small = shrink(core + noise + [r(24, 60, 61)])
    assert linearizable(small).verdict == "violation"
    assert len(small) <= 3


# -- registers: generated from a correct register -------------------------------------------------


def _correct_history(seed, count=30, processes=4):
    """Operations that really took effect at a random instant inside their interval."""
    rng = random.Random(seed)
    ops, clock = [], {f"p{i}": 0.0 for i in range(processes)}
    planned = []
    for n in range(count):
        process = rng.choice(list(clock))
        start = clock[process] + rng.random()
        end = start + rng.random() * 3
        clock[process] = end
        planned.append((start + rng.random() * (end - start), n, process, start, end, rng.random()))
    value, version = None, 0
    for point, n, process, start, end, dice in sorted(planned):
        if dice < 0.4:
            ops.append(r(value, start, end, process, version=version))
        elif dice < 0.7:
            version += 1
            value = f"v{n}"
            ops.append(w(value, start, end, process, version=version))
        elif dice < 0.8:
            # unknown outcome: it applied here, but the client never heard back
            version += 1
            value = f"v{n}"
            ops.append(w(value, start, None, process, outcome="unknown"))
        else:
            expected = version if dice < 0.9 else version + 7
            if expected == version:
                version += 1
                value = f"v{n}"
                ops.append(cas(expected, value, start, end, process))
            else:
                ops.append(cas(expected, f"v{n}", start, end, process, conflict=True))
    return ops


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10 ** 9))
def test_histories_of_a_correct_register_are_linearizable(seed):
    result = check_kv(_correct_history(seed), time_limit=20)
    assert result.verdict == "ok", result.explain()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10 ** 9))
def test_a_read_of_a_value_never_written_is_always_caught(seed):
    history = _correct_history(seed)
    reads = [i for i, op in enumerate(history) if op.f == "read"]
    if not reads:
        return
    victim = history[random.Random(seed).choice(reads)]
    history[history.index(victim)] = r("never-written", victim.invoke, victim.complete, victim.process)
    assert check_kv(history, time_limit=20).verdict == "violation"


# -- locks, leaders, lost writes ---------------------------------------------------------------------


def test_disjoint_holds_with_increasing_tokens_pass():
    assert check_holds([Hold("a", "L", 1, 0, release=1), Hold("b", "L", 2, 2, release=3),
                        Hold("a", "L", 3, 4)]) == []


def test_overlapping_holds_are_caught():
    violations = check_holds([Hold("a", "L", 1, 0, release=5), Hold("b", "L", 2, 3, release=6)])
    assert [v.kind for v in violations] == ["overlap"]


def test_holds_of_different_locks_may_overlap():
    assert check_holds([Hold("a", "L", 1, 0, release=5), Hold("b", "M", 1, 3, release=6)]) == []


def test_a_hold_ends_when_its_holder_learns_it_is_lost():
    assert check_holds([Hold("a", "L", 1, 0, release=10, lost=3), Hold("b", "L", 2, 4, release=6)]) == []


def test_a_paused_holder_is_safe_only_until_its_safe_until():
    # a resumed after its lease expired and released at 10: it must not have acted after 3
    assert check_holds([Hold("a", "L", 1, 0, release=10, safe_until=3), Hold("b", "L", 2, 4, release=6)]) == []
    assert check_holds([Hold("a", "L", 1, 0, release=10, safe_until=5), Hold("b", "L", 2, 4, release=6)]) != []


def test_a_hold_never_released_lasts_forever():
    assert [v.kind for v in check_holds([Hold("a", "L", 1, 0), Hold("b", "L", 2, 100, release=101)])] == ["overlap"]


def test_tokens_must_increase_in_grant_order():
    violations = check_holds([Hold("a", "L", 5, 0, release=1), Hold("b", "L", 4, 2, release=3)])
    assert [v.kind for v in violations] == ["token-order"]
    equal = check_holds([Hold("a", "L", 5, 0, release=1), Hold("b", "L", 5, 2, release=3)])
    assert [v.kind for v in equal] == ["token-order"]


def test_a_grant_already_expired_on_arrival_is_not_a_hold():
    assert check_holds([Hold("a", "L", 1, 5, release=6, safe_until=4), Hold("b", "L", 2, 4.5, release=7)]) == []


def test_one_leader_per_term():
    assert check_leaders_per_term([("raft", 1, "n1"), ("raft", 1, "n1"), ("raft", 2, "n2")]) == []
    violations = check_leaders_per_term([("raft", 3, "n1"), ("raft", 3, "n2"), ("g", 3, "n3")])
    assert [(v.kind, v.evidence) for v in violations] == [("two-leaders", ("raft", 3))]


def test_lost_and_phantom_writes():
    ops = [w(1, 0, 1), w(2, 2, 3), w(3, 4, None, outcome="unknown"), w(9, 5, 6, outcome="fail"),
           cas(2, "x", 7, 8, conflict=True)]
    assert check_write_counts(ops, {"k": 2}) == []
    assert check_write_counts(ops, {"k": 3}) == []
    assert [v.kind for v in check_write_counts(ops, {"k": 1})] == ["lost-write"]
    assert [v.kind for v in check_write_counts(ops, {"k": 4})] == ["phantom-write"]


def test_final_reads_taken_while_writes_go_on():
    ops = [w(1, 0, 1), w(2, 2, 3), w(3, 4, 10), w(4, 11, 12)]
    # a read during the third write may see 2 or 3 writes, never fewer than the two acknowledged
    assert check_write_counts(ops, [r(2, 5, 6, version=2)]) == []
    assert check_write_counts(ops, [r(3, 5, 6, version=3)]) == []
    assert [v.kind for v in check_write_counts(ops, [r(1, 5, 6, version=1)])] == ["lost-write"]
    assert [v.kind for v in check_write_counts(ops, [r(4, 5, 6, version=4)])] == ["phantom-write"]


# -- the workload's JSON-lines histories -----------------------------------------------------------------


def _write_history(path, records):
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records) + '{"t": 99, "cut sh')


def _rec(t, process, op_id, kind, **fields):
    return {"t": t, "process": process, "pid": 7, "id": op_id, "type": kind, **fields}


def test_workload_records_become_operations_and_holds(tmp_path):
    path = tmp_path / "h.jsonl"
    _write_history(path, [
        _rec(0.0, "n1", 1, "invoke", f="write", key="k", value="a"),
        _rec(0.1, "n1", 1, "ok", result={"version": 1}),
        _rec(0.2, "n2", 1, "invoke", f="read", key="k"),
        _rec(0.3, "n2", 1, "ok", result={"value": "a", "version": 1}),
        _rec(0.4, "n1", 2, "invoke", f="write", key="k", value="b"),      # killed before it completed
        _rec(1.0, "n2", 2, "invoke", f="acquire", lock="L"),
        _rec(1.1, "n2", 2, "ok", lock="L", result={"token": 4}, safe_until=5.0),
        _rec(1.5, "n2", 3, "invoke", f="release", lock="L", token=4, safe_until=6.0),
        _rec(1.6, "n2", 3, "ok", result={"lost": False}),
        _rec(2.0, "n3", 1, "invoke", f="acquire", lock="L"),
        _rec(2.1, "n3", 1, "ok", lock="L", result={"token": 9}),
        _rec(2.5, "n3", 2, "event", f="lost", lock="L", token=9),
    ])
    records = read_records([path])
    ops = kv_ops(records)
    assert [(op.f, op.outcome) for op in ops] == [("write", "ok"), ("read", "ok"), ("write", "unknown")]
    assert sorted((h.token, h.start, h.end) for h in holds(records)) == [(4, 1.1, 1.5), (9, 2.1, 2.5)]
    assert check_workload([path]).ok


def test_workload_check_reports_a_stale_read_and_overlapping_holds(tmp_path):
    path = tmp_path / "h.jsonl"
    _write_history(path, [
        _rec(0.0, "n1", 1, "invoke", f="write", key="k", value="a"),
        _rec(0.1, "n1", 1, "ok", result={"version": 1}),
        _rec(0.2, "n1", 2, "invoke", f="write", key="k", value="b"),
        _rec(0.3, "n1", 2, "ok", result={"version": 2}),
        _rec(0.4, "n2", 1, "invoke", f="read", key="k"),
        _rec(0.5, "n2", 1, "ok", result={"value": "a", "version": 1}),
        _rec(1.0, "n2", 2, "invoke", f="acquire", lock="L"),
        _rec(1.1, "n2", 2, "ok", lock="L", result={"token": 4}),
        _rec(1.2, "n3", 1, "invoke", f="acquire", lock="L"),
        _rec(1.3, "n3", 1, "ok", lock="L", result={"token": 5}),
        _rec(1.5, "n2", 3, "invoke", f="release", lock="L", token=4),
        _rec(1.8, "n3", 2, "invoke", f="release", lock="L", token=5),
        _rec(2.0, "n1", 3, "event", f="raft", role="leader", term=2, leader="n1"),
        _rec(2.1, "n2", 4, "event", f="raft", role="leader", term=2, leader="n2"),
    ])
    report = check_workload([path])
    assert not report.ok
    assert report.kv.verdict == "violation"
    assert sorted(v.kind for v in report.violations) == ["overlap", "two-leaders"]


def test_workload_final_read_missing_an_acknowledged_write_is_caught(tmp_path):
    path = tmp_path / "h.jsonl"
    records = [
        _rec(0.0, "n1", 1, "invoke", f="write", key="k", value="a"),
        _rec(0.1, "n1", 1, "ok", result={"version": 1}),
        _rec(0.2, "n1", 2, "invoke", f="write", key="k", value="b"),
        _rec(0.3, "n1", 2, "ok", result={"version": 2}),
        _rec(5.0, "n2", 1, "invoke", f="read", key="k", final=True),
    ]
    _write_history(path, records + [_rec(5.1, "n2", 1, "ok", result={"value": "b", "version": 2})])
    assert check_workload([path]).ok
    # the value is right but one acknowledged write is gone from the version count
    _write_history(path, records + [_rec(5.1, "n2", 1, "ok", result={"value": "b", "version": 1})])
    assert "lost-write" in [v.kind for v in check_workload([path]).violations]


def test_a_paused_leader_that_hears_late_held_only_until_its_safe_until(tmp_path):
    # n1 leads from 1.1; paused from ~2 to 9; its session's safe-until stopped at 4.0;
    # n2 leads from 6; n1, resumed, is told at 9.2 that its term was revoked
    path = tmp_path / "h.jsonl"
    records = [
        _rec(1.0, "n1", 1, "invoke", f="campaign", group="G"),
        _rec(1.1, "n1", 1, "ok", group="G", result={"term": 3}),
        _rec(5.9, "n2", 1, "invoke", f="campaign", group="G"),
        _rec(6.0, "n2", 1, "ok", group="G", result={"term": 4}),
    ]
    _write_history(path, records + [_rec(9.2, "n1", 2, "event", f="revoked", group="G", term=3, safe_until=4.0)])
    assert check_workload([path]).ok
    # had its lease still been valid at 6 (the cluster expired it too early), that is an overlap
    _write_history(path, records + [_rec(9.2, "n1", 2, "event", f="revoked", group="G", term=3, safe_until=7.0)])
    assert [v.kind for v in check_workload([path]).violations] == ["overlap"]


def test_a_holder_killed_while_holding_held_until_it_died(tmp_path):
    path = tmp_path / "h.jsonl"
    _write_history(path, [
        _rec(1.0, "n2", 1, "invoke", f="acquire", lock="L"),
        _rec(1.1, "n2", 1, "ok", lock="L", result={"token": 4}),
        _rec(5.0, "n3", 1, "invoke", f="acquire", lock="L"),
        _rec(5.1, "n3", 1, "ok", lock="L", result={"token": 5}),
    ])
    assert check_workload([path], deaths={("n2", 7): 2.0}).ok
    assert [v.kind for v in check_workload([path], deaths={("n2", 7): 6.0}).violations] == ["overlap"]


@pytest.mark.parametrize("count", [200])
def test_a_long_correct_history_checks_quickly(count):
    history = _correct_history(12345, count=count, processes=5)
    assert check_kv(history, time_limit=30).verdict == "ok"


# -- events ------------------------------------------------------------------------------------------


def pub(event_id, offset, start=0.0, end=1.0, outcome="ok", process="p1"):
    return Published(event_id, process, start, end if outcome == "ok" else None, outcome,
                     offset if outcome == "ok" else None)


def topic(*ids, first=0, at=10.0, process="r1", next=None, offsets=None):
    offsets = offsets if offsets is not None else range(first, first + len(ids))
    events = tuple(zip(offsets, ids))
    return TopicRead(process, at, first, first + len(ids) if next is None else next, events)


def sub(start, *deliveries, group="g", key="s1", opened=0.5, process="c1"):
    """deliveries: (time, offset, id)"""
    return Consumed(process, group, key, opened, start, tuple(deliveries))


def event_kinds(published, reads, consumed=()):
    return sorted({v.kind for v in check_events(published, reads, consumed)[0]})


def test_events_every_acknowledged_publish_once_at_its_offset_passes():
    published = [pub("a", 0), pub("b", 1, 1, 2), pub("u1", None, 2, outcome="unknown"),
                 pub("u2", None, 2, outcome="unknown"), pub("f", None, 2, 3, outcome="fail")]
    # u1 applied (at offset 2), u2 never did; two members' final reads agree
    reads = [topic("a", "b", "u1"), topic("a", "b", "u1", process="r2", at=11)]
    consumed = [sub(0, (3, 0, "a"), (3, 1, "b")), sub(2, (5, 2, "u1"), key="s2", opened=4)]
    violations, stats = check_events(published, reads, consumed)
    assert violations == []
    assert stats["acknowledged"] == 2 and stats["checked"] == 2 and stats["deliveries"] == 3


def test_events_a_read_taken_before_the_acknowledgement_may_miss_the_event():
    published = [pub("a", 0), pub("b", 1, 1, 12)]
    assert event_kinds(published, [topic("a", at=10), topic("a", "b", at=13, process="r2")]) == []


def test_events_trimmed_prefix_is_not_a_loss():
    published = [pub("a", 0), pub("b", 1), pub("c", 2)]
    violations, stats = check_events(published, [topic("c", first=2)])
    assert violations == [] and stats["trimmed"] == 2 and stats["checked"] == 1


def test_events_lost_acknowledged_publish_is_caught():
    published = [pub("a", 0), pub("b", 1)]
    assert event_kinds(published, [topic("a")]) == ["lost-event"]
    # the topic gone altogether
    assert event_kinds(published, [TopicRead("r1", 10, 0, 0, (), missing=True)]) == ["lost-event"]


def test_events_acknowledged_publish_at_another_offset_is_caught():
    published = [pub("a", 0), pub("b", 1), pub("u", None, outcome="unknown")]
    assert event_kinds(published, [topic("a", "u", "b")]) == ["lost-event"]


def test_events_an_event_twice_is_caught():
    published = [pub("a", 0), pub("u", None, outcome="unknown")]
    assert event_kinds(published, [topic("a", "u", "u")]) == ["duplicate-event"]
    # twice across members' reads: at one offset for one, another for the other
    assert "duplicate-event" in event_kinds(published, [topic("a", "u"), topic("a", "x", "u", process="r2")])


def test_events_failed_or_unpublished_events_in_the_topic_are_caught():
    published = [pub("a", 0), pub("f", None, outcome="fail")]
    assert event_kinds(published, [topic("a", "f")]) == ["phantom-event"]
    assert event_kinds(published, [topic("a", "zzz")]) == ["phantom-event"]


def test_events_members_disagreeing_on_an_offset_is_caught():
    published = [pub("a", 0), pub("u", None, outcome="unknown"), pub("v", None, outcome="unknown")]
    assert event_kinds(published, [topic("a", "u"), topic("a", "v", process="r2")]) == ["event-order"]


def test_events_a_final_read_with_a_hole_is_caught():
    published = [pub("a", 0), pub("b", 2)]
    assert "event-gap" in event_kinds(published, [topic("a", "b", offsets=[0, 2], next=3)])
    # short of the end the info reported
    assert event_kinds([pub("a", 0)], [topic("a", next=2)]) == ["event-gap"]


def test_events_consumer_out_of_order_or_skipping_within_a_subscription_is_caught():
    published = [pub(x, i) for i, x in enumerate("abc")]
    reads = [topic("a", "b", "c")]
    assert event_kinds(published, reads, [sub(0, (2, 0, "a"), (2, 1, "b"), (3, 2, "c"))]) == []
    assert event_kinds(published, reads, [sub(0, (2, 0, "a"), (2, 2, "c"), (3, 1, "b"))]) == ["event-order"]
    assert event_kinds(published, reads, [sub(0, (2, 0, "a"), (2, 2, "c"))]) == ["event-order"]
    assert event_kinds(published, reads, [sub(0, (2, 1, "b"))]) == ["event-order"]   # not where it started


def test_events_consumer_seeing_another_event_at_an_offset_is_caught():
    published = [pub("a", 0), pub("b", 1)]
    assert event_kinds(published, [topic("a", "b")], [sub(0, (2, 0, "b"))]) == ["event-order"]


def test_events_consumer_group_resuming_after_what_it_delivered_is_fine_and_skipping_is_caught():
    published = [pub(x, i) for i, x in enumerate("abcd")]
    reads = [topic("a", "b", "c", "d")]
    first = sub(0, (2, 0, "a"), (2, 1, "b"), key="s1", opened=1)
    # a restarted consumer resumes at the group's committed offset: at most one past what it had
    for start in (0, 1, 2):
        again = sub(start, *[(6, o, "abcd"[o]) for o in range(start, 4)], key="s2", opened=5)
        assert event_kinds(published, reads, [first, again]) == []
    skipped = sub(3, (6, 3, "d"), key="s2", opened=5)
    assert event_kinds(published, reads, [first, skipped]) == ["skipped-events"]
    # another group's subscriptions do not count; a group's first starts at the oldest event
    assert event_kinds(published, reads, [first, sub(2, (6, 2, "c"), group="h", key="s3", opened=5)]) == \
        ["skipped-events"]


# -- tasks -------------------------------------------------------------------------------------------


def submit(sid, job, start=0.0, end=1.0, outcome="ok", created=True, key=None, process="p1"):
    return Submit(process, sid, key, start, end if outcome != "unknown" else None, outcome,
                  job if outcome == "ok" else None, created if outcome == "ok" else None)


def effect(job, attempt, token, sid, t=2.0, process="w1"):
    return Effect(process, job, attempt, token, sid, t)


def final(job, state, attempt=1, max_attempts=1, token=0, result_token=None, t=20.0):
    result = {"token": token if result_token is None else result_token} if state == "done" else None
    return JobFinal("p1", job, t, state, attempt, max_attempts, token, result)


def task_kinds(submits, effects, finals):
    return sorted({v.kind for v in check_tasks(submits, effects, finals)[0]})


def _good_tasks():
    submits = [submit("s1", 10), submit("s2", 20),
               submit("k1", 30, key="k1"), submit("k1", 30, 5, 6, created=False, key="k1"),   # resubmit
               submit("k2", None, outcome="unknown", key="k2"), submit("k2", 40, 7, 8, key="k2"),
               submit("s3", None, outcome="unknown"), submit("s4", None, outcome="fail")]
    effects = [effect(10, 1, 11, "s1"),
               effect(20, 1, 21, "s2"), effect(20, 2, 25, "s2", process="w2"),    # failed once, retried
               effect(30, 1, 31, "k1"), effect(40, 1, 41, "k2"),
               effect(50, 1, 51, "s3")]                                          # an unknown submit that applied
    finals = [final(10, "done", token=11), final(20, "done", 2, 3, token=25), final(30, "dead", 1, 1, token=31),
              final(40, "done", token=41)]
    return submits, effects, finals


def test_tasks_completed_and_dead_lettered_jobs_run_once_per_token_pass():
    submits, effects, finals = _good_tasks()
    violations, stats = check_tasks(submits, effects, finals)
    assert violations == []
    assert stats["jobs"] == 4 and stats["checked"] == 4 and stats["unchecked"] == 0 and stats["effects"] == 6


def test_tasks_a_job_without_final_status_is_unchecked_not_a_violation():
    submits, effects, finals = _good_tasks()
    violations, stats = check_tasks(submits, effects, finals[1:])
    assert violations == [] and stats["unchecked"] == 1


def test_tasks_effect_twice_under_one_token_is_caught():
    submits, effects, finals = _good_tasks()
    assert task_kinds(submits, effects + [effect(10, 1, 11, "s1", t=3, process="w2")], finals) == \
        ["task-effect-twice"]


def test_tasks_attempts_must_increase_with_the_token():
    submits, effects, finals = _good_tasks()
    effects = [e for e in effects if e.job != 20] + [effect(20, 2, 21, "s2"), effect(20, 1, 25, "s2")]
    assert task_kinds(submits, effects, finals) == ["attempt-order"]
    # more claims ran than the cluster counted attempts
    effects = [e for e in _good_tasks()[1] if e.job != 10] + [effect(10, 1, 11, "s1"), effect(10, 2, 12, "s1")]
    finals = [final(10, "done", attempt=1, token=12) if f.job == 10 else f for f in finals]
    assert task_kinds(submits, effects, finals) == ["attempt-order"]


def test_tasks_idempotent_resubmit_returning_another_job_is_caught():
    submits, effects, finals = _good_tasks()
    submits = submits + [submit("k1", 99, 9, 10, created=False, key="k1")]
    assert task_kinds(submits, effects, finals) == ["duplicate-job"]
    # or a second submit of the key reporting it created the job
    submits = _good_tasks()[0] + [submit("k1", 30, 9, 10, created=True, key="k1")]
    assert task_kinds(submits, effects, finals) == ["duplicate-job"]


def test_tasks_one_submit_that_made_two_jobs_is_caught():
    submits, effects, finals = _good_tasks()
    assert task_kinds(submits, effects + [effect(11, 1, 12, "s1")], finals) == ["duplicate-job"]


def test_tasks_a_job_nobody_submitted_or_whose_submit_failed_that_ran_is_caught():
    submits, effects, finals = _good_tasks()
    assert task_kinds(submits, effects + [effect(60, 1, 61, "s4")], finals) == ["phantom-job"]
    assert task_kinds(submits, effects + [effect(70, 1, 71, "nobody")], finals) == ["phantom-job"]
    # found "already there" with no earlier submit of that key
    assert task_kinds(submits + [submit("k9", 80, created=False, key="k9")], effects, finals) == ["phantom-job"]


def test_tasks_acknowledged_job_not_finished_or_unknown_at_the_end_is_caught():
    submits, effects, finals = _good_tasks()
    for state in ("queued", "running", "delayed", "cancelled"):
        assert task_kinds(submits, effects, finals + [final(10, state, t=30)]) == ["unfinished-job"]
    assert task_kinds(submits, effects, finals + [final(10, "missing", t=30)]) == ["lost-job"]
    # the latest final status counts: done after an earlier incarnation saw it queued
    assert task_kinds(submits, effects, [final(10, "queued", t=1)] + finals) == []


def test_tasks_done_needs_the_effect_and_result_of_its_last_claim():
    submits, effects, finals = _good_tasks()
    without_effect = [final(10, "done", token=12) if f.job == 10 else f for f in finals]
    assert task_kinds(submits, effects, without_effect) == ["done-without-effect"]
    stale_result = [final(20, "done", 2, 3, token=25, result_token=21) if f.job == 20 else f for f in finals]
    assert task_kinds(submits, effects, stale_result) == ["done-without-effect"]


def test_tasks_dead_letter_before_the_last_attempt_is_caught():
    submits, effects, finals = _good_tasks()
    early = [final(30, "dead", 1, 3, token=31) if f.job == 30 else f for f in finals]
    assert task_kinds(submits, effects, early) == ["dead-early"]


def test_tasks_run_after_the_job_finished_is_caught():
    submits, effects, finals = _good_tasks()
    assert task_kinds(submits, effects + [effect(10, 2, 90, "s1")], finals) == ["attempt-order", "effect-after-finish"]


# -- events and tasks from the workload's JSON lines -------------------------------------------------------


def _events_and_tasks_records():
    return [
        _rec(0.0, "n1", 1, "invoke", f="publish", topic="T", ids=["n1/7/1.0"]),
        _rec(0.1, "n1", 1, "ok", result={"offsets": [0]}),
        _rec(0.2, "n2", 1, "invoke", f="publish", topic="T", ids=["n2/7/1.0", "n2/7/1.1"]),
        _rec(0.3, "n2", 1, "ok", result={"offsets": [1, 2]}),
        _rec(0.4, "n1", 2, "invoke", f="publish", topic="T", ids=["n1/7/2.0"]),   # killed: unknown
        _rec(0.5, "n3", 1, "invoke", f="subscribe", topic="T", group="g3", sub=1),
        _rec(0.6, "n3", 1, "ok", result={"position": 0}),
        _rec(0.7, "n3", 2, "event", f="consume", topic="T", group="g3", sub=1,
             events=[[0, "n1/7/1.0"], [1, "n2/7/1.0"]]),
        _rec(0.8, "n3", 3, "event", f="consume", topic="T", group="g3", sub=1, events=[[2, "n2/7/1.1"]]),
        _rec(1.0, "n1", 3, "invoke", f="submit", handler="h", sid="n1/7/3", key=None, retries=0, fail=0),
        _rec(1.1, "n1", 3, "ok", result={"job": 40, "created": True}),
        _rec(1.2, "n2", 4, "event", f="task-effect", job=40, attempt=1, token=41, sid="n1/7/3"),
        _rec(1.3, "n1", 4, "invoke", f="submit", handler="h", sid="n1/7/k4", key="n1/7/k4", retries=1, fail=9),
        _rec(1.4, "n1", 4, "ok", result={"job": 44, "created": True}),
        _rec(1.5, "n3", 4, "event", f="task-effect", job=44, attempt=1, token=45, sid="n1/7/k4"),
        _rec(1.6, "n1", 5, "invoke", f="submit", handler="h", sid="n1/7/k4", key="n1/7/k4", retries=1, fail=9,
             resubmit=True),
        _rec(1.7, "n1", 5, "ok", result={"job": 44, "created": False}),
        _rec(1.8, "n2", 5, "event", f="task-effect", job=44, attempt=2, token=48, sid="n1/7/k4"),
        _rec(5.0, "n2", 6, "invoke", f="events-final", topic="T"),
        _rec(5.1, "n2", 6, "ok", result={"first": 0, "next": 3,
                                         "events": [[0, "n1/7/1.0"], [1, "n2/7/1.0"], [2, "n2/7/1.1"]]}),
        _rec(5.2, "n1", 6, "invoke", f="job-final", job=40),
        _rec(5.3, "n1", 6, "ok", result={"state": "done", "attempt": 1, "max_attempts": 1, "token": 41,
                                         "result": {"token": 41}}),
        _rec(5.4, "n1", 7, "invoke", f="job-final", job=44),
    ]


def test_workload_events_and_tasks_records_are_checked(tmp_path):
    path = tmp_path / "h.jsonl"
    good = _events_and_tasks_records() + [
        _rec(5.5, "n1", 7, "ok", result={"state": "dead", "attempt": 2, "max_attempts": 2, "token": 48,
                                         "result": None})]
    _write_history(path, good)
    records = read_records([path])
    assert [(p.id, p.outcome, p.offset) for p in published_events(records)] == [
        ("n1/7/1.0", "ok", 0), ("n2/7/1.0", "ok", 1), ("n2/7/1.1", "ok", 2), ("n1/7/2.0", "unknown", None)]
    assert [len(c.deliveries) for c in consumed_events(records)] == [3]
    report = check_workload([path])
    assert report.ok, report.explain()
    assert report.events["checked"] == 3 and report.tasks["checked"] == 2 and report.tasks["effects"] == 3
    assert report.counts == {"kv": 0, "events": 7, "tasks": 8}
    # the same history with the dead-lettered job still queued, and an event lost
    bad = _events_and_tasks_records() + [
        _rec(5.5, "n1", 7, "ok", result={"state": "queued", "attempt": 1, "max_attempts": 2, "token": 45})]
    bad[19] = _rec(5.1, "n2", 6, "ok", result={"first": 0, "next": 2, "events": [[0, "n1/7/1.0"], [1, "n2/7/1.0"]]})
    _write_history(path, bad)
    assert sorted(v.kind for v in check_workload([path]).violations) == ["lost-event", "unfinished-job"]
