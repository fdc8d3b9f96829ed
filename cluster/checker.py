"""Checkers for histories recorded under faults. Pure functions: no I/O, no clocks but a deadline.

KV registers (``check_kv``): linearizability by the Wing–Gong search with Lowe's
memoization, as Porcupine does it: operations become call and return entries in time
order; the search linearizes a call whose model step accepts it, backtracks at a return
whose call was not linearized yet, and remembers every (set of linearized ops, state)
pair already explored. Registers are independent, so each key is checked on its own
(P-compositionality), which keeps each search small. Outcomes:

- ``ok``: it took effect (or, for a read, observed) at one instant between invoke and
  completion. A compare-and-set that found another version is ``ok`` with
  ``result["conflict"]``: it observed the register, so it is checked like a read.
- ``fail``: it certainly did not take effect; dropped.
- ``unknown``: a write or compare-and-set may have taken effect at any instant after its
  invoke, or never (its completion is +infinity, so the search may put it last, where
  it is harmless). An unknown read observed nothing; dropped.

Each search is bounded by a deadline and answers ``unknown`` instead of hanging.

The register model: state ``(value, version)``, initially ``(None, 0)`` (absent); each
applied write adds one to the version (raftsync's per-key version, with no deletes in
the workload). Reads that report a version are checked on value and version.

Locks (``check_holds``): a hold is the interval during which a client may act as the
lock's owner: from the completion of its acquire to the earliest of the start of its
release, the moment it was told the lease is lost, and the lease's safe-until as the
holder last knew it (a paused holder notices late; past safe-until it must not act,
which is what the fencing token is for). No two holds of a name overlap, and fencing
tokens strictly increase in grant order. An election's leaderships are holds too.

Leaders (``check_leaders_per_term``): at most one leader per term. Writes
(``check_write_counts``): since versions count applied writes, a final version below
the number of acknowledged writes means an acknowledged write was lost, and one above
acknowledged plus unknown writes means a write applied twice or out of nowhere.

Events (``check_events``): every acknowledged publish is present exactly once at the
offset it returned in every final read of the topic taken after it (unless retention
trimmed that offset), an unknown one at most once, a failed one never; final reads are
dense and agree where they overlap; a subscription delivers consecutive offsets, the
same events as the final reads, and a consumer group never skips an event.

Tasks (``check_tasks``): a submit (all submits of one idempotency key) makes at most one
job; no task effect (a handler running a claim) twice under one fencing token; every
acknowledged job completed or dead-lettered at its final status, a completed one with
its last claim's result and effect, a dead-lettered one after all its attempts.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping

INF = math.inf


@dataclass(frozen=True)
class Op:
    """One KV operation of a history. ``complete`` is None when the outcome is unknown."""

    process: str
    f: str                                  # "read" | "write" | "cas"
    key: str
    invoke: float
    complete: float | None
    outcome: str                            # "ok" | "fail" | "unknown"
    value: Any = None                       # write, cas: the value written
    expected: int | None = None             # cas: the version it requires
    result: Mapping[str, Any] | None = None  # read: value, version; write: version; cas: conflict, version
    id: int = 0

    def __post_init__(self) -> None:
        if self.f not in ("read", "write", "cas"):
            raise ValueError(f"unknown operation {self.f!r}")
        if self.outcome not in ("ok", "fail", "unknown"):
            raise ValueError(f"unknown outcome {self.outcome!r}")
        if self.outcome == "ok" and (self.complete is None or self.complete < self.invoke):
            raise ValueError(f"an ok operation needs a completion time after its invoke: {self}")
        if self.f == "read" and self.outcome == "ok" and (self.result is None or "value" not in self.result):
            raise ValueError(f"an ok read needs result['value']: {self}")
        if self.f == "cas" and self.expected is None:
            raise ValueError(f"a cas needs 'expected': {self}")

    def describe(self) -> str:
        end = "…" if self.complete is None else f"{self.complete:.6f}"
        what = {"read": "read", "write": f"write {self.value!r}",
                "cas": f"cas v{self.expected}->{self.value!r}"}[self.f]
        return f"[{self.invoke:.6f}, {end}] {self.process} {what} {self.key} -> {self.outcome} {dict(self.result or {})}"


State = tuple[Any, int]
INITIAL: State = (None, 0)


def register_step(state: State, op: Op) -> State | None:
    """The register after ``op`` applied at this point, or None if ``op`` cannot be here."""
    value, version = state
    result = op.result or {}
    if op.f == "read":
        if result.get("value") != value:
            return None
        if "version" in result and result["version"] != version:
            return None
        return state
    if op.f == "write":
        if op.outcome == "ok" and "version" in result and result["version"] != version + 1:
            return None
        return (op.value, version + 1)
    # cas
    if op.outcome == "ok" and result.get("conflict"):
        return state if version != op.expected else None
    if version != op.expected:
        return None if op.outcome == "ok" else state   # unknown: it ran here and found another version
    if op.outcome == "ok" and "version" in result and result["version"] != version + 1:
        return None
    return (op.value, version + 1)


# -- the search ----------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("op", "index", "is_call", "match", "prev", "next")

    def __init__(self, op: Op | None, index: int, is_call: bool) -> None:
        self.op, self.index, self.is_call = op, index, is_call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _entries(ops: list[Op]) -> _Entry:
    events = []
    for index, op in enumerate(ops):
        end = INF if op.complete is None else op.complete
        # at equal times calls come first: touching intervals count as concurrent
        events.append((op.invoke, 0, index))
        events.append((end, 1, index))
    events.sort()
    head = _Entry(None, -1, False)
    calls: dict[int, _Entry] = {}
    previous = head
    for _, kind, index in events:
        entry = _Entry(ops[index], index, kind == 0)
        if kind == 0:
            calls[index] = entry
        else:
            calls[index].match = entry
        previous.next, entry.prev = entry, previous
        previous = entry
    return head


def _lift(entry: _Entry) -> None:
    entry.prev.next = entry.next
    entry.next.prev = entry.prev
    match = entry.match
    match.prev.next = match.next
    if match.next is not None:
        match.next.prev = match.prev


def _unlift(entry: _Entry) -> None:
    match = entry.match
    match.prev.next = match
    if match.next is not None:
        match.next.prev = match
    entry.prev.next = entry
    entry.next.prev = entry


@dataclass
class SearchResult:
    verdict: str                   # "ok" | "violation" | "unknown"
    ops: list[Op]                  # the operations searched (fail and unknown reads dropped)
    longest: list[Op] = field(default_factory=list)   # the longest linearized prefix found
    steps: int = 0

    def explain(self) -> str:
        placed = {id(op) for op in self.longest}
        pending = sorted((op for op in self.ops if id(op) not in placed), key=lambda op: op.invoke)
        lines = [f"{self.verdict}: linearized at most {len(self.longest)} of {len(self.ops)} operations",
                 "  longest linearization:"]
        lines += [f"    {op.describe()}" for op in self.longest]
        lines.append("  then none of these fits:")
        lines += [f"    {op.describe()}" for op in pending[:10]]
        return "\n".join(lines)


def linearizable(ops: list[Op], step: Callable[[Any, Op], Any] = register_step, initial: Hashable = INITIAL,
                 deadline: float | None = None) -> SearchResult:
    """Wing–Gong search of one object's history; ``deadline`` (monotonic) makes it answer unknown."""
    ops = [op for op in ops if op.outcome == "ok" or (op.outcome == "unknown" and op.f != "read")]
    if len(ops) == 0:
        return SearchResult("ok", ops)
    head = _entries(ops)
    entry = head.next
    state = initial
    linearized = 0
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Entry, Hashable]] = []
    longest: list[Op] = []
    steps = 0
    while head.next is not None:
        steps += 1
        if deadline is not None and steps % 512 == 0 and time.monotonic() > deadline:
            return SearchResult("unknown", ops, longest, steps)
        if entry.is_call:
            new_state = step(state, entry.op)
            if new_state is not None:
                new_linearized = linearized | (1 << entry.index)
                if (new_linearized, new_state) not in seen:
                    seen.add((new_linearized, new_state))
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    _lift(entry)
                    if len(stack) > len(longest):
                        longest = [e.op for e, _ in stack]
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # a return whose call is not linearized yet: undo the last choice
            if not stack:
                return SearchResult("violation", ops, longest, steps)
            entry, state = stack.pop()
            linearized &= ~(1 << entry.index)
            _unlift(entry)
            entry = entry.next
    return SearchResult("ok", ops, longest, steps)


