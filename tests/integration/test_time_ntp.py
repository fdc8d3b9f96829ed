"""NtpClock against real NTP servers on loopback that the tests start (cluster/ntp.py),
and chronyd where it is installed; node.time / node.hlc() on a single in-process node."""

import os
import shutil
import subprocess
import threading
import time

import pytest

from cluster.launcher import free_ports
from cluster.ntp import NtpResponder
from raftsync import ClockUnsynchronized, Node, NtpClock
from raftsync.errors import Closed, ConfigError
from raftsync.time import LocalClock

from .util import wait_for

TRUE_OFFSET = 0.5        # every honest server's clock runs this far ahead of this host's


@pytest.fixture
def servers():
    """Factory of started responders; all closed at teardown."""
    made = []

    def make(offset=TRUE_OFFSET, **options):
        responder = NtpResponder(offset, **options).start()
        made.append(responder)
        return responder

    yield make
    for responder in made:
        responder.close()


@pytest.fixture
def clocks():
    made = []

    def make(*args, **kwargs):
        clock = NtpClock(*args, **kwargs)
        made.append(clock)
        return clock

    yield make
    for clock in made:
        clock.close()


def assert_holds_true_time(clock, offset=TRUE_OFFSET):
    """now_interval() contains this host's time + the servers' true offset."""
    before = time.time() + offset
    interval = clock.now_interval()
    after = time.time() + offset
    assert interval.earliest.timestamp() <= after and interval.latest.timestamp() >= before, \
        (interval, before, after)
    return interval


def test_offset_recovered_within_the_bound_and_falseticker_rejected(servers, clocks):
    honest = [servers(root_delay=0.02, root_dispersion=0.01) for _ in range(3)]
    liar = servers(30.0, root_delay=0.02, root_dispersion=0.01)
    clock = clocks([s.address for s in honest + [liar]], timeout=2.0)
    status = clock.poll()
    assert status.synchronized, status.problem
    assert abs(status.offset - TRUE_OFFSET) <= status.error
    assert 0.02 / 2 + 0.01 <= status.error < 0.5        # honest, and not uselessly wide
    by_name = {s.server: s for s in status.servers}
    assert by_name[liar.address].falseticker and by_name[liar.address].reachable
    assert abs(by_name[liar.address].offset - 30.0) < 0.5
    for server in honest:
        entry = by_name[server.address]
        assert entry.reachable and not entry.falseticker and entry.problem is None
        assert abs(entry.offset - TRUE_OFFSET) <= entry.error
    interval = assert_holds_true_time(clock)
    assert interval.latest.timestamp() < time.time() + 29      # the liar's time is out
    now = clock.now()
    assert abs(now.timestamp() - (time.time() + TRUE_OFFSET)) < 0.5


def test_an_asymmetric_path_stays_within_the_bound(servers, clocks):
    # Replies held 0.2 s after stamping: the measured offset is 0.1 s short, and the
    # round trip (>= 0.2 s) makes the bound cover it.
    slow = [servers(return_delay=0.2) for _ in range(3)]
    clock = clocks([s.address for s in slow], timeout=2.0)
    status = clock.poll()
    assert min(s.offset for s in status.servers) < TRUE_OFFSET - 0.05   # the answers are off...
    assert abs(status.offset - TRUE_OFFSET) <= status.error                 # ...the bound covers it
    assert_holds_true_time(clock)


def test_a_dead_server_times_out_and_is_reported(servers, clocks):
    honest = [servers() for _ in range(3)]
    dead = NtpResponder(answer=False)          # bound, never reads: the query times out
    try:
        started = time.monotonic()
        clock = clocks([dead.address] + [s.address for s in honest], timeout=0.5)
        assert_holds_true_time(clock)          # the first call waits for the first round only
        assert time.monotonic() - started < 3.0
        entry = clock.status().servers[0]
        assert not entry.reachable and entry.problem == "no answer within 0.5 s"
        assert sum(s.reachable for s in clock.status().servers) == 3
    finally:
        dead.close()


def test_only_dead_servers_never_hang_now(clocks):
    dead = [NtpResponder(answer=False) for _ in range(2)]
    closed_port = free_ports(1)[0]             # nothing listens there at all
    try:
        clock = clocks([d.address for d in dead] + [f"127.0.0.1:{closed_port}"], timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ClockUnsynchronized, match="no server gave a usable answer"):
            clock.now()
        assert time.monotonic() - started < 3.0
        with pytest.raises(ClockUnsynchronized):
            clock.now_interval()
        status = clock.status()
        assert not status.synchronized and not any(s.reachable for s in status.servers)
        assert abs(clock.physical_time() - time.time()) < 1.0
    finally:
        for responder in dead:
            responder.close()


