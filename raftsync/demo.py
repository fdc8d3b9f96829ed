"""``raftsync demo``: a local cluster, one process per node, showing what the core does."""

from __future__ import annotations

import threading
import time

import click


def _say(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan") + text)


def _wait_until(condition, timeout: float) -> None:
    """Wait (bounded) until ``condition()`` holds; the demo then just reports what it sees."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def run_demo(size: int = 3, keep_dir: bool = False) -> int:
    from cluster import LocalCluster

    _say(f"starting {size} node processes on loopback (random password, own data dirs)")
    cluster = LocalCluster(size, session_ttl=3.0)
    started = time.monotonic()
    try:
        cluster.start()
        leader = cluster.leader()
        _say(f"cluster ready in {time.monotonic() - started:.2f}s; Raft leader is {leader.address}, "
             f"term {leader.call('status')['term']}")
        # Three roles; a smaller group plays several of them on one node (separate handles).
        first, second, third = (cluster.nodes[i % size] for i in range(3))
        a, b, c = (f"{n.index}" if size >= 3 else f"{n.index}/{role}"
                   for n, role in zip((first, second, third), "abc"))

        _say(f"nodes {a} and {b} campaign to lead the group 'scheduler'; every node observes it")
        for node in cluster.nodes:
            node.call("observe_start", name="demo", group="scheduler")
        term = first.call("leader_campaign", handle="e0", group="scheduler", candidate_id=f"node-{a}",
                          value=b"10.0.0.1:8080")
        _say(f"node {a} leads 'scheduler' with term {term}; others queue behind it")
        successor = {}
        waiting = threading.Thread(target=lambda: successor.setdefault("term", second.call(
            "leader_campaign", handle="e1", group="scheduler", candidate_id=f"node-{b}", timeout=30)))
        waiting.start()
        _wait_until(lambda: (first.call("lock_info", name="scheduler", table="leader") or [0, 0, []])[2], 10)
        first.call("leader_resign", handle="e0")
        waiting.join(30)
        _say(f"node {a} resigned; node {b} now leads with the larger term {successor['term']}")

        def observed() -> list:
            return [e[3] for e in third.call("events") if e[1] == "observed" and e[2] == "demo"]
        _wait_until(lambda: len(observed()) >= 3, 10)  # node c applies the changes a moment later
        history = observed()
        _say(f"node {c} observed every change in order: {[h[0] if h else None for h in history]}")

        _say(f"lock hand-off: node {a} holds 'report', nodes {b} and {c} wait (FIFO, woken by notification)")
        token = first.call("lock_acquire", handle="h0", name="report")
        _say(f"node {a} holds 'report' with fencing token {token}")
        grants = {}
        waiters = []
        for role, node in ((1, second), (2, third)):
            thread = threading.Thread(target=lambda r=role, n=node: grants.setdefault(r, n.call(
                "lock_acquire", handle=f"h{r}", name="report", timeout=30)))
            thread.start()
            waiters.append(thread)
            time.sleep(0.1)
        first.call("lock_release", handle="h0")
        waiters[0].join(30)
        _say(f"node {b} got it next with token {grants[1]} (> {token}); a storage server fencing on "
             f"tokens would now refuse node {a}'s")
        second.call("lock_release", handle="h1")
        waiters[1].join(30)
        _say(f"then node {c} with token {grants[2]}")
        third.call("lock_release", handle="h2")

        version, revision = first.call("kv_write", key="greeting", value=f"hello from node {a}".encode())
        _say(f"node {a} wrote greeting (version {version}, revision {revision})")
        value, version, revision = second.call("kv_read", key="greeting")
        _say(f"node {b} read it back linearizably: {value.decode()!r} (version {version}, revision {revision})")
        _show_events(first, second, a, b)
        _show_tasks(cluster)

        if size < 3:
            _say(f"a group of {size} has no spare member (its quorum is {size}): skipping the leader kill")
            _say("demo finished")
            return 0

        _say(f"killing the Raft leader {leader.address} (SIGKILL, app and engine)")
        killed_at = time.monotonic()
        leader.kill()
        survivor = next(n for n in cluster.nodes if n is not leader)
        survivor.call("kv_write", key="after-failover", value=b"still here", timeout=20)
        new_leader = cluster.leader()
        _say(f"first acknowledged write {time.monotonic() - killed_at:.2f}s after the kill; new leader "
             f"{new_leader.address}, term {new_leader.call('status')['term']}")
        for node in cluster.nodes:
            if node.running:
                value = node.call("kv_read", key="greeting")[0]
                _say(f"{node.address} still reads greeting = {value.decode()!r}")
        _say("restarting the killed node from its data dir")
        leader.start()
        leader.call("wait_ready", timeout=20)
        value = leader.call("kv_read", key="after-failover")[0]
        _say(f"restarted {leader.address} caught up: after-failover = {value.decode()!r}")
        _show_synchronized_time()
        _say("demo finished")
        return 0
    except Exception as exc:
        click.echo(click.style(f"demo failed: {exc}", fg="red"))
        for node in cluster.nodes:
            click.echo(f"--- log of {node.address} ---\n{node.log_tail()}")
        return 1
    finally:
        if keep_dir:
            cluster.stop()
            _say(f"data dirs and logs kept in {cluster.base_dir}")
        else:
            cluster.cleanup()


def _show_tasks(cluster) -> None:
    """Jobs submitted on one node run on the workers of the others (claims by notification)."""
    submitter, *others = cluster.nodes
    workers = others or [submitter]
    for node in workers:
        node.call("tasks_start", pool=2, handlers=["echo", "fail"])
    _say(f"tasks: workers (pool 2) on {', '.join(n.address for n in workers)}; node {submitter.address} "
         f"submits 6 jobs")
    submitted = [submitter.call("task_submit", name="echo", payload=f"job {i}")[0] for i in range(6)]
    for job_id, _, result in submitter.call("task_results", job_ids=submitted, timeout=30):
        _say(f"job {job_id} ({result['payload']!r}) ran on {result['node']} (attempt {result['attempt']}, "
             f"fencing token {result['token']})")
    again, created = workers[-1].call("task_submit", name="echo", payload="job 0", key="demo-once")
    same, created_again = submitter.call("task_submit", name="echo", payload="job 0", key="demo-once")
    _say(f"submitted twice with key 'demo-once' from two nodes: one job ({again} == {same}, "
         f"created {created}/{created_again})")
    failing = submitter.call("task_submit", name="fail", retries=2, backoff=0.1)[0]
    [[_, state, error]] = workers[0].call("task_results", job_ids=[failing], timeout=30)
    _say(f"a handler that always raises: retried with backoff, then {state} with {error!r}")


def _show_synchronized_time() -> None:
    """An NTP-bounded interval from loopback servers this demo starts (no internet here)."""
    from cluster.ntp import NtpResponder
    from raftsync import NtpClock

    responders = [NtpResponder(0.25, root_dispersion=0.002).start() for _ in range(3)]
    responders.append(NtpResponder(3600.0).start())
    try:
        _say("time: an NtpClock over four loopback NTP servers: three run 0.25 s ahead of this host, "
             "one is an hour off")
        with NtpClock([r.address for r in responders], timeout=1.0) as clock:
            earliest, latest = clock.now_interval()
            status = clock.status()
            dropped = ", ".join(s.server for s in status.servers if s.falseticker)
            _say(f"now_interval(): {earliest:%H:%M:%S.%f} .. {latest:%H:%M:%S.%f} UTC "
                 f"(+/-{status.error * 1000:.2f} ms), offset {status.offset:+.4f} s; falseticker dropped: {dropped}")
    finally:
        for responder in responders:
            responder.close()


def _show_events(publisher, consumer, a: str, b: str) -> None:
    """An event stream: published on one node, consumed in order on another by a group."""
    _say(f"events: node {b} subscribes to topic 'orders' as consumer group 'billing'")
    consumer.call("events_subscribe", name="demo", topic="orders", group="billing", ack="explicit")
    first = publisher.call("events_publish", topic="orders", payload={"order": 1, "item": "tea"})
    rest = publisher.call("events_publish_many", topic="orders",
                          payloads=[{"order": 2, "item": "cake"}, {"order": 3, "item": "jam"}])
    _say(f"node {a} published 3 events, committed at offsets {[first, *rest]}, each stamped with its "
         f"hybrid logical clock")
    for offset, payload, (physical_ms, logical) in consumer.call("events_consume", name="demo", count=3,
                                                                 timeout=10, stamps=True):
        _say(f"node {b} consumed offset {offset}: {payload} (stamp {physical_ms}.{logical})")
    consumer.call("events_ack", name="demo")
    groups = consumer.call("events_info", topic="orders")["groups"]
    _say(f"'billing' acknowledged them: its committed offset {groups['billing']} is kept in the cluster, "
         f"so a restarted consumer goes on from there")
