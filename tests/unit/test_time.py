"""raftsync.time without a network: interval intersection, bounds, NtpClock over a
fake ntplib, and the hybrid logical clock."""

import threading
import time
from datetime import timezone

import msgpack
import ntplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftsync import ClockUnsynchronized, ConfigError, HLCTimestamp, HybridLogicalClock, LocalClock, NtpClock
from raftsync.config import load_config
from raftsync.errors import BadRequest, Closed
from raftsync.time import MAX_LOGICAL, marzullo, parse_server

# -- marzullo ---------------------------------------------------------------------------


def test_marzullo_drops_a_falseticker():
    agreement = marzullo([(0.49, 0.52), (0.48, 0.51), (0.495, 0.53), (29.9, 30.1)])
    assert (agreement.low, agreement.high) == (0.495, 0.51)
    assert agreement.agreeing == {0, 1, 2}
    assert agreement.clique == 3


def test_marzullo_without_a_majority_gives_nothing():
    assert marzullo([]) is None
    assert marzullo([(0, 1), (5, 6)]) is None                    # one against one
    assert marzullo([(0, 1), (0, 1), (5, 6), (5, 6)]) is None    # two against two: a tie
    assert marzullo([(0, 1), (2, 3), (4, 5)]) is None


def test_marzullo_ambiguous_majorities_keep_the_whole_hull():
    # Two different points each have a majority (A+B, A+C): the truth may be at either,
    # so the answer spans both and nobody is called a falseticker.
    agreement = marzullo([(0, 10), (0, 1), (9, 10)])
    assert (agreement.low, agreement.high) == (0, 10)
    assert agreement.agreeing == {0, 1, 2}


def test_marzullo_touching_intervals_share_their_end():
    agreement = marzullo([(0, 1), (1, 2), (1, 3)])
    assert (agreement.low, agreement.high) == (1, 2)
    assert agreement.agreeing == {0, 1, 2}
    assert agreement.clique == 3


def test_marzullo_keeps_the_truth_where_the_largest_clique_misses_it():
    # Truth at 0: three truechimers hold it; two falsetickers at 100 overlap the two wide
    # truechimers, so the largest clique (4) is at 100. Intersecting only that clique
    # would exclude the truth; the majority hull does not.
    intervals = [(-1, 101), (-1, 101), (-1, 1), (99, 101), (99, 101)]
    agreement = marzullo(intervals)
    assert agreement.clique == 4
    assert agreement.low <= 0 <= agreement.high


def test_marzullo_rejects_malformed_intervals():
    with pytest.raises(ValueError):
        marzullo([(2, 1)])
    with pytest.raises(ValueError):
        marzullo([(0, float("inf"))])


@settings(max_examples=300, deadline=None)
@given(truth=st.floats(-1000, 1000),
       true_halves=st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50)), min_size=1, max_size=6),
       false=st.lists(st.tuples(st.floats(-2000, 2000), st.floats(0, 50)), max_size=5),
       order=st.randoms())
def test_marzullo_contains_the_truth_when_a_majority_holds_it(truth, true_halves, false, order):
    false = false[:len(true_halves) - 1]        # truechimers stay more than half
    truechimers = [(truth - below, truth + above) for below, above in true_halves]
    falsetickers = [(low, low + width) for low, width in false]
    intervals = truechimers + falsetickers
    order.shuffle(intervals)
    agreement = marzullo(intervals)
    assert agreement is not None
    assert agreement.low <= truth <= agreement.high
    for index, interval in enumerate(intervals):
        if interval in truechimers:
            assert index in agreement.agreeing


# -- NtpClock over a fake ntplib ----------------------------------------------------------


