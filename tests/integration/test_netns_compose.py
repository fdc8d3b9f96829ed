"""docker-compose.yml's members, each in its own network namespace, through cluster/netns.py.

The runner needs root and iproute2; elsewhere these tests skip saying why (under CI=true
they fail instead). What they show: the compose file is a working group (members find
each other by service name, elect a leader, replicate, and their workload's history is
linearizable), and the runner leaves nothing behind, even when it is SIGKILLed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from cluster.history import check_workload, kv_ops, read_records
from cluster.netns import STATE_DIR, NamespaceCluster, list_namespaces, namespace_pids, sweep

from cluster.workload_log import last_status, member_live, peer_counters_seen

from .netns_util import ROOT, compose_cluster, history_paths, leftovers, pid_alive, require_namespaces
from .util import wait_for


@pytest.fixture(autouse=True)
def _namespaces():
    require_namespaces()


def _tiny_compose(tmp_path):
    """Two services that only print a ready line and sleep: for the runner's own mechanics."""
    path = tmp_path / "tiny-compose.yml"
    sleeper = "import time; print('raftsync node x ready', flush=True); time.sleep(300)"
    path.write_text(f"""
services:
  a: {{image: x, command: [python, -c, "{sleeper}"]}}
  b: {{image: x, command: [python, -c, "{sleeper}"]}}
""")
    return path


def test_compose_members_elect_a_leader_replicate_and_stay_linearizable(tmp_path):
    cluster = compose_cluster(tmp_path / "run")
    run_id = cluster.run_id
    try:
        cluster.start(timeout=60)
        services = cluster.services
        # each member (app and engine) lives in its own namespace, and names resolve there
        for name, service in services.items():
            assert service.pid in namespace_pids(service.namespace)
            assert len(namespace_pids(service.namespace)) >= 2, "app and engine"
            for other in services.values():
                found = cluster.exec(name, ["getent", "hosts", other.name]).stdout.split()
                assert found[:1] == [other.address]

        def everyone_reads_everyone():
            return all(len(peer_counters_seen(s.log_text())) == 2 for s in services.values())
        wait_for(everyone_reads_everyone, 60, "each member reading both other members' counters")

        def one_leader_agreed():
            statuses = {name: last_status(s.log_text()) for name, s in services.items()}
            if None in statuses.values():
                return False
            leaders = {status[2] for status in statuses.values()}
            roles = sorted(status[1] for status in statuses.values())
            return len(leaders) == 1 and roles == ["follower", "follower", "leader"]
        wait_for(one_leader_agreed, 30, "all three members reporting the same Raft leader")

        codes = cluster.stop_services()
        assert codes == {name: 0 for name in services}, [s.log_tail() for s in services.values()]
    finally:
        cluster.close()
    assert leftovers(run_id) == []
    assert not (STATE_DIR / f"{run_id}.json").exists()
    assert all(not pid_alive(s.pid) for s in cluster.services.values())

    report = check_workload(history_paths(cluster), time_limit=60)
    assert report.ok, report.explain()
    assert report.kv.operations >= 30
    assert report.holds >= 1
    final_reads = kv_ops(read_records(history_paths(cluster)), final_only=True)
    # on SIGTERM each member's workload reads every key once more; all three stop at
    # once, so the last to read may find no quorum left: a majority must have managed
    assert len({op.process for op in final_reads if op.outcome == "ok"}) >= 2


def test_sigkilled_runner_leftovers_are_swept_and_live_runs_kept(tmp_path):
    live = NamespaceCluster(_tiny_compose(tmp_path), base_dir=tmp_path / "live")
    live.start(timeout=30)
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        runner = subprocess.Popen([sys.executable, "-m", "cluster.netns", "up", "--quiet", "-f",
                                   str(_tiny_compose(tmp_path))], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        running = {}

        def read_running():
            for line in runner.stdout:
                if line.startswith("RUNNING "):
                    running.update(item.split("=", 1) for item in line.split()[1:])
                    return
        reader = threading.Thread(target=read_running, daemon=True)
        reader.start()
        reader.join(60)
        assert running, "the runner did not report RUNNING"
        run_id = running["run"]
        record = json.loads((STATE_DIR / f"{run_id}.json").read_text())
        service_pids = [pid for ns in record["namespaces"] for pid in namespace_pids(ns)]
        assert len(service_pids) == 2

        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        assert leftovers(run_id), "a SIGKILLed runner cannot clean up after itself"
        assert all(pid_alive(pid) for pid in service_pids)

        assert run_id in sweep()
        assert leftovers(run_id) == []
        assert not any(pid_alive(pid) for pid in service_pids)
        assert not (STATE_DIR / f"{run_id}.json").exists()
        assert not os.path.exists(running["base_dir"])

        # the live run's runner (this process) is alive: the sweep left it alone
        assert set(live.namespaces) <= set(list_namespaces())
        assert all(s.running for s in live.services.values())
    finally:
        live.close()
    assert leftovers(live.run_id) == []


@pytest.mark.parametrize("lose_volumes", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["volumes-kept", "volumes-lost"])
def test_whole_group_sigkilled_and_restarted_from_its_volumes_keeps_its_state(tmp_path, lose_volumes):
    """Every member's whole process group (app and engine) SIGKILLed at once, then started
    again from its volume: the Raft log survived, so versions continue and the combined
    history across both lives is linearizable. With the volumes wiped before the restart
    (a group that lost its state) the same check must fail: it can tell."""
    cluster = compose_cluster(tmp_path / "run")
    deaths = {}
    try:
        cluster.start(timeout=60)
        # every member also published, consumed and ran jobs: the events and tasks checks
        # have acknowledged work from before the kill to find (or miss) after it
        wait_for(lambda: all(len(peer_counters_seen(s.log_text())) == 2 and member_live(s.log_text())
                             for s in cluster.services.values()), 60, "replication before the kill")
        for name, service in cluster.services.items():
            pid = service.pid
            cluster.kill(name)
            deaths[(service.service.environment["RAFTSYNC_SELF"], pid)] = time.monotonic()
            assert namespace_pids(service.namespace) == [], "the engine died with its app"
        if lose_volumes:
            shutil.rmtree(cluster.base_dir / "volumes")
        for name in cluster.services:
            cluster.start_service(name, wait=False)
        cluster.wait_ready(timeout=60)
        marks = {name: len(s.log_text()) for name, s in cluster.services.items()}
        wait_for(lambda: all(len(peer_counters_seen(s.log_text()[marks[n]:])) == 2
                             for n, s in cluster.services.items()), 60, "replication after the restart")
        assert set(cluster.stop_services().values()) == {0}
    finally:
        cluster.close()
    report = check_workload(history_paths(cluster), deaths=deaths, time_limit=60)
    if lose_volumes:
        assert not report.ok and report.kv.violations, report.explain()
        # the topic started again at offset 0: events acknowledged before are gone
        assert "lost-event" in {v.kind for v in report.violations}, report.explain()
    else:
        assert report.ok, report.explain()
        assert report.events["checked"] > 0 and report.tasks["checked"] > 0, report.explain()
