"""``raftsync demo``: a local cluster, one process per node, showing what the core does."""

from __future__ import annotations

import time

import click


def _say(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan") + text)


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
        first, second = cluster.nodes[0], cluster.nodes[1]
        version, revision = first.call("kv_write", key="greeting", value=b"hello from node 0")
        _say(f"node 0 wrote greeting (version {version}, revision {revision})")
        value, version, revision = second.call("kv_read", key="greeting")
        _say(f"node 1 read it back linearizably: {value.decode()!r} (version {version}, revision {revision})")

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