class FakeServers:
    """Replaces ntplib.NTPClient.request: each port is a server with a behaviour."""

    def __init__(self):
        self.behaviour = {}

    def request(self, client, host, version=2, port="ntp", timeout=5):
        kind, value, extra = self.behaviour[port]
        if kind == "timeout":
            raise ntplib.NTPException(f"No response received from {host}.")
        if kind == "hang":                  # e.g. name resolution that outlasts the timeout
            threading.Event().wait(20 * timeout)
            raise ntplib.NTPException(f"No response received from {host}.")
        sent = time.time()
        stats = ntplib.NTPStats()
        stats.mode, stats.stratum, stats.leap, stats.precision = 4, 2, 0, -20
        stats.root_delay, stats.root_dispersion = extra.get("root_delay", 0.0), extra.get("root_dispersion", 0.0)
        stats.orig_timestamp = ntplib.system_to_ntp_time(sent - extra.get("stale", 0.0))
        stats.recv_timestamp = ntplib.system_to_ntp_time(sent + value)
        stats.tx_timestamp = stats.recv_timestamp
        stats.dest_timestamp = ntplib.system_to_ntp_time(time.time())
        for field, setting in extra.items():
            if field in ("mode", "stratum", "leap", "precision"):
                setattr(stats, field, setting)
        return stats


@pytest.fixture
def fake_ntp(monkeypatch):
    servers = FakeServers()
    monkeypatch.setattr(ntplib.NTPClient, "request", lambda client, *a, **k: servers.request(client, *a, **k))
    clocks = []

    def make(behaviours, **options):
        names = []
        for port, behaviour in enumerate(behaviours, start=1000):
            kind, value, *extra = behaviour
            servers.behaviour[port] = (kind, value, extra[0] if extra else {})
            names.append(f"127.0.0.1:{port}")
        options.setdefault("timeout", 0.3)
        clock = NtpClock(names, **options)
        clocks.append(clock)
        return clock

    make.servers = servers
    yield make
    for clock in clocks:
        clock.close()


def test_ntpclock_combines_servers_and_names_the_falseticker(fake_ntp):
    clock = fake_ntp([("ok", 0.5), ("ok", 0.5), ("ok", 0.5), ("ok", 30.0)])
    before = time.time() + 0.5
    interval = clock.now_interval()
    after = time.time() + 0.5
    assert interval.earliest.timestamp() <= after and interval.latest.timestamp() >= before
    assert interval.earliest.tzinfo is timezone.utc
    status = clock.status()
    assert status.synchronized and status.problem is None
    assert [s.falseticker for s in status.servers] == [False, False, False, True]
    assert "falseticker" in status.servers[3].problem
    assert abs(status.offset - 0.5) <= status.error


def test_the_first_read_waits_out_a_hanging_server(fake_ntp):
    # The first round lasts until its deadline (one query hangs); a read made right
    # after the clock must wait for that round rather than give up a moment too early.
    clock = fake_ntp([("ok", 0.5), ("ok", 0.5), ("ok", 0.5), ("hang", 0)], timeout=0.3)
    started = time.monotonic()
    clock.now_interval()
    assert time.monotonic() - started < 2.0
    assert clock.status().servers[3].problem == "no answer within 0.3 s"
    # the next round does not pile a second query onto the hanging one
    assert "previous query has not returned" in clock.poll().servers[3].problem


def test_ntpclock_bound_adds_root_delay_dispersion_round_trip_and_precision(fake_ntp):
    clock = fake_ntp([("ok", 0.0, {"root_delay": 0.2, "root_dispersion": 0.05, "precision": -10})])
    clock.poll()
    server = clock.status().servers[0]
    claimed = 0.2 / 2 + 0.05 + server.delay / 2 + 2 ** -10
    # plus only this host's clock-read slack (microseconds, more on a loaded machine)
    assert claimed <= server.error <= claimed + 0.01
    assert clock.status().error >= claimed


