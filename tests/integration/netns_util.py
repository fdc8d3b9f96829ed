"""Shared by the tests that run docker-compose.yml's services in network namespaces."""

import os
import secrets
from pathlib import Path

import pytest

from cluster.netns import NETNS_DIR, NamespaceCluster, list_namespaces, missing_privileges
from cluster.workload_log import all_live, leads_since, missing_liveness

from .util import wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def require_namespaces():
    """Skip with the reason when this machine cannot run namespaced clusters; under CI=true
    that is a failure instead, so CI cannot go green by skipping the fault tests."""
    why = missing_privileges()
    if why is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the namespace tests cannot run: {why}")
    pytest.skip(f"namespace tests skipped: {why}")


def compose_cluster(base_dir, compose=COMPOSE, interval="0.1", faketime=False, **extra):
    """The compose file's services with a random password, the demo workload at a test
    rate and its histories under ``base_dir/history``."""
    base_dir = Path(base_dir)
    (base_dir / "history").mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)

    def environment(service):
        return {"RAFTSYNC_PASSWORD": password, "RAFTSYNC_DEMO_INTERVAL": interval,
                "RAFTSYNC_WORKLOAD_HISTORY": str(base_dir / "history" / f"{service.name}.jsonl"), **extra}

    return NamespaceCluster(compose, base_dir=base_dir, environment=environment, faketime=faketime)


def history_paths(cluster):
    return sorted((cluster.base_dir / "history").glob("*.jsonl"))


def leftovers(run_id):
    """What of run ``run_id`` still exists: namespaces and /etc/netns entries."""
    prefix = f"rs-{run_id}-"
    return ([n for n in list_namespaces() if n.startswith(prefix)]
            + [str(p) for p in NETNS_DIR.glob(f"{prefix}*")])


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_all_live(cluster, marks, timeout=60):
    """Liveness after the faults stop: every member, since ``marks``, committed a write,
    read another member's counter (linearizable reads answer), acquired the lock,
    published and consumed events, ran a job and saw one of its jobs finish."""
    try:
        wait_for(lambda: all_live(cluster, marks), timeout,
                 "every member writing, reading its peers, taking the lock, publishing and consuming events and "
                 "running jobs after the faults")
    except AssertionError as exc:
        missing = {name: missing_liveness(s.log_text()[marks[name]:]) for name, s in cluster.services.items()}
        raise AssertionError(f"{exc}; still missing: {missing}") from None


def wait_new_leader(cluster, members, old, marks, timeout=30):
    """Until one of ``members`` reports, after ``marks``, that it leads (and it is not ``old``)."""
    wait_for(lambda: leads_since(cluster, members, marks, old), timeout, f"a new leader among {members}")