@dataclass
class KVResult:
    verdict: str                                        # "ok" | "violation" | "unknown"
    keys: dict[str, SearchResult]
    operations: int

    @property
    def violations(self) -> dict[str, SearchResult]:
        return {key: r for key, r in self.keys.items() if r.verdict == "violation"}

    @property
    def unknown(self) -> list[str]:
        return [key for key, r in self.keys.items() if r.verdict == "unknown"]

    def explain(self) -> str:
        if self.verdict == "ok":
            return f"linearizable: {self.operations} operations on {len(self.keys)} keys"
        parts = [f"{self.verdict}: {len(self.violations)} keys not linearizable, {len(self.unknown)} undecided"]
        parts += [f"key {key!r}: {result.explain()}" for key, result in self.violations.items()]
        return "\n".join(parts)


def check_kv(ops: Iterable[Op], time_limit: float = 30.0) -> KVResult:
    """Linearizability of a KV history, key by key, within ``time_limit`` seconds in all."""
    deadline = time.monotonic() + time_limit
    by_key: dict[str, list[Op]] = defaultdict(list)
    count = 0
    for op in ops:
        by_key[op.key].append(op)
        count += 1
    results = {key: linearizable(key_ops, deadline=deadline) for key, key_ops in sorted(by_key.items())}
    verdicts = {r.verdict for r in results.values()}
    verdict = "violation" if "violation" in verdicts else "unknown" if "unknown" in verdicts else "ok"
    return KVResult(verdict, results, count)


