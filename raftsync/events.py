"""Events: a strongly consistent, ordered event stream per topic (Kafka-like, one partition).

``stream = node.events(topic)``; ``stream.publish(payload)`` returns the event's offset
once it is committed; ``stream.subscribe(group=...)`` yields events in offset order.

Guarantees
- One total order per topic, the same on every node: offsets start at 0 and are
  dense (every offset below a topic's end holds exactly one event until retention
  trims it). Payloads are msgpack values (None, bool, int, float, str, bytes, lists,
  dicts; tuples come back as lists), at most 32 KiB encoded.
- ``publish`` returns after the event is committed through the Raft log, and applies
  at most once even when retried after a lost reply (it is a session command: a retry
  carries the same (session, seq)). So an acknowledged publish is present exactly
  once, at the offset it returned; one that raised ``OutcomeUnknown`` is present at
  most once (it may still appear later, at one offset).
- ``publish_many`` sends one command per chunk of at most about 44 KiB (and 1000
  events), and within the topic's retention (a chunk refused as over it is chunked
  again to fit, after one look-up of the retention; so a batch beyond ``max_events``
  or ``max_bytes`` publishes as one-by-one publishes would: its oldest events are
  trimmed at once): each chunk applies all or none of its events, at consecutive
  offsets, in order. A failure in a later chunk leaves the
  earlier chunks published: the exception then carries their offsets as
  ``published``.
- Every event is stamped on the publishing node with its hybrid logical clock
  (``node.hlc()``) before it is sent, and keeps that stamp (``Event.stamp``). A
  subscription merges the stamp of each event it delivers into its own node's clock
  (``node.hlc(stamp)``), so stamps taken after consuming an event are larger than it.
- ``subscribe`` delivers events in offset order with no gap: a trimmed offset raises
  ``Compacted`` instead of being skipped. Subscribers are woken by notification when
  a publish applies on their node (no polling); they read from their own node's
  replica, which only lags, never reorders.
- A consumer group is one committed offset per (topic, group) in the cluster: the next
  offset the group wants. ``subscribe(group=g)`` starts there (a group that never
  committed starts at the oldest retained event), so a restarted consumer, or the
  next member of the group, resumes where the group left off. Delivery is
  at-least-once: events delivered but not acknowledged before a crash are delivered
  again. A commit only ever moves a group forward (a late commit never rewinds it).
- A group is *not* a Kafka consumer group: it has no membership, no assignment of
  events to members and no fencing. Every live subscription of a group reads from its
  own position and gets every event from there, so two members consuming at once each
  get all events; and any member's commit, even one from a member that is long gone
  (a late background commit, a paused process), moves the group forward. For
  exclusive consumption guard the consumer with an election: only the leader of
  ``node.leader(f"{topic}/{group}")`` subscribes (after ``campaign`` returns, so it
  starts at the committed offset), it stops when ``Term.revoked`` is set, and it
  acknowledges only events it finished. A deposed leader may not know yet that it is
  deposed (see ``Term``): fence the consumer's side effects with ``Term.term`` (the
  downstream refuses a lower term) or make them idempotent.
- Acknowledgements: ``ack="batch"`` (default) commits everything handed out so far
  each time the subscription fetches the next batch from its node (so an event is
  acknowledged once the consumer asks for events after it). That commit goes in the
  background: events already on the node are served at once (``get(timeout=0)``
  polls), and a commit that waits for a quorum or gets no answer never fails ``get``
  (it is retried, at the latest with the next fetch); ``ack()`` commits and waits.
  ``ack="explicit"`` commits only on ``Subscription.ack()``.
- Retention keeps memory bounded: per topic by count and bytes (trimmed as events are
  published, the same on every replica) and optionally by age (measured by the Raft
  leader's monotonic clock: an event stays at least ``max_age`` after the leader
  applied it, and goes within about ``max_age / 32`` more; a leader change restarts
  the clock). At most 256 topics and 64 groups per topic; the retention of all topics
  may reserve at most 256 Ki events and 64 MiB. Beyond these limits: ``TooLarge``.

Failure modes
- ``publish`` raises ``OutcomeUnknown`` when it was sent and got no answer by its
  deadline, ``Timeout`` / ``NoQuorum`` when nothing was sent, ``TooLarge`` for an
  oversized payload or a topic or group beyond the limits, ``BadRequest`` for a
  payload msgpack cannot encode or a bad name.
- A topic that is deleted and created again restarts at offset 0; a subscription or
  acknowledgement from before the delete raises ``Compacted``.
- A subscription waits through leader changes; without a quorum (or with its node's
  engine silent) for ``quorum_timeout`` its ``get`` raises ``NoQuorum``, also with
  ``timeout=None`` (call it again to go on waiting). Once the subscription is closed
  ``get`` raises StopIteration; once the node is closed, ``Closed``.
- A background commit the cluster refuses is raised by the next ``get`` that fetches:
  ``TooLarge`` (the topic already has 64 groups) or ``Compacted`` (the topic was
  deleted).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .codec import MAX_COMMAND_BYTES, Op, Query, Status, encode_query, pack_value, raise_for_status, unpack_value
from .errors import BadRequest, Compacted, NotFound, RaftsyncError, Timeout, TooLarge
from .machine.events import (DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, MAX_BATCH_EVENTS, MAX_EVENT_BYTES,
                             READ_MAX_BYTES, READ_MAX_EVENTS, event_bytes)
from .ownership import check_name
from .replica import Replica, deadline_after
from .time import HLCTimestamp, HybridLogicalClock
from .watch import iterate_through_outages, new_watch_id

# What one publish command may hold: the codec's limit less the header and topic name,
# and per event its msgpack framing (array, bin and str headers, the stamp).
_COMMAND_HEADROOM = 256
_EVENT_FRAMING = 32
ACK_MODES = ("batch", "explicit")


@dataclass(frozen=True)
class Event:
    """One event of a topic: ``offset`` in the topic's order, the publisher's ``stamp``."""

    topic: str
    offset: int
    payload: Any
    key: str | None
    stamp: HLCTimestamp


@dataclass(frozen=True)
class TopicInfo:
    """A topic's retained range [first_offset, next_offset), retention and groups."""

    topic: str
    first_offset: int
    next_offset: int
    bytes: int
    max_events: int
    max_bytes: int
    max_age: float | None
    groups: dict[str, int] = field(default_factory=dict)


