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

from cluster.checker import (Hold, Op, check_holds, check_kv, check_leaders_per_term, check_write_counts,
                             linearizable, shrink)
from cluster.history import check_workload, holds, kv_ops, read_records

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
