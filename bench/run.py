"""``python -m bench.run [--quick] [--ops N] [--encrypted]``: print figures.

Starts a three-node raftsync LocalCluster on 127.0.0.1 and measures, inside one node's
app process at a time: sequential 100 B writes, lock cycles, linearizable and local
reads (each from the Raft leader's node and from a follower's node), then lock cycles
from the other two nodes while the leader's app burns CPU. Stops it, then does the
same against a three-process bare PySyncObj 0.3.17 cluster (``bench.bare_pysyncobj``),
and prints one table with both and the targets from PEERS.md. No pass/fail.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
from importlib import metadata
from typing import Callable

from .bare_pysyncobj import BarePySyncObjCluster
from .report import render_notes, render_table
from .workloads import Settings, SuiteResult, run_suite

DEFAULT_OPS = 2000
QUICK_OPS = 200
SESSION_TTL = 3.0  # as in PEERS.md: lock TTL / session = 3 s everywhere


def settings_from(args: argparse.Namespace) -> Settings:
    ops = args.ops if args.ops is not None else (QUICK_OPS if args.quick else DEFAULT_OPS)
    if args.quick:
        return Settings(ops=ops, warmup=10, max_seconds=10.0, busy_ops=ops, busy_max_seconds=5.0)
    return Settings(ops=ops, warmup=50, max_seconds=30.0, busy_ops=ops, busy_max_seconds=15.0)


def measure_raftsync(settings: Settings, encrypted: bool) -> SuiteResult:
    """The suite on a raftsync LocalCluster (3 nodes, engine in a helper process)."""
    from cluster import LocalCluster

    cluster = LocalCluster(size=3, session_ttl=SESSION_TTL, encrypted=encrypted)
    try:
        cluster.start(timeout=30)
        leader = cluster.leader()
        followers = [node for node in cluster.nodes if node is not leader]
        return run_suite("raftsync", leader, followers, settings)
    finally:
        cluster.cleanup()


def measure_bare(settings: Settings, password: str | None) -> SuiteResult:
    """The suite on three bare PySyncObj member processes."""
    with BarePySyncObjCluster(size=3, password=password) as bare:
        leader = bare.leader()
        followers = [node for node in bare.nodes if node is not leader]
        return run_suite("bare PySyncObj", leader, followers, settings)


def guarded(system: str, measure: Callable[[], SuiteResult]) -> SuiteResult:
    """Run one system's suite; a failure becomes a note so the other system still prints."""
    print(f"{system}: measuring", file=sys.stderr, flush=True)
    try:
        return measure()
    except Exception as exc:
        return SuiteResult(system, error=f"{type(exc).__name__}: {exc}")


def describe_machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"pysyncobj {metadata.version('pysyncobj')}, load average {load}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Print latency figures (never pass/fail) for raftsync and bare PySyncObj, "
                    "each as three processes on 127.0.0.1.")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_OPS} ops, shorter time bounds")
    parser.add_argument("--ops", type=int, default=None,
                        help=f"timed ops per measurement (default {DEFAULT_OPS}, --quick {QUICK_OPS})")
    parser.add_argument("--encrypted", action="store_true",
                        help="give both clusters a password (PySyncObj's encrypted transport, required off "
                             "loopback); by default both run unencrypted on loopback, as PEERS.md measured")
    args = parser.parse_args(argv)
    if args.ops is not None and args.ops < 1:
        parser.error("--ops must be >= 1")
    settings = settings_from(args)
    # A SIGTERM must still run the finally blocks that stop the clusters.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    machine_before = describe_machine()
    raftsync = guarded("raftsync", lambda: measure_raftsync(settings, args.encrypted))
    bare = guarded("bare PySyncObj", lambda: measure_bare(settings, "bench" if args.encrypted else None))
    transport = "password (encrypted transport)" if args.encrypted else "no password"
    elapsed = time.monotonic() - started

    print(machine_before)
    print(f"settings: {settings.ops} timed ops per measurement after {settings.warmup} warm-up ops, "
          f"each bounded to {settings.max_seconds:.0f} s; busy-app rows {settings.busy_ops} ops / "
          f"{settings.busy_max_seconds:.0f} s while the leader's app runs {settings.burn_threads} "
          f"pure-Python CPU threads; one client, sequential, timed inside the member's app process")
    print(f"raftsync: 3-node LocalCluster on 127.0.0.1, engine in a helper process per node, "
          f"session TTL {SESSION_TTL:g} s, {transport}, journal in a temp data dir; "
          f"leader was {raftsync.leader_address or '-'}")
    print(f"bare PySyncObj: 3 processes on 127.0.0.1, SyncObj with @replicated set/get/acquire/release, "
          f"appendEntriesUseBatch=False, other settings default, log in memory, "
          f"{transport}; "
          f"lock cycle = 2 sync commands, linearizable read = a sync get through the log, "
          f"local read = in-process dict lookup; leader was {bare.leader_address or '-'}")
    print()
    print(render_table(raftsync, bare))
    print()
    print("ratio = raftsync p50 / bare PySyncObj p50; ops/s = n / wall time of the timed loop")
    notes = render_notes(raftsync, bare)
    if notes:
        print(notes)
    print(f"run time {elapsed:.1f} s; {describe_machine().split(', ')[-1]} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
