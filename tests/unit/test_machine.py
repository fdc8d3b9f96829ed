"""Example tests for the pure replicated state machine (sessions, exactly-once, locks, KV).

Every command goes through the codec as bytes, exactly as a replica applies it. The
property tests in test_machine_properties.py generalise most of these.
"""

from __future__ import annotations

import msgpack
import pytest

from raftsync.codec import (CODEC_VERSION, NOT_APPLIED, Op, Query, Status, decode_result, encode_command,
                            encode_query, encode_result)
from raftsync.machine import StateMachine
from raftsync.machine.sessions import MAX_RESULTS_PER_SESSION, MAX_TTL_MS, MIN_TTL_MS

pytestmark = pytest.mark.timeout(120)

OK = encode_result(Status.OK)
STALE = encode_result(Status.STALE)
SESSION_EXPIRED = encode_result(Status.SESSION_EXPIRED)
NEVER_APPLIED = encode_result(Status.SESSION_EXPIRED, NOT_APPLIED)
NOT_HELD = encode_result(Status.NOT_HELD)


class Client:
    """One session's view: increasing seqs, everything below the next seq acked unless
    told otherwise."""

    def __init__(self, machine: StateMachine, sid: int, ttl_ms: int = 1000, open_: bool = True) -> None:
        self.m = machine
        self.sid = sid
        self.seq = 0
        if open_:
            result, fx = run(machine, encode_command(Op.OPEN_SESSION, sid, 0, 0, [ttl_ms]))
            assert result == encode_result(Status.OK, [ttl_ms])
            assert fx == [("session_opened", sid, ttl_ms, machine.index)]

    def command(self, op: Op, *args, acked_below: int | None = None) -> bytes:
        self.seq += 1
        return encode_command(op, self.sid, self.seq, self.seq if acked_below is None else acked_below, list(args))

    def do(self, op: Op, *args, acked_below: int | None = None):
        return run(self.m, self.command(op, *args, acked_below=acked_below))

    def acquire(self, name: str, handle: int = 1, wait: bool = True):
        return self.do(Op.LOCK_ACQUIRE, name, handle, wait)

    def release(self, name: str, token: int, handle: int = 1):
        return self.do(Op.LOCK_RELEASE, name, handle, token)


def run(machine: StateMachine, command: bytes):
    effects: list = []
    index = machine.index
    result = machine.apply(command, effects)
    assert machine.index == index + 1
    return result, effects


def result_of(result: bytes):
    return tuple(decode_result(result))


def q(machine: StateMachine, kind: Query, *args):
    return tuple(decode_result(machine.query(encode_query(kind, list(args)))))


def lock_info(machine: StateMachine, name: str):
    return q(machine, Query.LOCK_INFO, name)[1]


def state(machine: StateMachine) -> dict:
    data = msgpack.unpackb(machine.snapshot(), raw=False, strict_map_key=False)
    data.pop("index")
    return data


def keepalive(machine: StateMachine, *sids: int):
    return run(machine, encode_command(Op.KEEPALIVE, 0, 0, 0, [list(sids)]))


def expire(machine: StateMachine, sid: int, keepalive_index: int):
    return run(machine, encode_command(Op.EXPIRE_SESSION, 0, 0, 0, [sid, keepalive_index]))


# -- sessions ----------------------------------------------------------------------------

def test_open_session_is_idempotent_and_announced_once():
    m = StateMachine()
    Client(m, 11, ttl_ms=2000)
    again, fx = run(m, encode_command(Op.OPEN_SESSION, 11, 0, 0, [9000]))
    assert again == encode_result(Status.OK, [2000])  # the original TTL, not the new one
    assert fx == []
    assert q(m, Query.SESSION_INFO, 11) == (Status.OK, [2000, 1])


@pytest.mark.parametrize("sid, args", [(0, [1000]), (5, [MIN_TTL_MS - 1]), (5, [MAX_TTL_MS + 1]), (5, []),
                                       (5, [True]), (5, ["1000"]), (5, [1000, 1])])