def shrink(ops: list[Op], time_limit: float = 10.0) -> list[Op]:
    """A smaller history of one key that is still not linearizable (greedy: drop each op
    whose removal keeps the violation). Returns ``ops`` itself if time runs out first."""
    deadline = time.monotonic() + time_limit
    current = list(ops)
    changed = True
    while changed:
        changed = False
        for op in list(current):
            if time.monotonic() > deadline:
                return current
            candidate = [o for o in current if o is not op]
            if linearizable(candidate, deadline=deadline).verdict == "violation":
                current = candidate
                changed = True
    return current


# -- locks, leaders, lost writes -------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """One client's holding of a lock (or leadership of an election group)."""

    process: str
    name: str
    token: int
    start: float                       # the acquire (campaign) completed
    release: float | None = None       # it began releasing (resigning)
    lost: float | None = None          # it was told the lease is lost (term revoked)
    safe_until: float | None = None    # the latest safe-until it knew

    @property
    def end(self) -> float:
        return min((t for t in (self.release, self.lost, self.safe_until) if t is not None), default=INF)

    def describe(self) -> str:
        return f"{self.process} {self.name} token={self.token} [{self.start:.6f}, {self.end:.6f}]"


@dataclass(frozen=True)
class Violation:
    kind: str            # "overlap" | "token-order" | "two-leaders" | "lost-write" | "phantom-write" |
    #                      events: "lost-event" | "duplicate-event" | "phantom-event" | "event-order" |
    #                      "event-gap" | "skipped-events" | tasks: "duplicate-job" | "phantom-job" |
    #                      "task-effect-twice" | "attempt-order" | "lost-job" | "unfinished-job" |
    #                      "done-without-effect" | "dead-early" | "effect-after-finish"
    message: str
    evidence: tuple[Any, ...] = ()


def check_holds(holds: Iterable[Hold]) -> list[Violation]:
    """No two holds of a name overlap; fencing tokens strictly increase in grant order."""
    violations = []
    by_name: dict[str, list[Hold]] = defaultdict(list)
    for hold in holds:
        if hold.end > hold.start:   # a grant that was already over when it arrived was never held
            by_name[hold.name].append(hold)
    for name, group in sorted(by_name.items()):
        group.sort(key=lambda h: (h.start, h.token))
        for i, first in enumerate(group):
            for second in group[i + 1:]:
                if second.start >= first.end:
                    break
                violations.append(Violation("overlap", f"{name}: {first.describe()} overlaps {second.describe()}",
                                            (first, second)))
        for first, second in zip(group, group[1:]):
            if second.token <= first.token:
                violations.append(Violation("token-order", f"{name}: token {second.token} granted after "
                                            f"{first.token}: {first.describe()} then {second.describe()}",
                                            (first, second)))
    return violations


