"""Turn the demo workload's JSON-lines histories (raftsync/workload.py) into checker input:
KV operations, lock and leader holds, published/consumed events and final topic reads,
job submits, task effects and final job statuses.

An operation is one invoke record and at most one completion record with the same
(process, pid, id); an invoke without completion (the member was killed, or the history
ended first) is ``unknown``. ``deaths`` maps (process, pid) to when that incarnation was
killed: a lock it held then was held until then, since it could act until it died.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .checker import (Consumed, Effect, Hold, JobFinal, KVResult, Op, Published, Submit, TopicRead, Violation,
                      check_events, check_holds, check_kv, check_leaders_per_term, check_tasks, check_write_counts)

Incarnation = tuple[str, int]


def read_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut short by SIGKILL
        except FileNotFoundError:
            continue
    records.sort(key=lambda r: r["t"])
    return records


def _pairs(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    invokes: dict[tuple[str, int, int], dict[str, Any]] = {}
    completions: dict[tuple[str, int, int], dict[str, Any]] = {}
    for record in records:
        key = (record["process"], record.get("pid", 0), record["id"])
        if record["type"] == "invoke":
            invokes[key] = record
        elif record["type"] in ("ok", "fail", "unknown"):
            completions[key] = record
    return [(invoke, completions.get(key)) for key, invoke in invokes.items()]


def kv_ops(records: list[dict[str, Any]], final_only: bool = False) -> list[Op]:
    """The KV operations; ``final_only``: the reads a workload took on its way out."""
    ops = []
    for invoke, completion in _pairs(records):
        if invoke.get("f") not in ("read", "write", "cas") or (final_only and not invoke.get("final")):
            continue
        outcome = completion["type"] if completion is not None else "unknown"
        ops.append(Op(process=f"{invoke['process']}#{invoke.get('pid', 0)}", f=invoke["f"], key=invoke["key"],
                      invoke=invoke["t"], complete=completion["t"] if outcome != "unknown" else None,
                      outcome=outcome, value=invoke.get("value"), expected=invoke.get("if_version"),
                      result=(completion or {}).get("result") if outcome == "ok" else None,
                      id=invoke["id"]))
    return ops


def holds(records: list[dict[str, Any]], deaths: Mapping[Incarnation, float] | None = None) -> list[Hold]:
    """Lock holds and election leaderships (name = lock name or group)."""
    deaths = deaths or {}
    starts = []
    ends: dict[tuple[str, int, str, int], dict[str, float]] = {}
    for invoke, completion in _pairs(records):
        incarnation = (invoke["process"], invoke.get("pid", 0))
        f = invoke.get("f")
        name = invoke.get("lock") or invoke.get("group")
        if f in ("acquire", "campaign") and completion is not None and completion["type"] == "ok":
            token = completion["result"]["token" if f == "acquire" else "term"]
            starts.append((incarnation, name, token, completion["t"]))
        elif f in ("release", "resign"):
            token = invoke.get("token", invoke.get("term"))
            end = ends.setdefault((*incarnation, name, token), {})
            end["release"] = invoke["t"]
            if invoke.get("safe_until") is not None:
                end["safe_until"] = min(end.get("safe_until", invoke["safe_until"]), invoke["safe_until"])
    for record in records:
        if record["type"] == "event" and record.get("f") in ("lost", "revoked"):
            name = record.get("lock") or record.get("group")
            token = record.get("token", record.get("term"))
            end = ends.setdefault((record["process"], record.get("pid", 0), name, token), {})
            end.setdefault("lost", record["t"])
            if record.get("safe_until") is not None:
                end["safe_until"] = min(end.get("safe_until", record["safe_until"]), record["safe_until"])
    result = []
    for incarnation, name, token, start in starts:
        end = ends.get((*incarnation, name, token), {})
        release = end.get("release")
        if release is None and not end.get("lost"):
            # never released nor told it lost: it held until it died, or still holds
            release = deaths.get(incarnation)
        result.append(Hold(f"{incarnation[0]}#{incarnation[1]}", name, token, start, release, end.get("lost"),
                           end.get("safe_until")))
    return result


def raft_leader_claims(records: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(\"raft\", term, member) for every status in which a member reports it leads."""
    return [("raft", r["term"], r["process"]) for r in records
            if r["type"] == "event" and r.get("f") == "raft" and r.get("role") == "leader"]


