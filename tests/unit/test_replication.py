"""Raft replication rules of the engine's SyncObj, driven with crafted messages.

Each SyncObj here runs without ticks or sockets: a recording transport captures what
it sends, and tests hand messages to its message handler directly (the one the real
transport calls), so every interleaving is exact.
"""

import gzip
import os
import select

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.serializer as pysyncobj_serializer
import pytest
from pysyncobj import SyncObjConf, replicated
from pysyncobj.atomic_replace import atomicReplace as atomic_replace
from pysyncobj.serializer import Serializer
from pysyncobj.transport import Transport

from raftsync.engine.core import _RaftNode

LEADER, FOLLOWER, THIRD = "127.0.0.1:10001", "127.0.0.1:10002", "127.0.0.1:10003"
NOOP = b"\x01"  # PySyncObj's NO_OP command type: applying it does nothing


class _RecordingTransport(Transport):
    def __init__(self, syncObj, selfNode, otherNodes):
        super().__init__(syncObj, selfNode, otherNodes)
        self.nodes = {node.address: node for node in otherNodes}
        self.sent = []

    def send(self, node, message):
        self.sent.append((node.address, message))
        return True

    def take(self):
        sent, self.sent = self.sent, []
        return sent


class _Member:
    """A SyncObj of class ``cls`` plus handles on the internals a test sets up."""

    def __init__(self, cls, address, term, entries=(), commit=1, **conf):
        others = [a for a in (LEADER, FOLLOWER, THIRD) if a != address]
        self.obj = cls(address, others, SyncObjConf(autoTick=False, **conf), transportClass=_RecordingTransport)
        self.transport = self.obj._SyncObj__transport
        for idx, entry_term, command in entries:
            self.obj._SyncObj__raftLog.add(command, idx, entry_term)
        self.obj._SyncObj__setCurrentTerm(term, None)
        self.obj._SyncObj__raftCommitIndex = commit

    def receive(self, sender, message):
        self.obj._SyncObj__onMessageReceived(self.transport.nodes[sender], message)

    @property
    def log(self):
        raft_log = self.obj._SyncObj__raftLog
        return [(raft_log[i][1], raft_log[i][2]) for i in range(len(raft_log))]

    @property
    def commit(self):
        return self.obj._SyncObj__raftCommitIndex

    def replies(self):
        return [message for _, message in self.transport.take()]

    def close(self):
        if not self.closed:
            self.closed = True
            self.obj.destroy()

    closed = False


@pytest.fixture
def members():
    made = []

    def make(*args, cls=_RaftNode, **kwargs):
        member = _Member(cls, *args, **kwargs)
        made.append(member)
        return member

    yield make
    for member in made:
        member.close()


def _entries(first, last, term, size=1):
    return [(idx, term, NOOP + b"x" * (size - 1)) for idx in range(first, last + 1)]


def _append(term, prev, prev_term, entries, commit):
    return {"type": "append_entries", "term": term, "commit_index": commit, "prevLogIdx": prev,
            "prevLogTerm": prev_term, "entries": [(command, idx, t) for idx, t, command in entries]}


# -- follower: Raft AppendEntries rules 3-5 ------------------------------------------------


def test_a_stale_duplicate_append_keeps_the_entries_acknowledged_since(members):
    follower = members(FOLLOWER, term=1)
    follower.receive(LEADER, _append(1, 1, 0, _entries(2, 6, 1), commit=1))
    assert follower.replies()[-1]["next_node_idx"] == 7  # acknowledged up to 6
    # The same leader's earlier append arrives again, late (delayed or duplicated).
    follower.receive(LEADER, _append(1, 1, 0, _entries(2, 3, 1), commit=1))
    assert follower.log == [(1, 0)] + [(i, 1) for i in range(2, 7)]
    reply = follower.replies()[-1]
    assert reply["success"] and reply["next_node_idx"] == 4  # what that append matched


