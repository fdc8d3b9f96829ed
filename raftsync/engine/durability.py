"""Crash-safe hand-over between PySyncObj's snapshot file and its journal.

PySyncObj 0.3.17 compacts its log in two steps: the snapshot of the state up to entry L
is written to ``snapshot.bin.tmp`` and renamed over ``snapshot.bin`` (in a forked child
for the process engine); on a later tick the journal is truncated to start at L-1 by
*rewriting it in place* (``FileJournal.deleteEntriesTo``: reset the end marker, then
append every remaining entry again). At restart ``__loadDumpFile`` keeps the journal
only if its first two entries are exactly the snapshot's last two; otherwise it clears
the journal down to those two. Two crash windows therefore drop entries after L that
were already committed and acknowledged:

- the process dies after the snapshot is replaced and before the journal is truncated:
  the journal still starts before L-1, so the restart clears it;
- the process dies during the in-place rewrite: the file then holds only the entries
  re-appended so far.

``DurabilityMixin`` closes both windows: the journal is rewritten into a temporary file
that replaces the old one atomically (a crash leaves the old journal or the new one),
and at restart a journal that still runs from before the snapshot point is trimmed to
it instead of being cleared. It also ties the snapshot child to its engine, so a
snapshot started by a dead engine cannot land after its successor started.

The journal file may thus hold a prefix of entries the FileJournal no longer lists
(after a restart, or when a rewrite failed): appends and ``deleteEntriesFrom`` work
from the end of the file, so that prefix is inert; the next compaction drops it from
the file and a restart before that trims it again.

Process crashes only: like PySyncObj's mmap journal, nothing here is fsync'd, so a
power loss may still lose recent writes (README, "Durability").
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import struct
import threading
from typing import Any

from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET, FileJournal, ResizableFile
from pysyncobj.pickle import to_bytes

log = logging.getLogger("raftsync.engine.durability")


class DurabilityMixin:
    """Goes before ``SyncObj`` in the bases; overrides two name-mangled SyncObj methods.

    pysyncobj is pinned exactly (==0.3.17), so these internals do not move under us.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        conf = args[2] if len(args) > 2 else kwargs.get("conf")
        if conf is not None and conf.useFork and conf.fullDumpFile:
            # Before SyncObj starts its tick thread, which is what forks.
            _kill_snapshot_children_with_engine()
        super().__init__(*args, **kwargs)

    def _SyncObj__deleteEntriesTo(self, toIDx: int) -> None:
        # Called once a snapshot up to toIDx+1 is on disk: drop the entries before toIDx.
        # PySyncObj rewrites the journal in place, so a crash mid-rewrite loses the tail;
        # we write the kept entries to a new file and rename it over the old one.
        journal = self._SyncObj__raftLog
        if not isinstance(journal, FileJournal):
            super()._SyncObj__deleteEntriesTo(toIDx)
            return
        drop = toIDx - journal[0][1]
        if drop <= 0:
            return
        if not _replace_journal(journal, drop):
            _forget_prefix(journal, drop)  # the file keeps it; see the module docstring

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        # clearJournal=True: a snapshot received from the leader replaces the whole log
        # (Raft InstallSnapshot); replication.py installs one only when our log does not
        # hold its last entry, so clearing loses nothing that can be committed.
        # clearJournal=False: our own snapshot at start. If the journal still begins
        # before the snapshot point (we died before truncating it), PySyncObj would clear
        # it and lose every entry after the snapshot: trim it to that point first (in
        # memory; the next compaction rewrites the file), so the original finds the
        # journal starting with the snapshot's last two entries and keeps it. Costs one
        # extra read of the snapshot, once, at start.
        if not clearJournal:
            self._trim_journal_to_snapshot()
        super()._SyncObj__loadDumpFile(clearJournal)

    def _trim_journal_to_snapshot(self) -> None:
        journal = self._SyncObj__raftLog
        if not isinstance(journal, FileJournal) or len(journal) < 2:
            return
        try:
            snapshot = self._SyncObj__serializer.deserialize()
            before, last = snapshot[2], snapshot[1]  # entries L-1 and L, as (command, index, term)
        except Exception:
            return  # unreadable: the original load logs it and keeps the journal
        position = before[1] - journal[0][1]
        if position <= 0 or position + 2 > len(journal):
            return
        # Same index and term means the same entry (Raft's log matching property).
        if (journal[position][1:3] == tuple(before[1:3])
                and journal[position + 1][1:3] == tuple(last[1:3])):
            log.warning("the journal still holds %d entries from before the snapshot point %d (the "
                        "process stopped before truncating it); skipping them", position, last[1])
            _forget_prefix(journal, position)