def test_ntpclock_refuses_unusable_answers(fake_ntp):
    clock = fake_ntp([("ok", 0.0, {"leap": 3}), ("ok", 0.0, {"stratum": 0}), ("ok", 0.0, {"stratum": 16}),
                      ("ok", 0.0, {"mode": 3}), ("ok", 0.0, {"stale": 5.0}), ("timeout", 0)])
    with pytest.raises(ClockUnsynchronized, match="no server gave a usable answer"):
        clock.now_interval()
    problems = [s.problem for s in clock.status().servers]
    assert "leap indicator 3" in problems[0]
    assert "kiss-o'-death" in problems[1]
    assert "stratum 16" in problems[2]
    assert "mode 3" in problems[3]
    assert "origin timestamp" in problems[4]
    assert "no answer within 0.3 s" in problems[5]
    assert not any(s.reachable for s in clock.status().servers)
    assert abs(clock.physical_time() - time.time()) < 1.0   # best effort still answers


def test_ntpclock_without_a_majority_is_unsynchronized(fake_ntp):
    clock = fake_ntp([("ok", 0.5), ("ok", 30.0)])
    with pytest.raises(ClockUnsynchronized, match="do not agree"):
        clock.now()
    assert not clock.status().synchronized
    assert not any(s.falseticker for s in clock.status().servers)   # which one lies is unknown


def test_ntpclock_min_agreeing(fake_ntp):
    clock = fake_ntp([("ok", 0.5), ("timeout", 0), ("timeout", 0)], min_agreeing=2)
    with pytest.raises(ClockUnsynchronized, match="only 1 servers agree, 2 are required"):
        clock.now_interval()


def test_ntpclock_keeps_its_estimate_when_a_later_round_fails(fake_ntp):
    clock = fake_ntp([("ok", 0.5), ("ok", 0.5), ("ok", 0.5)], drift_ppm=1e5)
    first = clock.poll()
    fake_ntp.servers.behaviour.update({port: ("timeout", 0, {}) for port in (1000, 1001, 1002)})   # all go silent
    later = clock.poll()
    assert later.synchronized and "keeping the estimate" in later.problem
    assert not any(s.reachable for s in later.servers)
    assert later.error > first.error           # the drift allowance keeps growing
    before = time.time() + 0.5
    interval = clock.now_interval()
    after = time.time() + 0.5
    assert interval.earliest.timestamp() <= after and interval.latest.timestamp() >= before


def test_ntpclock_drift_allowance_grows_with_time_since_the_poll(fake_ntp):
    clock = fake_ntp([("ok", 0.0)], drift_ppm=1e5)      # 10 %: measurable in milliseconds
    clock.poll()
    start_outer = time.monotonic()
    first = clock.status().error
    start_inner = time.monotonic()
    threading.Event().wait(0.05)                        # let time pass (nothing to wait for)
    end_inner = time.monotonic()
    second = clock.status().error
    end_outer = time.monotonic()
    growth = second - first
    assert 0.1 * (end_inner - start_inner) - 1e-9 <= growth <= 0.1 * (end_outer - start_outer) + 1e-9


def test_ntpclock_closed(fake_ntp):
    clock = fake_ntp([("ok", 0.0)])
    clock.now()
    clock.close()
    clock.close()
    with pytest.raises(Closed):
        clock.now()
    with pytest.raises(Closed):
        clock.poll()


@pytest.mark.parametrize("kwargs, setting", [
    (dict(servers=[]), "servers"), (dict(servers="pool.ntp.org"), "servers"), (dict(servers=5), "servers"),
    (dict(servers=["a:0"]), "servers"), (dict(servers=["a:x"]), "servers"), (dict(servers=[""]), "servers"),
    (dict(servers=["a"], timeout=0), "timeout"), (dict(servers=["a"], timeout=True), "timeout"),
    (dict(servers=["a"], poll_interval=float("inf")), "poll_interval"),
    (dict(servers=["a"], min_agreeing=2), "min_agreeing"), (dict(servers=["a"], drift_ppm=-1), "drift_ppm"),
    (dict(servers=["a"], version=5), "version"),
])
def test_ntpclock_bad_arguments(kwargs, setting):
    with pytest.raises(ConfigError) as caught:
        NtpClock(**kwargs)
    assert caught.value.setting == setting