def test_entries_are_replaced_from_the_first_conflict_only(members):
    follower = members(FOLLOWER, term=1, entries=_entries(2, 5, 1))
    follower.receive(LEADER, _append(2, 2, 1, _entries(3, 3, 1) + _entries(4, 6, 2), commit=1))
    assert follower.log == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert follower.replies()[-1]["next_node_idx"] == 7


def test_commit_stops_at_the_last_entry_the_append_matched(members):
    # An old-term tail 4..8 beyond what this heartbeat checked (3).
    follower = members(FOLLOWER, term=1, entries=_entries(2, 8, 1))
    follower.receive(LEADER, _append(2, 3, 1, [], commit=100))
    assert follower.commit == 3
    assert len(follower.log) == 8  # nothing conflicted, nothing deleted


def test_an_append_while_the_leaders_snapshot_is_not_ready_commits_nothing(members):
    follower = members(FOLLOWER, term=1, entries=_entries(2, 8, 1), commit=2)
    follower.receive(LEADER, {"type": "append_entries", "term": 2, "commit_index": 500, "serialized": None})
    assert follower.commit == 2  # the old-term tail 3..8 was never matched with the leader
    assert follower.obj._getLeader().address == LEADER and follower.obj.raftCurrentTerm == 2


def test_every_refusal_names_the_entry_after_the_commit_index(members):
    follower = members(FOLLOWER, term=1, entries=_entries(2, 8, 1), commit=3)
    follower.receive(LEADER, _append(2, 12, 2, [], commit=20))  # lacks 12
    follower.receive(LEADER, _append(2, 6, 2, [], commit=20))  # holds 6 with another term
    replies = follower.replies()
    assert [(r["success"], r["reset"], r["next_node_idx"]) for r in replies] == [(False, True, 4)] * 2
    assert all(r["term"] == 2 and r["last_log_idx"] == 8 for r in replies)
    assert follower.commit == 3


def test_an_append_of_an_older_term_is_ignored(members):
    follower = members(FOLLOWER, term=3, entries=_entries(2, 4, 3))
    follower.receive(LEADER, _append(2, 1, 0, _entries(2, 2, 2), commit=2))
    assert follower.replies() == [] and follower.log == [(1, 0), (2, 3), (3, 3), (4, 3)]


# -- follower: installing the leader's snapshot ----------------------------------------------


def _snapshot_chunks(directory, last, term, value, leader_term=None):
    """The append_entries a leader (of ``leader_term``, default ``term``) sends for its
    snapshot of the state ``{"value": value}`` up to entry ``last`` of ``term``, made and
    cut in chunks by PySyncObj's own Serializer."""
    serializer = Serializer(os.path.join(directory, "leader-snapshot.bin"), 64, False, None, None, None)
    entries = [(NOOP, last - 1, term), (NOOP, last, term)]  # (command, index, term)
    serializer.serialize(({"value": value}, entries[1], entries[0], set()), last - 1)
    serializer.checkSerializing()  # written (no fork): ready to send
    chunks = []
    while not chunks or not chunks[-1][2]:
        chunks.append(serializer.getTransmissionData("follower"))
    assert len(chunks) > 2  # several chunks with data, then the empty last one
    return [{"type": "append_entries", "term": leader_term or term, "commit_index": last, "serialized": chunk}
            for chunk in chunks]