def _check_key(key: Any) -> str | None:
    if key is None:
        return None
    return check_name(key, "key")


def _check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (a bool is not) in ``low..high``; else BadRequest."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise BadRequest(f"{what} must be an int {f'>= {low}' if high is None else f'in {low}..{high}'}")
    return value


class Events:
    """A handle on the event stream ``topic``. Create with ``node.events(topic)``."""

    def __init__(self, replica: Replica, topic: str, hlc: HybridLogicalClock) -> None:
        self._replica = replica
        self.topic = check_name(topic, "topic")
        self._hlc = hlc

    # -- publishing -----------------------------------------------------------------------

    def publish(self, payload: Any, key: str | None = None, timeout: float | None = None) -> int:
        """Append one event; returns its offset once committed."""
        event = self._event(payload, key)
        return self._publish([event], deadline_after(timeout), f"publish to {self.topic!r}")

    def publish_many(self, payloads: Iterable[Any], keys: Iterable[str | None] | None = None,
                     timeout: float | None = None) -> list[int]:
        """Append several events in order; returns their offsets. One command per chunk
        (all or nothing each, at consecutive offsets); if a chunk fails, the exception's
        ``published`` lists the offsets of the chunks before it."""
        payloads = list(payloads)
        keys = [None] * len(payloads) if keys is None else list(keys)
        if len(keys) != len(payloads):
            raise BadRequest("keys must be None or one per payload")
        deadline = deadline_after(timeout)
        events = [self._event(payload, key) for payload, key in zip(payloads, keys)]
        offsets: list[int] = []
        # Chunks fit one command; once one is refused as over the topic's retention
        # (which the machine checks per command), they fit that retention too.
        retention: tuple[int, int] | None = None
        start = 0
        while start < len(events):
            chunk = events[start:start + self._chunk_length(events, start, *(retention or (MAX_BATCH_EVENTS,
                                                                                            MAX_COMMAND_BYTES)))]
            try:
                first = self._publish(chunk, deadline, f"publish {len(chunk)} events to {self.topic!r}")
            except TooLarge as exc:
                if retention is None and len(chunk) > 1:
                    # Nothing of it applied (all or none): chunk it again, to fit.
                    retention = self._retention(deadline)
                    continue
                exc.published = list(offsets)
                raise
            except RaftsyncError as exc:
                exc.published = list(offsets)
                raise
            offsets.extend(range(first, first + len(chunk)))
            start += len(chunk)
        return offsets

    def _event(self, payload: Any, key: Any) -> list[Any]:
        data, key = pack_value(payload, "payload", MAX_EVENT_BYTES), _check_key(key)
        stamp = self._hlc.now()
        return [data, key, [stamp.physical_ms, stamp.logical]]

    def _retention(self, deadline: float) -> tuple[int, int]:
        """The topic's (max_events, max_bytes); the defaults a first publish creates it
        with if it does not exist."""
        info = self._info("linearizable", deadline)
        return (DEFAULT_MAX_EVENTS, DEFAULT_MAX_BYTES) if info is None else (info[4], info[5])

    def _chunk_length(self, events: list[list[Any]], start: int, max_events: int, max_bytes: int) -> int:
        """How many events from ``start`` on fit in one command and within ``max_events``
        and ``max_bytes`` of payloads and keys (at least one)."""
        budget = MAX_COMMAND_BYTES - _COMMAND_HEADROOM - len(self.topic.encode("utf-8"))
        most = min(MAX_BATCH_EVENTS, max_events, len(events) - start)
        size = retained = 0
        for count, event in enumerate(events[start:start + most]):
            event_size = event_bytes(event)
            size += event_size + _EVENT_FRAMING
            retained += event_size
            if count and (size > budget or retained > max_bytes):
                return count
        return most

    def _publish(self, events: list[list[Any]], deadline: float, what: str) -> int:
        session = self._replica.sessions.default(deadline)
        status, payload = self._replica.submit(session, Op.EVENTS_PUBLISH, [self.topic, events], deadline, what)
        raise_for_status(status, payload, what)
        return payload[0]

    # -- consuming ------------------------------------------------------------------------

    def subscribe(self, group: str | None = None, from_offset: int | None = None, ack: str = "batch",
                  batch_size: int = 256, timeout: float | None = None) -> "Subscription":
        """Events in offset order, blocking for new ones.

        Starts at ``from_offset`` if given; else at ``group``'s committed offset (the
        oldest retained event if the group never committed); else (no group) at the
        topic's end, i.e. with the next event published. ``ack``: "batch" or
        "explicit" (see the module docstring); ``batch_size``: events fetched per read.
        ``timeout`` bounds finding the start position. A topic that does not exist yet
        is waited for.
        """
        if group is not None:
            check_name(group, "group")
        if from_offset is not None:
            _check_int(from_offset, "from_offset", 0)
        if ack not in ACK_MODES:
            raise BadRequest(f"ack must be one of {ACK_MODES}")
        _check_int(batch_size, "batch_size", 1, READ_MAX_EVENTS)
        return Subscription(self, group, from_offset, ack, batch_size, deadline_after(timeout))

    def read(self, from_offset: int = 0, limit: int = READ_MAX_EVENTS, consistency: str = "linearizable",
             timeout: float | None = None) -> list[Event]:
        """Up to ``limit`` retained events from ``from_offset`` on, without waiting (fewer
        at the end of the topic, or past 4 MiB). Raises Compacted if ``from_offset`` was
        trimmed, NotFound if the topic does not exist."""
        _check_int(from_offset, "from_offset", 0)
        _check_int(limit, "limit", 1, READ_MAX_EVENTS)
        incarnation, first, _, items = self._read(from_offset, limit, consistency, deadline_after(timeout))
        if not incarnation:
            raise NotFound(f"topic {self.topic!r}")
        if from_offset < first:
            raise Compacted(f"topic {self.topic!r}: offset {from_offset} was trimmed; the oldest retained is {first}")
        return self._events(from_offset, items)

    def _read(self, offset: int, limit: int, consistency: str, deadline: float) -> list[Any]:
        status, payload = self._replica.query(
            encode_query(Query.EVENTS_READ, [self.topic, offset, limit, READ_MAX_BYTES]), consistency, deadline)
        raise_for_status(status, payload, f"read {self.topic!r}")
        return payload

    def _events(self, offset: int, items: list[list[Any]]) -> list[Event]:
        return [Event(self.topic, offset + i, unpack_value(data), key, HLCTimestamp(*stamp))
                for i, (data, key, stamp) in enumerate(items)]

    def _merge(self, stamp: HLCTimestamp) -> None:
        """Merge a delivered event's stamp into this node's hybrid logical clock."""
        try:
            self._hlc.update(stamp)
        except BadRequest:
            pass  # a stamp beyond the clock's max_offset is not taken over

    # -- topic and groups ---------------------------------------------------------------

    def info(self, consistency: str = "linearizable", timeout: float | None = None) -> TopicInfo:
        """The topic's retained offsets, retention and groups; NotFound if it does not exist."""
        payload = self._info(consistency, deadline_after(timeout))
        if payload is None:
            raise NotFound(f"topic {self.topic!r}")
        return self._topic_info(payload)

    def _info(self, consistency: str, deadline: float) -> list[Any] | None:
        status, payload = self._replica.query(encode_query(Query.EVENTS_INFO, [self.topic]), consistency, deadline)
        if status == Status.NOT_FOUND:
            return None
        raise_for_status(status, payload, f"info of {self.topic!r}")
        return payload

    def _topic_info(self, payload: list[Any]) -> TopicInfo:
        _, first, end, size, max_events, max_bytes, max_age_ms, groups = payload
        return TopicInfo(self.topic, first, end, size, max_events, max_bytes,
                         max_age_ms / 1000.0 if max_age_ms else None, dict(groups))

    def committed(self, group: str, consistency: str = "linearizable", timeout: float | None = None) -> int | None:
        """The group's committed offset (the next it wants), or None if it never committed."""
        check_name(group, "group")
        payload = self._info(consistency, deadline_after(timeout))
        return None if payload is None else dict(payload[7]).get(group)

    def commit(self, group: str, offset: int, timeout: float | None = None) -> int:
        """Set ``group``'s committed offset to ``offset`` (the next event it wants) unless
        it is already further; returns the group's committed offset. NotFound if the
        topic does not exist; BadRequest past the topic's end."""
        check_name(group, "group")
        _check_int(offset, "offset", 0)
        status, payload = self._commit(group, offset, 0, deadline_after(timeout))
        if status == Status.NOT_FOUND:
            raise NotFound(f"topic {self.topic!r}")
        raise_for_status(status, payload, f"commit {group!r} on {self.topic!r}")
        return payload[0]

    def _commit(self, group: str, offset: int, incarnation: int, deadline: float) -> tuple[int, Any]:
        session = self._replica.sessions.default(deadline)
        return self._replica.submit(session, Op.EVENTS_COMMIT, [self.topic, group, offset, incarnation], deadline,
                                    f"commit {group!r} on {self.topic!r}")

    def configure(self, max_events: int | None = None, max_bytes: int | None = None, max_age: float | None = None,
                  timeout: float | None = None) -> TopicInfo:
        """Create the topic or change its retention; None means the default (1024 events,
        256 KiB, no age limit). Events beyond the new limits are trimmed at once.
        TooLarge if the topics' reserved retention would pass the cluster's limit."""
        for value, what in ((max_events, "max_events"), (max_bytes, "max_bytes")):
            if value is not None:
                _check_int(value, what, 1)
        max_age_ms = None
        if max_age is not None:
            if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not max_age >= 0.001:
                raise BadRequest("max_age must be None or seconds >= 0.001")
            max_age_ms = int(max_age * 1000)
        deadline = deadline_after(timeout)
        session = self._replica.sessions.default(deadline)
        what = f"configure {self.topic!r}"
        status, payload = self._replica.submit(session, Op.EVENTS_CONFIGURE,
                                               [self.topic, max_events, max_bytes, max_age_ms], deadline, what)
        raise_for_status(status, payload, what)
        return self._topic_info(payload)

    def delete(self, timeout: float | None = None) -> None:
        """Delete the topic, its events and groups (NotFound if it does not exist). A topic
        of the same name created later starts at offset 0."""
        deadline = deadline_after(timeout)
        session = self._replica.sessions.default(deadline)
        status, payload = self._replica.submit(session, Op.EVENTS_DELETE, [self.topic], deadline,
                                               f"delete {self.topic!r}")
        if status == Status.NOT_FOUND:
            raise NotFound(f"topic {self.topic!r}")
        raise_for_status(status, payload, f"delete {self.topic!r}")

    def delete_group(self, group: str, timeout: float | None = None) -> None:
        """Forget ``group``'s committed offset (NotFound if it has none)."""
        check_name(group, "group")
        deadline = deadline_after(timeout)
        session = self._replica.sessions.default(deadline)
        status, payload = self._replica.submit(session, Op.EVENTS_DELETE_GROUP, [self.topic, group], deadline,
                                               f"delete group {group!r}")
        if status == Status.NOT_FOUND:
            raise NotFound(f"group {group!r} of topic {self.topic!r}")
        raise_for_status(status, payload, f"delete group {group!r}")


