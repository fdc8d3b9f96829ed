"""SIGSTOP that has taken effect when it returns.

``kill(pid, SIGSTOP)`` only queues the signal: each thread stops when it next returns to
user mode, so a thread busy on another core can still answer a request after ``kill``
has returned (measured here under CPU load: an engine applied and answered a write
0.25 ms after its SIGSTOP was sent). A fault that must be in force before the next step
(a "paused" member must not serve) waits until every thread shows state ``T``.
"""

from __future__ import annotations

import os
import signal
import time

STOP_WAIT = 5.0


def _thread_states(pid: int) -> list[str]:
    """One state letter per thread of ``pid``; empty if the process is gone."""
    states = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return states
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                # The command name (field 2) may hold spaces and ')', so split after the last ')'.
                states.append(stat.read().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            pass  # the thread ended meanwhile
    return states


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields after ')': state, ppid, pgrp, ...
            members.append(int(entry))
    return members


def is_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (or the process is gone or a zombie)."""
    return all(state in "TtZX" for state in _thread_states(pid))


def stop_and_wait(pid: int, *, group: bool = False, timeout: float = STOP_WAIT) -> None:
    """SIGSTOP ``pid`` (its whole process group with ``group=True``) and return once every
    thread of every signalled process is stopped; TimeoutError after ``timeout``."""
    try:
        if group:
            os.killpg(pid, signal.SIGSTOP)
        else:
            os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while True:
        targets = _group_members(pid) if group else [pid]
        if all(is_stopped(target) for target in targets):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{'group ' if group else ''}{pid} did not stop within {timeout}s of SIGSTOP")
        time.sleep(0.001)  # no event tells us a thread has stopped; this poll is bounded