def _own_snapshot(follower):
    """What this follower's own snapshot holds: its file, or its in-memory buffer."""
    serializer = follower.obj._SyncObj__serializer
    path = serializer._Serializer__fileName
    if path is None:
        return serializer._Serializer__inMemorySerializedData
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("on_disk", [True, False], ids=["snapshot-file", "in-memory"])
@pytest.mark.parametrize("stale_last", [10, 20], ids=["older", "same-point"])
def test_a_stale_snapshot_is_ignored_and_a_newer_one_installs(members, tmp_path, on_disk, stale_last):
    data_dir = tmp_path / "follower"
    data_dir.mkdir()
    follower = members(FOLLOWER, term=1, fullDumpFile=str(data_dir / "snapshot.bin") if on_disk else None)
    stale = _snapshot_chunks(str(tmp_path), stale_last, 1, "stale state")
    newer = _snapshot_chunks(str(tmp_path), 20, 1, "state at 20")
    newest = _snapshot_chunks(str(tmp_path), 30, 1, "state at 30")
    for message in newer:
        follower.receive(LEADER, message)
    assert follower.obj.value == "state at 20" and follower.log == [(19, 1), (20, 1)]
    follower.receive(LEADER, _append(1, 20, 1, _entries(21, 25, 1), commit=25))  # acknowledged
    own_snapshot = _own_snapshot(follower)
    follower.replies()

    # A delayed or duplicated snapshot, not newer than what this follower applied (20).
    for message in stale:
        follower.receive(LEADER, message)
    assert follower.obj.value == "state at 20"
    assert follower.log == [(19, 1), (20, 1)] + [(i, 1) for i in range(21, 26)]
    assert _own_snapshot(follower) == own_snapshot
    assert os.listdir(data_dir) == (["snapshot.bin"] if on_disk else [])  # no received temp file left
    reply = follower.replies()[-1]
    assert reply["success"] and reply["next_node_idx"] == 26  # resume after our committed entries

    for message in newest:
        follower.receive(LEADER, message)
    assert follower.obj.value == "state at 30" and follower.log == [(29, 1), (30, 1)]
    assert _own_snapshot(follower) != own_snapshot
    reply = follower.replies()[-1]
    assert reply["success"] and reply["next_node_idx"] == 31


def test_a_snapshot_that_cannot_be_read_replaces_nothing_and_is_asked_for_again(members, tmp_path):
    data_dir = tmp_path / "follower"
    data_dir.mkdir()
    follower = members(FOLLOWER, term=1, fullDumpFile=str(data_dir / "snapshot.bin"))
    for message in _snapshot_chunks(str(tmp_path), 20, 1, "state at 20"):
        follower.receive(LEADER, message)
    own_snapshot = _own_snapshot(follower)
    follower.replies()
    garbled = _snapshot_chunks(str(tmp_path), 30, 1, "state at 30")
    garbled[1]["serialized"] = (b"\0" * 64, False, False)
    for message in garbled:
        follower.receive(LEADER, message)
    assert follower.obj.value == "state at 20" and follower.log == [(19, 1), (20, 1)]
    assert _own_snapshot(follower) == own_snapshot and os.listdir(data_dir) == ["snapshot.bin"]
    reply = follower.replies()[-1]
    assert not reply["success"] and reply["reset"] and reply["next_node_idx"] == 21


class _ValueNode(_RaftNode):
    """A member whose state is the one value its applied entries set: entry i sets
    "state at i", which is what a snapshot of ``_snapshot_chunks`` up to i holds."""

    value = None

    @replicated
    def set_value(self, value):
        self.value = value


def _add_value_entries(member, first, last, term):
    obj = member.obj
    func_id = obj._methodToID[obj._getFuncName("set_value")]
    for idx in range(first, last + 1):
        command = b"\x00" + pysyncobj_pickle.dumps((func_id, [f"state at {idx}"]))  # REGULAR command
        obj._SyncObj__raftLog.add(command, idx, term)


def _tick(member):
    """One tick of the member's SyncObj (it applies committed entries there)."""
    member.obj._onTick(0.0)


def _compact(member):
    """The member snapshots its state at its applied entry and drops the log before it,
    as PySyncObj's compaction does (synchronously: its conf has useFork=False)."""
    member.obj._SyncObj__forceLogCompaction = True
    member.obj._SyncObj__tryLogCompaction()  # writes the snapshot
    member.obj._SyncObj__tryLogCompaction()  # sees it written, drops the entries before it


def _follower_applied_to_10_of_30(members, tmp_path, on_disk):
    """A follower holding entries 2..30 of term 1, 10 of them committed and applied, with
    its snapshot in a file (``on_disk``) or in memory; returns it and its data dir."""
    data_dir = tmp_path / "follower"
    data_dir.mkdir()
    follower = members(FOLLOWER, term=1, commit=10, cls=_ValueNode, useFork=False,
                       fullDumpFile=str(data_dir / "snapshot.bin") if on_disk else None)
    _add_value_entries(follower, 2, 30, term=1)
    _tick(follower)
    return follower, data_dir


