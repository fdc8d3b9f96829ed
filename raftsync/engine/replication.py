"""Raft log replication repaired: a mixin over PySyncObj 0.3.17's ``SyncObj``.

PySyncObj's replication breaks the things below; each is fixed in the smallest
handler that owns it (``_RaftNode(ReplicationFixes, SyncObj)`` in core.py):

1. A diverged follower can stay behind for good (livelock). The leader advances a
   follower's ``nextIndex`` optimistically on every send and a refusal set it
   unconditionally. A follower whose tail diverges refuses the first append_entries
   of a burst with "mismatch at k" (go back one) and every pipelined later one with
   "I lack prevLogIdx, send from my last + 1", so the later, stale refusals undo every
   step back; with more than one append per round trip (several 64 KiB batches, or
   steady load) it never converges. Now every refusal names one place to resume that
   stays the same until the follower's log changes: its commit index + 1 (committed
   entries are in every later leader's log, so the next append from there matches),
   and the leader never resumes at or below what the follower already confirmed
   (``matchIndex``), so stale refusals cost a resend at most, never progress.
2. A follower dropped entries it had acknowledged: any append_entries whose
   ``prevLogIdx`` matched deleted everything after it, even entries that match, so a
   delayed or duplicated (stale) append truncated acknowledged entries, which a
   leader may have counted towards a commit. Raft (AppendEntries rule 3) deletes only
   from the first entry that conflicts (same index, other term).
3. A follower committed entries it had not matched: an append_entries without
   ``prevLogIdx`` (the leader's snapshot is not ready yet) moved the commit index up
   to min(leader's commit, own last entry), so a follower with an old-term tail
   applied entries the cluster never committed. Raft (rule 5) commits only up to the
   last entry the append just matched with the leader's log.

4. A follower installed any snapshot the leader sent, however old: a delayed or
   duplicated snapshot rolled the state machine back to its point and cleared the log
   (dropping acknowledged entries), and its file had already replaced this node's own,
   newer snapshot on disk. A snapshot now installs only if it ends after the last
   entry this follower applied; an older one is discarded before it replaces anything
   and the leader is told where this follower is.
5. A follower dropped acknowledged entries installing a newer snapshot: upstream
   clears the whole log, also the entries after the snapshot's last one, which this
   follower may have acknowledged to an earlier leader that counted them towards a
   commit; a committed entry can then be left on less than a majority and a leader
   elected without it. Raft (InstallSnapshot rule 6): if the log holds the snapshot's
   last entry (same index and term), the snapshot is discarded and the log kept; the
   follower commits up to that entry, applies its own (identical) entries up to it, and
   the leader resumes right after it. Otherwise it installs as before: a log that lacks
   that entry or holds another term there has nothing after it that can be committed.
6. A follower could install a snapshot while its own compaction's forked child was
   still writing an older one; the child's rename then put the older snapshot back on
   disk, and a restart cleared the journal down to it, losing acknowledged entries
   (and as a leader it would send that older snapshot). A snapshot is installed only
   when no such child runs: a running one is killed, the leader asked again, and no
   new compaction starts until the snapshot is in (at most INSTALL_WAIT_LIMIT).

Replies also carry the follower's term, and the leader ignores replies of another
term (Raft: a response is only meaningful in the term of its request).

Everything runs on PySyncObj's tick thread. It relies on ``pysyncobj==0.3.17``
(pinned exactly): the name-mangled ``_SyncObj__*`` members; each override says which
upstream method it replaces and why. The handlers for every other message type, the
leader's sending (``__sendAppendEntries``), voting, compaction and snapshots are
upstream's.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import signal

import pysyncobj.pickle as pickle
from pysyncobj.monotonic import monotonic as monotonicTime
from pysyncobj.syncobj import _RAFT_STATE

log = logging.getLogger("raftsync.engine.replication")

# How long our own log compaction stays off while a leader's snapshot waits to install.
INSTALL_WAIT_LIMIT = 30.0


class ReplicationFixes:
    """Mix in before ``SyncObj``: replaces the follower's append_entries handling and the
    leader's handling of the follower's reply (``next_node_idx``)."""

    # Why: upstream registers this bound method with the transport; it handles every
    # Raft message in one function. Take over the two message types whose handling
    # is wrong and leave the rest (votes, forwarded commands, timeout_now) to upstream.
    def _SyncObj__onMessageReceived(self, node, message):
        kind = message['type']
        if kind == 'append_entries':
            if message['term'] >= self._SyncObj__raftCurrentTerm:
                self._followLeader(node, message)
            # (an append of an older term is ignored without a reply, as upstream)
        elif kind == 'next_node_idx':
            if self._SyncObj__raftState == _RAFT_STATE.LEADER:
                self._onFollowerReply(node, message)
        else:
            super()._SyncObj__onMessageReceived(node, message)

    # -- follower --------------------------------------------------------------------------

    def _followLeader(self, node, message):
        """Upstream's append_entries handling up to the log checks, unchanged: accept the
        sender as leader of its term and reset the leader-timeout timer."""
        if message['term'] > self._SyncObj__raftCurrentTerm:
            # A new leader at a higher term supersedes any pending transfer.
            self._SyncObj__transferInProgress = False
        if not self._SyncObj__transferInProgress:
            # While a transfer is pending, same-term heartbeats from the outgoing leader
            # must not postpone the forced vote.
            self._SyncObj__raftElectionDeadline = monotonicTime() + self._SyncObj__generateRaftTimeout()
        if self._SyncObj__raftLeader != node:
            self._SyncObj__onLeaderChanged()
        self._SyncObj__raftLeader = node
        if message['term'] > self._SyncObj__raftCurrentTerm:
            self._SyncObj__setCurrentTerm(message['term'], None)
        self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        # Only used to decide when this node is first "ready" (upstream).
        self._SyncObj__leaderCommitIndex = message['commit_index']

        if 'prevLogIdx' in message:
            self._appendEntries(node, message)
        elif message.get('serialized') is not None:
            self._installSnapshotChunk(node, message['serialized'])
        # Else the leader's snapshot is not ready (it is being written). Upstream moved
        # the commit index up to min(leader's commit, own last entry) here, although
        # nothing matched this log with the leader's: a follower holding an old-term
        # tail then applied entries the cluster never committed. Nothing to commit.

    def _appendEntries(self, node, message):
        entries = message.get('entries', [])
        transmission = message.get('transmission')
        if transmission is not None:
            # One entry larger than a batch, in pieces (upstream, unchanged).
            if transmission == 'start':
                self._SyncObj__recvTransmission = message['data']
                self._reply(node, self._SyncObj__getCurrentLogIndex() + 1, success=False, reset=False)
                return
            if transmission == 'process':
                self._SyncObj__recvTransmission += message['data']
                self._reply(node, self._SyncObj__getCurrentLogIndex() + 1, success=False, reset=False)
                return
            if transmission != 'finish':
                raise ValueError('wrong transmission type %r' % (transmission,))
            self._SyncObj__recvTransmission += message['data']
            entries = [pickle.loads(self._SyncObj__recvTransmission)]
            self._SyncObj__recvTransmission = ''

        prevLogIdx = message['prevLogIdx']
        prevEntries = self._SyncObj__getEntries(prevLogIdx, 1)
        if not prevEntries or prevEntries[0][2] != message['prevLogTerm']:
            self._refuse(node)
            return

        self._mergeEntries(entries)
        # Raft AppendEntries rule 5: commit up to the last entry this append matched
        # with the leader's log, not up to our last entry (which may be a stale tail
        # that only the next append will check).
        lastMatched = entries[-1][1] if entries else prevLogIdx
        self._raiseCommitIndex(min(message['commit_index'], lastMatched))
        self._reply(node, lastMatched + 1, success=True, reset=False)

    def _mergeEntries(self, entries):
        """Raft AppendEntries rules 3 and 4: skip entries we already have, delete from
        the first one that conflicts (same index, other term), append the rest.

        Upstream deleted every entry after ``prevLogIdx`` first, even matching ones, so
        a delayed duplicate of an earlier append made this follower drop entries it had
        already acknowledged (and logged CRITICAL "truncating already-applied log
        entries" when they were applied)."""
        raftLog = self._SyncObj__raftLog
        lastIdx = self._SyncObj__getCurrentLogIndex()
        firstIdx = raftLog[0][1]
        newFrom = len(entries)
        for position, entry in enumerate(entries):
            idx = entry[1]
            if idx > lastIdx:
                newFrom = position
                break
            if raftLog[idx - firstIdx][2] != entry[2]:
                self._deleteConflictingFrom(idx)
                newFrom = position
                break
        added = entries[newFrom:]
        for entry in added:
            raftLog.add(*entry)
        if self._SyncObj__conf.dynamicMembershipChange:
            for entry in added:
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request)

    def _deleteConflictingFrom(self, idx):
        if self._SyncObj__conf.dynamicMembershipChange:
            # Roll back cluster changes of the deleted entries (upstream).
            for entry in reversed(self._SyncObj__getEntries(idx)):
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request, reverse=True)
        if idx <= self._SyncObj__raftCommitIndex:
            # Cannot happen under Raft (committed entries never conflict); kept loud
            # as upstream, since the state machine may now differ from the others.
            log.critical('deleting committed log entries from index %d (commit index %d, last applied %d)',
                         idx, self._SyncObj__raftCommitIndex, self._SyncObj__raftLastApplied)
        self._SyncObj__deleteEntriesFrom(idx)
        if self._SyncObj__raftCommitIndex > self._SyncObj__getCurrentLogIndex():
            # As upstream: never persist a commit index past the entries we hold.
            self._SyncObj__raftCommitIndex = self._SyncObj__getCurrentLogIndex()
            self._SyncObj__raftLog.setRaftCommitIndex(self._SyncObj__raftCommitIndex)

    def _installSnapshotChunk(self, node, serialized):
        serializer = self._SyncObj__serializer
        data, isFirst, isLast = serialized
        if not isLast:
            serializer.setTransmissionData(serialized)
            return  # more chunks to come (upstream: no reply until the last)
        # Items 4 and 5 of the module doc. Upstream's last chunk completes the snapshot in one
        # step (file: renames <fullDumpFile>.1.tmp over our own snapshot file; in memory:
        # replaces our snapshot buffer), then __loadDumpFile replaces the state and clears
        # the log whatever the snapshot's point. So the last chunk's data goes in as an
        # ordinary chunk first, and the snapshot is completed only once we know it is
        # newer than what we applied and that our log lacks its last entry; an older one
        # would roll us back, and on disk a restart from it plus a journal that starts
        # later would lose entries.
        serializer.setTransmissionData((data, isFirst, False))
        if serializer._Serializer__incomingTransmissionFile is None:
            return  # out of sequence or failed to write (upstream logged it): no reply, as upstream
        snapshotLast = _received_snapshot_last_entry(serializer)
        if snapshotLast is None:
            _discard_received_snapshot(serializer)
            self._refuse(node)  # the leader sends it again
            return
        snapshotIdx, snapshotTerm = snapshotLast
        if snapshotIdx <= self._SyncObj__raftLastApplied:
            _discard_received_snapshot(serializer)
            log.info('ignoring a snapshot up to %d from %s: entries up to %d are applied already',
                     snapshotIdx, node, self._SyncObj__raftLastApplied)
            # Our position, as a refusal names it: what we hold that is committed matches
            # this leader's log, so it may count it and resume after it.
            self._reply(node, self._committedIndex() + 1, success=True, reset=False)
            return
        # Item 5 of the module doc. Entries after the last applied one are never compacted
        # away, so if we hold the snapshot's last entry it is in the log here.
        held = self._SyncObj__getEntries(snapshotIdx, 1)
        if held and held[0][2] == snapshotTerm:
            # Same index and term: our log up to it is the leader's (Log Matching), so
            # applying it reaches the snapshot's state; installing would clear the entries
            # after it, which we may have acknowledged to a leader that counted them.
            _discard_received_snapshot(serializer)
            log.info('a snapshot up to %d from %s ends at an entry this log holds; keeping the log '
                     'and committing up to it', snapshotIdx, node)
            # The snapshot is the leader's applied, hence committed, state; the tick applies it.
            self._raiseCommitIndex(snapshotIdx)
            # The leader's log starts just before its snapshot's last entry, so it can send
            # the append after it (prevLogIdx = snapshotIdx); entries we hold past it are
            # checked there and replaced from the first conflict only (item 2).
            self._reply(node, snapshotIdx + 1, success=True, reset=False)
            return
        child = serializer._Serializer__pid
        if child > 0:
            # Item 6 of the module doc: our own compaction's forked child may still rename
            # its older snapshot over the one installed here. Stop it (the tick reaps it),
            # start no new compaction until the leader's snapshot is in, and have the
            # leader send it again.
            log.info('stopping our own snapshot writer (pid %d) to install the leader\'s snapshot up to %d',
                     child, snapshotIdx)
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass  # already gone; the tick reaps it
            self._install_wanted_since = monotonicTime()
            _discard_received_snapshot(serializer)
            self._refuse(node)
            return
        if not serializer.setTransmissionData((b'', False, True)):
            return  # the rename failed (upstream logged it): no reply, as upstream
        self._install_wanted_since = None
        self._SyncObj__loadDumpFile(clearJournal=True)
        # A loaded snapshot leaves the log as [entry before it, its last entry] with that
        # last entry applied (upstream __loadDumpFile, which logs and swallows failures).
        lastIdx = self._SyncObj__getCurrentLogIndex()
        if self._SyncObj__raftLastApplied != lastIdx:
            log.warning('snapshot from the leader did not load; asking for it again')
            self._refuse(node)
            return
        # The snapshot is the leader's applied, hence committed, state.
        self._raiseCommitIndex(lastIdx)
        self._reply(node, lastIdx + 1, success=True, reset=False)

    _install_wanted_since = None  # monotonic time a snapshot install waited for our compaction

    def _SyncObj__tryLogCompaction(self):
        # Item 6 of the module doc. While the leader's snapshot waits to be installed, only
        # reap a compaction child already stopped; a new one (upstream starts one on every
        # tick while the log is long) would make every resent snapshot wait again. Bounded,
        # in case the leader never sends it again.
        since = self._install_wanted_since
        if since is not None and monotonicTime() - since < INSTALL_WAIT_LIMIT:
            if self._SyncObj__serializer._Serializer__pid > 0:
                super()._SyncObj__tryLogCompaction()  # reaps it (and starts nothing this call)
            return
        self._install_wanted_since = None
        super()._SyncObj__tryLogCompaction()

    def _raiseCommitIndex(self, index):
        if index > self._SyncObj__raftCommitIndex:
            self._SyncObj__raftCommitIndex = index
            self._SyncObj__raftLog.setRaftCommitIndex(index)

    def _refuse(self, node):
        """Refuse an append whose ``prevLogIdx`` we lack or hold with another term.

        Upstream answered "send from prevLogIdx" on a term mismatch and "send from my
        last + 1" when it lacked prevLogIdx; pipelined appends then got answers that
        contradict each other and the last one read won (item 1 of the module doc).
        Every refusal now names the entry after our commit index: the same answer
        until our log changes, and one every later leader's log agrees with (a
        committed entry is in every later leader's log), so the append sent from there
        matches. ``last_log_idx`` lets the leader notice a follower that lost entries
        it had acknowledged (only a member without a journal, restarted)."""
        lastIdx = self._SyncObj__getCurrentLogIndex()
        self._reply(node, self._committedIndex() + 1, success=False, reset=True, last_log_idx=lastIdx)

    def _committedIndex(self):
        """The last entry this follower holds that it knows to be committed."""
        # Applied entries were committed too; after a snapshot install the applied
        # index can be ahead of a commit index read back from an older journal.
        committed = max(self._SyncObj__raftCommitIndex, self._SyncObj__raftLastApplied)
        return min(committed, self._SyncObj__getCurrentLogIndex())

    def _reply(self, node, nextIdx, success, reset, **extra):
        """Upstream's ``__sendNextNodeIdx`` plus this follower's term (see the leader)."""
        message = {
            'type': 'next_node_idx',
            'next_node_idx': nextIdx,
            'reset': reset,
            'success': success,
            'term': self._SyncObj__raftCurrentTerm,
        }
        message.update(extra)
        self._SyncObj__transport.send(node, message)

    # -- leader ----------------------------------------------------------------------------

    def _onFollowerReply(self, node, message):
        term = message.get('term')
        if term is not None and term != self._SyncObj__raftCurrentTerm:
            # A reply to an append of an earlier term of ours: its indices describe
            # another leader's log. (Upstream had no term in replies.)
            return
        self._SyncObj__lastResponseTime[node] = monotonicTime()
        nextIdx = message['next_node_idx']
        matchIndex = self._SyncObj__raftMatchIndex
        nextIndex = self._SyncObj__raftNextIndex
        if message['success']:
            # As upstream: a newer acknowledgement confirms everything up to it.
            if matchIndex[node] < nextIdx - 1:
                matchIndex[node] = nextIdx - 1
                nextIndex[node] = nextIdx
        elif message['reset']:
            lastIdx = message.get('last_log_idx')
            if lastIdx is not None and lastIdx < matchIndex[node]:
                # The follower no longer holds entries it acknowledged: it restarted
                # without a journal. Only what it still has committed is known to match.
                log.warning('%s lost acknowledged log entries (holds up to %d, had confirmed %d)',
                            node, lastIdx, matchIndex[node])
                matchIndex[node] = nextIdx - 1
            # Upstream set nextIndex to the hint unconditionally, so a stale refusal of
            # a pipelined append undid the progress of a newer one. Resume from the
            # hint, but never at or below what the follower confirmed (its log holds
            # that prefix, so the next append matches), nor past our log's end.
            nextIndex[node] = min(max(nextIdx, matchIndex[node] + 1), self._SyncObj__getCurrentLogIndex() + 1)


