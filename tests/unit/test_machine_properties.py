"""Property tests (hypothesis) for the pure replicated state machine.

They drive ``StateMachine.apply`` only through encoded command bytes, the way every
replica does, and check what users and the other layers rely on: determinism across
replicas, snapshot equivalence, exactly-once application of retried commands, that
``apply``/``query`` never raise, the lock table's safety and FIFO hand-off, the
session expiry race, and the key/value compare-and-set contract. The random mixes also
carry leader-election and KV-TTL commands so those take part in the determinism,
snapshot and never-INTERNAL properties.

Random command sequences are described abstractly (so hypothesis shrinks them well)
and turned into bytes by a ``Driver`` that may look at the machine it feeds (to pick
the right or a wrong keepalive index or fencing token). The bytes it produced are then
replayed on other, fresh machines.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from raftsync.codec import (CODEC_VERSION, NOT_APPLIED, Op, Query, Status, decode_result, encode_command, encode_query,
                            encode_result)
from raftsync.machine import StateMachine

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SIDS = [1, 2, 3]
KEYS = ["k1", "k2", "k3/x"]
LOCKS = ["a", "b"]
GROUPS = ["g"]
HANDLES = [1, 2]
OP_NUMBERS = {int(op) for op in Op}
OK = encode_result(Status.OK)
STALE = encode_result(Status.STALE)
SESSION_EXPIRED = encode_result(Status.SESSION_EXPIRED)
# A command of a session that ended (and is still in the window of ended sessions) and
# that never applied.
NEVER_APPLIED = encode_result(Status.SESSION_EXPIRED, NOT_APPLIED)


# -- helpers ---------------------------------------------------------------------------

def query(machine: StateMachine, kind: Query, *args):
    return decode_result(machine.query(encode_query(kind, list(args))))


def session_info(machine: StateMachine, sid: int):
    status, payload = query(machine, Query.SESSION_INFO, sid)
    return payload if status == Status.OK else None


def lock_info(machine: StateMachine, name: str):
    status, payload = query(machine, Query.LOCK_INFO, name)
    assert status == Status.OK
    return payload


def kv_version(machine: StateMachine, key: str) -> int:
    status, payload = query(machine, Query.KV_GET, key)
    return payload[2] if status == Status.OK else 0


def kv_revision(machine: StateMachine, key: str) -> int | None:
    status, payload = query(machine, Query.KV_GET, key)
    return payload[3] if status == Status.OK else None


def leader_term(machine: StateMachine, group: str) -> int:
    status, payload = query(machine, Query.LEADER_INFO, group)
    assert status == Status.OK
    return payload[2] if payload else 0


def state(machine: StateMachine) -> dict:
    """The snapshot as data, without the applied-command counter."""
    data = msgpack.unpackb(machine.snapshot(), raw=False, strict_map_key=False)
    data.pop("index")
    return data


def user_state(machine: StateMachine) -> dict:
    """What a retry must not change: everything but the per-session result cache and
    acked_below (KV map and history, locks, elections, live sessions and keepalives,
    tombstones)."""
    data = state(machine)
    sessions = data.pop("sessions")
    data["tombstones"] = sessions["tombstones"]
    data["live"] = [item[:3] for item in sessions["live"]]
    return data


def apply(machine: StateMachine, command: bytes):
    effects: list = []
    before = machine.index
    result = machine.apply(command, effects)
    assert machine.index == before + 1
    assert isinstance(result, bytes)
    return result, effects


def status_of(result: bytes) -> int:
    return decode_result(result)[0]


# -- random command sequences ----------------------------------------------------------

sid_st = st.sampled_from(SIDS)
junk_value = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64 - 1), st.floats(allow_nan=False),
                       st.text(max_size=4), st.binary(max_size=4), st.sampled_from(["a", "k1", "g"]),
                       st.lists(st.integers(-2, 5), max_size=3),
                       st.dictionaries(st.text(max_size=2), st.integers(-9, 9), max_size=2))
if_version_st = st.one_of(st.none(), st.just("current"), st.just(0), st.integers(1, 4))

STEP = st.one_of(
    st.tuples(st.just("open"), sid_st, st.sampled_from([100, 5000, 99])),
    st.tuples(st.just("keepalive"), st.lists(st.sampled_from(SIDS + [42]), max_size=3)),
    st.tuples(st.just("expire"), sid_st, st.booleans()),
    st.tuples(st.just("close"), sid_st),
    st.tuples(st.just("put"), sid_st, st.sampled_from(KEYS), st.binary(max_size=6), if_version_st,
              st.sampled_from(["absent", None, 500])),
    st.tuples(st.just("kv_expire"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("delete"), sid_st, st.sampled_from(KEYS), if_version_st),
    st.tuples(st.just("acquire"), sid_st, st.sampled_from(HANDLES), st.sampled_from(LOCKS), st.booleans()),
    st.tuples(st.just("release"), sid_st, st.sampled_from(HANDLES), st.sampled_from(LOCKS), st.booleans()),
    st.tuples(st.just("withdraw"), sid_st, st.sampled_from(HANDLES), st.sampled_from(LOCKS)),
    st.tuples(st.just("campaign"), sid_st, st.sampled_from(HANDLES), st.sampled_from(GROUPS), st.booleans(),
              st.binary(max_size=3)),
    st.tuples(st.just("resign"), sid_st, st.sampled_from(HANDLES), st.sampled_from(GROUPS), st.booleans()),
    st.tuples(st.just("proclaim"), sid_st, st.sampled_from(HANDLES), st.sampled_from(GROUPS), st.booleans(),
              st.binary(max_size=3)),
    st.tuples(st.just("leader_withdraw"), sid_st, st.sampled_from(HANDLES), st.sampled_from(GROUPS)),
    st.tuples(st.just("ack"), sid_st, st.integers(1, 4)),
    st.tuples(st.just("retry"), st.integers(1, 6)),  # resend the command sent that many commands ago
    st.tuples(st.just("retry"), st.integers(1, 3)),
    st.tuples(st.just("barrier")),
    st.tuples(st.just("garbage"), st.binary(max_size=12)),
    st.tuples(st.just("unknown_op"), st.integers(0, 300).filter(lambda o: o not in OP_NUMBERS), sid_st),
    st.tuples(st.just("bad_args"), st.sampled_from(list(Op)), sid_st, st.lists(junk_value, max_size=4)),
)
# A valid argument list per op; "corrupt" steps break one position (type confusion,
# missing or extra argument), which reaches far deeper than random argument lists.
VALID_ARGS = {
    Op.OPEN_SESSION: [1000], Op.KEEPALIVE: [[1, 2]], Op.CLOSE_SESSION: [], Op.EXPIRE_SESSION: [1, 1],
    Op.BARRIER: [], Op.KV_PUT: ["k1", b"v", None, 500], Op.KV_DELETE: ["k1", None], Op.KV_EXPIRE: ["k1", 3],
    Op.LOCK_ACQUIRE: ["a", 1, True], Op.LOCK_RELEASE: ["a", 1, 5], Op.LOCK_WITHDRAW: ["a", 1],
    Op.LEADER_CAMPAIGN: ["g", 1, "c", b"v", True], Op.LEADER_RESIGN: ["g", 1, 5], Op.LEADER_WITHDRAW: ["g", 1],
    Op.LEADER_PROCLAIM: ["g", 1, 5, b"v"],
}
# Semaphores and read/write locks, where this version of the machine has them.
HAS_SEMAPHORES = hasattr(Op, "SEM_ACQUIRE") and hasattr(Op, "RW_ACQUIRE")
if HAS_SEMAPHORES:
    VALID_ARGS.update({
        Op.SEM_ACQUIRE: ["s", 1, 2, True], Op.SEM_RELEASE: ["s", 1, 5], Op.SEM_WITHDRAW: ["s", 1],
        Op.RW_ACQUIRE: ["r", 1, "w", True], Op.RW_RELEASE: ["r", 1, 5], Op.RW_WITHDRAW: ["r", 1],
    })
    STEP = st.one_of(
        STEP,
        st.tuples(st.just("shared_acquire"), st.sampled_from(["sem", "rw"]), sid_st, st.sampled_from(HANDLES),
                  st.sampled_from([2, 2, 3, "r", "r", "w"]), st.booleans()),
        st.tuples(st.just("shared_release"), st.sampled_from(["sem", "rw"]), sid_st, st.sampled_from(HANDLES),
                  st.booleans()),
        st.tuples(st.just("shared_withdraw"), st.sampled_from(["sem", "rw"]), sid_st, st.sampled_from(HANDLES)),
    )


def corrupted_args(op: int, position: int, junk, mode: str) -> list:
    args = list(VALID_ARGS.get(op, []))
    if mode == "append" or not args:
        args.append(junk)
    elif mode == "drop":
        del args[position % len(args)]
    else:
        args[position % len(args)] = junk
    return args


corrupt_st = st.tuples(st.sampled_from(list(Op)), st.integers(0, 4), junk_value,
                       st.sampled_from(["replace", "replace", "drop", "append"]))
STEP = st.one_of(STEP, st.tuples(st.just("corrupt"), sid_st, corrupt_st))
STEPS = st.lists(STEP, min_size=10, max_size=60)
# Every random run starts with its sessions open (later OPENs are idempotent repeats or
# tombstoned ids) and ends by ending every session, so whatever was accumulated (holds,
# waits, candidacies; possibly across a snapshot install) goes through end_session.
PREFIX = [("open", 1, 1000), ("open", 2, 1000), ("open", 3, 100)]
FINISH = [("expire", 1, True), ("close", 2), ("close", 3), ("expire", 3, True)]


class Driver:
    """Turns abstract steps into command bytes the way clients of several sessions would:
    per-session increasing seqs, an ``acked_below`` that only moves forward, retries that
    resend the very same bytes. It may look at ``machine`` (the one it feeds) to choose
    the right or a wrong keepalive index / fencing token / version."""

    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.seq = {sid: 0 for sid in SIDS}
        self.acked = {sid: 0 for sid in SIDS}
        self.sent: list[bytes] = []  # session-bound commands, for retries

    def bound(self, op: Op, sid: int, args: list) -> bytes:
        self.seq[sid] += 1
        command = encode_command(op, sid, self.seq[sid], self.acked[sid], args)
        self.sent.append(command)
        return command

    def command(self, step: tuple) -> bytes | None:
        kind = step[0]
        m = self.machine
        if kind == "open":
            return encode_command(Op.OPEN_SESSION, step[1], 0, 0, [step[2]])
        if kind == "keepalive":
            return encode_command(Op.KEEPALIVE, 0, 0, 0, [step[1]])
        if kind == "expire":
            _, sid, right = step
            info = session_info(m, sid)
            latest = info[1] if info else m.index
            return encode_command(Op.EXPIRE_SESSION, 0, 0, 0, [sid, latest if right else max(0, latest - 1)])
        if kind == "close":
            return self.bound(Op.CLOSE_SESSION, step[1], [])
        if kind in ("put", "delete"):
            sid, key = step[1], step[2]
            if_version = step[4] if kind == "put" else step[3]
            if if_version == "current":
                if_version = kv_version(m, key)
            if kind == "put":
                ttl = step[5]
                args = [key, step[3], if_version] + ([] if ttl == "absent" else [ttl])
                return self.bound(Op.KV_PUT, sid, args)
            return self.bound(Op.KV_DELETE, sid, [key, if_version])
        if kind == "kv_expire":
            _, key, right = step
            revision = kv_revision(m, key)
            revision = m.index if revision is None else revision
            return encode_command(Op.KV_EXPIRE, 0, 0, 0, [key, revision if right else revision - 1])
        if kind == "campaign":
            _, sid, handle, group, wait, value = step
            return self.bound(Op.LEADER_CAMPAIGN, sid, [group, handle, f"c{sid}.{handle}", value, wait])
        if kind in ("resign", "proclaim"):
            sid, handle, group, right = step[1:5]
            term = leader_term(m, group)
            term = term if right else term + 1
            if kind == "resign":
                return self.bound(Op.LEADER_RESIGN, sid, [group, handle, term])
            return self.bound(Op.LEADER_PROCLAIM, sid, [group, handle, term, step[5]])
        if kind == "leader_withdraw":
            _, sid, handle, group = step
            return self.bound(Op.LEADER_WITHDRAW, sid, [group, handle])
        if kind == "acquire":
            _, sid, handle, name, wait = step
            return self.bound(Op.LOCK_ACQUIRE, sid, [name, handle, wait])
        if kind == "release":
            _, sid, handle, name, right = step
            info = lock_info(m, name)
            token = info[1] if info else 0
            return self.bound(Op.LOCK_RELEASE, sid, [name, handle, token if right else token + 1])
        if kind == "withdraw":
            _, sid, handle, name = step
            return self.bound(Op.LOCK_WITHDRAW, sid, [name, handle])
        if kind == "ack":
            _, sid, n = step
            self.acked[sid] = min(self.seq[sid] + 1, self.acked[sid] + n)
            return None
        if kind == "retry":
            if not self.sent:
                return None
            return self.sent[-min(step[1], len(self.sent))]
        if kind == "barrier":
            return encode_command(Op.BARRIER, 0, 0, 0, [])
        if kind == "garbage":
            return step[1]
        if kind == "unknown_op":
            _, op, sid = step
            self.seq[sid] += 1
            return encode_command(op, sid, self.seq[sid], self.acked[sid], [])
        if kind.startswith("shared_"):
            table, sid, handle = step[1:4]
            sem = table == "sem"
            name = "s" if sem else "r"
            if kind == "shared_acquire":
                amount, wait = step[4], step[5]
                if sem:
                    amount = 2 if isinstance(amount, str) else amount
                else:
                    amount = amount if isinstance(amount, str) else "r"
                return self.bound(Op.SEM_ACQUIRE if sem else Op.RW_ACQUIRE, sid, [name, handle, amount, wait])
            if kind == "shared_withdraw":
                return self.bound(Op.SEM_WITHDRAW if sem else Op.RW_WITHDRAW, sid, [name, handle])
            status, info = query(m, Query.SEM_INFO if sem else Query.RW_INFO, name)
            tokens = [t for owner, t, _ in (info[2] if info else []) if owner == [sid, handle]]
            token = tokens[0] if tokens else 1
            return self.bound(Op.SEM_RELEASE if sem else Op.RW_RELEASE, sid,
                              [name, handle, token if step[4] else token + 1])
        if kind == "corrupt":
            _, sid, (op, position, junk, mode) = step
            self.seq[sid] += 1
            return bytes((CODEC_VERSION,)) + msgpack.packb(
                [int(op), sid, self.seq[sid], self.acked[sid], corrupted_args(op, position, junk, mode)],
                use_bin_type=True)
        if kind == "bad_args":
            _, op, sid, args = step
            self.seq[sid] += 1
            return bytes((CODEC_VERSION,)) + msgpack.packb([int(op), sid, self.seq[sid], self.acked[sid], args],
                                                           use_bin_type=True)
        raise AssertionError(step)


def run(steps: list[tuple]):
    """Realize ``steps`` (then FINISH) on a fresh machine. Returns (machine, commands, results, effects)."""
    machine = StateMachine()
    driver = Driver(machine)
    commands, results, effects = [], [], []
    for step in PREFIX + list(steps) + FINISH:
        command = driver.command(step)
        if command is None:
            continue
        result, fx = apply(machine, command)
        commands.append(command)
        results.append(result)
        effects.append(fx)
    return machine, commands, results, effects


def replay(commands: list[bytes], machine: StateMachine | None = None):
    machine = machine or StateMachine()
    results, effects = [], []
    for command in commands:
        result, fx = apply(machine, command)
        results.append(result)
        effects.append(fx)
    return machine, results, effects


# -- 1. determinism --------------------------------------------------------------------

@SETTINGS
@given(steps=STEPS)
def test_same_commands_give_same_results_effects_and_snapshot(steps):
    """Replicas applying the same command bytes (sessions, keepalives, right and wrong
    expiries, CAS writes, locks, elections, retries, acks, garbage, unknown ops, wrong
    argument types) answer byte-identically, emit identical effects at every step and
    end with identical snapshots."""
    first, commands, results, effects = run(steps)
    second, results2, effects2 = replay(commands)
    third, results3, effects3 = replay(commands)
    for i, command in enumerate(commands):
        note(f"step {i}: {command!r}")
        assert results2[i] == results[i]
        assert effects2[i] == effects[i]
        assert results3[i] == results[i]
        assert effects3[i] == effects[i]
    assert second.snapshot() == first.snapshot() == third.snapshot()
    assert second.index == first.index == len(commands)


@SETTINGS
@given(steps=STEPS)
def test_random_sequences_never_hit_internal_errors_and_retries_are_consistent(steps):
    """No command, however wrong, makes the machine report INTERNAL (a bug); a resent
    command gets its original answer (also after its session ended, a close included), or
    STALE once acked, and a repeated answer changes nothing."""
    machine = StateMachine()
    driver = Driver(machine)
    first_result: dict[bytes, bytes] = {}
    for step in PREFIX + list(steps) + FINISH:
        command = driver.command(step)
        if command is None:
            continue
        before = user_state(machine)
        result, fx = apply(machine, command)
        status, payload = decode_result(result)
        assert status in set(Status), result
        assert status != Status.INTERNAL, (step, payload)
        if step[0] == "retry" and command in first_result:
            original = first_result[command]
            if status_of(original) in (Status.SESSION_EXPIRED, Status.BAD_COMMAND):
                continue  # never applied: nothing to deduplicate
            # An applied command keeps its answer after its session ended (the ended
            # window), until acked (STALE) or evicted (a bare SESSION_EXPIRED: unknown);
            # never "not applied".
            assert result in (original, STALE, SESSION_EXPIRED), (step, original, result)
            assert fx == []
            assert user_state(machine) == before
        elif step[0] != "retry":
            first_result.setdefault(command, result)
        if step[0] == "barrier":
            assert decode_result(result) == (Status.OK, machine.index)
    # Every session has ended: nothing may stay held, queued or remembered for them.
    final = state(machine)
    assert final["sessions"]["live"] == []
    assert final["lock"] == [] and final["leader"]["names"] == []
    assert final["sem"] == [] and final["rw"] == []


def decode_command_op(command: bytes) -> int:
    return msgpack.unpackb(command[1:], raw=False)[0]


# -- 2. snapshot equivalence -----------------------------------------------------------

@SETTINGS
@given(steps=STEPS, data=st.data())
def test_restore_of_snapshot_continues_identically(steps, data):
    original, commands, results, effects = run(steps)
    split = data.draw(st.integers(0, len(commands)), label="split")
    head, _, _ = replay(commands[:split])
    snap = head.snapshot()
    restored = StateMachine.restore(snap)
    assert restored.snapshot() == snap
    assert restored.index == split
    _, tail_results, tail_effects = replay(commands[split:], restored)
    assert tail_results == results[split:]
    assert tail_effects == effects[split:]
    assert restored.snapshot() == original.snapshot()
    # The same holds when a snapshot is taken and installed before every command.
    hopping = StateMachine()
    for i, command in enumerate(commands):
        hopping = StateMachine.restore(hopping.snapshot())
        assert apply(hopping, command) == (results[i], effects[i]), f"step {i}: {command!r}"
    assert hopping.snapshot() == original.snapshot()
    # Queries answer the same too.
    for name in LOCKS:
        assert restored.query(encode_query(Query.LOCK_INFO, [name])) == original.query(
            encode_query(Query.LOCK_INFO, [name]))
    assert restored.query(encode_query(Query.KV_RANGE, [""])) == original.query(encode_query(Query.KV_RANGE, [""]))
    for sid in SIDS:
        assert restored.query(encode_query(Query.SESSION_INFO, [sid])) == original.query(
            encode_query(Query.SESSION_INFO, [sid]))
    for group in GROUPS:
        assert restored.query(encode_query(Query.LEADER_INFO, [group])) == original.query(
            encode_query(Query.LEADER_INFO, [group]))
    if HAS_SEMAPHORES:
        for kind, name in ((Query.SEM_INFO, "s"), (Query.RW_INFO, "r")):
            assert restored.query(encode_query(kind, [name])) == original.query(encode_query(kind, [name]))


# -- 3. exactly-once -------------------------------------------------------------------

SPEC = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=4), st.sampled_from([None, 0, 1, 2])),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.sampled_from([None, 1])),
    st.tuples(st.just("acquire"), st.sampled_from(LOCKS), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("withdraw"), st.sampled_from(LOCKS), st.integers(1, 4)),
)


def spec_command(spec: tuple, sid: int, seq: int, acked_below: int) -> bytes:
    kind = spec[0]
    if kind == "put":
        return encode_command(Op.KV_PUT, sid, seq, acked_below, [spec[1], spec[2], spec[3]])
    if kind == "delete":
        return encode_command(Op.KV_DELETE, sid, seq, acked_below, [spec[1], spec[2]])
    if kind == "acquire":
        return encode_command(Op.LOCK_ACQUIRE, sid, seq, acked_below, [spec[1], spec[2], spec[3]])
    return encode_command(Op.LOCK_WITHDRAW, sid, seq, acked_below, [spec[1], spec[2]])


@SETTINGS
@given(specs=st.lists(SPEC, min_size=1, max_size=10), data=st.data())
def test_retried_commands_apply_exactly_once_even_out_of_order(specs, data):
    """Commands of one session (from concurrent threads: seqs delivered out of order) are
    each delivered 1..4 times. Every delivery of a seq returns the byte-identical first
    answer, a repeat has no effects, and the whole run equals one where every repeat is
    replaced by a no-op (a BARRIER, to keep indexes aligned)."""
    sid, other = 7, 8
    n = len(specs)
    counts = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n), label="deliveries per seq")
    order = data.draw(st.permutations([seq for seq in range(1, n + 1) for _ in range(counts[seq - 1])]),
                      label="delivery order")
    # A competing session's commands interleaved (they are never retried).
    competing = data.draw(st.lists(st.tuples(st.integers(0, len(order)), SPEC), max_size=4), label="competing")
    last = {seq: pos for pos, seq in enumerate(order)}

    real, ref = StateMachine(), StateMachine()
    for machine in (real, ref):
        for s in (sid, other):
            assert apply(machine, encode_command(Op.OPEN_SESSION, s, 0, 0, [5000]))[0] == encode_result(
                Status.OK, [5000])

    first: dict[int, bytes] = {}
    other_seq = 0
    for pos, seq in enumerate(order):
        for at, spec in competing:
            if at == pos:
                other_seq += 1
                command = spec_command(spec, other, other_seq, other_seq)
                assert apply(real, command) == apply(ref, command)
        # acked_below: the lowest seq the client still waits for (whose last delivery
        # is yet to come), so no delivery is STALE by construction.
        acked_below = min(s for s, p in last.items() if p >= pos)
        command = spec_command(specs[seq - 1], sid, seq, acked_below)
        before = user_state(real)
        result, fx = apply(real, command)
        if seq not in first:
            first[seq] = result
            assert apply(ref, command) == (result, fx)
            assert status_of(result) == Status.OK or status_of(result) in (Status.CONFLICT, Status.NOT_FOUND)
        else:
            assert result == first[seq], f"retry of seq {seq} answered differently"
            assert fx == [], f"retry of seq {seq} had effects {fx}"
            assert user_state(real) == before
            assert apply(ref, encode_command(Op.BARRIER, 0, 0, 0, []))[1] == []
    assert user_state(real) == user_state(ref)
    for key in KEYS:
        assert real.query(encode_query(Query.KV_GET, [key])) == ref.query(encode_query(Query.KV_GET, [key]))

    # Once acked, an old seq is STALE and changes nothing.
    final = spec_command(("delete", "nope", None), sid, n + 1, n + 1)
    assert status_of(apply(real, final)[0]) == Status.NOT_FOUND
    stale_seq = data.draw(st.integers(1, n), label="stale seq")
    before = state(real)
    result, fx = apply(real, spec_command(specs[stale_seq - 1], sid, stale_seq, 0))
    assert result == STALE
    assert fx == []
    assert state(real) == before


def test_kv_put_retried_many_times_bumps_version_once():
    machine = StateMachine()
    apply(machine, encode_command(Op.OPEN_SESSION, 5, 0, 0, [1000]))
    put = encode_command(Op.KV_PUT, 5, 1, 1, ["k", b"v", None])
    first, fx = apply(machine, put)
    assert decode_result(first) == (Status.OK, [2, 1])  # [revision == index, version]
    assert [e[:3] for e in fx] == [("kv_put", "k", 2)]
    for _ in range(5):
        assert apply(machine, put) == (first, [])
    assert query(machine, Query.KV_GET, "k")[1][:4] == ["k", b"v", 1, 2]  # [key, value, version, revision]


# -- 4. apply / query never raise ------------------------------------------------------

def primed_machine() -> StateMachine:
    """Two live sessions, a held lock with a waiter, a key: garbage has things to hit."""
    machine = StateMachine()
    for command in (encode_command(Op.OPEN_SESSION, 1, 0, 0, [1000]),
                    encode_command(Op.OPEN_SESSION, 2, 0, 0, [1000]),
                    encode_command(Op.LOCK_ACQUIRE, 1, 1, 0, ["a", 1, True]),
                    encode_command(Op.LOCK_ACQUIRE, 2, 1, 0, ["a", 1, True]),
                    encode_command(Op.KV_PUT, 1, 2, 0, ["k1", b"x", None])):
        result, _ = apply(machine, command)
        assert status_of(result) == Status.OK
    return machine


msgpack_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
              st.binary(max_size=8), st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))),
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=4), children, max_size=4)),
    max_leaves=20)

header_int = st.one_of(st.sampled_from([0, 1, 2, 3, 2**64 - 1]), st.integers(-5, 2**64 - 1), st.booleans(),
                       st.none(), st.text(max_size=2))
corrupted_command = st.tuples(st.sampled_from([1, 2]), st.integers(1, 1000), corrupt_st).map(
    lambda t: [int(t[2][0]), t[0], t[1], 0, corrupted_args(*t[2])])
shaped_command = st.tuples(st.one_of(st.sampled_from(sorted(OP_NUMBERS)), header_int), header_int, header_int,
                           header_int, st.one_of(st.lists(msgpack_value, max_size=5), msgpack_value))


def check_result(machine: StateMachine, command: bytes) -> None:
    before = machine.index
    effects: list = []
    result = machine.apply(command, effects)
    assert machine.index == before + 1
    status, _ = decode_result(result)
    assert status in set(Status)
    assert status != Status.INTERNAL, decode_result(result)
    assert isinstance(effects, list)


@SETTINGS
@given(blobs=st.lists(st.binary(max_size=200), min_size=1, max_size=10))
def test_apply_never_raises_on_arbitrary_bytes(blobs):
    machine = primed_machine()
    for blob in blobs:
        check_result(machine, blob)
        check_result(machine, bytes((CODEC_VERSION,)) + blob)
    StateMachine.restore(machine.snapshot())  # still a well-formed state


@SETTINGS
@given(values=st.lists(st.one_of(msgpack_value, shaped_command.map(list), corrupted_command), min_size=1,
                       max_size=10))
def test_apply_never_raises_on_arbitrary_msgpack(values):
    machine = primed_machine()
    for value in values:
        command = bytes((CODEC_VERSION,)) + msgpack.packb(value, use_bin_type=True)
        check_result(machine, command)
    snap = machine.snapshot()
    assert StateMachine.restore(snap).snapshot() == snap


JUNK = [None, True, False, -1, 0, 2**64 - 1, 1.5, "", "x", "a", b"", b"x", [], [1], {}, {"a": 1},
        msgpack.ExtType(5, b"x"), "x" * 2000]


def test_every_argument_of_every_op_is_checked_not_crashed_on():
    """Each argument of a valid command of every op replaced by a value of each wrong
    type, dropped, or followed by an extra one: BAD_COMMAND or a normal answer, never
    INTERNAL and never an exception, for a live session and a tombstoned one."""
    base = primed_machine()
    apply(base, encode_command(Op.OPEN_SESSION, 3, 0, 0, [1000]))
    apply(base, encode_command(Op.CLOSE_SESSION, 3, 1, 1, []))
    base_snapshot = base.snapshot()
    for op in Op:
        valid = VALID_ARGS.get(op, [])
        variants = [corrupted_args(op, 0, junk, "append") for junk in JUNK]
        variants += [corrupted_args(op, position, None, "drop") for position in range(len(valid))]
        variants += [corrupted_args(op, position, junk, "replace") for position in range(len(valid)) for junk in JUNK]
        for args in variants:
            for sid in (1, 2, 3):
                # A fresh copy each time: a variant that still ends a session (CLOSE
                # ignores extra arguments) must not hide the next one behind SESSION_EXPIRED.
                machine = StateMachine.restore(base_snapshot)
                command = bytes((CODEC_VERSION,)) + msgpack.packb([int(op), sid, 100, 0, args], use_bin_type=True)
                check_result(machine, command)
                snap = machine.snapshot()
                assert StateMachine.restore(snap).snapshot() == snap


@SETTINGS
@given(values=st.lists(st.one_of(st.binary(max_size=64), msgpack_value.map(
    lambda v: msgpack.packb(v, use_bin_type=True)), st.tuples(st.sampled_from([int(q) for q in Query] + [0, 9]),
                                                              st.lists(msgpack_value, max_size=3)).map(
    lambda qa: encode_query(qa[0], qa[1]))), min_size=1, max_size=10))
def test_query_never_raises_and_changes_nothing(values):
    machine = primed_machine()
    snap = machine.snapshot()
    for value in values:
        status, _ = decode_result(machine.query(value))
        assert status in set(Status)
        assert status != Status.INTERNAL
    assert machine.snapshot() == snap


# -- 5. locks: a reference model -------------------------------------------------------

lock_sid = st.sampled_from([1, 2, 3, 4])
LOCK_STEP = st.one_of(
    st.tuples(st.just("open"), lock_sid),
    st.tuples(st.just("keepalive"), st.lists(lock_sid, max_size=2)),
    st.tuples(st.just("expire"), lock_sid, st.booleans()),
    st.tuples(st.just("close"), lock_sid),
    st.tuples(st.just("acquire"), lock_sid, st.sampled_from(HANDLES), st.sampled_from(LOCKS), st.booleans()),
    st.tuples(st.just("acquire"), lock_sid, st.sampled_from(HANDLES), st.sampled_from(LOCKS), st.just(True)),
    st.tuples(st.just("release"), lock_sid, st.sampled_from(HANDLES), st.sampled_from(LOCKS), st.booleans()),
    st.tuples(st.just("release_holder"), st.sampled_from(LOCKS), st.booleans()),
    st.tuples(st.just("withdraw"), lock_sid, st.sampled_from(HANDLES), st.sampled_from(LOCKS)),
)


class LockModel:
    """The documented lock/session semantics, written independently of the machine."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # sid -> [ttl, keepalive_index]
        self.ended: set[int] = set()
        self.locks: dict[str, dict] = {}  # name -> {"holder", "token", "waiters"}

    def info(self, name: str):
        rec = self.locks.get(name)
        if rec is None:
            return None
        return [list(rec["holder"]), rec["token"], [list(w) for w in rec["waiters"]]]

    def _grant(self, name, rec, owner, index, fx):
        rec["holder"], rec["token"] = owner, index
        fx.append(("lock_granted", name, owner[0], owner[1], index))

    def _release(self, name, rec, index, fx):
        holder = rec["holder"]
        fx.append(("lock_released", name, holder[0], holder[1], rec["token"]))
        if rec["waiters"]:
            self._grant(name, rec, rec["waiters"].pop(0), index, fx)
        else:
            del self.locks[name]

    def _end(self, sid, reason, index, fx):
        for name in sorted(self.locks):
            rec = self.locks[name]
            rec["waiters"] = [w for w in rec["waiters"] if w[0] != sid]
            if rec["holder"][0] == sid:
                self._release(name, rec, index, fx)
        del self.live[sid]
        self.ended.add(sid)
        fx.append(("session_ended", sid, reason))

    def step(self, step, index, token_hint):
        """Expected (result bytes, effects) of ``step`` applied at machine index ``index``."""
        fx: list = []
        kind = step[0]
        if kind == "open":
            sid = step[1]
            if sid in self.ended:
                return SESSION_EXPIRED, fx
            if sid not in self.live:
                self.live[sid] = [1000, index]
                fx.append(("session_opened", sid, 1000, index))
            return encode_result(Status.OK, [self.live[sid][0]]), fx
        if kind == "keepalive":
            missing = []
            for sid in step[1]:
                if sid in self.live:
                    self.live[sid][1] = index
                    fx.append(("keepalive", sid, index))
                else:
                    missing.append(sid)
            return encode_result(Status.OK, missing), fx
        if kind == "expire":
            sid, expected = step[1], token_hint
            if sid not in self.live or self.live[sid][1] != expected:
                return STALE, fx
            self._end(sid, "expired", index, fx)
            return OK, fx
        sid = step[1]
        if sid not in self.live:
            return (NEVER_APPLIED if sid in self.ended else SESSION_EXPIRED), fx
        if kind == "close":
            self._end(sid, "closed", index, fx)
            return OK, fx
        owner = (sid, step[2])
        name = step[3]
        rec = self.locks.get(name)
        if kind == "acquire":
            wait = step[4]
            if rec is None:
                rec = self.locks[name] = {"holder": None, "token": 0, "waiters": []}
                self._grant(name, rec, owner, index, fx)
                return encode_result(Status.OK, index), fx
            if rec["holder"] == owner:
                return encode_result(Status.OK, rec["token"]), fx
            if wait and owner not in rec["waiters"]:
                rec["waiters"].append(owner)
            return encode_result(Status.OK, 0), fx
        if kind == "release":
            if rec is None or rec["holder"] != owner or rec["token"] != token_hint:
                return encode_result(Status.NOT_HELD), fx
            self._release(name, rec, index, fx)
            return OK, fx
        if kind == "withdraw":
            if rec is None:
                return encode_result(Status.OK, 0), fx
            if rec["holder"] == owner:
                token = rec["token"]
                self._release(name, rec, index, fx)
                return encode_result(Status.OK, token), fx
            if owner in rec["waiters"]:
                rec["waiters"].remove(owner)
            return encode_result(Status.OK, 0), fx
        raise AssertionError(step)