@pytest.mark.parametrize("on_disk", [True, False], ids=["snapshot-file", "in-memory"])
def test_a_snapshot_ending_at_an_entry_the_log_holds_keeps_the_entries_after_it(members, tmp_path, on_disk):
    # This follower holds 2..30 (acknowledged to the leader of term 1) but knows only 10
    # committed; it applied 10 and compacted there. The leader of term 2 compacted at
    # its applied entry 20 and sends its snapshot (this follower refused an append).
    follower, data_dir = _follower_applied_to_10_of_30(members, tmp_path, on_disk)
    _compact(follower)
    assert follower.obj.value == "state at 10" and follower.log[0] == (9, 1)
    own_snapshot = _own_snapshot(follower)

    for message in _snapshot_chunks(str(tmp_path), 20, 1, "state at 20", leader_term=2):
        follower.receive(LEADER, message)
    assert follower.log == [(i, 1) for i in range(9, 31)]  # 21..30 kept
    assert follower.commit == 20
    reply = follower.replies()[-1]
    assert reply["success"] and reply["next_node_idx"] == 21 and reply["term"] == 2
    assert _own_snapshot(follower) == own_snapshot
    assert os.listdir(data_dir) == (["snapshot.bin"] if on_disk else [])  # no received temp file left

    _tick(follower)
    assert follower.obj.raftLastApplied == 20 and follower.obj.value == "state at 20"  # the snapshot's state


@pytest.mark.parametrize("on_disk", [True, False], ids=["snapshot-file", "in-memory"])
def test_a_snapshot_ending_at_an_entry_of_another_term_installs(members, tmp_path, on_disk):
    follower, _ = _follower_applied_to_10_of_30(members, tmp_path, on_disk)  # 11..30: term 2 rewrote them
    for message in _snapshot_chunks(str(tmp_path), 20, 2, "state at 20 of term 2"):
        follower.receive(LEADER, message)
    assert follower.obj.value == "state at 20 of term 2" and follower.log == [(19, 2), (20, 2)]
    assert follower.commit == 20 and follower.obj.raftLastApplied == 20
    reply = follower.replies()[-1]
    assert reply["success"] and reply["next_node_idx"] == 21


