"""The members' demo workload (raftsync/workload.py) on one in-process node, no faults:
what it records — KV, locks, elections, events, task jobs and their final reads — is
what the fault checker (cluster/checker.py) reads, and a correct run passes it."""

from __future__ import annotations

import io
import threading


from cluster.history import check_workload, job_finals, read_records, task_submits
from raftsync.workload import Workload
from tests.integration.util import wait_for


def test_workload_history_of_a_correct_run_passes_every_check(node, tmp_path):
    history = tmp_path / "history.jsonl"
    out = io.StringIO()
    stop = threading.Event()
    workload = Workload(node, stop, interval=0.01, history_path=str(history), out=out, seed=7)
    thread = threading.Thread(target=workload.run, daemon=True)
    thread.start()

    def did_everything():
        text = out.getvalue()
        return all(mark in text for mark in ("-> ok offsets=", " events at offsets ", "task job=", "-> done ",
                                             "-> dead ", "again -> ok job=", "lock demo/lock -> held"))
    try:
        wait_for(did_everything, 60, "the workload publishing, consuming, running, finishing and resubmitting jobs")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    report = check_workload([history], time_limit=30)
    assert report.ok, report.explain()
    assert report.events["acknowledged"] > 0 and report.events["checked"] == report.events["acknowledged"]
    assert report.events["deliveries"] > 0
    # every acknowledged job has a final status, finished (the workload waited for them)
    assert report.tasks["jobs"] > 0 and report.tasks["unchecked"] == 0, report.explain()
    records = read_records([history])
    assert {f.state for f in job_finals(records)} == {"done", "dead"}
    assert any(s.key is not None and s.created is False for s in task_submits(records)), "an idempotent resubmit"