def test_open_session_rejects_bad_arguments(sid, args):
    m = StateMachine()
    result, fx = run(m, encode_command(Op.OPEN_SESSION, sid, 0, 0, args))
    assert result_of(result)[0] == Status.BAD_COMMAND
    assert fx == []
    assert q(m, Query.SESSION_INFO, sid)[0] == Status.NOT_FOUND


def test_closed_session_is_not_resurrected_by_a_duplicate_open():
    m = StateMachine()
    c = Client(m, 7)
    assert c.do(Op.CLOSE_SESSION) == (OK, [("session_ended", 7, "closed")])
    assert run(m, encode_command(Op.OPEN_SESSION, 7, 0, 0, [1000])) == (SESSION_EXPIRED, [])
    assert q(m, Query.SESSION_INFO, 7)[0] == Status.NOT_FOUND
    assert c.do(Op.KV_PUT, "k", b"v", None) == (NEVER_APPLIED, [])
    # ... nor after a snapshot install.
    restored = StateMachine.restore(m.snapshot())
    assert run(restored, encode_command(Op.OPEN_SESSION, 7, 0, 0, [1000])) == (SESSION_EXPIRED, [])


def test_expired_session_is_not_resurrected_by_a_duplicate_open():
    m = StateMachine()
    Client(m, 8)
    assert expire(m, 8, 1) == (OK, [("session_ended", 8, "expired")])
    assert run(m, encode_command(Op.OPEN_SESSION, 8, 0, 0, [1000])) == (SESSION_EXPIRED, [])


def test_close_retry_answers_its_original_ok_and_changes_nothing():
    m = StateMachine()
    c = Client(m, 7)
    close = c.command(Op.CLOSE_SESSION)
    assert run(m, close)[0] == OK
    before = state(m)
    assert run(m, close) == (OK, [])
    assert state(m) == before


def test_keepalive_moves_the_keepalive_index_and_reports_unknown_sessions():
    m = StateMachine()
    Client(m, 1)
    Client(m, 2)
    result, fx = keepalive(m, 2, 99, 1)
    assert result == encode_result(Status.OK, [99])
    assert fx == [("keepalive", 2, 3), ("keepalive", 1, 3)]
    assert q(m, Query.SESSION_INFO, 1) == (Status.OK, [1000, 3])
    result, fx = keepalive(m, 1, "2")
    assert result_of(result)[0] == Status.BAD_COMMAND and fx == []  # all or nothing
    assert q(m, Query.SESSION_INFO, 1) == (Status.OK, [1000, 3])


def test_stale_expiry_loses_to_a_racing_keepalive_and_the_session_keeps_its_locks():
    m = StateMachine()
    holder = Client(m, 1)  # opened at index 1
    waiter = Client(m, 2)
    token = result_of(holder.acquire("L")[0])[1]
    assert result_of(waiter.acquire("L")[0]) == (Status.OK, 0)
    keepalive(m, 1)
    renewed = m.index
    before = state(m)
    # The leader decided to expire session 1 when its last keepalive was the open (index 1).
    assert expire(m, 1, 1) == (STALE, [])
    assert expire(m, 1, renewed + 1) == (STALE, [])
    assert state(m) == before
    assert lock_info(m, "L") == [[1, 1], token, [[2, 1]]]
    # An expiry naming the latest keepalive wins: locks go, the waiter gets the lock.
    result, fx = expire(m, 1, renewed)
    assert result == OK
    assert fx == [("lock_released", "L", 1, 1, token), ("lock_granted", "L", 2, 1, m.index),
                  ("session_ended", 1, "expired")]
    assert lock_info(m, "L") == [[2, 1], m.index, []]
    assert q(m, Query.SESSION_INFO, 1)[0] == Status.NOT_FOUND


