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
  events): each chunk applies all or none of its events, at consecutive offsets,
  in order. A failure in a later chunk leaves the earlier chunks published: the
  exception then carries their offsets as ``published``.
- Every event is stamped on the publishing node with its hybrid logical clock
  (``node.hlc()``) before it is sent, and keeps that stamp (``Event.stamp``). A
  subscription merges the stamp of each event it delivers into its own node's clock
  (``node.hlc(stamp)``), so stamps taken after consuming an event are larger than it.
- ``subscribe`` delivers events in offset order with no gap: a trimmed offset raises
  ``Compacted`` instead of being skipped. Subscribers are woken by notification when
  a publish applies on their node (no polling); they read from their own node's
  replica, which only lags, never reorders.
- Consumer groups keep a committed offset per (topic, group) in the cluster: the next
  offset the group wants. ``subscribe(group=g)`` starts there (a group that never
  committed starts at the oldest retained event), so a restarted consumer, or another
  member of the group, resumes where the group left off. Delivery is at-least-once:
  events delivered but not acknowledged before a crash are delivered again. A commit
  only ever moves a group forward.
- Acknowledgements: ``ack="batch"`` (default) commits everything delivered so far
  each time the subscription fetches the next batch from its node (so an event is
  acknowledged once the consumer asks for events after it); ``ack="explicit"``
  commits only on ``Subscription.ack()``.
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
- A subscription waits through leader changes; without a quorum for
  ``quorum_timeout`` its ``get`` raises ``NoQuorum`` (call it again to go on waiting).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .codec import MAX_COMMAND_BYTES, Op, Query, Status, encode_query, pack_value, raise_for_status, unpack_value
from .errors import BadRequest, Compacted, NotFound, RaftsyncError, Timeout
from .machine.events import MAX_BATCH_EVENTS, MAX_EVENT_BYTES, READ_MAX_BYTES, READ_MAX_EVENTS
from .ownership import check_name
from .replica import Replica, deadline_after
from .time import HLCTimestamp, HybridLogicalClock
from .watch import new_watch_id

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


def _check_offset(offset: Any, what: str) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise BadRequest(f"{what} must be an int >= 0")
    return offset


