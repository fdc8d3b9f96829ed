"""Turn the demo workload's JSON-lines histories (raftsync/workload.py) into checker input.

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

from .checker import (Hold, KVResult, Op, Violation, check_holds, check_kv, check_leaders_per_term,
                      check_write_counts)

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


@dataclass
class Report:
    kv: KVResult
    violations: list[Violation] = field(default_factory=list)
    holds: int = 0

    @property
    def ok(self) -> bool:
        return self.kv.verdict == "ok" and not self.violations

    def explain(self) -> str:
        lines = [self.kv.explain(), f"{self.holds} lock/leader holds checked"]
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
    return Report(check_kv(ops, time_limit), violations, len(all_holds))