def test_parse_server():
    assert parse_server("time.example") == ("time.example", 123)
    assert parse_server("10.0.0.1:1123") == ("10.0.0.1", 1123)
    assert parse_server("[::1]:1123") == ("::1", 1123)
    assert parse_server("[::1]") == ("::1", 123)
    assert parse_server("fe80::1") == ("fe80::1", 123)
    assert parse_server(("127.0.0.1", 5)) == ("127.0.0.1", 5)
    for bad in ("a:", "a:70000", "[::1]x", "a b", None, ("a", True)):
        with pytest.raises(ConfigError):
            parse_server(bad)


def test_ntp_servers_setting():
    config = load_config({"self_address": "127.0.0.1:7001"}, {"RAFTSYNC_NTP_SERVERS": "127.0.0.1:1123, ntp.example"})
    assert config.ntp_servers == ["127.0.0.1:1123", "ntp.example"]
    assert load_config({"self_address": "127.0.0.1:7001"}, {}).ntp_servers == []
    for bad in ("one.string", ["a:0"], [5]):
        with pytest.raises(ConfigError) as caught:
            load_config({"self_address": "127.0.0.1:7001", "ntp_servers": bad}, {})
        assert caught.value.setting == "ntp_servers"


# -- LocalClock -------------------------------------------------------------------------


def test_local_clock():
    clock = LocalClock(max_error=0.25)
    before = time.time()
    interval = clock.now_interval()
    after = time.time()
    assert before - 0.25 - 1e-6 <= interval.earliest.timestamp() <= after - 0.25 + 1e-6
    assert before + 0.25 - 1e-6 <= interval.latest.timestamp() <= after + 0.25 + 1e-6
    assert abs(interval.error.total_seconds() - 0.25) < 1e-5
    assert clock.now().tzinfo is timezone.utc
    # without max_error the kernel's bound is used, or the clock says it has none
    kernel = LocalClock()
    if kernel.status().synchronized:
        assert kernel.now_interval().error.total_seconds() == pytest.approx(kernel.status().error, abs=1e-5)
    else:
        with pytest.raises(ClockUnsynchronized):
            kernel.now_interval()
    for bad in (-1, float("inf"), "1", True):
        with pytest.raises(ConfigError):
            LocalClock(max_error=bad)


# -- hybrid logical clock -----------------------------------------------------------------


class Physical:
    """A settable physical clock (seconds)."""

    def __init__(self, seconds=1000.0):
        self.seconds = seconds

    def __call__(self):
        return self.seconds


def test_hlc_follows_physical_time_and_never_goes_back():
    physical = Physical(1000.0)
    clock = HybridLogicalClock(physical)
    assert clock.now() == (1_000_000, 0)
    assert clock.now() == (1_000_000, 1)            # same millisecond: the counter moves
    physical.seconds = 1000.005
    assert clock.now() == (1_000_005, 0)
    physical.seconds = 990.0                        # the physical clock steps back 10 s
    assert clock.now() == (1_000_005, 1)
    assert clock.now() == (1_000_005, 2)
    physical.seconds = 1000.006
    assert clock.now() == (1_000_006, 0)
    assert clock.last() == (1_000_006, 0)


def test_hlc_update_merges_a_remote_stamp():
    physical = Physical(1000.0)
    clock = HybridLogicalClock(physical)
    clock.now()                                                 # (1_000_000, 0)
    assert clock.update([1_005_000, 7]) == (1_005_000, 8)       # remote ahead: take its time
    assert clock.now() == (1_005_000, 9)                        # and stay ahead of it
    assert clock.update((1_005_000, 20)) == (1_005_000, 21)     # same time: max counter + 1
    assert clock.update(HLCTimestamp(1_000_000, 99)) == (1_005_000, 22)   # remote behind
    physical.seconds = 1006.0
    assert clock.update([1_005_000, 500]) == (1_006_000, 0)     # physical ahead of both