class Events:
    """A handle on the event stream ``topic``. Create with ``node.events(topic)``."""

    def __init__(self, replica: Replica, topic: str, hlc: HybridLogicalClock | None = None) -> None:
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
        for chunk in self._chunks(events):
            try:
                first = self._publish(chunk, deadline, f"publish {len(chunk)} events to {self.topic!r}")
            except RaftsyncError as exc:
                exc.published = list(offsets)
                raise
            offsets.extend(range(first, first + len(chunk)))
        return offsets

    def _event(self, payload: Any, key: Any) -> list[Any]:
        data, key = pack_value(payload, "payload", MAX_EVENT_BYTES), _check_key(key)
        stamp = self._hlc.now() if self._hlc is not None else HLCTimestamp(int(time.time() * 1000), 0)
        return [data, key, [stamp.physical_ms, stamp.logical]]

    def _chunks(self, events: list[list[Any]]) -> Iterator[list[list[Any]]]:
        budget = MAX_COMMAND_BYTES - _COMMAND_HEADROOM - len(self.topic.encode("utf-8"))
        chunk: list[list[Any]] = []
        size = 0
        for event in events:
            event_size = len(event[0]) + (len(event[1].encode("utf-8")) if event[1] else 0) + _EVENT_FRAMING
            if chunk and (size + event_size > budget or len(chunk) >= MAX_BATCH_EVENTS):
                yield chunk
                chunk, size = [], 0
            chunk.append(event)
            size += event_size
        if chunk:
            yield chunk

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
            _check_offset(from_offset, "from_offset")
        if ack not in ACK_MODES:
            raise BadRequest(f"ack must be one of {ACK_MODES}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= READ_MAX_EVENTS:
            raise BadRequest(f"batch_size must be an int in 1..{READ_MAX_EVENTS}")
        return Subscription(self, group, from_offset, ack, batch_size, deadline_after(timeout))

    def read(self, from_offset: int = 0, limit: int = READ_MAX_EVENTS, consistency: str = "linearizable",
             timeout: float | None = None) -> list[Event]:
        """Up to ``limit`` retained events from ``from_offset`` on, without waiting (fewer
        at the end of the topic, or past 4 MiB). Raises Compacted if ``from_offset`` was
        trimmed, NotFound if the topic does not exist."""
        _check_offset(from_offset, "from_offset")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= READ_MAX_EVENTS:
            raise BadRequest(f"limit must be an int in 1..{READ_MAX_EVENTS}")
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
        if self._hlc is not None:
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
        _check_offset(offset, "offset")
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
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BadRequest(f"{what} must be None or an int >= 1")
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
    come from any thread. After ``close`` (or the node's), ``get`` raises StopIteration.
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
        self.committed: int | None = None  # the group's committed offset, as last known here
        self._delivered: int | None = None  # the offset after the last event handed out
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
        """The next event; raises Timeout if none arrives in time, StopIteration once closed."""
        self._replica.check_owner()
        deadline = deadline_after(timeout)
        if self._closed:
            raise StopIteration
        if not self._buffer:
            self._fetch(deadline, timeout)
        return self._hand_out(self._buffer.popleft())

    def get_batch(self, max_events: int | None = None, timeout: float | None = None) -> list[Event]:
        """The next events available (at least one, at most ``max_events`` or a fetched
        batch); raises Timeout if none arrives in time, StopIteration once closed."""
        self._replica.check_owner()
        if max_events is not None and (isinstance(max_events, bool) or not isinstance(max_events, int)
                                       or max_events < 1):
            raise BadRequest("max_events must be None or an int >= 1")
        deadline = deadline_after(timeout)
        if self._closed:
            raise StopIteration
        if not self._buffer:
            self._fetch(deadline, timeout)
        count = len(self._buffer) if max_events is None else min(max_events, len(self._buffer))
        return [self._hand_out(self._buffer.popleft()) for _ in range(count)]

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def _hand_out(self, event: Event) -> Event:
        self._delivered = event.offset + 1
        self._stream._merge(event.stamp)
        return event

    def _fetch(self, deadline: float, timeout: float | None) -> None:
        """Fill the buffer from this node's replica, waiting for a publish if need be."""
        if self._ack == "batch" and self.group is not None and self._delivered is not None and (
                self.committed is None or self._delivered > self.committed):
            # Asking for more: everything handed out so far is done with.
            self._commit(self._delivered, deadline)
        started = time.monotonic()
        while True:
            if self._closed:
                raise StopIteration
            if self._rewatch:
                self._rewatch = False
                self._watch()
            self._wake.clear()
            incarnation, first, _, items = self._stream._read(self.position, self._batch_size, "local",
                                                               deadline)
            self._check_incarnation(incarnation)
            if self.position < first:
                self.close()
                raise Compacted(f"topic {self.topic!r}: offset {self.position} was trimmed; the oldest retained "
                                f"is {first}")
            if items:
                self._buffer.extend(self._stream._events(self.position, items))
                self.position += len(items)
                return
            if not self._replica.wait_for(self._wake, deadline, started):
                raise Timeout(f"no event on {self.topic!r} within {timeout}s")

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
            return self.committed if self.committed is not None else 0
        return self._commit(offset, deadline)

    def _commit(self, offset: int, deadline: float) -> int:
        status, payload = self._stream._commit(self.group, offset, self._incarnation, deadline)
        if status in (Status.NOT_FOUND, Status.CONFLICT):
            self.close()
            raise Compacted(f"topic {self.topic!r} was deleted; its offsets are gone")
        raise_for_status(status, payload, f"ack on {self.topic!r}")
        self.committed = payload[0]
        return self.committed

    def close(self) -> None:
        """Stop; a ``get`` waiting in another thread raises StopIteration. Nothing is
        acknowledged by closing."""
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
