"""Log replication under faults, with real node processes (engine/replication.py).

Faults come from the engines' test hooks (engine/faults.py): each acts on the Raft
messages a member receives, so TCP connections stay up while a member is cut off, and
a held message outlives its sender. After every fault the cluster must be live again:
each member catches up and answers writes, linearizable reads and lock acquires.
"""

import threading
import time

import pytest

from cluster.launcher import AgentError
from raftsync.errors import NotFound, RaftsyncError
from tests.integration.util import events, wait_for

VALUE = b"v" * 1024  # several 64 KiB append batches build up while a member is cut off


def cut(cluster, member):
    """Drop every Raft message between ``member`` and the others (both directions)."""
    others = [n for n in cluster.nodes if n is not member and n.running]
    member.call("test_hook", name="cut", args={"peers": [n.address for n in others]})
    for node in others:
        node.call("test_hook", name="cut", args={"peers": [member.address]})


def heal(cluster):
    for node in cluster.nodes:
        if node.running:
            node.call("test_hook", name="cut", args={"peers": []})


def leader_among(nodes, timeout=15):
    """A member of ``nodes`` that is the Raft leader (others may still think they lead)."""
    found = []

    def one_leads():
        for node in nodes:
            if node.call("status")["role"] == "leader":
                found.append(node)
                return True
        return False

    wait_for(one_leads, timeout, "a leader among " + ", ".join(n.address for n in nodes))
    return found[-1]


def commit_index(cluster):
    """The highest commit index any running member reports."""
    return max(n.call("status")["commit_index"] for n in cluster.nodes if n.running)


def wait_caught_up(cluster, timeout, target=None):
    """Wait until every running member applied ``target`` (default: what any member has
    committed now); returns the seconds it took."""
    started = time.monotonic()
    running = [n for n in cluster.nodes if n.running]
    target = commit_index(cluster) if target is None else target
    applied = {}

    def all_applied():
        for node in running:
            applied[node.address] = node.call("status")["applied_index"]
        return all(index >= target for index in applied.values())

    try:
        wait_for(all_applied, timeout, f"every member to apply index {target}")
    except AssertionError:
        raise AssertionError(f"not caught up with index {target} after {timeout}s: applied {applied}") from None
    return time.monotonic() - started


def assert_live(cluster, tag):
    """Every running member answers a write, linearizable reads of every member's write,
    and can acquire (and release) one shared lock."""
    running = [n for n in cluster.nodes if n.running]
    written = {}
    for node in running:
        key = f"live/{tag}/{node.index}"
        written[key] = node.call("kv_write", key=key, value=b"%d" % node.index, timeout=10)[1]
    for node in running:
        for key, revision in written.items():
            assert node.call("kv_read", key=key, timeout=10)[2] == revision, f"{node.address} reading {key}"
    for node in running:
        handle = f"live-{tag}-{node.index}"
        node.call("lock_acquire", handle=handle, name=f"live/{tag}", timeout=10)
        node.call("lock_release", handle=handle)


class Load:
    """Writers on the given members at ``rate`` writes/s in all; failures (timeouts while
    a member is cut off) are counted, acknowledged keys remembered. Bounded in time."""

    def __init__(self, nodes, rate, max_seconds, value=VALUE):
        self.acknowledged = {}
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        interval = len(nodes) / rate
        self._threads = [threading.Thread(target=self._write, args=(node, interval, max_seconds, value), daemon=True)
                         for node in nodes]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _write(self, node, interval, max_seconds, value):
        end = time.monotonic() + max_seconds
        i = 0
        while not self._stop.is_set() and time.monotonic() < end:
            started = time.monotonic()
            key = f"load/{node.index}/{i}"
            i += 1
            try:
                revision = node.call("kv_write", key=key, value=value, timeout=1, rpc_timeout=5)[1]
                with self._lock:
                    self.acknowledged[key] = revision
            except (RaftsyncError, AgentError):
                with self._lock:
                    self.failed += 1
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))


# -- item 12: a diverged follower catches up under steady load -----------------------------


def _cut_leader_under_load_then_heal(cluster, restart_during_cut=False):
    """The leader is cut off while it keeps taking writes (so its log grows a tail the
    others never see) and the others elect a new leader and write on; then heal, with
    ~100 writes/s going on throughout. Returns the seconds until every member caught up."""
    old_leader = cluster.leader()
    others = [n for n in cluster.nodes if n is not old_leader]
    with Load(cluster.nodes, rate=100, max_seconds=60) as load:
        wait_for(lambda: len(load.acknowledged) >= 50, 15, "load running")
        cut(cluster, old_leader)
        before_cut = old_leader.call("status")
        new_leader = leader_among(others)
        # Both sides take writes for a while: the old leader into a tail of its own.
        others_committed = new_leader.call("status")["commit_index"]
        wait_for(lambda: new_leader.call("status")["commit_index"] >= others_committed + 200, 20,
                 "the new leader committing")
        tail = old_leader.call("status")["log_length"] - before_cut["log_length"]
        assert tail > 0, "the cut-off leader took no writes of its own"
        if restart_during_cut:  # it comes back from its journal, tail and all
            old_leader.kill()
            old_leader.start()
            cut(cluster, old_leader)  # a new engine starts without hooks
        committed = commit_index(cluster)
        healed_at = time.monotonic()
        heal(cluster)
        wait_caught_up(cluster, timeout=10, target=committed)
        caught_up_in = time.monotonic() - healed_at
        if restart_during_cut:
            old_leader.call("wait_ready", timeout=10, rpc_timeout=15)
        # Still under load: writes through every member, the old leader included.
        for node in cluster.nodes:
            node.call("kv_write", key=f"after-heal/{node.index}", value=b"x", timeout=10)
    assert load.failed > 0, "the cut disturbed no write"
    print(f"old leader's own tail {tail} entries; {len(load.acknowledged)} writes acknowledged, {load.failed} failed;"
          f" caught up {caught_up_in:.2f}s after heal")
    return caught_up_in