def test_closing_a_session_releases_its_locks_and_drops_its_waits():
    m = StateMachine()
    a, b, c = Client(m, 1), Client(m, 2), Client(m, 3)
    token_w = result_of(a.acquire("w", handle=2)[0])[1]
    token_x = result_of(a.acquire("x")[0])[1]
    token_y = result_of(b.acquire("y")[0])[1]
    a.acquire("y", handle=1)
    a.acquire("y", handle=2)
    c.acquire("x")
    c.acquire("y")
    c.acquire("w")
    result, fx = a.do(Op.CLOSE_SESSION)
    assert result == OK
    assert fx == [("lock_released", "w", 1, 2, token_w), ("lock_granted", "w", 3, 1, m.index),
                  ("lock_released", "x", 1, 1, token_x), ("lock_granted", "x", 3, 1, m.index),
                  ("session_ended", 1, "closed")]
    assert lock_info(m, "w") == [[3, 1], m.index, []]
    assert lock_info(m, "x") == [[3, 1], m.index, []]
    assert lock_info(m, "y") == [[2, 1], token_y, [[3, 1]]]  # a's two waits are gone, c keeps its place
    # b releases: y goes to c, not to the dead session.
    assert b.release("y", token_y) == (OK, [("lock_released", "y", 2, 1, token_y),
                                            ("lock_granted", "y", 3, 1, m.index)])


# -- locks -------------------------------------------------------------------------------

def test_release_hands_the_lock_to_the_first_waiter_only():
    m = StateMachine()
    owner = Client(m, 1)
    waiters = [Client(m, sid) for sid in (5, 3, 4, 2)]
    token = result_of(owner.acquire("L")[0])[1]
    assert token == m.index
    for w in waiters:
        assert w.acquire("L") == (encode_result(Status.OK, 0), [])
    assert lock_info(m, "L")[2] == [[5, 1], [3, 1], [4, 1], [2, 1]]
    current, previous = owner, token
    for w in waiters:
        result, fx = current.release("L", previous)
        assert result == OK
        assert fx == [("lock_released", "L", current.sid, 1, previous), ("lock_granted", "L", w.sid, 1, m.index)]
        assert m.index > previous
        current, previous = w, m.index
    assert current.release("L", previous) == (OK, [("lock_released", "L", 2, 1, previous)])
    assert lock_info(m, "L") is None


def test_release_with_wrong_token_or_by_a_non_holder_is_not_held():
    m = StateMachine()
    a, b = Client(m, 1), Client(m, 2)
    token = result_of(a.acquire("L")[0])[1]
    assert a.release("L", token + 1) == (NOT_HELD, [])
    assert a.release("L", token, handle=2) == (NOT_HELD, [])
    assert b.release("L", token) == (NOT_HELD, [])
    assert b.release("nope", 1) == (NOT_HELD, [])
    assert lock_info(m, "L") == [[1, 1], token, []]
    assert a.release("L", token)[0] == OK
    assert a.release("L", token) == (NOT_HELD, [])  # a second release of the same grant


def test_two_handles_of_one_session_exclude_each_other():
    m = StateMachine()
    c = Client(m, 1)
    token = result_of(c.acquire("L", handle=1)[0])[1]
    assert c.acquire("L", handle=2, wait=False) == (encode_result(Status.OK, 0), [])
    assert c.acquire("L", handle=2) == (encode_result(Status.OK, 0), [])
    assert lock_info(m, "L") == [[1, 1], token, [[1, 2]]]
    result, fx = c.release("L", token, handle=1)
    assert fx == [("lock_released", "L", 1, 1, token), ("lock_granted", "L", 1, 2, m.index)]


def test_acquire_by_the_holder_returns_its_token_without_a_new_grant():
    m = StateMachine()
    c = Client(m, 1)
    token = result_of(c.acquire("L")[0])[1]
    assert c.acquire("L") == (encode_result(Status.OK, token), [])
    assert c.acquire("L", wait=False) == (encode_result(Status.OK, token), [])


