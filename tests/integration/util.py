"""Helpers shared by the integration tests."""

import time


def wait_for(predicate, timeout=15, what="condition"):
    """Poll a cluster-side condition (over the agent RPC) until it holds or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def events(node, kind, name):
    """The payloads of the agent events ``(kind, name, payload)`` recorded on ``node``."""
    return [e[3] for e in node.call("events") if e[1] == kind and e[2] == name]


def wait_queued(node, name, count, table="lock", timeout=10):
    """Wait until ``count`` waiters are queued on a lock (or, table="leader", an election)."""
    wait_for(lambda: len((node.call("lock_info", name=name, table=table) or [None, 0, []])[2]) >= count,
             timeout, f"{count} waiters on {name}")
