"""Event streams: per topic one total order of events, retained within bounds, and the
committed offsets of consumer groups.

A topic is created by its first publish (with the default retention) or by
EVENTS_CONFIGURE. Each event gets its topic's next offset: offsets start at 0 and are
dense, so on every replica the n-th event published to a topic is at offset n. An
event, as commands and reads carry it, is ``[payload, key, stamp]``: the payload is msgpack bytes (opaque here), the
key a str or None, the stamp ``[physical_ms, logical]`` from the publisher's hybrid
logical clock. A publish carries one or more events and applies all or none of them,
at consecutive offsets.

A topic that is deleted and created again starts again at offset 0; its
``incarnation`` (the machine index that created it) tells the two apart.

Retention, decided in apply so every replica trims the same events: after a publish
or a configure, the oldest events go while the topic holds more than ``max_events``
or more than ``max_bytes``. Retention by age needs a clock, which the machine has not:
``AgeDuty`` (a leader duty) notes on the Raft leader's monotonic clock when each range
of offsets first appeared there and proposes EVENTS_TRIM [topic, incarnation, up_to]
once the range is older than ``max_age``; see its docstring for the approximation.

Memory stays bounded: at most MAX_TOPICS topics; a topic's ``max_events`` and
``max_bytes`` are reserved when it is created or configured, and the sums over all
topics may not pass TOTAL_MAX_EVENTS / TOTAL_MAX_BYTES; at most MAX_GROUPS_PER_TOPIC
consumer groups per topic. Beyond a limit a command is answered TOO_LARGE and changes
nothing.

Consumer groups: per topic, group -> committed offset, the next offset the group wants
to consume. EVENTS_COMMIT only moves it forward (a late commit of a slower member
never rewinds the group) and never past the topic's end.

Subscribers are woken by the "events" watch kind, a bounded history of
``[revision, topic, [incarnation, next_offset] or None]`` appended by every publish and
delete; they read the events themselves by offset (EVENTS_READ), so the wake-up history
can be short.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any, Callable, NamedTuple

from ..codec import MAX_NAME_BYTES, Op, Query, Status, encode_command, encode_result
from .history import History
from .table import Context, Invalid, LeaderDuty, Reader, Table, WatchKind, arity, int_arg, str_arg

MAX_TOPICS = 256
MAX_GROUPS_PER_TOPIC = 64
MAX_EVENT_BYTES = 32 * 1024  # one event's payload, msgpack-encoded
MAX_BATCH_EVENTS = 1000  # events in one publish command
DEFAULT_MAX_EVENTS = 1024
DEFAULT_MAX_BYTES = 256 * 1024
# Reserved by all topics at most: 256 Ki events and 64 MiB of payloads and keys. An
# event costs about 150 bytes of Python objects besides its payload, so the events of
# a replica take at most about 64 MiB + 256 Ki * 150 B = 100 MiB.
TOTAL_MAX_EVENTS = MAX_TOPICS * DEFAULT_MAX_EVENTS
TOTAL_MAX_BYTES = MAX_TOPICS * DEFAULT_MAX_BYTES
MIN_MAX_BYTES = 1024
MAX_AGE_MS = 365 * 24 * 3600 * 1000
# what one EVENTS_READ answers at most (at least one event, whatever its size)
READ_MAX_EVENTS = 1000
READ_MAX_BYTES = 4 * 1024 * 1024
# the wake-up history: subscribers re-read by offset, so a short one is enough
HISTORY_MAX_ENTRIES = 1024
HISTORY_MAX_BYTES = 256 * 1024
MAX_STAMP_PHYSICAL = (1 << 48) - 1
MAX_STAMP_LOGICAL = (1 << 16) - 1
# retention by age (AgeDuty): marks per max_age, their least width, and how long an
# unanswered trim waits before it is proposed again
MARKS_PER_AGE = 32
MIN_MARK_SECONDS = 0.05
RETRY_SECONDS = 1.0

OK = encode_result(Status.OK)


class TopicChanged(NamedTuple):
    """A topic's end moved (a publish) or it was deleted (incarnation 0); wakes watches."""

    kind: str
    topic: str
    incarnation: int
    next_offset: int

    owner = property(lambda self: 0)
    deadline = property(lambda self: None)