def test_try_acquire_does_not_queue():
    m = StateMachine()
    a, b = Client(m, 1), Client(m, 2)
    token = result_of(a.acquire("L")[0])[1]
    assert b.acquire("L", wait=False) == (encode_result(Status.OK, 0), [])
    assert lock_info(m, "L") == [[1, 1], token, []]
    assert a.release("L", token) == (OK, [("lock_released", "L", 1, 1, token)])
    assert lock_info(m, "L") is None


def test_a_waiter_is_queued_once_however_often_it_asks():
    m = StateMachine()
    a, b = Client(m, 1), Client(m, 2)
    token = result_of(a.acquire("L")[0])[1]
    for _ in range(3):
        b.acquire("L")
    assert lock_info(m, "L")[2] == [[2, 1]]
    a.release("L", token)
    assert lock_info(m, "L")[0] == [2, 1]
    assert lock_info(m, "L")[2] == []


def test_withdraw_drops_a_wait_and_releases_a_grant_that_raced_it():
    m = StateMachine()
    a, b, c = Client(m, 1), Client(m, 2), Client(m, 3)
    token = result_of(a.acquire("L")[0])[1]
    b.acquire("L")
    c.acquire("L")
    assert b.do(Op.LOCK_WITHDRAW, "L", 1) == (encode_result(Status.OK, 0), [])
    assert lock_info(m, "L")[2] == [[3, 1]]
    # c's wait is granted before its withdrawal is applied: the withdrawal releases the grant.
    a.release("L", token)
    granted = m.index
    result, fx = c.do(Op.LOCK_WITHDRAW, "L", 1)
    assert result == encode_result(Status.OK, granted)
    assert fx == [("lock_released", "L", 3, 1, granted)]
    assert lock_info(m, "L") is None
    assert c.do(Op.LOCK_WITHDRAW, "L", 1) == (encode_result(Status.OK, 0), [])


def test_fencing_tokens_strictly_increase_across_regrants():
    m = StateMachine()
    a, b = Client(m, 1), Client(m, 2)
    tokens = []
    for i in range(6):
        c = (a, b)[i % 2]
        result, fx = c.acquire("L")
        token = result_of(result)[1]
        assert fx == [("lock_granted", "L", c.sid, 1, m.index)] and token == m.index
        tokens.append(token)
        run(m, encode_command(Op.BARRIER, 0, 0, 0, []))
        c.release("L", token)
    assert tokens == sorted(set(tokens))


@pytest.mark.parametrize("args", [["L", 1], ["L", 1, 1], ["", 1, True], ["L", -1, True], ["L", True, True],
                                  [1, 1, True], ["L" * 300, 1, True]])
def test_lock_acquire_rejects_bad_arguments(args):
    m = StateMachine()
    c = Client(m, 1)
    result, fx = c.do(Op.LOCK_ACQUIRE, *args)
    assert result_of(result)[0] == Status.BAD_COMMAND and fx == []
    assert state(m)["lock"] == []


# -- exactly-once ------------------------------------------------------------------------

def test_a_retry_returns_the_original_result_even_after_later_writes():
    m = StateMachine()
    c = Client(m, 1)
    first = c.command(Op.KV_PUT, "k", b"v1", None, acked_below=1)
    r1, fx1 = run(m, first)
    assert result_of(r1) == (Status.OK, [m.index, 1])
    r2, _ = c.do(Op.KV_PUT, "k", b"v2", None, acked_below=1)
    assert result_of(r2) == (Status.OK, [m.index, 2])
    for _ in range(3):
        assert run(m, first) == (r1, [])
    assert q(m, Query.KV_GET, "k")[1][:3] == ["k", b"v2", 2]