# -- a snapshot being received (PySyncObj's Serializer, pysyncobj==0.3.17) ---------------------


def _received_snapshot_last_entry(serializer):
    """(index, term) of the last entry of the snapshot received so far (every chunk is
    in), or None if it cannot be read. Read as upstream's ``Serializer.deserialize`` reads a
    snapshot: gzip'd pickle of (state, last entry, entry before it, cluster), entries as
    (command, index, term). (raftsync sets no custom ``conf.serializer``/``deserializer``.)
    The whole state is unpickled, once more than the install itself does."""
    incoming = serializer._Serializer__incomingTransmissionFile
    try:
        if serializer._Serializer__fileName is None:
            source = io.BytesIO(incoming)  # in memory: the bytes received
        else:
            incoming.flush()  # the temp file the chunks are written to, still open
            source = open(incoming.name, 'rb')
        with source, gzip.GzipFile(fileobj=source, mode='rb') as unzipped:
            last = pickle.load(unzipped)[1]
            return last[1], last[2]
    except Exception:
        # Upstream would have put it in place and failed to load it; never let it
        # replace our own snapshot.
        log.exception('a snapshot received from the leader cannot be read; discarding it')
        return None


def _discard_received_snapshot(serializer):
    """Drop the snapshot being received; our own snapshot (file or buffer) stays."""
    incoming = serializer._Serializer__incomingTransmissionFile
    serializer._Serializer__incomingTransmissionFile = None
    if serializer._Serializer__fileName is None:
        return
    try:
        incoming.close()
    except OSError:
        pass
    try:
        os.unlink(incoming.name)
    except OSError:
        log.warning('could not remove the discarded snapshot %s', incoming.name, exc_info=True)