def test_reads_do_not_wait_for_a_round_in_progress(servers, clocks):
    honest = [servers() for _ in range(3)]
    dead = NtpResponder(answer=False)
    try:
        clock = clocks([s.address for s in honest] + [dead.address], timeout=2.0)
        clock.now()                                        # first round done (about 2 s)
        answered = [s.answered for s in honest]
        polling = threading.Thread(target=clock.poll)      # a round that lasts 2 s (the dead one)
        polling.start()
        wait_for(lambda: all(s.answered > n for s, n in zip(honest, answered)), 5, "the next round to start")
        for _ in range(100):
            assert_holds_true_time(clock)
        assert polling.is_alive()                          # all 100 reads finished inside the round
        polling.join(10)
    finally:
        dead.close()


def test_disagreeing_servers_leave_the_clock_unsynchronized(servers, clocks):
    clock = clocks([servers().address, servers(30.0).address], timeout=1.0)
    with pytest.raises(ClockUnsynchronized, match="do not agree"):
        clock.now_interval()
    status = clock.status()
    assert all(s.reachable and not s.falseticker for s in status.servers)


def test_servers_going_silent_keep_the_estimate_with_a_growing_bound(servers, clocks):
    honest = [servers() for _ in range(3)]
    clock = clocks([s.address for s in honest], timeout=0.5, drift_ppm=1000)
    first = clock.poll()
    for responder in honest:
        responder.close()
    later = clock.poll()
    assert later.synchronized and "keeping the estimate" in later.problem
    assert all(not s.reachable and s.problem == "no answer within 0.5 s" for s in later.servers)
    assert later.error > first.error
    assert_holds_true_time(clock)


def test_unsynchronized_server_is_not_believed(servers, clocks):
    clock = clocks([servers(leap=3).address, servers(stratum=0).address], timeout=1.0)
    with pytest.raises(ClockUnsynchronized):
        clock.now()
    problems = [s.problem for s in clock.status().servers]
    assert "leap indicator 3" in problems[0] and "kiss-o'-death" in problems[1]


def test_node_time_and_hlc(servers, tmp_path):
    honest = [servers() for _ in range(3)]
    address = f"127.0.0.1:{free_ports(1)[0]}"
    environ = {"RAFTSYNC_NTP_SERVERS": ",".join(s.address for s in honest)}
    node = Node(address, peers=[], engine="thread", data_dir=tmp_path, environ=environ).start()
    clock = node.time
    try:
        assert isinstance(clock, NtpClock) and clock.servers == [s.address for s in honest]
        assert_holds_true_time(node.time)
        stamps = [node.hlc() for _ in range(1000)]
        assert all(a < b for a, b in zip(stamps, stamps[1:]))
        # driven by node.time: the physical part follows the NTP estimate, not the local clock
        assert abs(stamps[-1].physical_ms / 1000 - (time.time() + TRUE_OFFSET)) < 0.2
        remote = (stamps[-1].physical_ms + 60_000, 3)       # a stamp from a node a minute ahead
        merged = node.hlc(remote)
        assert merged == (remote[0], 4) and node.hlc() > merged
    finally:
        node.close()
    with pytest.raises(Closed):
        node.time
    with pytest.raises(Closed):
        node.hlc()
    with pytest.raises(Closed):                 # the node closed the clock it made
        clock.now()


def test_node_clock_argument(tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    clock = LocalClock(max_error=0.5)
    with Node(address, peers=[], engine="thread", data_dir=tmp_path, clock=clock) as node:
        assert node.time is clock
        assert node.hlc() < node.hlc()
    assert clock.now_interval()                     # the caller's clock is not closed with the node
    with pytest.raises(ConfigError):
        Node(address, peers=[], engine="thread", clock=clock, ntp_servers=["127.0.0.1:1123"])
    with pytest.raises(ConfigError):
        Node(address, peers=[], engine="thread", clock="local")
    default = Node(address, peers=[], engine="thread", data_dir=tmp_path / "d").start()
    try:
        assert isinstance(default.time, LocalClock)
    finally:
        default.close()


CHRONY_CONFIG = """\
port {port}
bindaddress 127.0.0.1
allow 127.0.0.1
local stratum 8
cmdport 0
pidfile {dir}/chronyd.pid
driftfile {dir}/drift
"""


@pytest.mark.skipif(shutil.which("chronyd") is None, reason="chronyd is not installed (apt-get install chrony)")
def test_against_chronyd(tmp_path, clocks):
    """chronyd serving its local clock on a loopback port; -x: it never touches this host's clock."""
    port = free_ports(1)[0]
    config = tmp_path / "chrony.conf"
    config.write_text(CHRONY_CONFIG.format(port=port, dir=tmp_path))
    daemon = subprocess.Popen([shutil.which("chronyd"), "-d", "-x", "-f", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        clock = clocks([f"127.0.0.1:{port}"], timeout=0.5)

        def answered():
            return clock.poll().synchronized

        wait_for(answered, 20, "chronyd to serve time")
        status = clock.status()
        assert abs(status.offset) <= status.error            # chronyd serves this host's own clock
        assert status.servers[0].stratum == 8
        assert_holds_true_time(clock, offset=0.0)
    finally:
        daemon.terminate()
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(daemon.pid, 9)
            daemon.wait(5)