def test_out_of_order_seqs_from_concurrent_threads_each_apply_once():
    m = StateMachine()
    put = {seq: encode_command(Op.KV_PUT, 1, seq, 1, [f"k{seq}", b"x", 0]) for seq in (1, 2, 3)}
    Client(m, 1)
    answers = {}
    for seq in (3, 1, 3, 2, 1, 2, 3):
        result, fx = run(m, put[seq])
        if seq in answers:
            assert (result, fx) == (answers[seq], [])
        else:
            assert result_of(result) == (Status.OK, [m.index, 1])
            answers[seq] = result
    for seq in (1, 2, 3):
        assert q(m, Query.KV_GET, f"k{seq}")[1][2] == 1


def test_lock_acquire_retry_neither_duplicates_the_grant_nor_requeues():
    m = StateMachine()
    a, b = Client(m, 1), Client(m, 2)
    grant = a.command(Op.LOCK_ACQUIRE, "L", 1, True)
    granted, fx = run(m, grant)
    token = result_of(granted)[1]
    assert fx == [("lock_granted", "L", 1, 1, token)]
    assert run(m, grant) == (granted, [])
    wait = b.command(Op.LOCK_ACQUIRE, "L", 1, True)
    queued, _ = run(m, wait)
    assert result_of(queued) == (Status.OK, 0)
    assert run(m, wait) == (queued, [])
    assert lock_info(m, "L")[2] == [[2, 1]]
    # The lock passes to b and b lets it go; a late duplicate of b's wait must not queue
    # b again, and a late duplicate of a's acquire must not grant a the lock again.
    # (Both clients still wait for their first answer: acked_below stays 1.)
    a.do(Op.LOCK_RELEASE, "L", 1, token, acked_below=1)
    b.do(Op.LOCK_RELEASE, "L", 1, m.index, acked_below=1)
    assert lock_info(m, "L") is None
    assert run(m, wait) == (queued, [])
    assert run(m, grant) == (granted, [])
    assert lock_info(m, "L") is None


def test_a_seq_below_acked_below_is_stale_and_changes_nothing():
    m = StateMachine()
    c = Client(m, 1)
    old = c.command(Op.KV_PUT, "k", b"v", None, acked_below=1)
    run(m, old)
    c.do(Op.KV_DELETE, "k", None, acked_below=2)  # the client got seq 1's answer
    before = state(m)
    assert run(m, old) == (STALE, [])
    assert state(m) == before
    assert q(m, Query.KV_GET, "k")[0] == Status.NOT_FOUND


def test_a_client_that_never_acks_gets_stale_not_a_second_application():
    m = StateMachine()
    Client(m, 1)
    commands = [encode_command(Op.KV_PUT, 1, seq, 0, [f"k{seq}", b"", None]) for seq in range(1, 6)]
    for command in commands:
        run(m, command)
    for seq in range(6, MAX_RESULTS_PER_SESSION + 2):
        run(m, encode_command(Op.BARRIER, 0, 0, 0, []))  # keep seqs and keys apart
        run(m, encode_command(Op.KV_PUT, 1, seq, 0, ["other", b"", None]))
    # The oldest cached answer was dropped to bound memory: a retry is STALE, not re-applied.
    assert run(m, commands[0]) == (STALE, [])
    assert q(m, Query.KV_GET, "k1")[1][2] == 1
    assert result_of(run(m, commands[1])[0])[0] == Status.OK


# -- key/value ---------------------------------------------------------------------------

