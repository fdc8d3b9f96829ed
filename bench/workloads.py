"""The measurement suite, run identically against raftsync and bare PySyncObj.

A "member" is anything with ``address`` and ``call(op, rpc_timeout=..., **args)``:
``cluster.launcher.NodeProcess`` (raftsync's agent) or
``bench.bare_pysyncobj.BareNode``. Both serve the same bench ops, which time every
operation inside the member's own app process (``bench.timing.timed_loop``), so the
bench's control connection is never inside a measured interval.

Each measurement is one client issuing sequential synchronous operations. The busy-app
rows run while the leader's app process burns CPU in ``burn_threads`` pure-Python
threads, measuring lock cycles from each of the other two members in turn.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .stats import Summary


class Member(Protocol):
    address: str

    def call(self, op: str, rpc_timeout: float = 120.0, **args: Any) -> Any: ...


@dataclass(frozen=True)
class Settings:
    """How much to measure. Every loop is bounded both in count and in seconds."""

    ops: int                    # timed operations per measurement
    warmup: int                 # untimed operations before each measurement
    max_seconds: float          # time bound of each measurement
    busy_ops: int               # timed lock cycles per member while the leader's app burns CPU
    busy_max_seconds: float     # time bound of each busy-app measurement
    value_size: int = 100       # bytes per written value
    burn_threads: int = 4       # pure-Python CPU threads in the leader's app


@dataclass(frozen=True)
class Row:
    """One line of the table: a workload measured from one member."""

    workload: str   # "write", "lock", "read_linearizable", "read_local", "busy_lock"
    where: str      # "leader", "follower", "follower 1", "follower 2"

    @property
    def label(self) -> str:
        names = {
            "write": "sequential 100 B write",
            "lock": "lock cycle (acquire+release)",
            "read_linearizable": "linearizable read",
            "read_local": "local read",
            "busy_lock": "busy leader app: lock cycle",
        }
        return f"{names[self.workload]}, from {self.where}"


ROWS = [
    Row("write", "leader"), Row("write", "follower"),
    Row("lock", "leader"), Row("lock", "follower"),
    Row("read_linearizable", "leader"), Row("read_linearizable", "follower"),
    Row("read_local", "leader"), Row("read_local", "follower"),
    Row("busy_lock", "follower 1"), Row("busy_lock", "follower 2"),
]


@dataclass
class SuiteResult:
    """What one system measured: a Summary per Row, plus notes worth printing."""

    system: str
    leader_address: str = ""
    summaries: dict[Row, Summary] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure(member: Member, op: str, max_seconds: float, **args: Any) -> Summary:
    loop_result = member.call(op, rpc_timeout=max_seconds + 60.0, max_seconds=max_seconds, **args)
    return Summary.from_loop(loop_result)


def run_suite(system: str, leader: Member, followers: list[Member], settings: Settings) -> SuiteResult:
    """Measure every Row on a running three-member cluster whose leader is ``leader``."""
    result = SuiteResult(system, leader_address=leader.address)
    by_role = {"leader": leader, "follower": followers[0]}
    common = {"count": settings.ops, "warmup": settings.warmup}

    def record(row: Row, summary: Summary) -> None:
        result.summaries[row] = summary
        _progress(f"  {system}: {row.label}: p50 {summary.p50_ms:.3f} ms, p99 {summary.p99_ms:.3f} ms, "
                  f"n={summary.count}" + (f", {summary.failures} failed" if summary.failures else ""))

    for where, member in by_role.items():
        record(Row("write", where), _measure(member, "bench_writes", settings.max_seconds,
                                             size=settings.value_size, key_prefix=f"bench/write/{where}/",
                                             **common))
    for where, member in by_role.items():
        record(Row("lock", where), _measure(member, "bench_lock_cycles", settings.max_seconds,
                                            name=f"bench/lock/{where}", **common))
    for consistency in ("linearizable", "local"):
        for where, member in by_role.items():
            record(Row(f"read_{consistency}", where),
                   _measure(member, "bench_reads", settings.max_seconds, consistency=consistency,
                            key=f"bench/read/{where}", size=settings.value_size, **common))

    # Last, because the burn goes on until the cluster is stopped.
    term_before = leader.call("status", rpc_timeout=10)["term"]
    burn_seconds = 2 * settings.busy_max_seconds + 30.0
    leader.call("burn_cpu", threads=settings.burn_threads, seconds=burn_seconds)
    time.sleep(0.5)  # let the burners get going
    for number, member in enumerate(followers, start=1):
        record(Row("busy_lock", f"follower {number}"),
               _measure(member, "bench_lock_cycles", settings.busy_max_seconds, count=settings.busy_ops,
                        warmup=settings.warmup, name=f"bench/busy-lock/{number}"))
    statuses = [m.call("status", rpc_timeout=30) for m in [leader, *followers]]
    terms = sorted({s["term"] for s in statuses})
    leaders = sorted({str(s.get("leader")) for s in statuses})
    if terms == [term_before] and leaders == [leader.address]:
        result.notes.append(f"busy leader app: no election (term {term_before} throughout, "
                            f"leader still {leader.address})")
    else:
        result.notes.append(f"busy leader app: term {term_before} before, now {terms}; "
                            f"leader(s) now seen: {leaders}")
    for row, summary in result.summaries.items():
        if summary.failures:
            result.notes.append(f"{row.label}: {summary.failures} failed ops; first: {summary.first_error}")
    return result