class Topic:
    __slots__ = ("incarnation", "first", "events", "bytes", "max_events", "max_bytes", "max_age_ms", "groups")

    def __init__(self, incarnation: int, max_events: int, max_bytes: int, max_age_ms: int) -> None:
        self.incarnation = incarnation
        self.first = 0  # offset of the oldest retained event (= how many were trimmed)
        # (payload, key, stamp physical_ms, stamp logical) from ``first`` on: a flat tuple
        # is the smallest form (see TOTAL_MAX_EVENTS)
        self.events: deque[tuple[bytes, str | None, int, int]] = deque()
        self.bytes = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms  # 0: no limit by age
        self.groups: dict[str, int] = {}

    @property
    def next(self) -> int:
        """The offset the next event will get."""
        return self.first + len(self.events)

    def trim_to(self, offset: int) -> None:
        """Drop every event below ``offset`` (at most up to the end)."""
        while self.events and self.first < offset:
            self.bytes -= event_bytes(self.events.popleft())
            self.first += 1

    def trim_to_limits(self) -> None:
        while self.events and (len(self.events) > self.max_events or self.bytes > self.max_bytes):
            self.bytes -= event_bytes(self.events.popleft())
            self.first += 1


def event_bytes(event: Any) -> int:
    """What an event counts against ``max_bytes``: its payload and key."""
    key = event[1]
    return len(event[0]) + (len(key.encode("utf-8")) if key is not None else 0)


def _topic_arg(value: Any) -> str:
    return str_arg(value, MAX_NAME_BYTES, "topic")


def _group_arg(value: Any) -> str:
    return str_arg(value, MAX_NAME_BYTES, "group")