def test_hlc_logical_counter_overflow_borrows_a_millisecond():
    clock = HybridLogicalClock(Physical(1.0))
    stamps = [clock.now() for _ in range(MAX_LOGICAL + 3)]
    assert stamps[MAX_LOGICAL] == (1000, MAX_LOGICAL)
    assert stamps[MAX_LOGICAL + 1] == (1001, 0)
    assert stamps[MAX_LOGICAL + 2] == (1001, 1)
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    other = HybridLogicalClock(Physical(1.0))
    assert other.update([1000, MAX_LOGICAL]) == (1001, 0)


def test_hlc_stamps_are_msgpack_pairs_and_validated():
    stamp = HybridLogicalClock().now()
    wire = msgpack.unpackb(msgpack.packb(stamp))
    assert wire == [stamp.physical_ms, stamp.logical]
    assert HLCTimestamp.from_pair(wire) == stamp
    assert HLCTimestamp.from_int(stamp.to_int()) == stamp
    assert HLCTimestamp(5, MAX_LOGICAL).to_int() < HLCTimestamp(6, 0).to_int()
    assert abs(stamp.to_datetime().timestamp() - time.time()) < 60
    clock = HybridLogicalClock()
    before = clock.last()
    for bad in (None, 5, "1,2", [1], [1, 2, 3], [-1, 0], [1, -1], [1, MAX_LOGICAL + 1], [True, 0], [1.5, 0],
                [1 << 48, 0]):
        with pytest.raises(BadRequest):
            clock.update(bad)
    assert clock.last() == before
    with pytest.raises(BadRequest):
        HLCTimestamp.from_int(-1)


def test_hlc_max_offset_refuses_stamps_from_the_far_future():
    clock = HybridLogicalClock(Physical(1000.0), max_offset=5)
    assert clock.update([1_004_000, 0]) == (1_004_000, 1)
    with pytest.raises(BadRequest, match="ahead"):
        clock.update([1_010_000, 0])
    assert clock.last() == (1_004_000, 1)
    with pytest.raises(ConfigError):
        HybridLogicalClock(max_offset=-1)
    with pytest.raises(ConfigError):
        HybridLogicalClock(physical=5)


def test_hlc_is_thread_safe():
    clock = HybridLogicalClock(Physical(1.0))          # frozen physical clock: all from the counter
    stamps = []

    def issue():
        local = [clock.now() for _ in range(3000)]
        stamps.extend(local)
        assert local == sorted(local)

    threads = [threading.Thread(target=issue) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(stamps)) == 12000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["local", "send", "receive"]),
                          st.integers(-3000, 3000)), min_size=1, max_size=60))
def test_hlc_orders_causally_related_events(steps):
    """Three nodes with skewed, jumping physical clocks exchange messages; every event
    that happened before another (program order or a message) has a smaller stamp."""
    physical = [Physical(1000.0 + skew) for skew in (0, 30, -30)]
    clocks = [HybridLogicalClock(p) for p in physical]
    last_event = [None, None, None]             # each node's latest (stamp, causal past)
    in_flight = []                              # (stamp, causal past) of messages sent
    for node, kind, jump_ms in steps:
        physical[node].seconds += jump_ms / 1000          # may go backwards
        past = set() if last_event[node] is None else {last_event[node][0]} | last_event[node][1]
        if kind == "receive" and in_flight:
            message, message_past = in_flight.pop(0)
            stamp = clocks[node].update(message)
            past |= {message} | message_past
        else:
            stamp = clocks[node].now()
            if kind == "send":
                in_flight.append((stamp, past))
        assert all(earlier < stamp for earlier in past)
        last_event[node] = (stamp, past)