def check_leaders_per_term(claims: Iterable[tuple[Any, int, str]]) -> list[Violation]:
    """``claims``: (group, term, leader) — e.g. a Raft member reporting it leads a term."""
    leaders: dict[tuple[Any, int], set[str]] = defaultdict(set)
    for group, term, leader in claims:
        leaders[(group, term)].add(leader)
    return [Violation("two-leaders", f"{group!r} term {term} has leaders {sorted(names)}", (group, term))
            for (group, term), names in sorted(leaders.items(), key=lambda item: (str(item[0][0]), item[0][1]))
            if len(names) > 1]


def check_write_counts(ops: Iterable[Op], final: Mapping[str, int] | Iterable[Op]) -> list[Violation]:
    """Every acknowledged write survives and nothing applies twice.

    ``final``: each key's version once writes stopped (a mapping), or reads (ok ``read``
    ops with a version) taken while writes may go on. A read's version must be at least
    the number of writes acknowledged before the read began, and at most the number of
    writes (acknowledged or unknown) begun before it ended.
    """
    writes: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.f == "read" or op.outcome == "fail" or (op.outcome == "ok" and (op.result or {}).get("conflict")):
            continue
        writes[op.key].append(op)
    if isinstance(final, Mapping):
        observations = [(key, version, INF, INF) for key, version in final.items()]
    else:
        observations = [(op.key, op.result["version"], op.invoke, op.complete) for op in final
                        if op.f == "read" and op.outcome == "ok" and "version" in (op.result or {})]
    violations = []
    for key, version, began, ended in sorted(observations, key=lambda o: (o[0], o[2])):
        acknowledged = sum(1 for op in writes[key] if op.outcome == "ok" and op.complete < began)
        possible = sum(1 for op in writes[key] if op.invoke < ended)
        if version < acknowledged:
            violations.append(Violation("lost-write", f"{key}: version {version} read, but {acknowledged} writes "
                                        "were acknowledged before the read began", (key, version)))
        elif version > possible:
            violations.append(Violation("phantom-write", f"{key}: version {version} read, but only {possible} "
                                        "writes had begun when the read ended", (key, version)))
    return violations


# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One event a workload published (``id``: its unique payload id). ``offset`` is the one
    the publish returned when ``outcome`` is ok; ``complete`` when it was acknowledged."""

    id: str
    process: str
    invoke: float
    complete: float | None
    outcome: str                 # "ok" | "fail" | "unknown"
    offset: int | None = None


@dataclass(frozen=True)
class TopicRead:
    """A final read of the whole topic: ``events`` [(offset, id)] from ``first`` on, and
    ``next`` the topic's end by the info taken first (``missing``: no such topic)."""

    process: str
    invoke: float
    first: int
    next: int
    events: tuple[tuple[int, Any], ...]
    missing: bool = False

    def at(self, offset: int) -> Any:
        return self.events[offset - self.first][1] if self.first <= offset < self.first + len(self.events) else None


@dataclass(frozen=True)
class Consumed:
    """One subscription of a consumer group: where it ``start``-ed (None: unknown), when it
    was ``opened``, and what it delivered, in delivery order: (time, offset, id)."""

    process: str
    group: str
    key: Any
    opened: float
    start: int | None
    deliveries: tuple[tuple[float, int, Any], ...] = ()