@SETTINGS
@given(steps=st.lists(LOCK_STEP, min_size=1, max_size=60))
def test_lock_table_matches_model_and_keeps_its_invariants(steps):
    """Sessions 1-3 start open (4 may be opened later); at the end every session is
    expired or closed. Each step's result and effects must be the model's, and the
    invariants below must hold on their own."""
    machine = StateMachine()
    model = LockModel()
    seq = {sid: 0 for sid in (1, 2, 3, 4)}
    last_token = {name: 0 for name in LOCKS}
    holder_from_effects: dict[str, tuple] = {}
    steps = [("open", 1), ("open", 2), ("open", 3)] + list(steps) + [
        ("expire", 1, True), ("close", 2), ("expire", 3, False), ("expire", 3, True), ("close", 4)]
    for step in steps:
        kind = step[0]
        if kind == "release_holder":  # the holder releases, with its right token or a wrong one
            info = lock_info(machine, step[1])
            if info is None:
                continue
            step = ("release", info[0][0], info[0][1], step[1], step[2])
            kind = "release"
        hint = None
        if kind == "open":
            command = encode_command(Op.OPEN_SESSION, step[1], 0, 0, [1000])
        elif kind == "keepalive":
            command = encode_command(Op.KEEPALIVE, 0, 0, 0, [step[1]])
        elif kind == "expire":
            info = session_info(machine, step[1])
            latest = info[1] if info else 0
            hint = latest if step[2] else max(0, latest - 1)
            command = encode_command(Op.EXPIRE_SESSION, 0, 0, 0, [step[1], hint])
        else:
            sid = step[1]
            seq[sid] += 1
            if kind == "close":
                command = encode_command(Op.CLOSE_SESSION, sid, seq[sid], seq[sid], [])
            elif kind == "acquire":
                command = encode_command(Op.LOCK_ACQUIRE, sid, seq[sid], seq[sid], [step[3], step[2], step[4]])
            elif kind == "release":
                info = lock_info(machine, step[3])
                token = info[1] if info else 1
                hint = token if step[4] else token + 1
                command = encode_command(Op.LOCK_RELEASE, sid, seq[sid], seq[sid], [step[3], step[2], hint])
            else:
                command = encode_command(Op.LOCK_WITHDRAW, sid, seq[sid], seq[sid], [step[3], step[2]])

        infos_before = {name: lock_info(machine, name) for name in LOCKS}
        state_before = state(machine)
        expected = model.step(step, machine.index + 1, hint)
        result, fx = apply(machine, command)
        note(f"{step} -> {decode_result(result)} {fx}")
        assert (result, fx) == expected, step

        # The lock table, as queried, is the model's.
        for name in LOCKS:
            assert lock_info(machine, name) == model.info(name)

        # Invariants stated on the effects, independent of the model.
        granted = [e for e in fx if e[0] == "lock_granted"]
        for name in LOCKS:
            grants = [e for e in granted if e[1] == name]
            assert len(grants) <= 1, f"one command granted {name} twice: {fx}"  # O(1) hand-off
        for effect in fx:
            if effect[0] == "lock_released":
                assert holder_from_effects.pop(effect[1]) == (effect[2], effect[3], effect[4])
            elif effect[0] == "lock_granted":
                name, token = effect[1], effect[4]
                assert name not in holder_from_effects, "granted while held: two holders"
                assert token == machine.index
                assert token > last_token[name], "fencing tokens must strictly increase"
                last_token[name] = token
                holder_from_effects[name] = (effect[2], effect[3], token)
                # FIFO: a grant of a lock that had waiters goes to the first of them.
                before = infos_before[name]
                if before is not None and before[2] and kind != "acquire":
                    eligible = [w for w in before[2] if not (kind in ("close", "expire") and w[0] == step[1])]
                    assert [effect[2], effect[3]] == eligible[0]
        for name in LOCKS:
            info = lock_info(machine, name)
            assert (info is None) == (name not in holder_from_effects)
            if info is not None:
                assert tuple(info[0]) + (info[1],) == holder_from_effects[name]
                assert info[0] not in info[2], "holder also queued"
                assert len({tuple(w) for w in info[2]}) == len(info[2]), "waiter queued twice"

        status = status_of(result)
        if kind == "release" and status == Status.OK:
            waiting = infos_before[step[3]][2]
            assert len(granted) == (1 if waiting else 0)
        if kind == "expire" and not step[2] and status == Status.STALE:
            assert fx == [] and state(machine) == state_before, "a stale expiry changed something"
        if kind in ("close", "expire") and status == Status.OK:
            sid = step[1]
            assert session_info(machine, sid) is None
            assert fx[-1] == ("session_ended", sid, "closed" if kind == "close" else "expired")
            for name in LOCKS:
                info = lock_info(machine, name)
                if info is not None:
                    assert info[0][0] != sid and all(w[0] != sid for w in info[2])
            held = [name for name in LOCKS if infos_before[name] and infos_before[name][0][0] == sid]
            assert sorted(e[1] for e in fx if e[0] == "lock_released") == held
    assert all(lock_info(machine, name) is None for name in LOCKS)