def _event_arg(value: Any) -> tuple[bytes, str | None, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise Invalid("an event is [payload, key, stamp]")
    payload, key, stamp = value
    if not isinstance(payload, bytes) or len(payload) > MAX_EVENT_BYTES:
        raise Invalid(f"an event's payload must be bytes of at most {MAX_EVENT_BYTES}")
    if key is not None:
        str_arg(key, MAX_NAME_BYTES, "key")
    if (not isinstance(stamp, list) or len(stamp) != 2
            or any(type(part) is not int for part in stamp)
            or not 0 <= stamp[0] <= MAX_STAMP_PHYSICAL or not 0 <= stamp[1] <= MAX_STAMP_LOGICAL):
        raise Invalid("an event's stamp is [physical_ms, logical]")
    return (payload, key, stamp[0], stamp[1])


def _optional_limit(value: Any, what: str, minimum: int, maximum: int, default: int) -> int:
    if value is None:
        return default
    value = int_arg(value, what, minimum)
    if value > maximum:
        raise Invalid(f"{what} must be at most {maximum}")
    return value


class EventsTable(Table):
    name = "events"

    def __init__(self) -> None:
        self.topics: dict[str, Topic] = {}
        self.reserved_events = 0
        self.reserved_bytes = 0
        # [revision, topic, [incarnation, next_offset] or None (deleted)]
        self.history = History(HISTORY_MAX_ENTRIES, HISTORY_MAX_BYTES)

    # -- the table interface ------------------------------------------------------------

    def commands(self) -> dict[int, Callable[[Context, int, list[Any]], bytes]]:
        return {Op.EVENTS_PUBLISH: self._publish_command, Op.EVENTS_COMMIT: self._commit_command,
                Op.EVENTS_CONFIGURE: self._configure_command, Op.EVENTS_DELETE: self._delete_command,
                Op.EVENTS_DELETE_GROUP: self._delete_group_command}

    def engine_commands(self) -> dict[int, Callable[[Context, list[Any]], bytes]]:
        return {Op.EVENTS_TRIM: self._trim_command}

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        return {Query.EVENTS_READ: self._read_query, Query.EVENTS_INFO: self._info_query}

    def watch_kinds(self) -> dict[str, WatchKind]:
        return {"events": WatchKind(history=lambda: self.history, match=lambda topic, name: name == topic,
                                    payload=lambda entry: entry[2])}

    def leader_duties(self) -> list[LeaderDuty]:
        return [AgeDuty()]

    # -- commands -------------------------------------------------------------------------

    def _publish_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (2,), "EVENTS_PUBLISH takes [topic, [[payload, key, stamp], ...]]")
        name = _topic_arg(args[0])
        if not isinstance(args[1], list) or not 1 <= len(args[1]) <= MAX_BATCH_EVENTS:
            raise Invalid(f"EVENTS_PUBLISH takes 1 to {MAX_BATCH_EVENTS} events")
        events = [_event_arg(item) for item in args[1]]
        size = sum(event_bytes(event) for event in events)
        topic = self.topics.get(name)
        max_events, max_bytes = (topic.max_events, topic.max_bytes) if topic else (DEFAULT_MAX_EVENTS,
                                                                                   DEFAULT_MAX_BYTES)
        if len(events) > max_events or size > max_bytes:
            return encode_result(Status.TOO_LARGE, f"a batch of {len(events)} events and {size} bytes is over "
                                                   f"the retention of topic {name!r} ({max_events} events, "
                                                   f"{max_bytes} bytes)")
        if topic is None:
            refusal = self._room_for(name, DEFAULT_MAX_EVENTS, DEFAULT_MAX_BYTES)
            if refusal is not None:
                return encode_result(Status.TOO_LARGE, refusal)
            topic = self._create(ctx, name, DEFAULT_MAX_EVENTS, DEFAULT_MAX_BYTES, 0)
        offset = topic.next
        topic.events.extend(events)
        topic.bytes += size
        topic.trim_to_limits()
        self._changed(ctx, name, topic)
        return encode_result(Status.OK, [offset, topic.incarnation])

    def _configure_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (4,), "EVENTS_CONFIGURE takes [topic, max_events, max_bytes, max_age_ms]")
        name = _topic_arg(args[0])
        max_events = _optional_limit(args[1], "max_events", 1, TOTAL_MAX_EVENTS, DEFAULT_MAX_EVENTS)
        max_bytes = _optional_limit(args[2], "max_bytes", MIN_MAX_BYTES, TOTAL_MAX_BYTES, DEFAULT_MAX_BYTES)
        max_age_ms = _optional_limit(args[3], "max_age_ms", 1, MAX_AGE_MS, 0)
        refusal = self._room_for(name, max_events, max_bytes)
        if refusal is not None:
            return encode_result(Status.TOO_LARGE, refusal)
        topic = self.topics.get(name)
        if topic is None:
            topic = self._create(ctx, name, max_events, max_bytes, max_age_ms)
        else:
            self.reserved_events += max_events - topic.max_events
            self.reserved_bytes += max_bytes - topic.max_bytes
            topic.max_events, topic.max_bytes, topic.max_age_ms = max_events, max_bytes, max_age_ms
            topic.trim_to_limits()
        return encode_result(Status.OK, self.info(name))

    def _delete_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (1,), "EVENTS_DELETE takes [topic]")
        name = _topic_arg(args[0])
        topic = self.topics.pop(name, None)
        if topic is None:
            return encode_result(Status.NOT_FOUND)
        self.reserved_events -= topic.max_events
        self.reserved_bytes -= topic.max_bytes
        self.history.append([ctx.index, name, None])
        ctx.effects.append(TopicChanged("events_changed", name, 0, 0))
        return OK

    def _commit_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (4,), "EVENTS_COMMIT takes [topic, group, offset, incarnation or 0]")
        name, group = _topic_arg(args[0]), _group_arg(args[1])
        offset, incarnation = int_arg(args[2], "offset"), int_arg(args[3], "incarnation")
        topic = self.topics.get(name)
        if topic is None:
            return encode_result(Status.NOT_FOUND)
        if incarnation and incarnation != topic.incarnation:
            # the events this commit counted are gone with the topic they were read from
            return encode_result(Status.CONFLICT, [topic.incarnation])
        if offset > topic.next:
            raise Invalid(f"offset {offset} is past the end of topic {name!r} ({topic.next})")
        current = topic.groups.get(group)
        if current is None and len(topic.groups) >= MAX_GROUPS_PER_TOPIC:
            return encode_result(Status.TOO_LARGE, f"topic {name!r} has {MAX_GROUPS_PER_TOPIC} consumer groups, "
                                                   f"the limit")
        if current is None or offset > current:
            topic.groups[group] = offset
        return encode_result(Status.OK, [topic.groups[group]])

    def _delete_group_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (2,), "EVENTS_DELETE_GROUP takes [topic, group]")
        name, group = _topic_arg(args[0]), _group_arg(args[1])
        topic = self.topics.get(name)
        if topic is None or topic.groups.pop(group, None) is None:
            return encode_result(Status.NOT_FOUND)
        return OK

    def _trim_command(self, ctx: Context, args: list[Any]) -> bytes:
        arity(args, (3,), "EVENTS_TRIM takes [topic, incarnation, up_to]")
        name = _topic_arg(args[0])
        incarnation, up_to = int_arg(args[1], "incarnation"), int_arg(args[2], "up_to")
        topic = self.topics.get(name)
        if topic is None or topic.incarnation != incarnation or up_to <= topic.first:
            return encode_result(Status.STALE)
        topic.trim_to(up_to)
        return encode_result(Status.OK, [topic.first])

    def _room_for(self, name: str, max_events: int, max_bytes: int) -> str | None:
        """Why ``name`` may not have this retention (None if it may)."""
        topic = self.topics.get(name)
        if topic is None and len(self.topics) >= MAX_TOPICS:
            return f"there are {MAX_TOPICS} topics, the limit"
        events = self.reserved_events + max_events - (topic.max_events if topic else 0)
        size = self.reserved_bytes + max_bytes - (topic.max_bytes if topic else 0)
        if events > TOTAL_MAX_EVENTS or size > TOTAL_MAX_BYTES:
            return (f"the topics' retention would reserve {events} events and {size} bytes, over the limit of "
                    f"{TOTAL_MAX_EVENTS} events and {TOTAL_MAX_BYTES} bytes for all topics")
        return None

    def _create(self, ctx: Context, name: str, max_events: int, max_bytes: int, max_age_ms: int) -> Topic:
        topic = self.topics[name] = Topic(ctx.index, max_events, max_bytes, max_age_ms)
        self.reserved_events += max_events
        self.reserved_bytes += max_bytes
        return topic

    def _changed(self, ctx: Context, name: str, topic: Topic) -> None:
        self.history.append([ctx.index, name, [topic.incarnation, topic.next]])
        ctx.effects.append(TopicChanged("events_changed", name, topic.incarnation, topic.next))

    # -- queries --------------------------------------------------------------------------

    def _read_query(self, args: list[Any], reader: Reader) -> bytes:
        """[incarnation, first, next, events from ``from_offset``]: no events if
        ``from_offset`` is below ``first`` (trimmed) or at the end; [0, 0, 0, []] for a
        topic that does not exist."""
        arity(args, (4,), "EVENTS_READ takes [topic, from_offset, max_events, max_bytes]")
        name = _topic_arg(args[0])
        offset = int_arg(args[1], "from_offset")
        max_events = min(int_arg(args[2], "max_events", 1), READ_MAX_EVENTS)
        max_bytes = min(int_arg(args[3], "max_bytes", 1), READ_MAX_BYTES)
        topic = self.topics.get(name)
        if topic is None:
            return encode_result(Status.OK, [0, 0, 0, []])
        events = []
        if topic.first <= offset < topic.next:
            size = 0
            for event in islice(topic.events, offset - topic.first, offset - topic.first + max_events):
                size += event_bytes(event)
                if events and size > max_bytes:
                    break
                events.append([event[0], event[1], [event[2], event[3]]])
        return encode_result(Status.OK, [topic.incarnation, topic.first, topic.next, events])

    def _info_query(self, args: list[Any], reader: Reader) -> bytes:
        arity(args, (1,), "EVENTS_INFO takes [topic]")
        info = self.info(_topic_arg(args[0]))
        return encode_result(Status.NOT_FOUND) if info is None else encode_result(Status.OK, info)

    def info(self, name: str) -> list[Any] | None:
        """[incarnation, first, next, bytes, max_events, max_bytes, max_age_ms, [[group, offset], ...]]."""
        topic = self.topics.get(name)
        if topic is None:
            return None
        return [topic.incarnation, topic.first, topic.next, topic.bytes, topic.max_events, topic.max_bytes,
                topic.max_age_ms, [[group, offset] for group, offset in sorted(topic.groups.items())]]

    # -- snapshots ------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {"topics": [[name, t.incarnation, t.first, t.max_events, t.max_bytes, t.max_age_ms, list(t.events),
                            sorted([group, offset] for group, offset in t.groups.items())]
                           for name, t in sorted(self.topics.items())],
                "history": self.history.to_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.__init__()
        for name, incarnation, first, max_events, max_bytes, max_age_ms, events, groups in state["topics"]:
            topic = self._create(Context(incarnation, []), name, max_events, max_bytes, max_age_ms)
            topic.first = first
            topic.events = deque(tuple(event) for event in events)
            topic.bytes = sum(event_bytes(event) for event in events)
            topic.groups = {group: offset for group, offset in groups}
        self.history.load_state(state["history"])