def check_events(published: Iterable[Published], reads: Iterable[TopicRead],
                 consumed: Iterable[Consumed] = ()) -> tuple[list[Violation], dict[str, int]]:
    """One topic's history: every acknowledged publish is in every final read taken after
    it, exactly once, at the offset it returned (unless that offset was trimmed: below the
    read's first); an unknown publish at most once; a failed one never; nothing that no one
    published; every final read dense (its events fill [first, next)) and all of them equal
    where they overlap; every subscription delivers consecutive offsets from where it
    started, the same events as the final reads; a consumer group's subscription starts no
    later than just after what the group delivered before (nothing skipped), its first at
    the oldest retained event. Returns (violations, counts)."""
    published = list(published)
    reads = [r for r in reads]
    consumed = list(consumed)
    violations: list[Violation] = []
    stats = {"publishes": len(published), "acknowledged": 0, "checked": 0, "trimmed": 0, "reads": len(reads),
             "deliveries": sum(len(c.deliveries) for c in consumed)}
    by_id = {p.id: p for p in published}
    topic: dict[int, tuple[Any, TopicRead]] = {}
    places: dict[Any, set[int]] = defaultdict(set)

    def where(read: TopicRead) -> str:
        return f"the final read of {read.process} at {read.invoke:.3f}"

    for read in reads:
        if read.missing:
            continue
        offsets = [offset for offset, _ in read.events]
        if offsets != list(range(read.first, read.first + len(offsets))) or read.first + len(offsets) != read.next:
            violations.append(Violation("event-gap", f"{where(read)}: offsets {_ranges(offsets)} do not fill "
                                        f"[{read.first}, {read.next})", (read.process, read.invoke)))
        counted: dict[Any, int] = defaultdict(int)
        for offset, event_id in read.events:
            counted[event_id] += 1
            places[event_id].add(offset)
            if offset in topic and topic[offset][0] != event_id:
                other = topic[offset][1]
                violations.append(Violation("event-order", f"offset {offset}: {where(read)} has {event_id!r}, "
                                            f"{where(other)} has {topic[offset][0]!r}", (offset,)))
            topic.setdefault(offset, (event_id, read))
        for event_id, count in counted.items():
            if count > 1 and event_id is not None:
                violations.append(Violation("duplicate-event", f"{where(read)}: {event_id!r} is there {count} times "
                                            f"(offsets {sorted(places[event_id])})", (event_id,)))
    for event_id, offsets in places.items():
        publish = by_id.get(event_id)
        if publish is None:
            violations.append(Violation("phantom-event", f"{event_id!r} at offsets {sorted(offsets)}: nobody "
                                        "published it", (event_id,)))
        elif publish.outcome == "fail":
            violations.append(Violation("phantom-event", f"{event_id!r} at offsets {sorted(offsets)}: its publish "
                                        "failed", (event_id,)))
        elif len(offsets) > 1:
            violations.append(Violation("duplicate-event", f"{event_id!r} at offsets {sorted(offsets)}",
                                        (event_id,)))
    for publish in published:
        if publish.outcome != "ok":
            continue
        stats["acknowledged"] += 1
        later = [r for r in reads if r.invoke > publish.complete]
        if not later:
            continue
        trimmed = True
        for read in later:
            if not read.missing and publish.offset < read.first:
                continue
            trimmed = False
            found = None if read.missing else read.at(publish.offset)
            if found != publish.id:
                seen = f"offset {publish.offset} holds {found!r}" if found is not None else \
                    ("the topic is gone" if read.missing else f"it ends at {read.first + len(read.events)}")
                violations.append(Violation("lost-event", f"{publish.id!r} acknowledged at offset {publish.offset} "
                                            f"({publish.process} at {publish.complete:.3f}), but in {where(read)} "
                                            f"{seen}", (publish.id,)))
                break
        stats["trimmed" if trimmed else "checked"] += 1
    # consumers
    oldest = min((r.first for r in reads if not r.missing), default=None)
    by_group: dict[str, list[Consumed]] = defaultdict(list)
    for sub in consumed:
        by_group[sub.group].append(sub)
        expected = sub.start
        for t, offset, event_id in sub.deliveries:
            if expected is not None and offset != expected:
                violations.append(Violation("event-order", f"{sub.process} group {sub.group!r} subscription "
                                            f"{sub.key}: offset {offset} delivered at {t:.3f} where {expected} was "
                                            "next", (sub.key, offset)))
            expected = offset + 1
            if offset in topic and topic[offset][0] != event_id:
                violations.append(Violation("event-order", f"{sub.process} consumed {event_id!r} at offset {offset}"
                                            f", {where(topic[offset][1])} has {topic[offset][0]!r} there",
                                            (sub.key, offset)))
            publish = by_id.get(event_id)
            if publish is None or publish.outcome == "fail":
                why = "nobody published it" if publish is None else "its publish failed"
                violations.append(Violation("phantom-event", f"{sub.process} consumed {event_id!r} at offset "
                                            f"{offset}: {why}", (sub.key, offset)))
    for group, subs in by_group.items():
        subs.sort(key=lambda s: s.opened)
        for i, sub in enumerate(subs):
            if sub.start is None:
                continue
            before = [offset for earlier in subs[:i] for t, offset, _ in earlier.deliveries if t < sub.opened]
            if before and sub.start > max(before) + 1:
                violations.append(Violation("skipped-events", f"group {group!r}: {sub.process} subscription "
                                            f"{sub.key} starts at {sub.start}, but the group had delivered only up "
                                            f"to {max(before)}", (group, sub.key)))
            elif not before and oldest is not None and sub.start > oldest:
                violations.append(Violation("skipped-events", f"group {group!r}: its first subscription ({sub.process}"
                                            f" {sub.key}) starts at {sub.start}, the oldest retained event is "
                                            f"{oldest}", (group, sub.key)))
    return violations, stats