def test_kv_compare_and_set():
    m = StateMachine()
    c = Client(m, 1)
    r, fx = c.do(Op.KV_PUT, "k", b"a", 0)  # 0: must not exist
    assert result_of(r) == (Status.OK, [m.index, 1])
    created = m.index
    assert [e[:3] for e in fx] == [("kv_put", "k", created)]
    assert c.do(Op.KV_PUT, "k", b"b", 0) == (encode_result(Status.CONFLICT, [1]), [])
    run(m, encode_command(Op.BARRIER, 0, 0, 0, []))
    r, _ = c.do(Op.KV_PUT, "k", b"b", 1)
    assert result_of(r) == (Status.OK, [m.index, 2])
    assert q(m, Query.KV_GET, "k")[1][:4] == ["k", b"b", 2, m.index]
    assert c.do(Op.KV_PUT, "k", b"c", 1) == (encode_result(Status.CONFLICT, [2]), [])
    assert c.do(Op.KV_DELETE, "k", 1) == (encode_result(Status.CONFLICT, [2]), [])
    r, fx = c.do(Op.KV_DELETE, "k", 2)
    assert r == encode_result(Status.OK, [m.index])
    assert [e[:3] for e in fx] == [("kv_delete", "k", m.index)]
    assert c.do(Op.KV_DELETE, "k", None) == (encode_result(Status.NOT_FOUND), [])
    assert q(m, Query.KV_GET, "k") == (Status.NOT_FOUND, m.index)
    r, _ = c.do(Op.KV_PUT, "k", b"d", 0)  # re-created: version starts again at 1
    assert result_of(r) == (Status.OK, [m.index, 1])
    r, _ = c.do(Op.KV_PUT, "k", b"e", None)  # blind write
    assert result_of(r) == (Status.OK, [m.index, 2])


def test_kv_range_is_sorted_and_prefix_filtered():
    m = StateMachine()
    c = Client(m, 1)
    for key in ("b/2", "a", "b/1", "c"):
        c.do(Op.KV_PUT, key, key.encode(), None)
    assert [r[0] for r in q(m, Query.KV_RANGE, "")[1]] == ["a", "b/1", "b/2", "c"]
    assert [r[:2] for r in q(m, Query.KV_RANGE, "b/")[1]] == [["b/1", b"b/1"], ["b/2", b"b/2"]]


@pytest.mark.parametrize("args", [["k", b"v"], [1, b"v", None], ["", b"v", None], ["k", "v", None],
                                  ["k", b"v", -1], ["k", b"v", True], ["k", b"v", "1"], ["k" * 1025, b"v", None],
                                  ["k", b"v" * (32 * 1024 + 1), None],
                                  ["k", 5, None], ["k", None, None], ["k", [1], None], ["k", b"v", None, 0],
                                  ["k", b"v", None, "1"], ["k", b"v", None, 1, 2]])
def test_kv_put_rejects_bad_arguments(args):
    m = StateMachine()
    Client(m, 1)
    result, fx = run(m, bytes((CODEC_VERSION,)) + msgpack.packb([Op.KV_PUT, 1, 1, 1, args], use_bin_type=True))
    assert result_of(result)[0] == Status.BAD_COMMAND and fx == []
    assert q(m, Query.KV_RANGE, "")[1] == []


# -- robustness, barrier, snapshots --------------------------------------------------------

@pytest.mark.parametrize("command", [
    b"", b"\x01", b"\x02" + msgpack.packb([10, 1, 1, 0, []]), b"\x01\xc1", b"\x01" + msgpack.packb({"a": 1}),
    b"\x01" + msgpack.packb([10, 1, 1, 0]), b"\x01" + msgpack.packb([10, -1, 1, 0, []]),
    b"\x01" + msgpack.packb([10, 1, 1, 0, "args"]), b"\x01" + msgpack.packb([99, 1, 1, 0, []]),
    b"\x01" + msgpack.packb([True, 1, 1, 0, []]), b"\x01" + msgpack.packb([10, 1, 1, 0, []]) + b"\x00",
    b"\x01" + b"\xdd\xff\xff\xff\xff", b"\x01" + msgpack.packb([4, 0, 0, 0, [1, "x"]]),
    b"\x01" + msgpack.packb([2, 0, 0, 0, [1]]), b"\x01" + msgpack.packb([12, 0, 0, 0, [None, 1]]),
])
def test_malformed_commands_are_bad_command_results(command):
    m = StateMachine()
    Client(m, 1)
    before = m.snapshot()
    effects: list = []
    result = m.apply(command, effects)
    assert result_of(result)[0] == Status.BAD_COMMAND
    assert effects == []
    assert state(StateMachine.restore(before)) == state(m)
    assert m.index == 2