class AgeDuty(LeaderDuty):
    """Retention by age, on the Raft leader's monotonic clock.

    While this node leads, on each tick it notes for every topic with a ``max_age`` a
    *mark* ``[end, seen_at, opened_at]``: every offset below ``end`` was applied here by
    ``seen_at``. New offsets seen within ``granularity`` (max_age / MARKS_PER_AGE, at
    least MIN_MARK_SECONDS) of a mark's opening join that mark and move its ``seen_at``
    later, so there are at most about MARKS_PER_AGE marks per topic. Once a mark's
    ``seen_at`` is ``max_age`` old it proposes EVENTS_TRIM up to its ``end``.

    The approximation, stated: an event stays at least ``max_age`` after the current
    leader first saw it applied (a new leader sees every retained event as new: its
    clock restarts, as every deadline's does), and goes at most one granularity plus a
    tick and a commit later. An event is never trimmed by age early.
    """

    def __init__(self) -> None:
        self._marks: dict[tuple[str, int], deque[list[Any]]] = {}  # [end, seen_at, opened_at]
        self._proposed: dict[tuple[str, int], list[Any]] = {}  # key -> [up_to, proposed_at]

    def became_leader(self, machine: Any, monotonic_now: float, wall_now: float) -> None:
        self._marks.clear()
        self._proposed.clear()

    def due(self, machine: Any, monotonic_now: float, wall_now: float) -> list[bytes]:
        now = monotonic_now
        table: EventsTable = machine.events
        commands: list[bytes] = []
        live = set()
        for name, topic in table.topics.items():
            if not topic.max_age_ms:
                continue
            key = (name, topic.incarnation)
            live.add(key)
            marks = self._marks.setdefault(key, deque())
            end = topic.next
            if end > (marks[-1][0] if marks else topic.first):
                granularity = max(topic.max_age_ms / 1000 / MARKS_PER_AGE, MIN_MARK_SECONDS)
                if marks and now - marks[-1][2] < granularity:
                    marks[-1][0], marks[-1][1] = end, now
                else:
                    marks.append([end, now, now])
            cutoff = now - topic.max_age_ms / 1000
            up_to = None
            while marks and marks[0][1] <= cutoff:
                up_to = marks.popleft()[0]
            proposed = self._proposed.get(key)
            if proposed is not None and topic.first >= proposed[0]:
                del self._proposed[key]  # applied
                proposed = None
            if up_to is not None and up_to > topic.first and (proposed is None or up_to > proposed[0]):
                self._proposed[key] = [up_to, now]
                commands.append(encode_command(Op.EVENTS_TRIM, 0, 0, 0, [name, topic.incarnation, up_to]))
            elif proposed is not None and now - proposed[1] >= RETRY_SECONDS:
                # no trim applied since (the proposal was lost with a forward, the queue
                # was full): propose it again
                proposed[1] = now
                commands.append(encode_command(Op.EVENTS_TRIM, 0, 0, 0, [name, topic.incarnation, proposed[0]]))
        if len(self._marks) != len(live):
            for key in [key for key in self._marks if key not in live]:
                del self._marks[key]
                self._proposed.pop(key, None)
        return commands