def election_claims(records: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    return [(invoke["group"], completion["result"]["term"], invoke["process"])
            for invoke, completion in _pairs(records)
            if invoke.get("f") == "campaign" and completion is not None and completion["type"] == "ok"]


def _process(record: dict[str, Any]) -> str:
    return f"{record['process']}#{record.get('pid', 0)}"


def published_events(records: list[dict[str, Any]]) -> list[Published]:
    """One entry per event id of every publish. A failed ``publish_many`` whose first
    chunks were published reports their offsets: those events are acknowledged."""
    events = []
    for invoke, completion in _pairs(records):
        if invoke.get("f") != "publish":
            continue
        outcome = completion["type"] if completion is not None else "unknown"
        offsets = list(((completion or {}).get("result") or {}).get("offsets") or [])
        for i, event_id in enumerate(invoke["ids"]):
            if i < len(offsets):
                events.append(Published(event_id, _process(invoke), invoke["t"], completion["t"], "ok", offsets[i]))
            else:
                events.append(Published(event_id, _process(invoke), invoke["t"], None,
                                        "unknown" if outcome == "ok" else outcome))
    return events


def topic_reads(records: list[dict[str, Any]]) -> list[TopicRead]:
    reads = []
    for invoke, completion in _pairs(records):
        if invoke.get("f") == "events-final" and completion is not None and completion["type"] == "ok":
            result = completion["result"]
            reads.append(TopicRead(_process(invoke), invoke["t"], result["first"], result["next"],
                                   tuple((offset, event_id) for offset, event_id in result["events"]),
                                   bool(result.get("missing"))))
    return reads


def consumed_events(records: list[dict[str, Any]]) -> list[Consumed]:
    """Each subscription with what it delivered (records of the same process, pid and ``sub``)."""
    subscriptions: dict[tuple[str, int, int], dict[str, Any]] = {}
    for invoke, completion in _pairs(records):
        if invoke.get("f") == "subscribe" and completion is not None and completion["type"] == "ok":
            key = (invoke["process"], invoke.get("pid", 0), invoke["sub"])
            subscriptions[key] = {"group": invoke["group"], "opened": completion["t"],
                                  "start": completion["result"].get("position"), "deliveries": []}
    for record in records:
        if record["type"] == "event" and record.get("f") == "consume":
            sub = subscriptions.get((record["process"], record.get("pid", 0), record["sub"]))
            if sub is not None:
                sub["deliveries"] += [(record["t"], offset, event_id) for offset, event_id in record["events"]]
    return [Consumed(f"{process}#{pid}", sub["group"], (process, pid, number), sub["opened"], sub["start"],
                     tuple(sub["deliveries"]))
            for (process, pid, number), sub in subscriptions.items()]


def task_submits(records: list[dict[str, Any]]) -> list[Submit]:
    submits = []
    for invoke, completion in _pairs(records):
        if invoke.get("f") != "submit":
            continue
        outcome = completion["type"] if completion is not None else "unknown"
        result = (completion or {}).get("result") or {} if outcome == "ok" else {}
        submits.append(Submit(_process(invoke), invoke["sid"], invoke.get("key"), invoke["t"],
                              completion["t"] if completion is not None else None, outcome, result.get("job"),
                              result.get("created")))
    return submits


def task_effects(records: list[dict[str, Any]]) -> list[Effect]:
    return [Effect(_process(r), r["job"], r["attempt"], r["token"], r.get("sid"), r["t"]) for r in records
            if r["type"] == "event" and r.get("f") == "task-effect"]


def job_finals(records: list[dict[str, Any]]) -> list[JobFinal]:
    finals = []
    for invoke, completion in _pairs(records):
        if invoke.get("f") == "job-final" and completion is not None and completion["type"] == "ok":
            result = completion["result"]
            finals.append(JobFinal(_process(invoke), invoke["job"], invoke["t"], result["state"],
                                   result.get("attempt", 0), result.get("max_attempts", 0), result.get("token", 0),
                                   result.get("result")))
    return finals


@dataclass
class Report:
    kv: KVResult
    violations: list[Violation] = field(default_factory=list)
    holds: int = 0
    events: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)   # operations: kv, events, tasks

    @property
    def ok(self) -> bool:
        return self.kv.verdict == "ok" and not self.violations

    @property
    def operations(self) -> int:
        return sum(self.counts.values())

    def explain(self) -> str:
        lines = [self.kv.explain(), f"{self.holds} lock/leader holds checked"]
        if self.events:
            e = self.events
            lines.append(f"events: {e['publishes']} published ({e['acknowledged']} acknowledged: {e['checked']} "
                         f"checked against final reads, {e['trimmed']} trimmed), {e['reads']} final reads, "
                         f"{e['deliveries']} deliveries")
        if self.tasks:
            t = self.tasks
            lines.append(f"tasks: {t['submits']} submits, {t['jobs']} acknowledged jobs ({t['checked']} with a final "
                         f"status, {t['unchecked']} without), {t['effects']} task effects")
        lines += [f"{v.kind}: {v.message}" for v in self.violations]
        return "\n".join(lines)


def check_workload(paths: Iterable[str | os.PathLike], deaths: Mapping[Incarnation, float] | None = None,
                   time_limit: float = 30.0) -> Report:
    records = read_records(paths)
    all_holds = holds(records, deaths)
    violations = check_holds(all_holds)
    violations += check_leaders_per_term(raft_leader_claims(records) + election_claims(records))
    ops = kv_ops(records)
    violations += check_write_counts(ops, kv_ops(records, final_only=True))
    published, reads, consumed = published_events(records), topic_reads(records), consumed_events(records)
    event_violations, event_stats = check_events(published, reads, consumed)
    submits, effects, finals = task_submits(records), task_effects(records), job_finals(records)
    task_violations, task_stats = check_tasks(submits, effects, finals)
    counts = {
        "kv": len(ops),
        "events": sum(1 for r in records if r["type"] == "invoke" and r.get("f") in ("publish", "subscribe",
                                                                                       "events-final"))
        + sum(1 for r in records if r["type"] == "event" and r.get("f") == "consume"),
        "tasks": len(submits) + len(effects) + sum(1 for r in records if r["type"] == "invoke"
                                                   and r.get("f") == "job-final"),
    }
    return Report(check_kv(ops, time_limit), violations + event_violations + task_violations, len(all_holds),
                  event_stats if published or reads else {}, task_stats if submits or effects else {}, counts)
