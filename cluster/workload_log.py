"""What the demo workload's output lines (raftsync/workload.py) say about a member.

Pure text parsing over a member's log: the fault tests and the torture run use these as
pollable conditions ("every member reads its peers again", "someone else leads now").
"""

from __future__ import annotations

import re
from typing import Any

COUNTER_READ = re.compile(r"^workload (\S+?):\d+ #\d+ read demo/count/(\S+?):\d+ -> ok '(\d+)'", re.M)
STATUS = re.compile(r"^workload (\S+?):\d+ #\d+ status role=(\w+) leader=(\S+) term=(\d+)", re.M)
WRITE_OK = re.compile(r"^workload \S+ #\d+ (?:write|cas) .*-> ok version=", re.M)
LOCK_HELD = re.compile(r"^workload \S+ #\d+ lock \S+ -> held token=", re.M)
PUBLISHED = re.compile(r"^workload \S+ #\d+ publish \S+ .* -> ok offsets=", re.M)
CONSUMED = re.compile(r"^workload \S+ #\d+ consume \S+ -> \d+ events at offsets", re.M)
JOB_RAN = re.compile(r"^workload \S+ #\d+ task job=\d+ ", re.M)
JOB_FINISHED = re.compile(r"^workload \S+ #\d+ job \d+ -> (?:done|dead) ", re.M)


def peer_counters_seen(log_text: str) -> dict[str, int]:
    """{peer: highest counter value} this member read from other members."""
    seen: dict[str, int] = {}
    for reader, peer, value in COUNTER_READ.findall(log_text):
        if peer != reader:
            seen[peer] = max(seen.get(peer, 0), int(value))
    return seen


def last_status(log_text: str) -> tuple[str, str, str, str] | None:
    """(member, role, leader, term) of the member's latest status line."""
    found = STATUS.findall(log_text)
    return found[-1] if found else None


def log_marks(cluster: Any) -> dict[str, int]:
    """Where each member's log ends now: look only at what comes after."""
    return {name: len(s.log_text()) for name, s in cluster.services.items()}


def member_live(log_text: str) -> bool:
    """It committed a write, read another member's counter, acquired the lock, published
    and consumed events, ran a job on its worker and saw a job it submitted finish."""
    return (bool(WRITE_OK.search(log_text)) and bool(peer_counters_seen(log_text))
            and all(pattern.search(log_text) for pattern in (LOCK_HELD, PUBLISHED, CONSUMED, JOB_RAN, JOB_FINISHED)))


def missing_liveness(log_text: str) -> list[str]:
    """What ``member_live`` still waits for in this log text (for a failure message)."""
    checks = {"write": WRITE_OK.search(log_text), "peer read": peer_counters_seen(log_text),
              "lock": LOCK_HELD.search(log_text), "publish": PUBLISHED.search(log_text),
              "consume": CONSUMED.search(log_text), "job run": JOB_RAN.search(log_text),
              "job finished": JOB_FINISHED.search(log_text)}
    return [name for name, found in checks.items() if not found]


def all_live(cluster: Any, marks: dict[str, int]) -> bool:
    return all(member_live(s.log_text()[marks[name]:]) for name, s in cluster.services.items())


def leads_since(cluster: Any, members: list[str], marks: dict[str, int], not_member: str | None = None) -> bool:
    """One of ``members`` (other than ``not_member``) reported, since ``marks``, that it leads."""
    for name in members:
        status = last_status(cluster.services[name].log_text()[marks[name]:])
        if status and status[1] == "leader" and name != not_member:
            return True
    return False