@SETTINGS
@given(n_waiters=st.integers(0, 30), handle_order=st.data())
def test_release_with_n_waiters_grants_only_the_first_in_fifo_order(n_waiters, handle_order):
    machine = StateMachine()
    sids = list(range(1, n_waiters + 2))
    order = handle_order.draw(st.permutations(sids), label="arrival order")
    for sid in sids:
        apply(machine, encode_command(Op.OPEN_SESSION, sid, 0, 0, [1000]))
    for sid in order:
        apply(machine, encode_command(Op.LOCK_ACQUIRE, sid, 1, 1, ["L", 9, True]))
    # Each release hands the lock to the next arrival, with one grant and a new token.
    previous_token = 0
    for position, sid in enumerate(order):
        info = lock_info(machine, "L")
        assert info[0] == [sid, 9]
        assert [w[0] for w in info[2]] == order[position + 1:]
        assert info[1] > previous_token
        previous_token = info[1]
        result, fx = apply(machine, encode_command(Op.LOCK_RELEASE, sid, 2, 2, ["L", 9, info[1]]))
        assert result == OK
        grants = [e for e in fx if e[0] == "lock_granted"]
        if position + 1 < len(order):
            assert grants == [("lock_granted", "L", order[position + 1], 9, machine.index)]
        else:
            assert grants == []
        assert len(fx) == 1 + len(grants)
    assert lock_info(machine, "L") is None