class Subscription:
    """Events of one topic in offset order; create with ``Events.subscribe``.

    ``get(timeout)`` returns the next event (Timeout if none comes in time),
    ``get_batch(max_events, timeout)`` the next events at once; iterate for ever;
    ``ack(event=None)`` commits the group's offset past ``event`` (default: past every
    event delivered); ``close()``. One consumer thread per subscription; ``close`` may
    come from any thread. After ``close``, ``get`` raises StopIteration (iteration
    ends); after the node's ``close``, ``get`` raises Closed. Iterating is a standing
    consumer: it waits through NoQuorum (``get(timeout)`` tells of a lost cluster).
    """

    def __init__(self, stream: Events, group: str | None, from_offset: int | None, ack: str, batch_size: int,
                 deadline: float) -> None:
        self._stream = stream
        self._replica = stream._replica
        self.topic = stream.topic
        self.group = group
        self._ack = ack
        self._batch_size = batch_size
        self._wake = threading.Event()
        self._rewatch = False
        self._closed = False
        self._buffer: deque[Event] = deque()
        self._incarnation = 0  # of the topic this subscription reads (0: not seen yet)
        self._delivered: int | None = None  # the offset after the last event handed out
        # Batch acknowledgement in the background (see _ack_in_background); the lock also
        # guards ``committed``, which the answers of those commits move.
        self._ack_lock = threading.Lock()
        self.committed: int | None = None  # the group's committed offset, as last known here
        self._ack_wanted = 0  # the highest offset a fetch asked to commit
        self._ack_in_flight = False  # a commit is being proposed
        self._ack_refusal: RaftsyncError | None = None  # for the next fetch to raise
        self._watch_id = 0
        # Watch first: a publish applied after this point wakes us, whatever the reads see.
        self._watch()
        try:
            self.position = self._start(from_offset, deadline)  # the next offset to fetch
        except BaseException:
            self.close()
            raise

    def _start(self, from_offset: int | None, deadline: float) -> int:
        if from_offset is not None and self.group is None:
            return from_offset
        # Linearizable: the start includes every publish and commit acknowledged before.
        info = self._stream._info("linearizable", deadline)
        if info is None:
            return 0 if from_offset is None else from_offset
        self._incarnation = info[0]
        if self.group is not None:
            self.committed = dict(info[7]).get(self.group)
        if from_offset is not None:
            return from_offset
        if self.group is not None:
            return self.committed if self.committed is not None else info[1]
        return info[2]

    def _watch(self) -> None:
        if self._watch_id:
            self._replica.remove_watch(self._watch_id)
        self._watch_id = new_watch_id()
        self._replica.watch(self._watch_id, "events", self.topic, None, self._on_watch)

    def _on_watch(self, kind: str, payload: Any) -> None:
        """Reader thread: a publish or delete applied on this node (or the watch ended)."""
        if kind == "compacted":
            # Only the wake-up history was trimmed (a snapshot install skipped much of
            # it): the events themselves are read by offset. Watch again and re-read.
            self._rewatch = True
        self._wake.set()

    # -- consuming ------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Event:
        """The next event; raises Timeout if none arrives in time, NoQuorum (see the
        module docstring), StopIteration once closed, Closed once the node is closed."""
        self._replica.check_owner()
        deadline = deadline_after(timeout)
        if self._closed:
            raise StopIteration
        if not self._buffer:
            self._fetch(deadline, timeout)
        return self._hand_out(self._buffer.popleft())

    def get_batch(self, max_events: int | None = None, timeout: float | None = None) -> list[Event]:
        """The next events available (at least one, at most ``max_events`` or a fetched
        batch); raises as ``get`` does."""
        self._replica.check_owner()
        if max_events is not None:
            _check_int(max_events, "max_events", 1)
        deadline = deadline_after(timeout)
        if self._closed:
            raise StopIteration
        if not self._buffer:
            self._fetch(deadline, timeout)
        count = len(self._buffer) if max_events is None else min(max_events, len(self._buffer))
        return [self._hand_out(self._buffer.popleft()) for _ in range(count)]

    def __iter__(self) -> Iterator[Event]:
        return iterate_through_outages(self.get)

    def _hand_out(self, event: Event) -> Event:
        self._delivered = event.offset + 1
        self._stream._merge(event.stamp)
        return event

    def _fetch(self, deadline: float, timeout: float | None) -> None:
        """Fill the buffer from this node's replica, waiting for a publish if need be."""
        # A commit refused before this fetch began is raised now; one refused while it
        # runs is raised by it only if it has nothing to serve (else by the next fetch),
        # so what a fetch returns does not depend on how fast its own commit is answered.
        self._raise_ack_refusal()
        if self._ack == "batch" and self.group is not None and self._delivered is not None:
            # Asking for more: everything handed out so far is done with.
            self._ack_in_background(self._delivered)
        started = time.monotonic()
        while True:
            if self._closed:
                raise StopIteration
            if self._rewatch:
                self._rewatch = False
                self._watch()
            self._wake.clear()
            incarnation, first, _, items = self._read(deadline)
            self._check_incarnation(incarnation)
            if self.position < first:
                self.close()
                raise Compacted(f"topic {self.topic!r}: offset {self.position} was trimmed; the oldest retained "
                                f"is {first}")
            if items:
                self._buffer.extend(self._stream._events(self.position, items))
                self.position += len(items)
                return
            self._raise_ack_refusal()
            if not self._replica.wait_for(self._wake, deadline, started):
                raise Timeout(f"no event on {self.topic!r} within {timeout}s")

    def _raise_ack_refusal(self) -> None:
        with self._ack_lock:
            refusal, self._ack_refusal = self._ack_refusal, None
        if refusal is not None:
            if isinstance(refusal, Compacted):
                self.close()
            raise refusal

    def _read(self, deadline: float) -> list[Any]:
        # Without a deadline, an engine silent for quorum_timeout makes this NoQuorum.
        return self._stream._read(self.position, self._batch_size, "local", deadline)

    def _check_incarnation(self, incarnation: int) -> None:
        if incarnation and not self._incarnation:
            self._incarnation = incarnation
        elif incarnation != self._incarnation:
            self.close()
            raise Compacted(f"topic {self.topic!r} was deleted; its offsets are gone")

    # -- acknowledging ------------------------------------------------------------------------

    def ack(self, event: Event | None = None, timeout: float | None = None) -> int:
        """Commit the group's offset past ``event`` (default: past every event delivered);
        returns the group's committed offset. BadRequest without a group."""
        if self.group is None:
            raise BadRequest("this subscription has no group to acknowledge for")
        deadline = deadline_after(timeout)
        if event is not None:
            if not isinstance(event, Event) or event.topic != self.topic:
                raise BadRequest(f"ack takes an Event of topic {self.topic!r}")
            offset = event.offset + 1
        elif self._delivered is not None:
            offset = self._delivered
        else:
            with self._ack_lock:
                return self.committed if self.committed is not None else 0
        status, payload = self._stream._commit(self.group, offset, self._incarnation, deadline)
        if status in (Status.NOT_FOUND, Status.CONFLICT):
            self.close()
            raise Compacted(f"topic {self.topic!r} was deleted; its offsets are gone")
        raise_for_status(status, payload, f"ack on {self.topic!r}")
        with self._ack_lock:
            self.committed = max(self.committed or 0, payload[0])
        return payload[0]

    def _ack_in_background(self, offset: int) -> None:
        """Commit the group up to ``offset`` off the consumer's thread, so that a fetch
        serves what is on the node at once and a commit's trouble never fails it.

        One commit at a time: when one is answered the next takes the highest offset
        asked for meanwhile (commits only move a group forward, so the ones in between
        change nothing). A commit that got no answer is proposed on by ``replica.finish``
        until its session is lost or the node closes; one given up on is asked for again
        by the next fetch."""
        with self._ack_lock:
            self._ack_wanted = max(self._ack_wanted, offset)
            if self._ack_in_flight or (self.committed is not None and self.committed >= self._ack_wanted):
                return
            self._ack_in_flight = True
        threading.Thread(target=self._send_ack, name="raftsync-events-ack", daemon=True).start()

    def _send_ack(self) -> None:
        """On its own thread: propose one commit of the highest offset asked for."""
        with self._ack_lock:
            offset = self._ack_wanted
        replica = self._replica
        deadline = time.monotonic() + replica.config.quorum_timeout
        try:
            session = replica.sessions.default(deadline)
        except RaftsyncError:
            self._acked(None, None)  # no session now (no quorum, node closed): the next fetch asks again
            return
        try:
            replica.finish(session, Op.EVENTS_COMMIT, [self.topic, self.group, offset, self._incarnation], deadline,
                           f"commit {self.group!r} on {self.topic!r}", on_done=self._acked)
        except RaftsyncError:
            pass  # finish goes on in the background and calls _acked, or gave up and called it

    def _acked(self, status: int | None, payload: Any) -> None:
        """The answer to a background commit, once each: OK, a refusal (kept for the next
        fetch to raise), or no telling whether it applied (None: given up on; STALE,
        SESSION_EXPIRED: an unknown outcome), which the next fetch asks again for."""
        refusal: RaftsyncError | None = None
        if status in (Status.NOT_FOUND, Status.CONFLICT):
            refusal = Compacted(f"topic {self.topic!r} was deleted; its offsets are gone")
        elif status in (Status.TOO_LARGE, Status.BAD_COMMAND, Status.INTERNAL):
            try:
                raise_for_status(status, payload, f"commit {self.group!r} on {self.topic!r}")
            except RaftsyncError as exc:
                refusal = exc
        with self._ack_lock:
            if status == Status.OK:
                self.committed = max(self.committed or 0, payload[0])
            if refusal is not None:
                self._ack_refusal = refusal
            again = status == Status.OK and self._ack_wanted > self.committed
            self._ack_in_flight = again
        if refusal is not None:
            self._wake.set()  # a get waiting for events raises it
        if again:
            threading.Thread(target=self._send_ack, name="raftsync-events-ack", daemon=True).start()

    def close(self) -> None:
        """Stop; a ``get`` waiting in another thread raises StopIteration. Nothing is
        acknowledged by closing (a batch commit already under way goes on)."""
        if self._closed:
            return
        self._closed = True
        if self._watch_id:
            self._replica.remove_watch(self._watch_id)
        self._wake.set()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Subscription {self.topic!r} group={self.group!r} position={self.position}"
                f"{' CLOSED' if self._closed else ''}>")