def test_apply_without_an_effects_list_and_barrier_returns_its_index():
    m = StateMachine()
    assert m.apply(encode_command(Op.OPEN_SESSION, 1, 0, 0, [1000])) == encode_result(Status.OK, [1000])
    assert m.apply(encode_command(Op.BARRIER, 0, 0, 0, [])) == encode_result(Status.OK, 2)
    assert m.apply(b"junk") is not None and m.index == 3


def test_snapshot_restore_keeps_dedup_cache_tombstones_waiters_and_tokens():
    m = StateMachine()
    a, b, c = Client(m, 1), Client(m, 2), Client(m, 3)
    put = a.command(Op.KV_PUT, "k", b"v", None, acked_below=1)
    put_result, _ = run(m, put)
    token = result_of(a.do(Op.LOCK_ACQUIRE, "L", 1, True, acked_below=1)[0])[1]
    b.acquire("L")
    c.acquire("L")
    c.do(Op.CLOSE_SESSION)
    restored = StateMachine.restore(m.snapshot())
    assert restored.snapshot() == m.snapshot()
    for machine in (m, restored):
        assert run(machine, put) == (put_result, [])
        assert run(machine, encode_command(Op.OPEN_SESSION, 3, 0, 0, [1000])) == (SESSION_EXPIRED, [])
        assert lock_info(machine, "L") == [[1, 1], token, [[2, 1]]]
        # Expiring the holder after the snapshot install still finds and frees its lock.
        result, fx = expire(machine, 1, 1)
        assert fx == [("lock_released", "L", 1, 1, token), ("lock_granted", "L", 2, 1, machine.index),
                      ("session_ended", 1, "expired")]
        result, fx = run(machine, encode_command(Op.LOCK_RELEASE, 2, 99, 99, ["L", 1, machine.index]))
        assert fx == [("lock_released", "L", 2, 1, machine.index - 1)]
    assert restored.snapshot() == m.snapshot()


def test_restore_rejects_an_unknown_snapshot_version():
    data = msgpack.unpackb(StateMachine().snapshot(), raw=False)
    data["v"] = 999
    with pytest.raises(ValueError):
        StateMachine.restore(msgpack.packb(data, use_bin_type=True))


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgpack.packb([1]), msgpack.packb([1, []]), msgpack.packb([1, [5]]),
                                 msgpack.packb([2, [None]]), msgpack.packb([3, ["x"]]), msgpack.packb([4, [""]]),
                                 msgpack.packb([99, []]), msgpack.packb({"a": 1}), msgpack.packb([1.5, []])])
def test_bad_queries_are_answered_not_raised(raw):
    m = StateMachine()
    status, _ = decode_result(m.query(raw))
    assert status == Status.BAD_COMMAND


def test_retry_after_the_session_ended_gets_the_original_answer():
    m = StateMachine()
    c = Client(m, 7)
    write = c.command(Op.KV_PUT, "k", b"v", None, acked_below=1)
    first, _ = run(m, write)
    assert decode_result(first)[0] == Status.OK
    # The reply was lost; the session ends (close by another thread of the client).
    assert c.do(Op.CLOSE_SESSION, acked_below=1)[0] == OK
    assert run(m, write) == (first, [])  # the retry: original answer, applied once
    assert m.kv.get("k")[2] == 1
    # A retried close gets its own OK; a command that never applied is told so.
    close_again = encode_command(Op.CLOSE_SESSION, 7, 2, 1, [])
    assert run(m, close_again) == (OK, [])
    assert run(m, encode_command(Op.KV_PUT, 7, 9, 1, ["k", b"w", None])) == (NEVER_APPLIED, [])
    # The window survives a snapshot.
    restored = StateMachine.restore(m.snapshot())
    assert run(restored, write) == (first, [])