def test_a_snapshot_is_not_installed_under_our_own_compactions_rename(members, tmp_path, monkeypatch):
    # The follower's own compaction forks a child that writes an older snapshot and
    # renames it into place last. Here the child's rename is held back until after the
    # leader's snapshot arrived: had that snapshot been installed, the child would put the
    # older one back over it, and a restart would clear the journal down to it, losing
    # entries acknowledged after the install.
    let_rename, go = os.pipe()  # the forked child inherits both ends
    own_tmp = str(tmp_path / "snapshot.bin.tmp")

    def rename_when_let(source, destination):
        if source == own_tmp:  # in the forked child: our own compaction
            select.select([let_rename], [], [], 10)
        return atomic_replace(source, destination)

    monkeypatch.setattr(pysyncobj_serializer, "atomicReplace", rename_when_let)
    snapshot, journal = str(tmp_path / "snapshot.bin"), str(tmp_path / "journal.bin")
    follower = members(FOLLOWER, term=1, commit=10, cls=_ValueNode, useFork=True, fullDumpFile=snapshot,
                       journalFile=journal)
    _add_value_entries(follower, 2, 15, term=1)
    _tick(follower)  # applies up to 10
    follower.obj._SyncObj__forceLogCompaction = True
    follower.obj._SyncObj__tryLogCompaction()  # forks the child: a snapshot at 10
    serializer = follower.obj._SyncObj__serializer
    assert serializer._Serializer__pid > 0
    chunks = _snapshot_chunks(str(tmp_path), 20, 2, "state at 20 of term 2")  # lacks (20, 2): installs
    for message in chunks:
        follower.receive(LEADER, message)

    def child_reaped():
        child = serializer._Serializer__pid
        if child > 0:
            pidfd = os.pidfd_open(child)  # readable once the child has exited
            try:
                select.select([pidfd], [], [], 10)
            finally:
                os.close(pidfd)
            serializer.checkSerializing()  # what the tick does: reaps it
        return serializer._Serializer__pid == 0

    if not follower.replies()[-1]["success"]:  # asked again: the child is stopped first
        assert child_reaped(), "the compaction child was not stopped"
        # Until the snapshot is in, the tick starts no new compaction (one would make the
        # resent snapshot wait again, for as long as the log stays long).
        follower.obj._SyncObj__forceLogCompaction = True
        follower.obj._SyncObj__tryLogCompaction()
        assert serializer._Serializer__pid == 0, "a new compaction started under the awaited install"
        for message in chunks:  # the leader's next send
            follower.receive(LEADER, message)
    assert follower.obj.value == "state at 20 of term 2" and follower.log == [(19, 2), (20, 2)]
    follower.receive(LEADER, _append(2, 20, 2, _entries(21, 25, 2), commit=20))
    assert follower.replies()[-1] == {"type": "next_node_idx", "next_node_idx": 26, "reset": False,
                                      "success": True, "term": 2}
    os.write(go, b"go")  # a child still running renames now, after the install
    assert child_reaped()
    with gzip.open(snapshot) as on_disk:
        assert pysyncobj_pickle.load(on_disk)[1][1:] == (20, 2)
    follower.obj._SyncObj__raftLog.flush()
    follower.close()
    os.close(let_rename)
    os.close(go)

    restarted = members(FOLLOWER, term=2, cls=_ValueNode, useFork=False, fullDumpFile=snapshot, journalFile=journal)
    restarted.obj._SyncObj__loadDumpFile(clearJournal=False)  # what its first tick does
    assert restarted.log[-1] == (25, 2), "acknowledged entries lost across the restart"
    assert restarted.obj.value == "state at 20 of term 2"


def test_the_leader_resumes_appends_after_a_snapshot_the_follower_kept(members):
    # Upstream's leader side: after its last snapshot chunk, and on the follower's
    # reply, it must send the append after the snapshot, not the snapshot again.
    leader = members(LEADER, term=1, commit=20, cls=_ValueNode, useFork=False)
    _add_value_entries(leader, 2, 30, term=1)
    _tick(leader)
    _compact(leader)  # its log starts at 19, its snapshot ends at 20
    leader.obj._SyncObj__setCurrentTerm(2, None)
    leader.obj._SyncObj__onBecomeLeader()  # appends its no-op at 31
    leader.transport.take()
    follower = members(FOLLOWER, term=1, commit=5, cls=_ValueNode)
    _add_value_entries(follower, 2, 25, term=1)  # lacks 26..30: refuses the first append

    leader_node = follower.transport.nodes[LEADER]
    leader.obj._SyncObj__onNodeConnected(leader.transport.nodes[FOLLOWER])
    snapshots_sent = 0
    for _ in range(4):
        leader.obj._SyncObj__sendAppendEntries()
        for address, message in leader.transport.take():
            if address == FOLLOWER:
                serialized = message.get("serialized")
                snapshots_sent += bool(serialized and serialized[2])  # its last chunk
                follower.obj._SyncObj__onMessageReceived(leader_node, message)
        for _, message in follower.transport.take():
            leader.receive(FOLLOWER, message)
    assert snapshots_sent == 1
    assert follower.log[-13:] == leader.log  # 19..31
    assert _indices(leader) == (32, 31)
    _tick(follower)  # the leader's commit index is still 20 (it has not ticked)
    assert follower.obj.raftLastApplied == 20 and follower.obj.value == "state at 20"


# -- leader: handling the follower's reply --------------------------------------------------