# -- 6. KV: a reference model ----------------------------------------------------------

KV_STEP = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=4),
              st.one_of(st.none(), st.sampled_from(["current", "next", "prev"]), st.integers(0, 3)),
              st.sampled_from([0, 0, 700])),
    st.tuples(st.just("delete"), st.sampled_from(KEYS),
              st.one_of(st.none(), st.sampled_from(["current", "next"]), st.integers(0, 3))),
    st.tuples(st.just("expire"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("barrier")),
)


@SETTINGS
@given(steps=st.lists(KV_STEP, min_size=1, max_size=50))
def test_kv_compare_and_set_matches_model(steps):
    """if_version=None writes blindly, 0 means "must not exist", any other mismatch is
    CONFLICT carrying the current version; version counts writes since creation (+1 per
    write); revision is the machine index of the write; deletes of missing keys are
    NOT_FOUND. A TTL expiry (KV_EXPIRE) only removes the exact revision it names and only
    a record written with a TTL. Barriers interleave so index != number of KV writes."""
    machine = StateMachine()
    apply(machine, encode_command(Op.OPEN_SESSION, 4, 0, 0, [1000]))
    model: dict[str, list] = {}  # key -> [value, version, revision, ttl_ms]
    seq = 0
    for step in steps:
        index = machine.index + 1
        if step[0] == "barrier":
            result, fx = apply(machine, encode_command(Op.BARRIER, 0, 0, 0, []))
            assert result == encode_result(Status.OK, index) and fx == []
            continue
        key = step[1]
        current = model[key][1] if key in model else 0
        if step[0] == "expire":
            revision = model[key][2] if key in model else index - 1
            revision = revision if step[2] else revision - 1
            command = encode_command(Op.KV_EXPIRE, 0, 0, 0, [key, revision])
            if key in model and model[key][2] == revision and model[key][3]:
                del model[key]
                expected = (OK, [("kv_delete", key, index)])
            else:
                expected = (STALE, [])
            assert apply(machine, command) == expected, step
            continue
        if_version = step[3] if step[0] == "put" else step[2]
        if if_version == "current":
            if_version = current
        elif if_version == "next":
            if_version = current + 1
        elif if_version == "prev":
            if_version = max(0, current - 1)
        seq += 1
        if step[0] == "put":
            ttl = step[4]
            command = encode_command(Op.KV_PUT, 4, seq, seq, [key, step[2], if_version] + ([ttl] if ttl else []))
            if if_version is not None and if_version != current:
                expected_result, expected_fx = encode_result(Status.CONFLICT, [current]), []
            else:
                model[key] = [step[2], current + 1, index, ttl]
                expected_result = encode_result(Status.OK, [index, current + 1])
                expected_fx = [("kv_put", key, index)]
        else:
            command = encode_command(Op.KV_DELETE, 4, seq, seq, [key, if_version])
            if key not in model:
                expected_result, expected_fx = encode_result(Status.NOT_FOUND), []
            elif if_version is not None and if_version != current:
                expected_result, expected_fx = encode_result(Status.CONFLICT, [current]), []
            else:
                del model[key]
                expected_result, expected_fx = encode_result(Status.OK, [index]), [("kv_delete", key, index)]
        result, fx = apply(machine, command)
        assert result == expected_result, step
        # effects: (kind, key, revision[, extra fields])
        assert [e[:3] for e in fx] == expected_fx, step
        for k in KEYS:
            got = query(machine, Query.KV_GET, k)
            if k in model:
                assert got[0] == Status.OK and got[1][:4] == [k] + model[k][:3]
                if len(got[1]) > 4:
                    # the record's TTL in seconds (a bare machine measures none: all of it)
                    assert got[1][4] == (model[k][3] / 1000.0 if model[k][3] else None)
            else:
                assert tuple(got) == (Status.NOT_FOUND, machine.index)
        ranged = query(machine, Query.KV_RANGE, "")[1]
        assert [r[:4] for r in ranged] == [[k] + model[k][:3] for k in sorted(model)]
        ranged = query(machine, Query.KV_RANGE, "k3")[1]
        assert [r[:4] for r in ranged] == [[k] + model[k][:3] for k in sorted(model) if k.startswith("k3")]