def test_a_cut_off_leader_catches_up_under_load_3_members(make_cluster):
    cluster = make_cluster(3)
    _cut_leader_under_load_then_heal(cluster)
    wait_caught_up(cluster, timeout=10)
    assert_live(cluster, "after")


@pytest.mark.slow
@pytest.mark.parametrize("restart_during_cut", [False, True])
@pytest.mark.parametrize("run", range(2))
def test_a_cut_off_leader_catches_up_under_load_5_members(make_cluster, run, restart_during_cut):
    cluster = make_cluster(5)
    _cut_leader_under_load_then_heal(cluster, restart_during_cut)
    wait_caught_up(cluster, timeout=10)
    assert_live(cluster, "after")


# -- item 13a: a stale append must not drop acknowledged entries -----------------------------


def test_a_stale_duplicate_append_loses_no_acknowledged_write(make_cluster):
    cluster = make_cluster(3)
    leader = cluster.leader()
    follower, lagging = [n for n in cluster.nodes if n is not leader]
    cut(cluster, lagging)  # the leader needs the follower's acknowledgement to commit
    leader.call("kv_write", key="before", value=b"0")
    # The follower gets the leader's next append at once and a copy of it later.
    follower.call("test_hook", name="delay_appends",
                  args={"peers": [leader.address], "delay": None, "duplicate": True, "count": 1,
                        "with_entries": True})
    acknowledged = {}
    for i in range(10):
        acknowledged[f"w{i}"] = leader.call("kv_write", key=f"w{i}", value=b"%d" % i)[1]
    assert follower.call("test_hook", name="stats")["holding"] == 1, "no append was held"
    leader.kill()
    # The stale copy arrives after the follower acknowledged every write above.
    follower.call("test_hook", name="release_held")
    assert follower.call("test_hook", name="stats")["holding"] == 0
    heal(cluster)  # the lagging member comes back; the follower must lead it
    leader_among([follower, lagging])
    for node in (lagging, follower):
        for key, revision in acknowledged.items():
            try:
                assert node.call("kv_read", key=key, timeout=10)[2] == revision
            except NotFound:
                raise AssertionError(f"acknowledged write {key} lost (read through {node.address})") from None
    leader.start()
    wait_caught_up(cluster, timeout=15)
    assert_live(cluster, "after")


# -- item 13b: no commit of an unmatched old-term tail while the leader's snapshot is not ready


def test_an_old_term_tail_is_not_applied_while_the_leaders_snapshot_is_not_ready(make_cluster):
    cluster = make_cluster(3, compaction_min_entries=50)
    old_leader = cluster.leader()
    others = [n for n in cluster.nodes if n is not old_leader]
    old_leader.call("watch_start", name="ghosts", prefix="ghost/")
    cut(cluster, old_leader)
    log_before = old_leader.call("status")["log_length"]
    # Writes the old leader takes while cut off: an old-term tail nobody else sees.
    for i in range(5):
        with pytest.raises(RaftsyncError):
            old_leader.call("kv_write", key=f"ghost/{i}", value=b"g", timeout=0.3)
    assert old_leader.call("status")["log_length"] > log_before, "the cut-off leader logged nothing"
    new_leader = leader_among(others)
    for i in range(200):
        new_leader.call("kv_write", key=f"real/{i}", value=b"r")
    # Both others compact past the old leader's log, so it can only get a snapshot.
    wait_for(lambda: all(n.call("status")["log_length"] < 150 for n in others), 20, "compaction")
    wait_for(lambda: old_leader.call("status")["role"] != "leader", 10, "the old leader stepping down")
    # Snapshot chunks reach it as if the leader's snapshot were still being written.
    old_leader.call("test_hook", name="withhold_snapshot", args={"peers": [n.address for n in others]})
    heal(cluster)
    wait_for(lambda: old_leader.call("test_hook", name="stats")["withheld_snapshots"] >= 5, 20,
             "appends without a snapshot reaching the old leader")
    assert old_leader.call("status")["snapshots_restored"] == 0
    old_leader.call("test_hook", name="clear")
    wait_caught_up(cluster, timeout=15)
    assert old_leader.call("status")["snapshots_restored"] >= 1
    assert events(old_leader, "change", "ghosts") == [], "the old leader applied writes never committed"
    for node in cluster.nodes:
        assert node.call("kv_dump", prefix="ghost/") == []
        assert len(node.call("kv_dump", prefix="real/")) == 200
    assert_live(cluster, "after")