def _leader(members, last=40, term=2):
    leader = members(LEADER, term=term, entries=_entries(2, last, term))
    leader.obj._SyncObj__onBecomeLeader()  # appends its no-op at last + 1
    leader.transport.take()
    return leader


def _indices(leader, address=FOLLOWER):
    node = leader.transport.nodes[address]
    return leader.obj._SyncObj__raftNextIndex[node], leader.obj._SyncObj__raftMatchIndex[node]


def _reply(term, next_idx, success, **extra):
    return {"type": "next_node_idx", "next_node_idx": next_idx, "success": success, "reset": not success,
            "term": term, **extra}


def test_a_refusal_never_moves_next_index_to_what_the_follower_confirmed(members):
    leader = _leader(members)
    leader.receive(FOLLOWER, _reply(2, 31, True))
    assert _indices(leader) == (31, 30)
    leader.receive(FOLLOWER, _reply(2, 5, False, last_log_idx=35))  # stale: before that ack
    assert _indices(leader) == (31, 30)
    leader.receive(FOLLOWER, _reply(2, 36, False, last_log_idx=35))
    assert _indices(leader) == (36, 30)


def test_replies_of_another_term_are_ignored(members):
    leader = _leader(members, term=3)
    before = _indices(leader)
    leader.receive(FOLLOWER, _reply(2, 20, True))
    leader.receive(FOLLOWER, _reply(2, 3, False, last_log_idx=2))
    assert _indices(leader) == before


def test_a_follower_that_lost_acknowledged_entries_is_resent_them(members):
    leader = _leader(members)
    leader.receive(FOLLOWER, _reply(2, 31, True))
    # Restarted without a journal: it holds only its first entry now.
    leader.receive(FOLLOWER, _reply(2, 2, False, last_log_idx=1))
    assert _indices(leader) == (2, 1)


# -- a diverged follower catches up under pipelining ---------------------------------------


def _run_rounds(leader, follower, rounds, sends_per_round, grow):
    """Each round the leader sends ``sends_per_round`` times (appending ``grow`` new
    entries before each send, as under load) before the follower's replies to any of
    them arrive: several appends per round trip. Returns the round the follower's log
    equalled the leader's, or None."""
    leader_node = follower.transport.nodes[LEADER]
    leader.obj._SyncObj__onNodeConnected(leader.transport.nodes[FOLLOWER])
    term = leader.obj.raftCurrentTerm
    for round_number in range(1, rounds + 1):
        for _ in range(sends_per_round):
            for _ in range(grow):
                last = leader.log[-1][0]
                leader.obj._SyncObj__raftLog.add(NOOP + b"y" * 99, last + 1, term)
            leader.obj._SyncObj__sendAppendEntries()
        for address, message in leader.transport.take():
            if address == FOLLOWER:
                follower.obj._SyncObj__onMessageReceived(leader_node, message)
        for _, message in follower.transport.take():
            leader.receive(FOLLOWER, message)
        if follower.log == leader.log:
            return round_number
    return None


@pytest.mark.parametrize("entry_size, sends_per_round, grow", [
    (8 * 1024, 1, 0),  # a backlog of many 64 KiB batches, sent in one go
    (100, 2, 1),  # small entries, steady load: two sends per round trip
])
def test_a_diverged_follower_catches_up_when_appends_are_pipelined(members, entry_size, sends_per_round, grow):
    common = _entries(2, 20, 1)
    # The follower led term 1 and took entries 21..60 that were never committed; the
    # leader of term 2 wrote 21..300 meanwhile.
    follower = members(FOLLOWER, term=1, entries=common + _entries(21, 60, 1, entry_size), commit=20)
    leader = members(LEADER, term=2, entries=common + _entries(21, 300, 2, entry_size), commit=280)
    leader.obj._SyncObj__onBecomeLeader()
    leader.transport.take()
    caught_up_in = _run_rounds(leader, follower, rounds=30, sends_per_round=sends_per_round, grow=grow)
    assert caught_up_in is not None and caught_up_in <= 3, f"not caught up after 30 rounds ({caught_up_in})"
    assert follower.commit >= 280