@SETTINGS
@given(steps=st.lists(st.tuples(st.sampled_from(["open", "close", "expire", "expire_stale", "keepalive"]),
                                st.sampled_from(SIDS)), min_size=1, max_size=40))
def test_ended_session_ids_are_never_resurrected(steps):
    """Once a session id is closed or expired, OPEN_SESSION (e.g. a delayed duplicate)
    answers SESSION_EXPIRED for good and its commands answer SESSION_EXPIRED; a live
    session re-opened idempotently keeps its TTL and announces itself once."""
    machine = StateMachine()
    ended: set[int] = set()
    opened: set[int] = set()
    seq = 0
    for kind, sid in steps:
        seq += 1
        if kind == "open":
            result, fx = apply(machine, encode_command(Op.OPEN_SESSION, sid, 0, 0, [100 * sid + 100]))
            if sid in ended:
                assert (result, fx) == (SESSION_EXPIRED, [])
            else:
                assert result == encode_result(Status.OK, [100 * sid + 100])
                assert fx == ([] if sid in opened else [("session_opened", sid, 100 * sid + 100, machine.index)])
                opened.add(sid)
        elif kind == "close":
            result, fx = apply(machine, encode_command(Op.CLOSE_SESSION, sid, seq, seq, []))
            if sid in opened and sid not in ended:
                assert result == OK and fx == [("session_ended", sid, "closed")]
                ended.add(sid)
            else:
                assert (result, fx) == (NEVER_APPLIED if sid in ended else SESSION_EXPIRED, [])
        elif kind == "keepalive":
            result, fx = apply(machine, encode_command(Op.KEEPALIVE, 0, 0, 0, [[sid]]))
            live = sid in opened and sid not in ended
            assert result == encode_result(Status.OK, [] if live else [sid])
            assert fx == ([("keepalive", sid, machine.index)] if live else [])
        else:
            info = session_info(machine, sid)
            live = sid in opened and sid not in ended
            assert (info is not None) == live
            expected = max(0, (info[1] if info else 0) - (1 if kind == "expire_stale" else 0))
            result, fx = apply(machine, encode_command(Op.EXPIRE_SESSION, 0, 0, 0, [sid, expected]))
            if live and kind == "expire":
                assert result == OK and fx == [("session_ended", sid, "expired")]
                ended.add(sid)
            else:
                assert (result, fx) == (STALE, [])
        put = encode_command(Op.KV_PUT, sid, 10_000 + seq, 0, ["k", b"v", None])
        probe = StateMachine.restore(machine.snapshot())  # tombstones survive snapshots too
        if sid in ended:
            assert apply(probe, put)[0] == NEVER_APPLIED
            assert apply(probe, encode_command(Op.OPEN_SESSION, sid, 0, 0, [1000]))[0] == SESSION_EXPIRED
