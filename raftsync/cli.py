"""The ``raftsync`` command line."""

from __future__ import annotations

import signal
import sys
import threading

import click


@click.group()
def main() -> None:
    """raftsync: coordination primitives on an embedded Raft group."""


@main.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9),
              help="Cluster size (voters), 1 to 9; odd sizes tolerate the most failures per member.")
@click.option("--keep-dir", is_flag=True, help="Keep the cluster's data dirs and logs afterwards.")
def demo(nodes: int, keep_dir: bool) -> None:
    """Start a local cluster (one process per node) and walk through the primitives."""
    from .demo import run_demo

    sys.exit(run_demo(nodes, keep_dir))


@main.group()
def node() -> None:
    """Run a member node."""


@node.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
def node_run(config_file: str | None) -> None:
    """Run a node configured from RAFTSYNC_* variables and/or a TOML file until SIGTERM."""
    from . import Node
    from .errors import ConfigError

    try:
        member = Node.from_env(config_file=config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with member:
        member.wait_ready(timeout=None)
        status = member.status()
        click.echo(f"raftsync node {member.address} ready: role={status['role']} leader={status['leader']}")
        demo = _start_demo_workload(member, stop)
        stop.wait()
        if demo is not None:
            from .workload import SHUTDOWN_BUDGET
            demo.join(SHUTDOWN_BUDGET + 5)  # its final reads and job statuses, bounded by the budget


def _start_demo_workload(member, stop: threading.Event):
    """RAFTSYNC_DEMO_WORKLOAD=1: also run the demo workload (raftsync/workload.py)."""
    from . import workload

    return workload.start(member, stop) if workload.enabled() else None