def _ranges(offsets: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0..2, 5..6' (at most 5 ranges shown)."""
    parts: list[str] = []
    start = previous = None
    for offset in offsets + [None]:
        if start is not None and offset == previous + 1:
            previous = offset
            continue
        if start is not None:
            parts.append(f"{start}..{previous}" if previous != start else f"{start}")
        start = previous = offset
    return ", ".join(parts[:5]) + (", ..." if len(parts) > 5 else "") if parts else "none"


# -- tasks -----------------------------------------------------------------------------------------

FINISHED_JOB_STATES = ("done", "dead")


@dataclass(frozen=True)
class Submit:
    """One submit: ``sid`` identifies what was submitted (a keyed submit's sid is its key,
    the same for every resubmit); ``job`` and ``created`` when ``outcome`` is ok."""

    process: str
    sid: str
    key: str | None
    invoke: float
    complete: float | None
    outcome: str
    job: int | None = None
    created: bool | None = None


@dataclass(frozen=True)
class Effect:
    """A handler ran a claim: the task effect, recorded before anything else it does."""

    process: str
    job: int
    attempt: int
    token: int
    sid: str | None
    t: float


@dataclass(frozen=True)
class JobFinal:
    """A job's status read at the end (state "missing": the cluster did not know it)."""

    process: str
    job: int
    t: float
    state: str
    attempt: int = 0
    max_attempts: int = 0
    token: int = 0
    result: Mapping[str, Any] | None = None


def check_tasks(submits: Iterable[Submit], effects: Iterable[Effect],
                finals: Iterable[JobFinal]) -> tuple[list[Violation], dict[str, int]]:
    """Jobs: one submit (or every submit of one idempotency key) makes at most one job, and
    a resubmit with the key returns that job; only a submit that may have applied ever
    runs; no task effect applied twice under one fencing token, attempts increasing with
    the token; every acknowledged job, at its final status, completed or dead-lettered
    (the workload waits for outstanding jobs before reading it), known to the cluster, a
    completed one with the result of its last claim and that claim's effect, a
    dead-lettered one after all its attempts, and none run again after it finished.
    Returns (violations, counts)."""
    submits = list(submits)
    effects = list(effects)
    violations: list[Violation] = []
    by_sid: dict[str, list[Submit]] = defaultdict(list)
    for submit in submits:
        by_sid[submit.sid].append(submit)
    effects_by_sid: dict[Any, list[Effect]] = defaultdict(list)
    for effect in effects:
        effects_by_sid[effect.sid].append(effect)
    for sid, ops in sorted(by_sid.items()):
        acknowledged = [op for op in ops if op.outcome == "ok"]
        jobs = {op.job for op in acknowledged} | {e.job for e in effects_by_sid.get(sid, ())}
        if len(jobs) > 1:
            violations.append(Violation("duplicate-job", f"submit {sid!r} made jobs {sorted(jobs)}", (sid,)))
        created = [op for op in acknowledged if op.created]
        if len(created) > 1:
            violations.append(Violation("duplicate-job", f"{sid!r}: {len(created)} submits report they created "
                                        f"job(s) {sorted({op.job for op in created})}", (sid,)))
        for op in acknowledged:
            if not op.created and not any(other is not op and other.invoke < op.complete for other in ops):
                violations.append(Violation("phantom-job", f"{sid!r}: {op.process} found job {op.job} already "
                                            "there, but no earlier submit of that key", (sid, op.job)))
    for sid, runs in effects_by_sid.items():
        ops = by_sid.get(sid, [])
        if not ops or all(op.outcome == "fail" for op in ops):
            violations.append(Violation("phantom-job", f"job {runs[0].job} ran ({sid!r}) but "
                                        f"{'nobody submitted it' if not ops else 'its submit failed'}", (sid,)))
    by_claim: dict[tuple[int, int], list[Effect]] = defaultdict(list)
    by_job: dict[int, list[Effect]] = defaultdict(list)
    for effect in effects:
        by_claim[(effect.job, effect.token)].append(effect)
        by_job[effect.job].append(effect)
    for (job, token), runs in sorted(by_claim.items()):
        if len(runs) > 1:
            violations.append(Violation("task-effect-twice", f"job {job} ran {len(runs)} times under token {token}: "
                                        + ", ".join(f"{e.process} attempt {e.attempt} at {e.t:.3f}" for e in runs),
                                        (job, token)))
    for job, runs in sorted(by_job.items()):
        claims = sorted({(e.token, e.attempt) for e in runs})
        for (token_a, attempt_a), (token_b, attempt_b) in zip(claims, claims[1:]):
            if attempt_b <= attempt_a:
                violations.append(Violation("attempt-order", f"job {job}: attempt {attempt_b} (token {token_b}) "
                                            f"after attempt {attempt_a} (token {token_a})", (job,)))
    latest: dict[int, JobFinal] = {}
    for final in finals:
        if final.job not in latest or final.t > latest[final.job].t:
            latest[final.job] = final
    jobs = sorted({op.job for op in submits if op.outcome == "ok"})
    stats = {"submits": len(submits), "jobs": len(jobs), "checked": 0, "unchecked": 0, "effects": len(effects)}
    for job in jobs:
        final = latest.get(job)
        if final is None:
            stats["unchecked"] += 1
            continue
        stats["checked"] += 1
        runs = by_job.get(job, [])
        if final.state == "missing":
            violations.append(Violation("lost-job", f"job {job} was acknowledged, but the cluster does not know it "
                                        f"({final.process} at {final.t:.3f})", (job,)))
            continue
        if final.state not in FINISHED_JOB_STATES:
            violations.append(Violation("unfinished-job", f"job {job} is {final.state} (attempt {final.attempt}/"
                                        f"{final.max_attempts}) at its final status ({final.process} at "
                                        f"{final.t:.3f})", (job,)))
            continue
        if final.token == 0:
            pass  # evicted from the cluster's window of finished jobs: only its state is kept
        elif final.state == "done":
            if not any(e.token == final.token for e in runs):
                violations.append(Violation("done-without-effect", f"job {job} done under token {final.token}, but "
                                            f"no handler ran that claim (tokens run: {sorted(e.token for e in runs)})",
                                            (job,)))
            elif (final.result or {}).get("token") != final.token:
                violations.append(Violation("done-without-effect", f"job {job} done under token {final.token} with "
                                            f"the result of token {(final.result or {}).get('token')}", (job,)))
        elif final.attempt < final.max_attempts:
            violations.append(Violation("dead-early", f"job {job} dead-lettered after {final.attempt} of "
                                        f"{final.max_attempts} attempts", (job,)))
        late = [e for e in runs if final.token and e.token > final.token]
        if late:
            violations.append(Violation("effect-after-finish", f"job {job} finished under token {final.token}, then "
                                        f"ran under {sorted(e.token for e in late)}", (job,)))
        if final.token and len({e.token for e in runs}) > final.attempt:
            violations.append(Violation("attempt-order", f"job {job}: {len({e.token for e in runs})} claims ran, but "
                                        f"the cluster counts {final.attempt} attempts", (job,)))
    return violations, stats
