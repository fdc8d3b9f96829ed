"""``python -m bench.tasks [--jobs N] [--pool N] [--quick]``: Tasks figures (never pass/fail).

Starts a three-node LocalCluster on 127.0.0.1 with a worker on every node (a trivial
handler, ``pool`` threads each) and measures:
- throughput: ``jobs`` jobs submitted at once from all three nodes (6 threads each);
  jobs/s = jobs / (last result back - first submit), waited for on one node;
- submit→start latency: from just before ``submit()`` to the handler's first line
  (CLOCK_MONOTONIC is one clock for all processes on a host), p50/p99, both for that
  burst (queueing included) and for jobs submitted one at a time on an idle pool, from
  the Raft leader's node and from a follower's.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading
from typing import Any

from .stats import percentile

SESSION_TTL = 3.0


def _starts(cluster: Any) -> dict[int, float]:
    """job id -> monotonic time its handler started (first start only)."""
    starts: dict[int, float] = {}
    for node in cluster.nodes:
        for event in node.call("events", rpc_timeout=60):
            if event[1] == "task_start" and event[2] == "noop":
                job_id, start = event[3][0], event[3][5]
                starts[job_id] = min(start, starts.get(job_id, start))
    return starts


def _latencies(submitted: list[list[Any]], starts: dict[int, float]) -> list[float]:
    return sorted(starts[job_id] - sent for job_id, sent, *_ in submitted if job_id in starts)


def _line(label: str, latencies: list[float], extra: str = "") -> str:
    if not latencies:
        return f"{label:<48} no samples"
    return (f"{label:<48} p50 {percentile(latencies, 0.5) * 1000:7.2f} ms   p99 {percentile(latencies, 0.99) * 1000:7.2f} ms"
            f"   n={len(latencies)}{extra}")


def measure(jobs: int, pool: int, sequential: int) -> list[str]:
    from cluster import LocalCluster

    lines = []
    cluster = LocalCluster(size=3, session_ttl=SESSION_TTL, encrypted=False)
    try:
        cluster.start(timeout=30)
        for node in cluster.nodes:
            node.call("tasks_start", pool=pool, handlers=["noop"])
        leader = cluster.leader()
        follower = next(node for node in cluster.nodes if node is not leader)
        # warm-up: every worker takes a few jobs
        leader.call("task_submit_many", name="noop", count=30, threads=3)

        submitted: list[list[Any]] = []
        shares = [jobs // 3 + (i < jobs % 3) for i in range(3)]
        threads = [threading.Thread(target=lambda n=n, share=share: submitted.extend(
            n.call("task_submit_many", name="noop", count=share, threads=6, rpc_timeout=300)))
            for n, share in zip(cluster.nodes, shares)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        failed = [row for row in submitted if row[0] is None]
        ok = [row for row in submitted if row[0] is not None]
        results = follower.call("task_results", job_ids=[row[0] for row in ok], timeout=300, rpc_timeout=330)
        done_at = follower.call("monotonic")
        first_sent = min(sent for _, sent in ok)
        wall = done_at - first_sent
        done = sum(1 for _, state, _ in results if state == "done")
        lines.append(f"throughput: {done} jobs done of {jobs} submitted at once from 3 nodes x 6 threads, "
                     f"{3} workers x pool {pool}: {done / wall:.0f} jobs/s ({wall:.2f} s"
                     + (f"; {len(failed)} submits failed, first: {failed[0][1]}" if failed else "") + ")")
        burst_starts = _starts(cluster)
        lines.append(_line("submit->start, during that burst (queueing incl.)", _latencies(ok, burst_starts)))

        for where, node in (("leader", leader), ("follower", follower)):
            rows = node.call("bench_task_latency", count=sequential, rpc_timeout=120)
            starts = _starts(cluster)
            latencies = _latencies(rows, starts)
            round_trips = sorted(back - sent for _, sent, back in rows)
            lines.append(_line(f"submit->start, one at a time, from the {where}", latencies))
            lines.append(_line(f"submit->result back, one at a time, from the {where}", round_trips))
        status = leader.call("status")
        lines.append(f"leader {leader.address}, term {status['term']}, machine index {status['machine_index']}")
    finally:
        cluster.cleanup()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs in the throughput burst (default 2000)")
    parser.add_argument("--pool", type=int, default=4, help="threads per worker (default 4)")
    parser.add_argument("--sequential", type=int, default=300, help="one-at-a-time jobs per node (default 300)")
    parser.add_argument("--quick", action="store_true", help="300 burst jobs, 100 one at a time")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.sequential = 300, 100
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {load}")
    print(f"3-node LocalCluster on 127.0.0.1 (no password), engine in a helper process per node, session TTL "
          f"{SESSION_TTL:g} s; handler returns None at once; times from CLOCK_MONOTONIC across processes")
    for line in measure(args.jobs, args.pool, args.sequential):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
