"""The snapshot/journal hand-over survives a crash at any point of a log compaction.

A one-member SyncObj of the engine's class (``_RaftNode``) runs in a forked child,
ticked by hand: it applies 30 commands, then 10 more while a compaction writes the
snapshot and truncates the journal. The child dies (``os._exit``: no cleanup, like
SIGKILL; the journal's mmap writes are already in the page cache) at the k-th call
inside the hand-over code (PySyncObj's journal, serializer and compaction functions,
and ours), for k over every such call. Each time a fresh SyncObj restarts from the
files and must hold every command the child had applied (acknowledged) when it died.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from pysyncobj import SyncObjConf, SyncObjConsumer, replicated

from cluster.launcher import free_ports
from raftsync.engine.core import _RaftNode
from tests.integration.util import wait_for

BEFORE = 30   # commands applied before the compaction starts
DURING = 10   # commands applied by the ticks that compact

_HANDOVER_FILES = (os.path.join("pysyncobj", "journal.py"), os.path.join("pysyncobj", "serializer.py"),
                   os.path.join("pysyncobj", "atomic_replace.py"), os.path.join("engine", "durability.py"))
_HANDOVER_FUNCTIONS = ("__tryLogCompaction", "__deleteEntriesTo", "__loadDumpFile")


class Counter(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.applied: list[int] = []

    @replicated
    def add(self, value: int) -> int:
        self.applied.append(value)
        return len(self.applied)


def _start(directory: str, port: int) -> tuple[_RaftNode, Counter]:
    conf = SyncObjConf(journalFile=os.path.join(directory, "journal.bin"),
                       fullDumpFile=os.path.join(directory, "snapshot.bin"),
                       autoTick=False, useFork=False, appendEntriesUseBatch=False,
                       appendEntriesPeriod=0.002, raftMinTimeout=0.01, raftMaxTimeout=0.02,
                       logCompactionMinEntries=10**6, logCompactionMinTime=10**6)
    counter = Counter()
    return _RaftNode(f"127.0.0.1:{port}", [], conf, consumers=[counter]), counter


def _tick_until(node: _RaftNode, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached while ticking")
        node.doTick(0.001)


def _in_handover(frame) -> bool:
    code = frame.f_code
    return code.co_name in _HANDOVER_FUNCTIONS or code.co_filename.endswith(_HANDOVER_FILES)


def _compact_and_die(directory: str, port: int, crash_at: int | str, report: int) -> None:
    """In the child: apply, compact while applying more, die at hand-over call number
    ``crash_at`` (or on entering the function named ``crash_at``)."""
    node, counter = _start(directory, port)
    _tick_until(node, node._isLeader)
    for i in range(BEFORE):
        counter.add(i, callback=lambda result, error: None)
    _tick_until(node, lambda: len(counter.applied) == BEFORE)
    for i in range(BEFORE, BEFORE + DURING):
        counter.add(i, callback=lambda result, error: None)
    node.forceLogCompaction()
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if _in_handover(frame):
            if calls == crash_at or (event == "call" and isinstance(crash_at, str)
                                     and frame.f_code.co_name.endswith(crash_at)):
                os.write(report, pickle.dumps(("died", len(counter.applied))))
                os._exit(0)
            calls += 1

    sys.setprofile(profile)
    # Tick 1 writes the snapshot, tick 2 commits and applies the 10 (acknowledging them)
    # and truncates the journal; a few more make sure nothing is left pending.
    for _ in range(6):
        node.doTick(0)
    sys.setprofile(None)
    os.write(report, pickle.dumps(("done", len(counter.applied), calls, node._getRaftLogSize())))


def _run_child(directory: str, port: int, crash_at: int | str) -> tuple:
    os.makedirs(directory)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _compact_and_die(directory, port, crash_at, write_end)
        except BaseException as exc:
            os.write(write_end, pickle.dumps(("error", repr(exc))))
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as reader:
        outcome = pickle.loads(reader.read())
    assert outcome[0] != "error", outcome
    return outcome


def _restart(directory: str, port: int) -> list[int]:
    node, counter = _start(directory, port)
    try:
        _tick_until(node, lambda: node._isLeader() and node.raftLastApplied == node.raftCommitIndex
                    == node._SyncObj__getCurrentLogIndex())
        return list(counter.applied)
    finally:
        node.destroy()


def _crash_everywhere(tmp_path, stride: int) -> None:
    port = free_ports(1)[0]
    outcome = _run_child(str(tmp_path / "uninterrupted"), port, crash_at=10**9)
    assert outcome[0] == "done" and outcome[1] == BEFORE + DURING
    assert outcome[3] < BEFORE, "the compaction did not truncate the journal"
    crash_points = range(0, outcome[2], stride)
    losses = []
    for k in crash_points:
        directory = str(tmp_path / f"crash{k}")
        outcome = _run_child(directory, port, crash_at=k)
        acknowledged = outcome[1]
        restored = _restart(directory, port)
        # Applied in order, exactly once, and nothing acknowledged is missing.
        assert restored == list(range(len(restored)))
        if len(restored) < acknowledged:
            losses.append((k, acknowledged, len(restored)))
    assert not losses, (f"{len(losses)} of {len(crash_points)} crash points lost acknowledged commands "
                        f"(point, acknowledged, restored): {losses[:5]}")


def test_a_crash_anywhere_in_a_compaction_loses_no_acknowledged_command_sampled(tmp_path):
    _crash_everywhere(tmp_path, stride=7)


@pytest.mark.slow
def test_a_crash_anywhere_in_a_compaction_loses_no_acknowledged_command_every_point(tmp_path):
    _crash_everywhere(tmp_path, stride=1)


def test_a_journal_trimmed_at_restart_keeps_working_through_later_compactions(tmp_path):
    port = free_ports(1)[0]
    directory = str(tmp_path / "node")
    # Die as the journal truncation begins: the snapshot is replaced, all 40 commands are
    # applied, and the journal still holds everything from entry 1.
    assert _run_child(directory, port, crash_at="__deleteEntriesTo") == ("died", BEFORE + DURING)
    for round_ in range(2):
        node, counter = _start(directory, port)
        try:
            _tick_until(node, lambda: node._isLeader() and node.raftLastApplied == node.raftCommitIndex
                        == node._SyncObj__getCurrentLogIndex())
            expected = BEFORE + DURING + 5 * round_
            assert counter.applied == list(range(expected))
            for i in range(expected, expected + 5):
                counter.add(i, callback=lambda result, error: None)
            _tick_until(node, lambda: len(counter.applied) == expected + 5)
            node.forceLogCompaction()
            _tick_until(node, lambda: node._getRaftLogSize() <= 3)
        finally:
            node.destroy()


def test_a_journal_that_cannot_be_rewritten_keeps_its_file_and_the_node_keeps_applying(tmp_path, caplog):
    port = free_ports(1)[0]
    directory = tmp_path / "node"
    directory.mkdir()
    (directory / "journal.bin.tmp").mkdir()  # the rewrite's temporary file cannot be created
    node, counter = _start(str(directory), port)
    try:
        _tick_until(node, node._isLeader)
        for i in range(BEFORE):
            counter.add(i, callback=lambda result, error: None)
        _tick_until(node, lambda: len(counter.applied) == BEFORE)
        node.forceLogCompaction()
        _tick_until(node, lambda: "could not rewrite the journal" in caplog.text)
        for i in range(BEFORE, BEFORE + DURING):
            counter.add(i, callback=lambda result, error: None)
        _tick_until(node, lambda: len(counter.applied) == BEFORE + DURING)
    finally:
        node.destroy()
    assert _restart(str(directory), port) == list(range(BEFORE + DURING))


def test_a_snapshot_child_dies_with_its_engine(tmp_path):
    """PySyncObj forks a child to write the snapshot; if the engine dies, so must it,
    or it may rename an old snapshot over the files of the engine's successor."""
    script = (
        "import os, sys, time\n"
        "from raftsync.engine.durability import _kill_snapshot_children_with_engine\n"
        "_kill_snapshot_children_with_engine()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    engine = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd())
    child = None
    try:
        child = int(engine.stdout.readline())
        assert _alive(child)
        engine.send_signal(signal.SIGKILL)
        engine.wait(10)
        wait_for(lambda: not _alive(child), 10, "the snapshot child to die with its engine")
    finally:
        engine.kill()
        engine.wait(10)
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