def _forget_prefix(journal: FileJournal, drop: int) -> None:
    """Drop the first ``drop`` entries from the FileJournal's list, not from its file."""
    journal._FileJournal__journal = journal._FileJournal__journal[drop:]


def _replace_journal(journal: FileJournal, drop: int) -> bool:
    """Make ``journal`` hold its entries from position ``drop`` on, crash-safely.

    Writes the file format of ``FileJournal`` (header with the end offset, then
    ``size | index term command | size`` records) to ``<journal>.tmp`` and renames it
    over the journal, then points the FileJournal at the new file. On an I/O error the
    old file stays as it is, the error is logged and False returned: this runs on the
    tick thread, which must not raise.
    """
    old_file: ResizableFile = journal._FileJournal__journalFile
    path = old_file._ResizableFile__fileName
    kept = journal._FileJournal__journal[drop:]
    body = bytearray()
    for command, index, term in kept:
        record = struct.pack("<QQ", index, term) + to_bytes(command)
        size = struct.pack("<I", len(record))
        body += size + record + size
    end = FIRST_RECORD_OFFSET + len(body)
    header = journal._FileJournal__getDefaultHeader()
    header = header[:LAST_RECORD_OFFSET_OFFSET] + struct.pack("<I", end)
    temporary = path + ".tmp"
    new_file = None
    try:
        with open(temporary, "wb") as handle:
            handle.write(header)
            handle.write(body)
        # Mapped before the rename, so nothing can fail once the new file is in place
        # (an old mapping kept after the rename would take appends into an unlinked file).
        new_file = ResizableFile(temporary)
        os.replace(temporary, path)  # atomic: the old journal or the new one, never a mix
    except (OSError, ValueError):
        log.exception("could not rewrite the journal %s; its file keeps the compacted entries", path)
        if new_file is not None:
            _close_without_sync(new_file)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return False
    new_file._ResizableFile__fileName = path  # it reopens by name if mmap.resize fails
    journal._FileJournal__journalFile = new_file
    journal._FileJournal__journal = kept
    journal._FileJournal__currentOffset = end
    _close_without_sync(old_file)  # unlinked by the rename
    return True


def _close_without_sync(resizable: ResizableFile) -> None:
    # ResizableFile._destroy msyncs first: a synchronous disk write nothing here needs.
    try:
        resizable._ResizableFile__mm.close()
        resizable._ResizableFile__f.close()
    except (OSError, ValueError):
        pass


_fork_hook_lock = threading.Lock()
_fork_hook_pid: int | None = None
_prctl: Any = None


def _kill_snapshot_children_with_engine() -> None:
    """Make every child this process forks (PySyncObj's snapshot writer) die with it.

    A forked child does not inherit PR_SET_PDEATHSIG. Without this, a snapshot child
    whose engine crashed keeps writing ``snapshot.bin.tmp`` and renames it into place
    later, possibly while the restarted engine writes the same temporary file, or over
    a newer snapshot after the new engine truncated its journal past it.
    """
    global _fork_hook_pid, _prctl
    with _fork_hook_lock:
        if _fork_hook_pid is not None:
            return
        try:
            # Resolved here: loading a library in the child of a threaded process can hang.
            _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        except (OSError, AttributeError):
            log.warning("no prctl: a snapshot child may outlive a crashed engine")
            return
        _fork_hook_pid = os.getpid()
        os.register_at_fork(after_in_child=_die_with_parent)


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _fork_hook_pid:
        os._exit(1)  # the engine died between fork and prctl