def test_ended_session_window_is_bounded_and_then_answers_unknown(monkeypatch):
    from raftsync.machine import sessions as sessions_module
    monkeypatch.setattr(sessions_module, "ENDED_SESSIONS_CAPACITY", 2)
    m = StateMachine()
    writes = {}
    for sid in (11, 12, 13):
        c = Client(m, sid)
        writes[sid] = c.command(Op.KV_PUT, f"k{sid}", b"v", None, acked_below=1)
        run(m, writes[sid])
        c.do(Op.CLOSE_SESSION, acked_below=1)
    assert list(m.sessions.ended) == [12, 13]
    # 11 fell out of the window: a bare SESSION_EXPIRED, which a retrying client reads
    # as "outcome unknown", never as "not applied".
    assert run(m, writes[11]) == (SESSION_EXPIRED, [])
    assert decode_result(run(m, writes[13])[0])[0] == Status.OK


def test_leader_history_records_every_change_and_survives_snapshots():
    m = StateMachine()
    a, b = Client(m, 7), Client(m, 8)
    a.do(Op.LEADER_CAMPAIGN, "g", 1, "a", b"1", True)
    first = m.index
    b.do(Op.LEADER_CAMPAIGN, "g", 2, "b", b"2", True)  # queued: no change
    a.do(Op.LEADER_PROCLAIM, "g", 1, first, b"1b")
    a.do(Op.CLOSE_SESSION)  # hands the group to b in the same entry
    entries = m.leaders.history.since(0, lambda group: group == "g")
    assert [e[2] for e in entries] == [["a", b"1", first], ["a", b"1b", first], ["b", b"2", m.index]]
    restored = StateMachine.restore(m.snapshot())
    assert restored.leaders.history.since(first, lambda group: True) == entries[1:]


def test_a_version_1_snapshot_restores_with_every_grant_and_queue():
    """Data dirs written before the table registry (snapshot v1, made by 03a2fd0's machine:
    two sessions, two keys, a held lock and an election each with a waiter, a semaphore
    and an RW lock) restore into today's machine and go on from there."""
    from pathlib import Path

    data = (Path(__file__).parent / "data" / "machine_v1.snapshot").read_bytes()
    m = StateMachine.restore(data)
    assert m.index == 12
    assert q(m, Query.KV_GET, "k")[1][:2] == ["k", b"v"]
    assert q(m, Query.LOCK_INFO, "L")[1] == [[7, 1], 5, [[8, 2]]]
    assert m.leaders.leader_info("g") == ["a", b"va", 7]
    assert q(m, Query.SEM_INFO, "s")[1][:2] == [2, 2]
    assert q(m, Query.RW_INFO, "r")[1][3] == [[[8, 2], 1 << 30]]
    # Ending session 7 hands everything on, as the old machine would have.
    result, fx = run(m, encode_command(Op.CLOSE_SESSION, 7, 9, 9, []))
    assert result == OK
    assert ("lock_granted", "L", 8, 2, m.index) in fx and ("leader_granted", "g", 8, 2, m.index) in fx
    assert ("rw_granted", "r", 8, 2, m.index) in fx
    assert m.leaders.leader_info("g") == ["b", b"vb", m.index]
    # A snapshot from before the leader history: observers resuming from before it get Compacted.
    assert m.leaders.history.since(0, lambda group: True) is None


def test_a_snapshot_from_before_a_table_existed_leaves_that_table_empty():
    m = StateMachine()
    Client(m, 7).do(Op.KV_PUT, "k", b"v", None)
    state = msgpack.unpackb(m.snapshot(), raw=False, strict_map_key=False)
    del state["sem"]
    restored = StateMachine.restore(msgpack.packb(state, use_bin_type=True))
    assert q(restored, Query.SEM_INFO, "s")[1] is None
    assert q(restored, Query.KV_GET, "k")[1][:2] == ["k", b"v"]
