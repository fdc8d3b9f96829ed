"""Shared by the tests that run docker-compose.yml's services in network namespaces."""

import os
import re
import secrets
from pathlib import Path

import pytest

from cluster.netns import NETNS_DIR, NamespaceCluster, list_namespaces, missing_privileges

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


COUNTER_READ = re.compile(r"^workload (node\d):\d+ #\d+ read demo/count/(node\d):\d+ -> ok '(\d+)'", re.M)
STATUS = re.compile(r"^workload (node\d):\d+ #\d+ status role=(\w+) leader=(\S+) term=(\d+)", re.M)


def peer_counters_seen(log_text):
    """{peer: highest counter value} this member read from other members."""
    seen = {}
    for reader, peer, value in COUNTER_READ.findall(log_text):
        if peer != reader:
            seen[peer] = max(seen.get(peer, 0), int(value))
    return seen


def last_status(log_text):
    found = STATUS.findall(log_text)
    return found[-1] if found else None


WRITE_OK = re.compile(r"^workload \S+ #\d+ (?:write|cas) .*-> ok version=", re.M)
LOCK_HELD = re.compile(r"^workload \S+ #\d+ lock \S+ -> held token=", re.M)


def log_marks(cluster):
    """Where each member's log ends now: look only at what comes after."""
    return {name: len(s.log_text()) for name, s in cluster.services.items()}


def wait_all_live(cluster, marks, timeout=60):
    """Liveness after the faults stop: every member, since ``marks``, committed a write,
    read another member's counter (linearizable reads answer) and acquired the lock."""
    def live(name):
        text = cluster.services[name].log_text()[marks[name]:]
        return bool(WRITE_OK.search(text)) and bool(peer_counters_seen(text)) and bool(LOCK_HELD.search(text))

    def everyone():
        return all(live(name) for name in cluster.services)
    wait_for(everyone, timeout, "every member writing, reading its peers and taking the lock after the faults")


def wait_new_leader(cluster, members, old, marks, timeout=30):
    """Until one of ``members`` reports, after ``marks``, that it leads (and it is not ``old``)."""
    def found():
        for name in members:
            status = last_status(cluster.services[name].log_text()[marks[name]:])
            if status and status[1] == "leader" and name != old:
                return True
        return False
    wait_for(found, timeout, f"a new leader among {members}")
