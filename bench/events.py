"""``python -m bench.events [--quick] [--events N]``: event stream figures (no pass/fail).

Starts a three-node raftsync LocalCluster on 127.0.0.1 (no password, as ``bench.run``)
and measures inside the nodes' app processes:
- publish: sequential ``publish`` calls of one ~110 B event, from the Raft leader's node
  and from a follower's; per-call latency and events/s;
- publish_many: sequential calls of 10 and of 100 such events (one command each);
  per-call latency and events/s, to compare with one event per call;
- 4 publishers at once in one app (one event per call): events/s;
- publish -> consume: a subscriber on one node, a sequential publisher on another; for
  each event the time from the start of its ``publish`` call to its delivery by
  ``Subscription.get`` (time.monotonic on one host), p50/p99;
- consume: a subscriber taking a backlog (batches of up to 1000 events): events/s.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from .run import describe_machine
from .stats import Summary

SESSION_TTL = 3.0


def _row(label: str, result: dict[str, Any], events_per_call: int = 1) -> list[str]:
    summary = Summary.from_loop(result)
    if summary.count == 0:
        return [label, f"- ({result.get('first_error') or 'nothing measured'})", "0", "-"]
    failed = f" ({summary.failures} failed)" if summary.failures else ""
    events = result.get("events", summary.count * events_per_call)
    rate = events / result["elapsed"] if result["elapsed"] > 0 else float("nan")
    return [label, f"{summary.p50_ms:.2f} / {summary.p99_ms:.2f}{failed}", str(summary.count), f"{rate:,.0f}"]


def _table(rows: list[list[str]]) -> str:
    lines = [["measurement", "p50 / p99 ms", "n", "events/s"], *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    fmt = lambda line: " | ".join(c.rjust(w) if i >= 2 else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(line, widths))).rstrip()
    return "\n".join([fmt(lines[0]), "-+-".join("-" * w for w in widths), *(fmt(line) for line in lines[1:])])


def measure(events: int, max_seconds: float) -> list[list[str]]:
    from cluster import LocalCluster

    cluster = LocalCluster(size=3, session_ttl=SESSION_TTL, encrypted=False)
    rows: list[list[str]] = []
    try:
        cluster.start(timeout=30)
        leader = cluster.leader()
        follower, other = [node for node in cluster.nodes if node is not leader]
        rpc = max_seconds + 60.0

        def publish(node, topic, count, **args) -> dict[str, Any]:
            # room for every event of a measurement (a consumer must not fall behind the retention)
            node.call("events_configure", topic=topic, max_events=16384, max_bytes=4 << 20)
            return node.call("bench_events_publish", rpc_timeout=rpc, topic=topic, count=count,
                             max_seconds=max_seconds, **args)

        def progress(row: list[str]) -> None:
            rows.append(row)
            print(f"  {' | '.join(row)}", file=sys.stderr, flush=True)

        for name, node in (("leader", leader), ("follower", follower)):
            progress(_row(f"publish, 1 event per call, from the {name}'s node",
                          publish(node, f"bench/single/{name}", events)))
        for batch in (10, 100):
            progress(_row(f"publish_many, {batch} events per call, from a follower's node",
                          publish(follower, f"bench/batch/{batch}", max(1, events // batch), batch=batch,
                                  warmup=5), batch))
        progress(_row("publish, 4 publishers at once in one app, from a follower's node",
                      publish(follower, "bench/concurrent", max(1, events // 4), threads=4)))

        # publish -> consume across nodes; a fresh topic each, warmed up first
        for label, publisher, consumer in (("publisher on a follower's node, consumer on the other's", follower,
                                            other),
                                           ("publisher on the leader's node, consumer on a follower's", leader,
                                            follower)):
            topic = f"bench/latency/{publisher.index}-{consumer.index}"
            publish(publisher, topic, 50, warmup=0)
            consumer.call("bench_events_consumer", name=topic, topic=topic, count=events, max_seconds=rpc - 30)
            publish(publisher, topic, events, warmup=0)
            result = consumer.call("bench_events_consumed", rpc_timeout=rpc, name=topic, timeout=30)
            progress(_row(f"publish -> consume, {label}", result))

        # a backlog taken by a subscriber as fast as it goes
        topic = "bench/backlog"
        backlog = min(4000, events * 2)
        consumer = other
        consumer.call("bench_events_consumer", name=topic, topic=topic, count=backlog, max_seconds=rpc - 30)
        publish(follower, topic, max(1, backlog // 100), batch=100, warmup=0)
        result = consumer.call("bench_events_consumed", rpc_timeout=rpc, name=topic, timeout=60)
        summary = Summary.from_loop(result)
        rate = summary.count / result["elapsed"] if result["elapsed"] > 0 else float("nan")
        progress(["consume a backlog published 100 per call (subscriber on another node)", "-",
                  str(summary.count), f"{rate:,.0f}"])
        return rows
    finally:
        cluster.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events",
                                     description="Print event stream figures (never pass/fail).")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 events per measurement")
    parser.add_argument("--events", type=int, default=None, help="events per measurement (default 2000)")
    args = parser.parse_args(argv)
    events = args.events or (200 if args.quick else 2000)
    if events < 1:
        parser.error("--events must be >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    before = describe_machine()
    started = time.monotonic()
    rows = measure(events, 10.0 if args.quick else 30.0)
    print(before)
    print(f"raftsync: 3-node LocalCluster on 127.0.0.1, engine in a helper process per node, no password, "
          f"session TTL {SESSION_TTL:g} s; payload {{'t': float, 'pad': 100 B}} (~115 B msgpack); "
          f"up to {events} calls per measurement, each bounded in time; latency per call, "
          f"timed inside the member's app process")
    print()
    print(_table(rows))
    print(f"run time {time.monotonic() - started:.1f} s; {describe_machine().split(', ')[-1]} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
